"""`chorus export` / `chorus import`: a teacher cache as parquet or arrow files that `datasets` opens, and back.

Export writes one row per corpus row — ``row``, ``input_ids``, ``segment_ids`` (0 = padding), ``topk_ids``,
``topk_logprobs`` and, when cached, ``sample_ids``/``sample_counts`` and the statistics ``stats``/``tail_logz``
(format v2) — as nested lists [L][k], so

    datasets.load_dataset("parquet", data_files="DIR/*.parquet")

gives ready-to-use columns. Values are the stored values without the store's delta coding: float16 log-probs
for the fp16 codec, the 8-bit codes for q8 (decode them with ``chorus.store.decode_values`` and the
manifest's ``value_params``); ``stats`` are float16 and ``tail_logz`` the 8-bit codes, decoded with
``chorus.store.decode_stats``. ``chorus.json`` beside the files (and each file's schema metadata) holds the
teacher and corpus manifests and the original commit records. Import checks the corpus fingerprint and
tokenizer against the target store, re-encodes each shard exactly as ``chorus cache`` does, commits it, and
checks that its checksums equal the original ones: the round trip is bit-identical or it fails loudly.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from chorus.config import ExportConfig, ImportConfig
from chorus.errors import ChorusError, IntegrityError
from chorus.progress import Progress, say
from chorus.store import CorpusManifest, Store, TeacherManifest, checksum, plain_values, stored_values, target_specs

SIDECAR = "chorus.json"
FILE_BYTES = 512 << 20  # whole shards are grouped into files of about this many (uncompressed) bytes
EXPORT_VERSION = 1


def _nested(a: np.ndarray) -> pa.Array:
    """[n, L] or [n, L, k] → arrow list<...> (list<list<...>>) keeping the dtype."""
    arr = pa.array(np.ascontiguousarray(a).reshape(-1))
    for size in reversed(a.shape[1:]):
        count = len(arr) // size
        arr = pa.ListArray.from_arrays(pa.array(np.arange(0, count * size + 1, size, dtype=np.int32)), arr)
    return arr


def _unnest(col: pa.ChunkedArray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    arr = col.combine_chunks()
    for _ in shape[1:]:
        arr = arr.flatten()
    out = arr.to_numpy(zero_copy_only=False)
    if out.size != int(np.prod(shape)):
        raise ChorusError(f"exported column '{col}' has {out.size} values, expected shape {shape}")
    return out.reshape(shape).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------- export
def run_export(cfg: ExportConfig) -> list[str]:
    store = Store.open(cfg.store, "r", cfg.storage_options)
    corpus = store.manifest
    teacher = store.teacher_manifest(cfg.teacher)
    unit = f"teachers/{cfg.teacher}"
    commits = store.commits(unit)
    if len(commits) != corpus.num_shards or teacher.status != "complete":
        raise ChorusError(f"cache '{cfg.teacher}' is incomplete ({len(commits)}/{corpus.num_shards} shards); "
                          "finish it with `chorus cache` (same arguments) before exporting")
    names = store.array_names(unit)
    row_bytes = sum(np.dtype(store.array(unit, n).dtype).itemsize * int(np.prod(store.array(unit, n).shape[1:]))
                    for n in names) + 6 * corpus.seq_len  # + input_ids and segment_ids
    shards_per_file = max(1, FILE_BYTES // (row_bytes * corpus.rows_per_shard))
    groups = [list(range(i, min(i + shards_per_file, corpus.num_shards))) for i in range(0, corpus.num_shards, shards_per_file)]
    ext = "parquet" if cfg.format == "parquet" else "arrow"
    files = [f"{cfg.teacher}-{i:05d}-of-{len(groups):05d}.{ext}" for i in range(len(groups))]
    meta = {
        "export_version": EXPORT_VERSION,
        "format": cfg.format,
        "teacher": teacher.to_dict(),
        "corpus": corpus.to_dict(),
        "commits": {str(s): c.to_dict() for s, c in sorted(commits.items())},
        "files": files,
        "values": "float16 log-probs" if teacher.value_codec == "fp16" else f"{teacher.value_codec} codes (see value_params)",
    }
    fs, root = fsspec.core.url_to_fs(cfg.out)
    fs.makedirs(root, exist_ok=True)
    with Progress(f"export {cfg.teacher}", total=corpus.num_rows) as bar:
        for fname, group in zip(files, groups):
            table = _export_table(store, unit, names, teacher, corpus, group, commits)
            table = table.replace_schema_metadata({b"chorus": json.dumps({k: v for k, v in meta.items() if k != "commits"}).encode()})
            with fs.open(f"{root}/{fname}", "wb") as f:
                if cfg.format == "parquet":
                    pq.write_table(table, f, compression="zstd")
                else:
                    with pa.ipc.new_stream(f, table.schema) as w:  # the stream format `datasets` writes and reads
                        w.write_table(table)
            bar.update(table.num_rows)
    with fs.open(f"{root}/{SIDECAR}", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    say(f"exported cache '{cfg.teacher}' ({corpus.num_rows} rows, {len(files)} {cfg.format} file(s)) → {cfg.out}; "
        f"open with datasets.load_dataset(\"{cfg.format}\", data_files=\"{cfg.out}/*.{ext}\")")
    return [f"{root}/{f}" for f in files]


def _export_table(store: Store, unit: str, names: list[str], teacher: TeacherManifest, corpus: CorpusManifest,
                  shards: list[int], commits: dict) -> pa.Table:
    parts: dict[str, list[np.ndarray]] = {}
    for shard in shards:
        data = store.read_shard(unit, shard, names, commit=commits[shard])
        data.update(store.read_shard("corpus", shard, ["input_ids", "segment_ids"]))
        data["topk_logprobs"] = plain_values(data["topk_logprobs"], teacher.value_codec, teacher.value_params)
        start, stop = corpus.shard_rows(shard)
        data["row"] = np.arange(start, stop, dtype=np.int64)
        for k, v in data.items():
            parts.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = ["row", "input_ids", "segment_ids", "topk_ids", "topk_logprobs", "sample_ids", "sample_counts", "stats",
             "tail_logz"]
    return pa.table({k: (pa.array(cols[k]) if cols[k].ndim == 1 else _nested(cols[k])) for k in order if k in cols})


# ---------------------------------------------------------------------------------------------- import
def _read_sidecar(src: str) -> tuple[fsspec.AbstractFileSystem, str, dict]:
    fs, root = fsspec.core.url_to_fs(src)
    path = f"{root.rstrip('/')}/{SIDECAR}"
    if not fs.exists(path):
        raise ChorusError(f"'{src}' has no {SIDECAR}; point --src at a directory written by `chorus export`")
    try:
        with fs.open(path, "r") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ChorusError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); re-export the cache") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), list) or not isinstance(meta.get("commits"), dict):
        raise ChorusError(f"{path}: expected the JSON object `chorus export` writes (files, commits, ...); re-export")
    if meta.get("export_version") != EXPORT_VERSION:
        raise ChorusError(f"{path}: expected export_version {EXPORT_VERSION}, got {meta.get('export_version')!r}")
    return fs, root.rstrip("/"), meta


def _read_table(fs, path: str, fmt: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            return pq.read_table(f)
        return pa.ipc.open_stream(f).read_all()


def run_import(cfg: ImportConfig) -> TeacherManifest:
    fs, root, meta = _read_sidecar(cfg.src)
    exported = TeacherManifest.from_dict(meta["teacher"])
    CorpusManifest.from_dict(meta["corpus"])  # a malformed sidecar fails here, naming the field
    if not Store.exists(cfg.store, cfg.storage_options):
        raise ChorusError(f"no chorus store at '{cfg.store}'; prepare the same corpus first (`chorus prepare`)")
    store = Store.open(cfg.store, "a", cfg.storage_options)
    corpus = store.manifest
    if corpus.fingerprint != exported.corpus_fingerprint:
        raise ChorusError(f"the files were exported from another corpus (fingerprint {exported.corpus_fingerprint}) "
                          f"than the one in '{cfg.store}' ({corpus.fingerprint}); prepare the same corpus first")
    if corpus.tokenizer.fingerprint != exported.tokenizer_fingerprint:
        raise ChorusError(f"the files were cached with tokenizer {exported.tokenizer_fingerprint}, the store has "
                          f"{corpus.tokenizer.fingerprint}")
    name = cfg.name or exported.name
    missing = [f for f in meta["files"] if not fs.exists(f"{root}/{f}")]
    if missing:  # before anything is written: a failed import leaves no unit behind
        raise ChorusError(f"'{cfg.src}' lacks {missing[0]}, which its {SIDECAR} lists; re-export the cache")
    unit = f"teachers/{name}"
    manifest = exported.replace(name=name, status="incomplete")
    specs = target_specs(corpus.seq_len, exported.top_k, exported.num_samples, corpus.tokenizer.vocab_size,
                         exported.value_codec, dict(exported.value_params), tail_betas=exported.tail_betas)
    if name in store.teacher_names():
        try:
            old = store.teacher_manifest(name)
        except KeyError:  # a unit whose creation was interrupted: no manifest yet
            old = manifest.replace(fingerprint="")
        if old.fingerprint != manifest.fingerprint and old.fingerprint and not cfg.overwrite:
            raise ChorusError(f"store '{cfg.store}' already has a cache '{name}' with other settings; "
                              "pass --overwrite to replace it, or --name to import under another name")
        if old.fingerprint != manifest.fingerprint or cfg.overwrite:
            store.delete_unit(unit)
    if name not in store.teacher_names():
        store.create_arrays(unit, specs, corpus.num_rows, corpus.rows_per_shard)
        store.write_teacher_manifest(manifest)
    done = store.commits(unit)  # the same cache partly imported before: resume past these
    originals = meta["commits"]
    # every byte is checked against the exported checksums before anything is committed
    for fname in meta["files"]:
        _import_table(store, unit, _read_table(fs, f"{root}/{fname}", meta["format"]), specs, exported, corpus, done,
                      originals, write=False)
    with Progress(f"import {name}", total=corpus.num_rows) as bar:
        for fname in meta["files"]:
            table = _read_table(fs, f"{root}/{fname}", meta["format"])
            _import_table(store, unit, table, specs, exported, corpus, done, originals)
            bar.update(table.num_rows)
    committed = store.commits(unit)
    if len(committed) == corpus.num_shards:
        manifest = manifest.replace(status="complete")
        store.write_teacher_manifest(manifest)
    say(f"imported cache '{name}' into {store.url} ({unit}): {len(committed)}/{corpus.num_shards} shards, "
        f"checksums equal to the exported cache's")
    return manifest


def _import_table(store: Store, unit: str, table: pa.Table, specs, exported: TeacherManifest, corpus: CorpusManifest,
                  done: dict, originals: dict, *, write: bool = True) -> None:
    rows = table.column("row").to_numpy()
    if len(rows) and not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        raise ChorusError("exported rows are not contiguous; re-export the cache with `chorus export`")
    for spec in specs:
        if spec.name not in table.column_names:
            raise ChorusError(f"exported files lack column '{spec.name}' that cache '{exported.name}' needs")
    first = int(rows[0]) if len(rows) else 0
    for shard in range(first // corpus.rows_per_shard, -(-(first + len(rows)) // corpus.rows_per_shard)):
        if shard in done:
            continue
        start, stop = corpus.shard_rows(shard)
        part = table.slice(start - first, stop - start)
        arrays = {}
        for spec in specs:
            dtype = np.float16 if spec.name == "topk_logprobs" and exported.value_codec == "fp16" else np.dtype(spec.dtype)
            arrays[spec.name] = _unnest(part.column(spec.name), (stop - start, *spec.row_shape), dtype)
        arrays["topk_logprobs"] = stored_values(arrays["topk_logprobs"], exported.value_codec, dict(exported.value_params))
        original = (originals.get(str(shard)) or {}).get("checksums")
        sums = {n: checksum(store.encode_chunk(unit, n, a)) for n, a in sorted(arrays.items())}
        if original != sums:
            raise IntegrityError(f"shard {shard} (rows {start}:{stop}) of '{exported.name}' does not re-encode to the "
                                 "exported checksums: the files were altered or are damaged; nothing was committed, "
                                 "re-export the cache")
        if write:
            store.write_shard(unit, shard, start, arrays, fingerprint=exported.fingerprint)
