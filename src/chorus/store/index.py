"""The corpus's row index: the split and domain of every row, in a few objects instead of one per shard.

Readers select rows by split and domain (train, eval, calibrate); without an index that means reading the
``split`` and ``domain`` chunk of every corpus shard (two objects per shard: ~76 k reads at 10 B tokens) each
time a reader starts. `chorus prepare` writes the index once, after the corpus: unit ``index`` with arrays
``split`` (uint8) and ``domain`` (uint16) over all rows, chunked by ``INDEX_ROWS`` rows, each chunk written
and committed like any shard (checksummed record, create-only, ``fingerprint`` = the corpus fingerprint), so a
reader trusts it exactly as it trusts the corpus. Shard offsets need no entry: shard s holds rows
``[s·rows_per_shard, (s+1)·rows_per_shard)`` (the manifest). A store without an index (older stores) is
scanned as before; ``chorus verify`` checks the index's checksums and compares it with the corpus.
"""

from __future__ import annotations

import numpy as np

from chorus.errors import ChorusError, IntegrityError
from chorus.store.manifest import CorpusManifest
from chorus.store.zarr_store import INDEX_UNIT, ArraySpec, Store

INDEX_ROWS = 1 << 20  # rows per index chunk: 3 MB raw, one object per ~1 M rows
INDEX_ARRAYS = ("split", "domain")


def write_row_index(store: Store, split: np.ndarray, domain: np.ndarray, *, fingerprint: str) -> None:
    """Write (replacing any) the row index of ``store``'s corpus: one committed chunk per ``INDEX_ROWS`` rows."""
    n = len(split)
    if len(domain) != n or n == 0:
        raise ValueError(f"row index: {len(split)} split and {len(domain)} domain entries; expected the same, > 0")
    store.delete_unit(INDEX_UNIT)
    chunk = min(n, INDEX_ROWS)
    store.create_arrays(INDEX_UNIT, [ArraySpec("split", (), "uint8"), ArraySpec("domain", (), "uint16")], n, chunk)
    for i, lo in enumerate(range(0, n, chunk)):
        hi = min(n, lo + chunk)
        store.write_shard(INDEX_UNIT, i, lo, {"split": np.asarray(split[lo:hi], np.uint8),
                                               "domain": np.asarray(domain[lo:hi], np.uint16)}, fingerprint=fingerprint)


def read_row_index(store: Store, manifest: CorpusManifest, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """(split uint8 [N], domain uint16 [N]) from the index, checksums verified; None when the store has none."""
    if not store.fs.exists(f"{store.root}/{INDEX_UNIT}/zarr.json"):
        return None
    n = manifest.num_rows
    chunk = store.array(INDEX_UNIT, "split").chunks[0]
    parts: dict[str, list] = {"split": [], "domain": []}
    for i, lo in enumerate(range(0, n, chunk)):
        c = store.commit(INDEX_UNIT, i)
        hi = min(n, lo + chunk)
        if c is None or (c.row_start, c.row_stop) != (lo, hi) or c.fingerprint != manifest.fingerprint:
            got = "no commit record" if c is None else f"rows {c.row_start}:{c.row_stop}, fingerprint {c.fingerprint}"
            raise IntegrityError(f"row index of '{store.url}': chunk {i} has {got}, expected rows {lo}:{hi} of corpus "
                                 f"{manifest.fingerprint}; run `chorus verify {store.url}`, or remove {store.root}/"
                                 f"{INDEX_UNIT} (readers then scan the corpus)")
        data = store.read_shard(INDEX_UNIT, i, INDEX_ARRAYS, commit=c, verify=verify)
        for name in INDEX_ARRAYS:
            parts[name].append(data[name])
    return np.concatenate(parts["split"]), np.concatenate(parts["domain"])


def scan_row_index(store: Store, manifest: CorpusManifest, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The same from the corpus itself: every shard's ``split`` and ``domain`` chunk (what readers did before)."""
    commits = store.commits("corpus")
    if len(commits) != manifest.num_shards:
        raise ChorusError(f"store '{store.url}' has uncommitted corpus shards; rerun `chorus prepare`")
    meta = [store.read_shard("corpus", i, INDEX_ARRAYS, commit=commits[i], verify=verify)
            for i in range(manifest.num_shards)]
    return (np.concatenate([m["split"] for m in meta]).astype(np.uint8),
            np.concatenate([m["domain"] for m in meta]).astype(np.uint16))


def row_index(store: Store, manifest: CorpusManifest, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The index when the store has one, else a scan of the corpus (older stores)."""
    found = read_row_index(store, manifest, verify=verify)
    return found if found is not None else scan_row_index(store, manifest, verify=verify)


def index_mismatch(store: Store) -> list[str]:
    """``chorus verify``: the index against a full scan (one line when they differ)."""
    m = store.manifest
    try:
        got = read_row_index(store, m)
    except ChorusError as e:
        return [str(e)]
    if got is None:
        return []
    want = scan_row_index(store, m)
    for name, a, b in zip(INDEX_ARRAYS, got, want):
        if len(a) != len(b) or not np.array_equal(a, b):
            first = int(np.flatnonzero(a != b)[0]) if len(a) == len(b) else min(len(a), len(b))
            return [f"{INDEX_UNIT}/{name}: row {first} differs from the corpus's {name}; remove {store.root}/{INDEX_UNIT} "
                    f"(readers then scan the corpus) or rebuild the store with `chorus prepare ... --overwrite`"]
    return []


def verify_corpus(store: Store) -> list[str]:
    """The corpus's checksums, then its row index: its own checksums and its content against the corpus's arrays."""
    bad = store.verify("corpus")
    if not bad and store.fs.exists(f"{store.root}/{INDEX_UNIT}"):
        bad = store.verify(INDEX_UNIT) or index_mismatch(store)
    return bad
