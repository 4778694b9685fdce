"""The chorus on-disk format (v1). Imports numpy/zarr/fsspec, never torch."""

from chorus.storage._fingerprint import StreamHasher, checksum, fingerprint
from chorus.storage._manifest import FORMAT_VERSION, CorpusManifest, ShardCommit, TeacherManifest, TokenizerInfo
from chorus.storage._store import ArraySpec, Store
from chorus.storage._targets import (
    VALUE_CODECS,
    compact_samples,
    count_dtype,
    decode_samples,
    decode_topk,
    decode_values,
    encode_targets,
    encode_values,
    id_dtype,
    plain_values,
    stored_values,
    target_specs,
    value_params,
)

__all__ = [
    "FORMAT_VERSION",
    "VALUE_CODECS",
    "compact_samples",
    "count_dtype",
    "decode_samples",
    "decode_topk",
    "decode_values",
    "encode_targets",
    "encode_values",
    "id_dtype",
    "plain_values",
    "stored_values",
    "target_specs",
    "value_params",
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
