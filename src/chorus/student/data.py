"""Streaming rows of one store, joined with the cached targets of the selected teachers.

Selection. Rows are chosen by split and domain from the store's row index (``storage._index``; an older
store without one is scanned), then ``exclude_rows`` / ``max_rows`` (evenly spread, or stratified by domain
from a few whole shards for evaluation and calibration).

Order. An epoch's row order is a pure function of (seed, epoch, selection): shards permuted, rows shuffled
within each, the shards dealt into ``shuffle_shards`` lanes read side by side (a batch mixes that many
shards, so several domains even when `prepare` wrote shards domain by domain), then shuffled inside windows
of ``shuffle_buffer`` rows (``order``). Epochs are concatenated into one endless *global stream* of rows.

Partition. Micro-batch j of the stream holds rows ``[g0 + j·B·R, g0 + (j+1)·B·R)`` (B rows per rank,
R ranks, g0 the start offset); rank r takes the r-th slice of B rows. So no row is seen twice in an epoch,
the global batch does not depend on R, and the loader state is one number: the stream offset after the last
batch consumed (``{"epoch", "position"}``). :class:`StreamLoader` decodes and collates ahead on threads of
this process; the batches and their order do not depend on how many.

Batches are collated in numpy from whole decoded shards (``Store.read_shard``, checksums verified against
each shard's commit record), no per-token Python; a decoded shard is dropped once the stream passed its last
row (``shards``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from chorus.errors import ChorusError
from chorus.progress import say
from chorus.store import (
    STATS_FIELDS,
    CorpusManifest,
    Store,
    TeacherManifest,
    check_teachers,
    decode_stats,
    decode_values,
)
from chorus.store.index import row_index
from chorus.student.order import last_use, shuffled, spread, stratified
from chorus.student.shards import ShardCache, prefetch

SPLITS = {"train": 0, "valid": 1}
CORPUS_ARRAYS = ("input_ids", "segment_ids")
SHUFFLE_SHARDS = 8  # shards read side by side by default: a batch mixes rows (and domains) of that many shards
ORDER = "lanes-v1"  # the epoch order's definition (``order.shuffled``), recorded in the loader state
PREFETCH_BATCHES = 4  # batches collated ahead, and whose shards are decoded ahead, by StreamLoader's threads


_spread = spread  # at most n rows, evenly spread over them (not the first ones): ``train_rows``' selection


def _dist_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class _Teacher:
    name: str
    arrays: tuple[str, ...]
    codec: str
    params: dict
    manifest: TeacherManifest


# ---------------------------------------------------------------------------------------------- dataset
class CachedRows(IterableDataset):
    """Batches of rows of ``split`` (and ``domains``) with each teacher's cached targets.

    Each item is a dict: ``input_ids`` (B, L) int64, ``segment_ids`` (B, L) int32 (0 = padding),
    ``domain`` (B,) int64, ``row`` (B,) int64 (store row index), ``stop`` (stream offset after this
    batch) and ``teachers``: {name: {"topk_ids" (B, L, k), "topk_logprobs" (B, L, k), and with
    ``samples``: "sample_ids" (B, L, m), "sample_counts" (B, L, m), and for a cache with statistics (format v2)
    float32 "log_tail", "entropy", "gold_logprob" (B, L) and, with the top-k, "tail_logz" (B, L, G)}}. Ids and counts keep their stored
    unsigned dtype (:func:`teacher_dist` widens them on the training device, so the loader moves
    fewer bytes); log-probs are float16 for the fp16 codec (exact; widened on the device) and float32
    otherwise, decoded per the manifest (``chorus.store.decode_values``; the fp16 codec's delta coding is
    undone here with torch's cumsum, bit-identical and faster than numpy's along a short axis).

    ``epochs=None`` streams forever (training); ``epochs=n`` stops after n epochs (evaluation, tests).
    ``max_rows`` picks rows evenly spread over the selection, or with ``stratify`` evenly over domains from
    a few whole shards (evaluation, calibration). ``shuffle_shards``: shards read side by side (memory: that
    many decoded shards; default the larger of 8 and a ``shuffle_buffer``'s worth).
    """

    def __init__(
        self,
        store: str,
        *,
        batch_size: int,
        teachers: Sequence[str] = (),
        split: str = "train",
        domains: Sequence[str] | None = None,
        samples: bool = False,
        topk: bool = True,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        shuffle_shards: int | None = None,
        seed: int = 0,
        epochs: int | None = None,
        max_rows: int | None = None,
        exclude_rows: int | None = None,
        stratify: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        verify: bool = True,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ChorusError(f"batch_size must be at least 1, got {batch_size}")
        if split not in SPLITS:
            raise ChorusError(f"unknown split '{split}'; expected one of: {', '.join(SPLITS)}")
        if shuffle_shards is not None and shuffle_shards < 1:
            raise ChorusError(f"shuffle_shards: expected a positive number of shards, got {shuffle_shards}")
        self.url, self.storage_options = store, dict(storage_options or {})
        self.batch_size, self.shuffle, self.seed, self.epochs = batch_size, shuffle, seed, epochs
        self.buffer = max(1, shuffle_buffer)
        self.verify = verify
        r, w = _dist_rank()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ChorusError(f"rank {self.rank} is outside world size {self.world_size}")

        st = self._open()
        self.manifest: CorpusManifest = st.manifest
        m = self.manifest
        self.lanes = shuffle_shards or max(SHUFFLE_SHARDS, -(-self.buffer // m.rows_per_shard))
        self.teacher_manifests = check_teachers(st, list(teachers), need_samples=samples)
        self.teachers = [
            _Teacher(t.name, (("topk_ids", "topk_logprobs") if topk else ()) + (("sample_ids", "sample_counts") if samples else ())
                     + ((("stats", "tail_logz") if topk else ("stats",)) if t.has_stats else ()),
                     t.value_codec, dict(t.value_params), t)
            for t in self.teacher_manifests
        ]
        split_of, domain_of = row_index(st, m, verify=verify)  # the store's index; older stores: a scan
        keep = split_of == SPLITS[split]
        if domains:
            unknown = [d for d in domains if d not in m.domains]
            if unknown:
                raise ChorusError(f"unknown domain(s) {', '.join(unknown)}; the store has: {', '.join(m.domains)}")
            keep &= np.isin(domain_of, [m.domains.index(d) for d in domains])
        rows = np.flatnonzero(keep)
        for what, n in (("max_rows", max_rows), ("exclude_rows", exclude_rows)):
            if n is not None and n < 1:
                raise ChorusError(f"{what}: expected a positive number of rows, got {n}")
        if exclude_rows is not None:  # the rows `max_rows=exclude_rows` picks from the whole split, left out
            rows = np.setdiff1d(rows, _spread(np.flatnonzero(split_of == SPLITS[split]), exclude_rows))
        if max_rows is not None:
            rows = stratified(rows, domain_of, max_rows, m.rows_per_shard) if stratify else _spread(rows, max_rows)
        if len(rows) == 0:
            what = f"split '{split}'" + (f" and domains {', '.join(domains)}" if domains else "")
            raise ChorusError(f"store '{store}' has no rows in {what}")
        self.rows = rows  # selected store rows, in store order
        self.domain_of = domain_of
        self.rows_per_epoch = len(rows)
        self._position = 0  # stream offset (rows, all ranks together) of the next batch
        self._orders: OrderedDict[int, tuple[np.ndarray, dict]] = OrderedDict()
        self._store: Store | None = None

    # ------------------------------------------------------------------ plumbing
    def _open(self) -> Store:
        return Store.open(self.url, "r", self.storage_options)

    def __getstate__(self) -> dict:  # workers reopen the store themselves
        state = dict(self.__dict__)
        state["_store"] = None
        state["_orders"] = OrderedDict()
        return state

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = self._open()
        return self._store

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer.vocab_size

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"epoch": self._position // self.rows_per_epoch, "position": self._position % self.rows_per_epoch,
                "seed": self.seed, "rows_per_epoch": self.rows_per_epoch, "order": ORDER, "lanes": self.lanes}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("rows_per_epoch") != self.rows_per_epoch:
            raise ChorusError(
                f"loader state is for seed {state.get('seed')} over {state.get('rows_per_epoch')} rows per epoch; "
                f"this run has seed {self.seed} over {self.rows_per_epoch}: resume with the same data settings"
            )
        if "order" not in state:  # a checkpoint from before lanes: same rows per epoch, another order
            say("warning: this loader state predates the current row order; the rest of its epoch follows the new "
                "order (some rows of that epoch may repeat or be left out), later epochs are exact")
        elif state["order"] != ORDER or state.get("lanes", self.lanes) != self.lanes:
            raise ChorusError(f"loader state is for row order {state['order']} over {state.get('lanes')} shards side by "
                              f"side; this run has {ORDER} over {self.lanes}: resume with the same shuffle settings")
        self._position = int(state["epoch"]) * self.rows_per_epoch + int(state["position"])

    # ------------------------------------------------------------------ order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The store rows of ``epoch`` in stream order (a pure function of seed and epoch; see ``order``)."""
        return self._epoch(epoch)[0]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, dict[int, int]]:
        if epoch not in self._orders:
            rps = self.manifest.rows_per_shard
            rows = (shuffled(self.rows, rps, seed=self.seed, epoch=epoch, lanes=self.lanes, window=self.buffer)
                    if self.shuffle else self.rows)
            self._orders[epoch] = (rows, last_use(rows, rps))
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _stream(self, start: int, stop: int) -> tuple[np.ndarray, dict[int, int]]:
        """Store rows at global stream offsets [start, stop), and {shard: offset of its last row in the stream}."""
        n, rps = self.rows_per_epoch, self.manifest.rows_per_shard
        parts, expiry = [], {}
        while start < stop:
            epoch, pos = divmod(start, n)
            take = min(stop - start, n - pos)
            order, last = self._epoch(epoch)
            part = order[pos : pos + take]
            for s in np.unique(part // rps).tolist():
                expiry[s] = max(expiry.get(s, -1), epoch * n + last[s])
            parts.append(part)
            start += take
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), expiry

    def _plan(self, start: int, worker: int = 0, workers: int = 1) -> Iterator[tuple]:
        """This rank's micro-batches j ≡ worker (mod workers) from stream offset ``start``: (rows, offset of
        the first, stream offset after the micro-batch, {shard: expiry})."""
        end = None if self.epochs is None else self.epochs * self.rows_per_epoch
        g, b, r = self.global_batch, self.batch_size, self.rank
        j = worker
        while True:
            lo = start + j * g
            if end is not None and lo >= end:
                return
            hi = lo + g if end is None else min(lo + g, end)
            first = min(lo + r * b, hi)
            rows, expiry = self._stream(first, min(lo + (r + 1) * b, hi))
            j += workers
            yield rows, first, hi, expiry

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        """Batches decoded in this thread (inside a DataLoader worker: micro-batches j ≡ worker mod workers,
        handed back round-robin, i.e. in order). :class:`StreamLoader` prefetches on threads instead."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cache = ShardCache(self._load)
        for item in self._plan(self._position, worker, workers):
            batch = self._make(item, cache)
            if info is None:
                self._position = item[2]
            if batch is not None:  # the tail of a finite stream is shorter than a global batch
                yield batch

    def prefetched(self, threads: int, *, pin_memory: bool = False) -> Iterator[dict]:
        """The same batches, decoded ``threads`` shards at a time and collated on a background thread."""
        _ = self.store  # opened once here, shared by the threads
        # look ahead at least one shard's worth of rows: the next lane to change shards is decoded before it is due
        lookahead = max(PREFETCH_BATCHES, -(-self.manifest.rows_per_shard // self.global_batch))
        for batch, stop in prefetch(self._plan(self._position), self._make, self._load, threads=threads,
                                    lookahead=lookahead, depth=PREFETCH_BATCHES, pin_memory=pin_memory):
            self._position = stop
            if batch is not None:
                yield batch

    def _make(self, item: tuple, cache: ShardCache) -> dict | None:
        rows, first, stop, expiry = item
        cache.release(first)
        if len(rows) == 0:
            return None
        batch = self._collate(rows, cache, expiry)
        batch["stop"] = stop
        return batch

    def _load(self, shard: int) -> dict:
        """One shard of the corpus and of every teacher, each checked against its own commit record."""
        st = self.store
        out = {}
        for key, unit, names in [("corpus", "corpus", CORPUS_ARRAYS)] + [(t.name, f"teachers/{t.name}", t.arrays)
                                                                      for t in self.teachers]:
            commit = st.commit(unit, shard)
            if commit is None:
                raise ChorusError(f"shard {shard} of {unit} in '{self.url}' is not committed; finish writing it first")
            out[key] = st.read_shard(unit, shard, names, commit=commit, verify=self.verify)
        return out

    def _collate(self, rows: np.ndarray, cache: ShardCache, expiry: dict[int, int]) -> dict:
        rps = self.manifest.rows_per_shard
        shard_of, local = (rows // rps).tolist(), (rows % rps).tolist()
        decoded = {s: cache.get(s, expiry[s]) for s in dict.fromkeys(shard_of)}  # in first-use order

        def gather(unit: str, name: str, dtype: Any = None) -> np.ndarray:
            # row by row into one array: a single copy (fancy indexing per shard copies twice, slower)
            src = {s: data[unit][name] for s, data in decoded.items()}
            first = src[shard_of[0]]
            out = np.empty((len(rows), *first.shape[1:]), dtype=dtype or first.dtype)
            for i, (s, j) in enumerate(zip(shard_of, local)):
                out[i] = src[s][j]
            return out

        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(gather("corpus", "input_ids", np.int64)),
            "segment_ids": torch.from_numpy(gather("corpus", "segment_ids", np.int32)),
            "domain": torch.from_numpy(self.domain_of[rows].astype(np.int64)),
            "row": torch.from_numpy(rows.astype(np.int64)),
            "teachers": {},
        }
        for t in self.teachers:
            out = {}
            for name in t.arrays:
                a = gather(t.name, name)
                if name == "topk_logprobs":
                    a = _values(a, t)
                if name not in ("stats", "tail_logz"):
                    # ids and counts keep their stored unsigned dtype: widened on the training device, after the copy
                    out[name] = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
            if t.manifest.has_stats:
                out.update(self._stats(t, gather, out))
            batch["teachers"][t.name] = out
        return batch

    @staticmethod
    def _stats(t: _Teacher, gather, out: dict) -> dict:
        """A teacher's exact statistics, decoded to float32: log_tail, entropy, gold_logprob (B, L) and,
        with the top-k loaded (its k-th value bounds the code), tail_logz (B, L, G)."""
        stats = gather(t.name, "stats")
        if "topk_logprobs" in out:
            kth = out["topk_logprobs"][..., -1].numpy().astype(np.float32)
            dec = decode_stats({"stats": stats, "tail_logz": gather(t.name, "tail_logz")}, t.manifest, kth)
        else:
            plain = stats.astype(np.float32)
            dec = {name: plain[..., i] for i, name in enumerate(STATS_FIELDS)}
        return {name: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for name, v in dec.items()}


def _values(stored: np.ndarray, t: _Teacher) -> np.ndarray | torch.Tensor:
    """A batch's stored top-k values → log-probs, per the manifest's codec. The fp16 codec with delta coding
    is the running sum of the 16-bit codes along k (``storage._targets``): torch's int16 cumsum computes it
    modulo 2^16 exactly as numpy's does, faster along a short axis (the loader's largest cost;
    docs/measurements.md)."""
    if t.codec == "fp16" and t.params.get("delta"):
        codes = torch.from_numpy(np.ascontiguousarray(stored).view(np.int16))
        return torch.cumsum(codes, -1, dtype=torch.int16).view(torch.float16)
    return decode_values(stored, t.codec, t.params, dtype=np.float16 if t.codec == "fp16" else np.float32)


class StreamLoader:
    """Batches of a :class:`CachedRows` that knows how far it got: ``state_dict()`` is the offset after the
    last batch handed out, so a checkpoint taken after step n resumes at batch n + 1 whatever was prefetched.

    ``num_workers`` > 0: shards are decoded by that many threads ahead of use, and batches collated on a
    background thread, all in this process (measured faster than DataLoader worker processes, which each
    decode shards and pickle every batch across: benchmarks/train.py). The batches are the same, in the same
    order, for any ``num_workers``. The pipeline persists: iterating again continues it (no restart) unless
    the loader state was changed in between."""

    def __init__(self, dataset: CachedRows, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        if num_workers < 0:
            raise ChorusError(f"num_workers must be 0 or more, got {num_workers}")
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._live: Iterator[dict] | None = None
        self._live_at = -1  # stream offset the live pipeline continues from

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        if self.num_workers == 0:
            yield from ds
            return
        if self._live is None or self._live_at != ds._position:
            self.close()
            self._live = ds.prefetched(self.num_workers, pin_memory=self.pin_memory)
        live = self._live
        for batch in live:
            self._live_at = ds._position
            yield batch
        self._live = None

    def close(self) -> None:
        if self._live is not None:
            self._live.close()  # type: ignore[attr-defined]
            self._live = None

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- positions
@dataclass
class Positions:
    """The next-token positions of a batch that predict a real token.

    select (N,) int64 indexes the flattened (B·(L-1)) positions; gold (N,) their next tokens; domain (N,)
    the domain of each position's row. Position t predicts token t+1, so it counts when both t and t+1
    are real tokens (segment id > 0); the teacher's cached distribution at t is its prediction of t+1."""

    select: torch.Tensor
    gold: torch.Tensor
    domain: torch.Tensor
    attention_mask: torch.Tensor  # (B, L)


def positions(batch: dict, device: torch.device | str = "cpu") -> Positions:
    ids = batch["input_ids"].to(device, non_blocking=True)
    real = batch["segment_ids"].to(device, non_blocking=True) > 0
    ok = (real[:, :-1] & real[:, 1:]).reshape(-1)
    select = torch.nonzero(ok).squeeze(1)
    gold = ids[:, 1:].reshape(-1)[select]
    if len(select) == 0:  # nothing to predict: one ignored position keeps every rank's step (and DDP) in line
        select = torch.zeros(1, dtype=torch.long, device=ids.device)
        gold = torch.full((1,), -100, dtype=ids.dtype, device=ids.device)
    domain = batch["domain"].to(device)[:, None].expand(-1, ids.shape[1] - 1).reshape(-1)[select]
    return Positions(select, gold, domain, real.long())
