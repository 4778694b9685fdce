"""Streaming rows of one store, joined with the cached targets of the selected teachers.

Order. An epoch's row order is a pure function of (seed, epoch, split/domain selection): the shards
are permuted, their selected rows concatenated, and that stream is shuffled inside consecutive
windows of ``shuffle_buffer`` rows (a shard-order + in-memory-buffer shuffle whose memory is a
window's shards). Epochs are concatenated into one endless *global stream* of rows.

Partition. Micro-batch j of the stream holds rows ``[g0 + j·B·R, g0 + (j+1)·B·R)`` (B rows per rank,
R ranks, g0 the start offset); rank r takes the r-th slice of B rows, and DataLoader worker w of W
takes the micro-batches j ≡ w (mod W), which the DataLoader hands back round-robin, i.e. in order.
So no row is seen twice in an epoch, the global batch does not depend on R, and the loader state is
one number: the stream offset after the last batch consumed (``{"epoch", "position"}``).

Batches are collated in numpy from whole decoded shards (``Store.read_shard``), no per-token Python.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from chorus.errors import ChorusError
from chorus.storage import STATS_FIELDS, CorpusManifest, Store, TeacherManifest, decode_stats, decode_values
from chorus.storage._check import check_store

SPLITS = {"train": 0, "valid": 1}
CORPUS_ARRAYS = ("input_ids", "segment_ids")


# ---------------------------------------------------------------------------------------------- checks
def check_teachers(store: Store, names: Sequence[str], *, need_samples: bool = False) -> list[TeacherManifest]:
    """The manifests of ``names``, refusing (one line, naming the teacher) any that cannot be joined, and a store
    with any structural problem a reader would trip on (``chorus verify`` names the same)."""
    corpus = store.manifest
    out = []
    for name in names:  # what a user most likely got wrong first, named plainly; then the store's structure
        m = store.teacher_manifest(name)
        unit = f"teachers/{name}"
        if m.status != "complete" or not store.is_complete(unit, corpus.num_shards):
            done = len(store.commits(unit))
            raise ChorusError(f"teacher '{name}' is not complete ({done}/{corpus.num_shards} shards committed, "
                              f"status '{m.status}'); finish it with `chorus cache` first")
        if m.corpus_fingerprint != corpus.fingerprint:
            raise ChorusError(f"teacher '{name}' was cached from another corpus (fingerprint {m.corpus_fingerprint}, "
                              f"store {corpus.fingerprint}); recache it with `chorus cache --store {store.url}`")
        if m.tokenizer_fingerprint != corpus.tokenizer.fingerprint or m.vocab_size != corpus.tokenizer.vocab_size:
            raise ChorusError(f"teacher '{name}' uses another tokenizer (vocab {m.vocab_size}, store vocab "
                              f"{corpus.tokenizer.vocab_size}); teachers and students must share the store's tokenizer")
        if need_samples and m.num_samples == 0:
            raise ChorusError(f"teacher '{name}' has no sampled targets (cached with --samples 0); "
                              "use target=topk_tail or recache it with --samples M")
        out.append(m)
    check_store(store, list(names))
    return out


def complete_teachers(store: Store) -> list[str]:
    """Names of the teachers of ``store`` that can be joined (complete, same corpus and tokenizer)."""
    ok = []
    for name in store.teacher_names():
        try:
            check_teachers(store, [name])
        except ChorusError:
            continue
        ok.append(name)
    return ok


def _spread(rows: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``rows``, evenly spread over them (not the first ones): ``train_rows``' selection."""
    return rows if n >= len(rows) else rows[np.linspace(0, len(rows) - 1, n).astype(np.int64)]


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
    otherwise, decoded by ``chorus.storage.decode_values`` per the manifest.

    ``epochs=None`` streams forever (training); ``epochs=n`` stops after n epochs (evaluation, tests).
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
        seed: int = 0,
        epochs: int | None = None,
        max_rows: int | None = None,
        exclude_rows: int | None = None,
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
        self.teacher_manifests = check_teachers(st, list(teachers), need_samples=samples)
        self.teachers = [
            _Teacher(t.name, (("topk_ids", "topk_logprobs") if topk else ()) + (("sample_ids", "sample_counts") if samples else ())
                     + ((("stats", "tail_logz") if topk else ("stats",)) if t.has_stats else ()),
                     t.value_codec, dict(t.value_params), t)
            for t in self.teacher_manifests
        ]
        commits = st.commits("corpus")  # listed once: every shard's record is read here
        if len(commits) != m.num_shards:
            raise ChorusError(f"store '{store}' has uncommitted corpus shards; rerun `chorus prepare`")
        meta = [st.read_shard("corpus", i, ("split", "domain"), commit=commits[i]) for i in range(m.num_shards)]
        split_of = np.concatenate([x["split"] for x in meta])
        domain_of = np.concatenate([x["domain"] for x in meta]).astype(np.int64)
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
            rows = _spread(rows, max_rows)
        if len(rows) == 0:
            what = f"split '{split}'" + (f" and domains {', '.join(domains)}" if domains else "")
            raise ChorusError(f"store '{store}' has no rows in {what}")
        self.rows = rows  # selected store rows, in store order
        self.domain_of = domain_of
        self.rows_per_epoch = len(rows)
        self._position = 0  # stream offset (rows, all ranks together) of the next batch
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._store: Store | None = None
        self._commits: dict | None = None

    # ------------------------------------------------------------------ plumbing
    def _open(self) -> Store:
        return Store.open(self.url, "r", self.storage_options)

    def __getstate__(self) -> dict:  # workers reopen the store themselves
        state = dict(self.__dict__)
        state["_store"] = None
        state["_commits"] = None
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
                "seed": self.seed, "rows_per_epoch": self.rows_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("rows_per_epoch") != self.rows_per_epoch:
            raise ChorusError(
                f"loader state is for seed {state.get('seed')} over {state.get('rows_per_epoch')} rows per epoch; "
                f"this run has seed {self.seed} over {self.rows_per_epoch}: resume with the same data settings"
            )
        self._position = int(state["epoch"]) * self.rows_per_epoch + int(state["position"])

    # ------------------------------------------------------------------ order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The store rows of ``epoch`` in stream order (a pure function of seed and epoch)."""
        if epoch in self._orders:
            return self._orders[epoch]
        rows = self.rows
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            m = self.manifest
            shard = rows // m.rows_per_shard
            rank_of_shard = np.empty(m.num_shards, dtype=np.int64)
            rank_of_shard[rng.permutation(m.num_shards)] = np.arange(m.num_shards)
            rows = rows[np.argsort(rank_of_shard[shard], kind="stable")]  # shard order permuted
            window = np.arange(len(rows)) // self.buffer
            rows = rows[np.lexsort((rng.random(len(rows)), window))]  # shuffled inside each window
        self._orders[epoch] = rows
        while len(self._orders) > 2:
            self._orders.popitem(last=False)
        return rows

    def _stream(self, start: int, stop: int) -> np.ndarray:
        """Store rows at global stream offsets [start, stop)."""
        n = self.rows_per_epoch
        parts = []
        while start < stop:
            epoch, pos = divmod(start, n)
            take = min(stop - start, n - pos)
            parts.append(self.epoch_order(epoch)[pos : pos + take])
            start += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        end = None if self.epochs is None else self.epochs * self.rows_per_epoch
        start = self._position
        cache: OrderedDict[int, dict] = OrderedDict()
        j = worker
        while True:
            lo = start + j * self.global_batch
            if end is not None and lo >= end:
                return
            hi = lo + self.global_batch if end is None else min(lo + self.global_batch, end)
            mine = self._stream(min(lo + self.rank * self.batch_size, hi), min(lo + (self.rank + 1) * self.batch_size, hi))
            j += workers
            if len(mine) == 0:  # the tail of a finite stream is shorter than a global batch
                if info is None:
                    self._position = hi
                continue
            batch = self._collate(mine, cache)
            batch["stop"] = hi
            if info is None:
                self._position = hi
            yield batch

    def _shard(self, shard: int, cache: OrderedDict) -> dict:
        if shard in cache:
            cache.move_to_end(shard)
            return cache[shard]
        st = self.store
        if self._commits is None:  # listed once per process: commit records never change once written
            self._commits = {u: st.commits(u) for u in ["corpus"] + [f"teachers/{t.name}" for t in self.teachers]}
        c = self._commits
        data = {"corpus": st.read_shard("corpus", shard, CORPUS_ARRAYS, commit=c["corpus"].get(shard), verify=self.verify)}
        for t in self.teachers:
            unit = f"teachers/{t.name}"
            data[t.name] = st.read_shard(unit, shard, t.arrays, commit=c[unit].get(shard), verify=self.verify)
        cache[shard] = data
        # a window's shards plus one on either side stay decoded
        limit = max(2, -(-self.buffer // self.manifest.rows_per_shard) + 2)
        while len(cache) > limit:
            cache.popitem(last=False)
        return data

    def _collate(self, rows: np.ndarray, cache: OrderedDict) -> dict:
        rps = self.manifest.rows_per_shard
        shard_of, local = rows // rps, rows % rps
        shards = list(dict.fromkeys(shard_of.tolist()))  # in first-use order
        picks = [(s, np.flatnonzero(shard_of == s)) for s in shards]
        decoded = [(self._shard(s, cache), where) for s, where in picks]

        def gather(unit: str, name: str) -> np.ndarray:
            first = decoded[0][0][unit][name]
            if len(decoded) == 1:
                return first[local]
            out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
            for data, where in decoded:
                out[where] = data[unit][name][local[where]]
            return out

        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(gather("corpus", "input_ids").astype(np.int64)),
            "segment_ids": torch.from_numpy(gather("corpus", "segment_ids").astype(np.int32)),
            "domain": torch.from_numpy(self.domain_of[rows]),
            "row": torch.from_numpy(rows.astype(np.int64)),
            "teachers": {},
        }
        for t in self.teachers:
            out = {}
            for name in t.arrays:
                a = gather(t.name, name)
                if name == "topk_logprobs":  # the format's own decoder (codec, delta coding) on the batch's rows
                    a = decode_values(a, t.codec, t.params, dtype=np.float16 if t.codec == "fp16" else np.float32)
                if name not in ("stats", "tail_logz"):
                    # ids and counts keep their stored unsigned dtype: widened on the training device, after the copy
                    out[name] = torch.from_numpy(a)
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


class StreamLoader:
    """A DataLoader over :class:`CachedRows` that knows how far it got: ``state_dict()`` is the offset
    after the last batch handed out, so a checkpoint taken after step n resumes at batch n + 1
    whatever the workers had prefetched."""

    def __init__(self, dataset: CachedRows, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            yield from self.dataset
            return
        # a generator of its own: without one, iter(DataLoader) draws the workers' base seed from the global RNG,
        # shifting dropout's stream by one draw at a different step in a resumed run than in an uninterrupted one
        generator = torch.Generator().manual_seed(self.dataset.seed)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=4, persistent_workers=False, generator=generator)
        for batch in loader:
            self.dataset._position = int(batch["stop"])
            yield batch

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
