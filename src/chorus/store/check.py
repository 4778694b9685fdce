"""Every structural fact a reader of a store relies on, checked without decoding a chunk.

``problems`` yields one line per problem, each naming what is wrong and the fix; ``verify`` adds checksums,
``chorus train``/``eval`` refuse a store whose first problem is found here (``check_store``) before step 1.
Facts: root and unit metadata parse; manifests parse and name themselves soundly; each array a reader opens
exists with the shape, chunking and data type its manifest implies; a complete unit has a commit record for
every shard, each with the right row range, the unit's fingerprint and every array's checksum; and every
committed chunk object is present.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from chorus.errors import ChorusError
from chorus.store.manifest import NAME_PATTERN, CorpusManifest, TeacherManifest
from chorus.store.targets import target_specs
from chorus.store.tokenizer_files import tokenizer_problems
from chorus.store.zarr_store import COMMITS, INDEX_UNIT, MANIFEST_KEY, ArraySpec, Store

CORPUS_ARRAYS = {"input_ids": "int32", "segment_ids": None, "domain": "uint16", "split": "uint8"}
RECACHE = "rebuild it with `chorus cache ... --overwrite` (same arguments)"
REPREPARE = "rebuild the store with `chorus prepare ... --overwrite`"


def _json(store: Store, path: str) -> dict:
    raw = store.fs.cat_file(path)
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _array_meta(store: Store, unit: str, name: str) -> tuple[dict | None, str | None]:
    path = f"{store.root}/{unit}/{name}/zarr.json"
    try:
        return _json(store, path), None
    except FileNotFoundError:
        return None, f"{unit}/{name}: array metadata {path} is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{unit}/{name}: array metadata {path} is not valid JSON ({str(e).splitlines()[0][:80]})"


def _check_array(store: Store, unit: str, name: str, *, rows: int, rows_per_shard: int, row_shape: tuple[int, ...],
                 dtype: str | None, fix: str) -> str | None:
    meta, problem = _array_meta(store, unit, name)
    if problem:
        return f"{problem}; {fix}"
    shape = tuple(meta.get("shape") or ())
    chunks = tuple(((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape") or ())
    if meta.get("node_type") != "array" or shape != (rows, *row_shape):
        return f"{unit}/{name}: shape {list(shape)} in its metadata, the manifest implies {[rows, *row_shape]}; {fix}"
    if chunks != (rows_per_shard, *row_shape):
        return f"{unit}/{name}: chunks {list(chunks)} in its metadata, expected {[rows_per_shard, *row_shape]}; {fix}"
    got = meta.get("data_type")
    if dtype is not None and got != np.dtype(dtype).name:
        return f"{unit}/{name}: data_type {got!r} in its metadata, the manifest implies {np.dtype(dtype).name!r}; {fix}"
    if dtype is None and (not isinstance(got, str) or not got.startswith(("int", "uint"))):
        return f"{unit}/{name}: data_type {got!r} in its metadata, expected an integer type; {fix}"
    return None


def _check_commits(store: Store, unit: str, names: list[str], corpus: CorpusManifest, *, fingerprint: str | None,
                   complete: bool, fix: str) -> Iterator[str]:
    try:
        commits = store.commits(unit)
    except ChorusError as e:
        yield f"{e}; {fix}"
        return
    for shard, c in sorted(commits.items()):
        if not 0 <= shard < corpus.num_shards:
            yield f"{unit}: commit record for shard {shard}, but the corpus has {corpus.num_shards} shards; {fix}"
            return
        if (c.row_start, c.row_stop) != corpus.shard_rows(shard) or c.unit != unit:
            yield (f"{unit}: commit record of shard {shard} says {c.unit} rows {c.row_start}:{c.row_stop}, expected "
                   f"{unit} rows {corpus.shard_rows(shard)[0]}:{corpus.shard_rows(shard)[1]}; {fix}")
            return
        if fingerprint is not None and c.fingerprint and c.fingerprint != fingerprint:
            yield (f"{unit}: shard {shard} was committed for another cache (fingerprint {c.fingerprint}, manifest "
                   f"{fingerprint}); {fix}")
            return
        missing = sorted(set(names) - set(c.checksums))
        if missing:
            yield f"{unit}: commit record of shard {shard} has no checksum for {', '.join(missing)}; {fix}"
            return
    if complete:
        absent = [s for s in range(corpus.num_shards) if s not in commits]
        if absent:
            yield (f"{unit}: marked complete but shard {absent[0]} (of {len(absent)} missing) has no commit record; "
                   f"{fix}")
            return
    for name in names:
        base = f"{store.root}/{unit}/{name}"
        try:
            present = {p for p in store.fs.find(base) if not p.endswith("zarr.json")}
        except FileNotFoundError:
            present = set()
        for shard in sorted(commits):
            if store.chunk_path(unit, name, shard) not in present:
                yield f"{unit}/{name}: chunk of committed shard {shard} is missing; {fix}"
                return


def corpus_problems(store: Store) -> Iterator[str]:
    try:
        corpus = store.manifest
    except ChorusError as e:
        yield f"corpus manifest: {e}; {REPREPARE}"
        return
    rps, rows, seq = corpus.rows_per_shard, corpus.num_rows, corpus.seq_len
    for name, dtype in CORPUS_ARRAYS.items():
        shape = (seq,) if name in ("input_ids", "segment_ids") else ()
        p = _check_array(store, "corpus", name, rows=rows, rows_per_shard=rps, row_shape=shape, dtype=dtype, fix=REPREPARE)
        if p:
            yield p
            return
    found = list(_check_commits(store, "corpus", list(CORPUS_ARRAYS), corpus, fingerprint=None, complete=True,
                                fix=REPREPARE))
    yield from found
    if not found and store.fs.exists(f"{store.root}/{INDEX_UNIT}/zarr.json"):
        yield from index_problems(store, corpus)
    yield from tokenizer_problems(store, corpus.tokenizer.fingerprint)


def index_problems(store: Store, corpus: CorpusManifest) -> Iterator[str]:
    """The row index (optional; see ``index``): its arrays and a commit record per chunk, for this corpus."""
    fix = f"remove {store.root}/{INDEX_UNIT} (readers then scan the corpus) or {REPREPARE}"
    meta, problem = _array_meta(store, INDEX_UNIT, "split")
    if problem:
        yield f"{problem}; {fix}"
        return
    chunk = (((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape") or [0])[0]
    if not isinstance(chunk, int) or chunk < 1:
        yield f"{INDEX_UNIT}/split: chunk shape {chunk!r} in its metadata; {fix}"
        return
    for name, dtype in (("split", "uint8"), ("domain", "uint16")):
        p = _check_array(store, INDEX_UNIT, name, rows=corpus.num_rows, rows_per_shard=chunk, row_shape=(),
                         dtype=dtype, fix=fix)
        if p:
            yield p
            return
    chunks = -(-corpus.num_rows // chunk)
    try:
        commits = store.commits(INDEX_UNIT, fingerprint=corpus.fingerprint)
    except ChorusError as e:
        yield f"{e}; {fix}"
        return
    for i in range(chunks):
        c = commits.get(i)
        want = (i * chunk, min(corpus.num_rows, (i + 1) * chunk))
        if c is None or (c.row_start, c.row_stop) != want or set(c.checksums) != {"split", "domain"}:
            yield f"{INDEX_UNIT}: chunk {i} (rows {want[0]}:{want[1]}) has no sound commit record; {fix}"
            return
        if c.fingerprint != corpus.fingerprint:
            yield f"{INDEX_UNIT}: chunk {i} was written for another corpus (fingerprint {c.fingerprint}); {fix}"
            return


def teacher_problems(store: Store, name: str, corpus: CorpusManifest, *, need_complete: bool = False) -> Iterator[str]:
    unit = f"teachers/{name}"
    fix = RECACHE.replace("...", f"--name {name} ...")
    if not NAME_PATTERN.match(name):
        yield f"{unit}: the folder name {name!r} is not a cache name; remove that folder"
        return
    try:
        attrs = _json(store, f"{store.root}/{unit}/zarr.json").get("attributes") or {}
    except (ValueError, UnicodeDecodeError) as e:
        yield f"{unit}: group metadata zarr.json is not valid JSON ({str(e).splitlines()[0][:80]}); {fix}"
        return
    if MANIFEST_KEY not in attrs:
        yield f"{unit}: no manifest (its `chorus cache` was interrupted while creating it); {fix}"
        return
    try:
        m = TeacherManifest.from_dict(attrs[MANIFEST_KEY])
    except ChorusError as e:
        yield f"{unit}: {e}; {fix}"
        return
    if m.name != name:
        yield f"{unit}: its manifest names it {m.name!r}; {fix}"
        return
    if m.corpus_fingerprint != corpus.fingerprint or m.tokenizer_fingerprint != corpus.tokenizer.fingerprint:
        yield f"{unit}: cached from another corpus or tokenizer than this store's; {fix}"
        return
    if need_complete and m.status != "complete":
        yield f"{unit}: status '{m.status}', not complete; finish it with `chorus cache` (same arguments)"
        return
    try:
        specs: list[ArraySpec] = target_specs(corpus.seq_len, m.top_k, m.num_samples, m.vocab_size, m.value_codec,
                                              dict(m.value_params), tail_betas=m.tail_betas)
    except ChorusError as e:
        yield f"{unit}: {e}; {fix}"
        return
    for spec in specs:
        p = _check_array(store, unit, spec.name, rows=corpus.num_rows, rows_per_shard=corpus.rows_per_shard,
                         row_shape=spec.row_shape, dtype=spec.dtype, fix=fix)
        if p:
            yield p
            return
    yield from _check_commits(store, unit, [s.name for s in specs], corpus, fingerprint=m.fingerprint,
                              complete=m.status == "complete", fix=fix)


def problems(store: Store, teachers: list[str] | None = None) -> Iterator[str]:
    """Structural problems of the corpus and of ``teachers`` (default: every teacher folder), first the corpus's."""
    found = list(corpus_problems(store))
    yield from found
    if found:
        return
    corpus = store.manifest
    names = store.teacher_names() if teachers is None else teachers
    for name in names:
        yield from teacher_problems(store, name, corpus, need_complete=teachers is not None)


_PASSED: set[tuple] = set()  # (url, unit, what identifies its content) that passed in this process


def check_store(store: Store, teachers: list[str]) -> None:
    """Refuse (one line: the first problem and its fix) a store a run cannot read soundly.

    A unit that passed once in this process is not checked again while its manifest is unchanged (committed
    shards never change): the check lists every chunk, which each evaluation would otherwise repeat."""
    corpus_key = (store.url, "corpus", json.dumps(store.group.attrs.get(MANIFEST_KEY), sort_keys=True, default=str))
    keys = {}
    for name in teachers:
        try:
            keys[name] = (store.url, name, json.dumps(store.teacher_manifest(name).to_dict(), sort_keys=True, default=str))
        except ChorusError:
            keys[name] = None
    todo = [n for n in teachers if keys[n] is None or keys[n] not in _PASSED]
    if corpus_key in _PASSED and not todo:
        return
    found = [] if corpus_key in _PASSED else list(corpus_problems(store))
    for name in todo if not found else ():
        found += list(teacher_problems(store, name, store.manifest, need_complete=True))[:1]
        if found:
            break
    if found:
        raise ChorusError(f"store '{store.url}' is damaged: {found[0]}")
    _PASSED.add(corpus_key)
    _PASSED.update(keys[n] for n in todo if keys[n] is not None)


__all__ = ["COMMITS", "check_store", "problems"]
