"""A chorus store: a Zarr v3 group at a local path or any fsspec URL, whose unit of work is a shard of rows.

A *unit* is ``corpus`` or ``teachers/<name>``: a group of arrays whose first axis is the store's rows.
Each array is chunked by exactly one shard of rows (the rest of its axes whole), so a shard is one
object per array. A shard is written whole, then its commit record (row range and checksums of the
encoded chunk bytes) is created create-only. Readers and resumers trust only committed shards: with
zarr a chunk that was never written reads back as the fill value, so an uncommitted shard is an error
here, never zeros. Writers on disjoint shards never touch the same object.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.implementations.local
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from chorus import failpoints
from chorus.errors import ChorusError, IntegrityError, StillCreating
from chorus.store.fingerprint import checksum, matches
from chorus.store.fs import CREATING_KEY, MANIFEST_KEY, check_replaceable, clean_stale_tmp, reader_pool, split_url
from chorus.store.manifest import CorpusManifest, ShardCommit, TeacherManifest

COMMITS = "_commits"
INDEX_UNIT = "index"  # the corpus's row index (split and domain of every row): see _index.py


@dataclass(frozen=True)
class ArraySpec:
    """One array of a unit: per-row shape (after the row axis), dtype, compressor ("zstd", "blosc", "none") and
    its level (zstd 1-22; blosc 1-9, which blosc maps to zstd levels up to 22)."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    compressor: str = "zstd"
    level: int = 3
    serializer: str = "bytes"  # "bytes", or a registered zarr array->bytes codec (chorus.topk_ids, chorus.topk_fp16)


def _compressors(name: str, dtype: np.dtype, level: int = 3) -> Any:
    if name == "none":
        return None
    if name == "zstd":
        return ZstdCodec(level=level)
    if name == "blosc":  # byte-shuffle groups the high bytes of fp16/uint16 together before zstd
        return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle" if dtype.itemsize > 1 else "noshuffle",
                          typesize=dtype.itemsize)
    raise ChorusError(f"unknown compressor '{name}'; expected one of: zstd, blosc, none")


def _serializer(name: str, dtype: np.dtype) -> Any:
    if name == "bytes":
        return BytesCodec(endian="little") if dtype.itemsize > 1 else BytesCodec(endian=None)
    try:
        return zarr.registry.get_codec_class(name)()
    except KeyError:
        raise ChorusError(f"unknown serializer '{name}'; expected bytes or a registered zarr codec") from None


class Store:
    """Open with :meth:`Store.open`. Holds the fsspec filesystem (commit records, checksums, raw reads)
    and the zarr group (array creation and writes) over the same location."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str, group: zarr.Group) -> None:
        self.url, self.fs, self.root, self.group = url, fs, root.rstrip("/"), group
        self._arrays: dict[str, zarr.Array] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "Store":
        """``mode``: "r" an existing store, "a" create if missing, "w" create anew, replacing a chorus store
        (or an empty directory) that is there; anything else at ``url`` is refused, never deleted."""
        protocol, target = split_url(url)
        opts = dict(storage_options or {})
        try:
            if protocol == "file":
                fs, root = fsspec.filesystem("file"), target
                if mode == "r" and not fs.exists(f"{root}/zarr.json"):
                    raise ChorusError(f"no chorus store at '{url}'; run `chorus prepare --out {url}` first")
                if mode == "w" and fs.exists(root):
                    check_replaceable(fs, root, url)
                    fs.rm(root, recursive=True)
                fs.makedirs(root, exist_ok=True) if mode != "r" else None
                zstore = zarr.storage.LocalStore(root, read_only=(mode == "r"))
            else:
                fs, root = fsspec.core.url_to_fs(target, **opts)
                if mode == "r" and not fs.exists(f"{root}/zarr.json"):
                    raise ChorusError(f"no chorus store at '{url}'; run `chorus prepare --out {url}` first")
                if mode == "w" and fs.exists(root):
                    check_replaceable(fs, root, url)
                    fs.rm(root, recursive=True)
                zstore = zarr.storage.FsspecStore.from_url(target, storage_options=opts, read_only=(mode == "r"))
            group = zarr.open_group(store=zstore, mode="r" if mode == "r" else "a", zarr_format=3)
            if mode == "w":  # marks the group as chorus's from its first byte: a killed prepare stays replaceable
                group.attrs[CREATING_KEY] = True
        except ChorusError:
            raise
        except Exception as e:  # network, credentials, permissions: one line that names the store
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ChorusError(f"cannot open store '{url}': {msg}") from None
        return cls(url, fs, root, group)

    @staticmethod
    def exists(url: str, storage_options: dict | None = None) -> bool:
        protocol, target = split_url(url)
        if protocol == "file":
            return os.path.exists(os.path.join(target, "zarr.json"))
        fs, root = fsspec.core.url_to_fs(target, **(storage_options or {}))
        return fs.exists(f"{root.rstrip('/')}/zarr.json")

    # ------------------------------------------------------------------ manifests
    @property
    def manifest(self) -> CorpusManifest:
        data = self.group.attrs.get(MANIFEST_KEY)
        if data is None:
            raise ChorusError(f"'{self.url}' is a zarr group but not a chorus store (no '{MANIFEST_KEY}' attribute)")
        return CorpusManifest.from_dict(data)

    def write_manifest(self, manifest: CorpusManifest) -> None:
        self.group.attrs[MANIFEST_KEY] = manifest.to_dict()

    def teacher_names(self) -> list[str]:
        base = f"{self.root}/teachers"
        if not self.fs.exists(base):
            return []
        names = []
        for p in self.fs.ls(base, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if self.fs.exists(f"{base}/{name}/zarr.json"):
                names.append(name)
        return sorted(names)

    def teacher_manifest(self, name: str) -> TeacherManifest:
        if name not in self.teacher_names():
            known = ", ".join(self.teacher_names()) or "none"
            raise ChorusError(f"no teacher '{name}' in store '{self.url}' (teachers: {known}); run `chorus cache` first")
        try:
            attrs = json.loads(self.fs.cat_file(f"{self.root}/teachers/{name}/zarr.json")).get("attributes") or {}
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise ChorusError(f"teacher '{name}' in '{self.url}': its zarr.json is not valid JSON; rebuild it with "
                              f"`chorus cache --name {name} ... --overwrite`") from None
        if MANIFEST_KEY not in attrs:
            raise StillCreating(f"teacher '{name}' in '{self.url}' is still being created (no manifest yet); wait for "
                              f"`chorus cache`, or rerun it with --overwrite if it was killed")
        m = TeacherManifest.from_dict(attrs[MANIFEST_KEY])
        if m.name != name:
            raise ChorusError(f"teacher '{name}' in '{self.url}': its manifest names it {m.name!r}; rebuild it with "
                              f"`chorus cache --name {name} ... --overwrite`")
        return m

    def write_teacher_manifest(self, manifest: TeacherManifest) -> None:
        grp = self.group.require_group(f"teachers/{manifest.name}")
        grp.attrs[MANIFEST_KEY] = manifest.to_dict()

    def delete_unit(self, unit: str) -> None:
        path = f"{self.root}/{unit}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(unit + "/")}

    # ------------------------------------------------------------------ arrays
    def create_arrays(self, unit: str, specs: Iterable[ArraySpec], num_rows: int, rows_per_shard: int) -> None:
        grp = self.group.require_group(unit)
        for spec in specs:
            dtype = np.dtype(spec.dtype)
            self._arrays[f"{unit}/{spec.name}"] = grp.create_array(
                spec.name,
                shape=(num_rows, *spec.row_shape),
                chunks=(rows_per_shard, *spec.row_shape),
                dtype=dtype,
                serializer=_serializer(spec.serializer, dtype),
                compressors=_compressors(spec.compressor, dtype, spec.level),
                fill_value=0,
                config={"write_empty_chunks": True},  # a committed shard always has its object, even all zeros
                overwrite=True,
            )

    def resize_rows(self, unit: str, names: Iterable[str], num_rows: int) -> None:
        """Grow (or set) the row count of arrays written by a single streaming writer (prepare)."""
        for name in names:
            arr = self.array(unit, name)
            arr.resize((num_rows, *arr.shape[1:]))

    def array(self, unit: str, name: str) -> zarr.Array:
        key = f"{unit}/{name}"
        if key not in self._arrays:
            try:  # writable when the store is (a resumed writer appends shards to existing arrays)
                mode = "r" if self.group.store.read_only else "r+"
                self._arrays[key] = zarr.open_array(store=self.group.store, path=key, mode=mode)
            except Exception:
                raise ChorusError(f"store '{self.url}' has no array '{key}'") from None
        return self._arrays[key]

    def array_names(self, unit: str) -> list[str]:
        base = f"{self.root}/{unit}"
        return sorted(
            p.rstrip("/").rsplit("/", 1)[-1]
            for p in self.fs.ls(base, detail=False)
            if not p.rstrip("/").endswith(COMMITS) and self.fs.exists(f"{p.rstrip('/')}/zarr.json")
        )

    def chunk_path(self, unit: str, name: str, shard: int) -> str:
        arr = self.array(unit, name)
        key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
        return f"{self.root}/{unit}/{name}/{key}"

    # ------------------------------------------------------------------ shards
    def write_shard(self, unit: str, shard: int, row_start: int, arrays: dict[str, np.ndarray], *,
                    fingerprint: str = "", before_commit: Callable[[ShardCommit], None] | None = None) -> ShardCommit:
        """Write one whole shard of every array in ``arrays``, then create its commit record.

        The record checksums the bytes encoded here (never a read-back: a concurrent writer's chunk
        must fail verification, not be blessed) and carries ``fingerprint``, the unit's cache
        fingerprint. ``before_commit(commit)`` runs last before the record is created and may raise
        to withhold it (a writer that lost its lease or whose cache was replaced)."""
        rows = {len(a) for a in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"arrays of shard {shard} disagree on row count: {sorted(rows)}")
        row_stop = row_start + rows.pop()
        blobs = {name: self.encode_chunk(unit, name, data) for name, data in arrays.items()}
        for name, blob in blobs.items():
            self.put_whole(self.chunk_path(unit, name, shard), blob)
        sums = {name: checksum(blobs[name]) for name in sorted(blobs)}
        commit = ShardCommit(unit=unit, shard=shard, row_start=row_start, row_stop=row_stop, checksums=sums,
                             fingerprint=fingerprint)
        failpoints.hit("shard-written")
        if before_commit is not None:
            before_commit(commit)
        self._create_commit(commit)
        failpoints.hit("commit")
        return commit

    def encode_chunk(self, unit: str, name: str, data: np.ndarray) -> bytes:
        """One whole chunk's bytes, encoded with the codecs of the array's zarr metadata (rows past ``data``
        are the fill value 0, as zarr pads an edge chunk)."""
        arr = self.array(unit, name)
        dtype = self._dtype(arr)
        chunks = tuple(arr.chunks)
        if data.ndim != len(chunks) or tuple(data.shape[1:]) != chunks[1:] or len(data) > chunks[0]:
            raise IntegrityError(f"{unit}/{name}: data of shape {tuple(data.shape)} does not fit chunks {chunks} of "
                                 f"'{self.url}' (the unit was replaced by another writer?); rerun with the same settings")
        chunk = np.zeros(chunks, dtype=dtype)
        chunk[: len(data)] = data
        first = arr.metadata.codecs[0]
        if isinstance(first, BytesCodec):
            out: Any = chunk.astype(dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype, copy=False)
        elif hasattr(first, "encode_array"):  # chorus's array->bytes codecs (store/codecs.py)
            out = first.encode_array(chunk)
        else:
            raise ChorusError(f"array {unit}/{name} uses serializer {type(first).__name__}, which this writer cannot encode")
        for codec in arr.metadata.codecs[1:]:
            if isinstance(codec, ZstdCodec):
                out = numcodecs.Zstd(level=codec.level, checksum=codec.checksum).encode(out)
            elif isinstance(codec, BloscCodec):
                out = codec._blosc_codec.encode(out)
            else:
                raise ChorusError(f"array {unit}/{name} uses codec {type(codec).__name__}, which this writer cannot encode")
        return bytes(out) if not isinstance(out, np.ndarray) else out.tobytes()

    def put_whole(self, path: str, blob: bytes) -> None:
        """Write ``path`` whole: locally through a temporary file renamed into place (a reader never sees a
        torn object), on object stores with one PUT (atomic by itself)."""
        if not isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            self.fs.pipe_file(path, blob)
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(blob)
        failpoints.hit("chunk")
        os.replace(tmp, path)

    def commit_path(self, unit: str, shard: int) -> str:
        return f"{self.root}/{unit}/{COMMITS}/{shard:06d}.json"

    def forget_commit(self, unit: str, shard: int) -> None:
        """Remove one shard's commit record, so the shard is rewritten; only a writer holding its lease may."""
        self.fs.rm(self.commit_path(unit, shard))

    def _create_commit(self, commit: ShardCommit) -> None:
        path = self.commit_path(commit.unit, commit.shard)
        blob = json.dumps(commit.to_dict(), sort_keys=True, indent=1).encode()
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            self._create_only(path, blob)
        except FileExistsError:
            if self.fs.cat_file(path) != blob:
                raise IntegrityError(
                    f"shard {commit.shard} of {commit.unit} was already committed with other content; "
                    "two writers disagree: rerun with --overwrite to rebuild this unit"
                ) from None

    def _create_only(self, path: str, blob: bytes) -> None:
        """Create ``path`` with ``blob`` atomically, or raise FileExistsError. Locally the bytes go to a
        temporary file first and are hard-linked into place (``link`` refuses an existing target), so a
        kill can never leave an empty or partial record; object stores get a create-only PUT
        (S3 ``If-None-Match: *``), which is atomic by itself."""
        if not isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            with self.fs.open(path, "xb") as f:
                f.write(blob)
            return
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)

    def commits(self, unit: str, *, fingerprint: str | None = None) -> dict[int, ShardCommit]:
        """The commit records of ``unit`` by shard. With ``fingerprint`` (the unit manifest's), a record written
        for another cache (a writer that overlapped an --overwrite) is an IntegrityError naming the shard."""
        base = f"{self.root}/{unit}/{COMMITS}"
        try:
            paths = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return {}
        clean_stale_tmp(self.fs, [p for p in paths if ".tmp-" in p])
        paths = [p for p in paths if p.endswith(".json")]
        blobs = self.fs.cat(paths) if paths else {}
        out = {}
        for p in paths:
            raw = blobs[p] if isinstance(blobs, dict) else blobs
            try:
                c = ShardCommit.from_dict(json.loads(raw))
            except (ValueError, ChorusError) as e:
                raise IntegrityError(f"commit record {p} is unreadable ({e}); run `chorus verify {self.url}`") from None
            if fingerprint is not None and c.fingerprint and c.fingerprint != fingerprint:
                raise IntegrityError(
                    f"shard {c.shard} of {unit} in '{self.url}' was committed for another cache (fingerprint "
                    f"{c.fingerprint}, the manifest says {fingerprint}): a writer overlapped an --overwrite; "
                    "rerun `chorus cache` with --overwrite to rebuild it")
            out[c.shard] = c
        return out

    def committed(self, unit: str) -> set[int]:
        """The shards of ``unit`` that have a commit record, from one listing (no record is read)."""
        try:
            paths = self.fs.ls(f"{self.root}/{unit}/{COMMITS}", detail=False)
        except FileNotFoundError:
            return set()
        out = set()
        for p in paths:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                out.add(int(name[:-5]))
        return out

    def commit(self, unit: str, shard: int) -> ShardCommit | None:
        """The commit record of one shard (one small read), or None when the shard is not committed."""
        path = self.commit_path(unit, shard)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return ShardCommit.from_dict(json.loads(raw))
        except (ValueError, ChorusError) as e:
            raise IntegrityError(f"commit record {path} is unreadable ({e}); run `chorus verify {self.url}`") from None

    def is_complete(self, unit: str, num_shards: int) -> bool:
        return len(self.committed(unit)) == num_shards

    def read_shard(
        self, unit: str, shard: int, names: Iterable[str], *, commit: ShardCommit | None = None, verify: bool = True
    ) -> dict[str, np.ndarray]:
        """The committed rows of ``shard`` for each array; IntegrityError naming the shard on any mismatch."""
        if commit is None:
            commit = self.commits(unit).get(shard)
        if commit is None:
            raise ChorusError(f"shard {shard} of {unit} in '{self.url}' is not committed; finish writing it first")
        names = list(names)
        for name in names:
            if name not in commit.checksums:
                raise ChorusError(f"shard {shard} of {unit} has no array '{name}'")

        def load(name: str) -> np.ndarray:
            try:
                raw = self.fs.cat_file(self.chunk_path(unit, name, shard))
            except FileNotFoundError:
                raise IntegrityError(f"{unit}/{name} shard {shard} of '{self.url}' is committed but its chunk is "
                                     f"missing; run `chorus verify {self.url}` and rebuild what it names") from None
            if verify and not matches(raw, commit.checksums[name]):
                raise IntegrityError(
                    f"checksum mismatch in {unit}/{name} shard {shard} (rows {commit.row_start}:{commit.row_stop}) "
                    f"of '{self.url}': the stored bytes are corrupt; rerun the job that wrote it with --overwrite"
                )
            return self._decode(unit, name, raw)[: commit.row_stop - commit.row_start]

        for name in names:
            self.array(unit, name)  # open metadata once, on this thread
        if len(names) == 1:
            return {names[0]: load(names[0])}
        # reads and zstd decoding release the GIL: the arrays of a shard decode side by side
        return dict(zip(names, reader_pool().map(load, names)))

    def _decode(self, unit: str, name: str, raw: bytes) -> np.ndarray:
        """Decode one chunk's bytes with the codecs recorded in its zarr metadata."""
        arr = self.array(unit, name)
        codecs = arr.metadata.codecs
        data = raw
        for codec in reversed(codecs[1:]):
            if isinstance(codec, ZstdCodec):
                data = numcodecs.Zstd().decode(data)
            elif isinstance(codec, BloscCodec):
                data = numcodecs.Blosc().decode(data)
            else:
                raise ChorusError(f"array {unit}/{name} uses codec {type(codec).__name__}, which this reader cannot decode")
        dtype = self._dtype(arr)
        if hasattr(codecs[0], "decode_array"):  # chorus's array->bytes codecs (store/codecs.py)
            try:
                return codecs[0].decode_array(data, tuple(arr.chunks), dtype)
            except ValueError as e:
                raise IntegrityError(f"{unit}/{name} of '{self.url}': {e}; run `chorus verify {self.url}`") from None
        dtype = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
        expected = int(np.prod(arr.chunks)) * dtype.itemsize
        if len(data) != expected:
            raise IntegrityError(f"{unit}/{name} of '{self.url}': a chunk decodes to {len(data)} bytes, its metadata "
                                 f"(shape {tuple(arr.chunks)}, {dtype.name}) needs {expected}; the array metadata was "
                                 f"edited or the chunk is foreign: run `chorus verify {self.url}`")
        return np.frombuffer(data, dtype=dtype).reshape(arr.chunks).astype(dtype.newbyteorder("="), copy=False)

    @staticmethod
    def _dtype(arr: zarr.Array) -> np.dtype:
        return np.dtype(arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype)

    def read_rows(self, unit: str, name: str, start: int, stop: int, *, verify: bool = True) -> np.ndarray:
        """Rows ``[start, stop)`` of one array, stitched from committed shards."""
        rps = self.array(unit, name).chunks[0]
        commits = self.commits(unit)
        parts = []
        for shard in range(start // rps, -(-stop // rps)):
            data = self.read_shard(unit, shard, [name], commit=commits.get(shard), verify=verify)[name]
            lo = max(start, shard * rps) - shard * rps
            hi = min(stop, shard * rps + len(data)) - shard * rps
            parts.append(data[lo:hi])
        return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.int32)

    def verify(self, unit: str) -> list[str]:
        """Recompute every committed shard's checksums; one message per bad shard (the corpus's row index: see
        :func:`chorus.store.index.verify_corpus`)."""
        bad = []
        for shard, commit in sorted(self.commits(unit).items()):
            for name, expected in sorted(commit.checksums.items()):
                try:
                    raw = self.fs.cat_file(self.chunk_path(unit, name, shard))
                    got = checksum(raw, expected.split(":", 1)[0])
                except FileNotFoundError:
                    got = "missing"
                if got != expected:
                    bad.append(f"{unit}/{name} shard {shard} (rows {commit.row_start}:{commit.row_stop}): {got} != {expected}")
        return bad

    def nbytes(self, unit: str, name: str) -> int:
        """Stored (encoded) bytes of one array's chunks."""
        base = f"{self.root}/{unit}/{name}"
        return sum(info["size"] for info in self.fs.find(base, detail=True).values() if not info["name"].endswith("zarr.json"))
