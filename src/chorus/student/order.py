"""Which rows, in which order: pure functions of the row selection, the seed and the epoch (no I/O).

Shuffled order. The selected rows are grouped by shard, the shards permuted and the rows of each shard
shuffled; the permuted shards are then dealt into ``lanes`` runs of about equal row counts, and the runs are
read *side by side* (each advancing at the rate that makes them all end together). So at any point of the
stream about ``lanes`` shards are open — a batch mixes rows of ``lanes`` random shards, hence of several
domains even when `prepare` wrote shards domain by domain — and each shard is decoded once per epoch and held
only while its lane reads it (memory: ``lanes`` decoded shards, two at a lane's shard boundary). Last, the
stream is shuffled inside consecutive windows of ``window`` rows, so which lane fills which slot of a batch is
random too. Nothing depends on ranks or workers: they only slice this stream.
"""

from __future__ import annotations

import numpy as np


def spread(rows: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``rows``, evenly spread over them (not the first ones)."""
    return rows if n >= len(rows) else rows[np.linspace(0, len(rows) - 1, n).astype(np.int64)]


def shuffled(rows: np.ndarray, rows_per_shard: int, *, seed: int, epoch: int, lanes: int, window: int) -> np.ndarray:
    """The rows of one epoch in stream order (see the module docstring)."""
    n = len(rows)
    if n == 0:
        return rows
    rng = np.random.default_rng([seed, epoch])
    shard = rows // rows_per_shard
    shards, counts = np.unique(shard, return_counts=True)
    perm = rng.permutation(len(shards))
    rank = np.empty(len(shards), dtype=np.int64)
    rank[perm] = np.arange(len(shards))
    grouped = rows[np.lexsort((rng.random(n), rank[np.searchsorted(shards, shard)]))]  # shard by shard, shuffled within
    lanes = max(1, min(lanes, len(shards)))
    per_shard = counts[perm]  # rows of each shard, in permuted order
    start = np.cumsum(per_shard) - per_shard
    lane_of_row = np.repeat(np.minimum(lanes - 1, start * lanes // n), per_shard)  # runs of whole shards
    length = np.bincount(lane_of_row, minlength=lanes)
    first = np.cumsum(length) - length
    progress = (np.arange(n) - first[lane_of_row] + 0.5) / length[lane_of_row]
    out = grouped[np.lexsort((lane_of_row, progress))]  # lanes side by side, all ending together
    if window > 1:
        out = out[np.lexsort((rng.random(n), np.arange(n) // window))]
    return out


def last_use(order: np.ndarray, rows_per_shard: int) -> dict[int, int]:
    """{shard: offset in ``order`` of its last row}: when a reader may drop the decoded shard."""
    shard = order[::-1] // rows_per_shard
    shards, idx = np.unique(shard, return_index=True)
    return dict(zip(shards.tolist(), (len(order) - 1 - idx).tolist()))


def _even_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """``n`` split as evenly as possible over groups of ``counts`` rows (water-filling: a small group gives
    what it lacks to the others)."""
    quota = np.zeros(len(counts), dtype=np.int64)
    left = n
    for i, g in enumerate(np.argsort(counts, kind="stable")):
        quota[g] = min(int(counts[g]), left // (len(counts) - i))
        left -= quota[g]
    return quota


def stratified(rows: np.ndarray, domain: np.ndarray, n: int, rows_per_shard: int) -> np.ndarray:
    """At most ``n`` of ``rows`` (store order), as even over domains as they allow, read from as few shards
    as that takes: whole shards spread evenly over the selection are added until every domain's quota is
    there (evaluation and calibration read a few shards, not one shard per row)."""
    if n >= len(rows):
        return rows
    dom = domain[rows]
    names, counts = np.unique(dom, return_counts=True)
    quota = _even_quota(counts, n)
    shard = rows // rows_per_shard
    shards = np.unique(shard)
    k = max(1, min(len(shards), -(-n // rows_per_shard)))
    while True:
        pick = shards[np.unique(np.linspace(0, len(shards) - 1, k).round().astype(np.int64))]
        inside = np.isin(shard, pick)
        have = np.bincount(np.searchsorted(names, dom[inside]), minlength=len(names))
        if (have >= quota).all() or len(pick) >= len(shards):
            break
        k = min(len(shards), k + max(1, k // 4))
    out = [spread(rows[inside & (dom == d)], int(q)) for d, q in zip(names, quota)]
    return np.sort(np.concatenate(out))
