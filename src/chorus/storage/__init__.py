"""The chorus on-disk format (v1). Imports numpy/zarr/fsspec, never torch."""

from chorus.storage._fingerprint import StreamHasher, checksum, fingerprint
from chorus.storage._manifest import FORMAT_VERSION, CorpusManifest, ShardCommit, TeacherManifest, TokenizerInfo
from chorus.storage._store import ArraySpec, Store

__all__ = [
    "FORMAT_VERSION",
    "ArraySpec",
    "CorpusManifest",
    "ShardCommit",
    "Store",
    "StreamHasher",
    "TeacherManifest",
    "TokenizerInfo",
    "checksum",
    "fingerprint",
]
