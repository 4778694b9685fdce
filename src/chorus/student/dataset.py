"""A store's rows with their teachers' cached targets as a ``torch.utils.data`` dataset, for any training loop.

:class:`CacheDataset` is iterable (the rows stream from whole decoded shards, as `chorus train` reads them; a
map-style dataset would decode a shard per random row). It yields one row at a time in `chorus train`'s order for
the same ``seed`` and ``batch_size``, and :func:`collate` stacks ``batch_size`` consecutive rows back into the batch
`chorus train` would have trained on, bit for bit. Under torchrun each rank takes its own slice of every global
batch (RANK / WORLD_SIZE), so a loader must not split it again. ``state_dict()`` after n whole batches resumes at
batch n + 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset

from chorus.errors import ChorusError
from chorus.student.data import CachedRows, StreamLoader

TARGETS = ("topk_tail", "topk_renorm", "samples")


class CacheDataset(IterableDataset):
    """Rows of ``split`` with the cached targets of ``teachers``, one dict per row.

    A row: ``input_ids`` (L,) int64, ``segment_ids`` (L,) int32 (0 = padding), ``domain`` and ``row`` (store row)
    int64 scalars, ``teachers`` {name: {array: tensor}} (see :class:`~chorus.student.data.CachedRows`). Batch with
    :func:`collate` and exactly ``batch_size`` rows per batch. ``target``: the target mode the loss will use
    ("samples" loads the sampled targets, the others the top-k). ``epochs=None`` streams forever (give the loop
    a step count); ``num_workers`` threads decode shards ahead, in this process, with the same rows for any number.
    """

    def __init__(self, store: str, *, batch_size: int, teachers: Sequence[str] = (), split: str = "train",
                 seed: int = 0, target: str = "topk_tail", domains: Sequence[str] | None = None,
                 max_rows: int | None = None, exclude_rows: int | None = None, shuffle_buffer: int = 1024,
                 shuffle_shards: int | None = None, epochs: int | None = None, num_workers: int = 0,
                 rank: int | None = None, world_size: int | None = None, storage_options: dict | None = None) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ChorusError(f"unknown target '{target}'; expected one of: {', '.join(TARGETS)}")
        self.rows = CachedRows(store, batch_size=batch_size, teachers=teachers, split=split, domains=domains or None,
                               samples=target == "samples", topk=target != "samples", shuffle_buffer=shuffle_buffer,
                               shuffle_shards=shuffle_shards, seed=seed, epochs=epochs, max_rows=max_rows,
                               exclude_rows=exclude_rows, rank=rank, world_size=world_size,
                               storage_options=storage_options)
        self.loader = StreamLoader(self.rows, num_workers=num_workers)
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: Any, *, rank: int | None = None, world_size: int | None = None,
                    epochs: int | None = None) -> CacheDataset:
        """The training rows of a `chorus train` config (``chorus.config.TrainConfig``)."""
        return cls(cfg.store, batch_size=cfg.batch_size, teachers=cfg.teachers, split="train", seed=cfg.seed,
                   target=cfg.target, domains=cfg.train_domains or None, max_rows=cfg.train_rows,
                   exclude_rows=cfg.exclude_rows, shuffle_buffer=cfg.shuffle_buffer, shuffle_shards=cfg.shuffle_shards,
                   epochs=epochs, num_workers=cfg.num_workers, rank=rank, world_size=world_size,
                   storage_options=cfg.storage_options)

    @property
    def vocab_size(self) -> int:
        return self.rows.vocab_size

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            for i in range(len(batch["row"])):
                yield _row(batch, i)

    def batches(self) -> Iterator[dict]:
        """The same stream, already collated: what ``DataLoader(self, batch_size, collate_fn=collate)`` gives."""
        yield from self.loader

    def state_dict(self) -> dict:
        """Where the stream stands after the last whole batch handed out."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def _row(batch: dict, i: int) -> dict:
    return {"input_ids": batch["input_ids"][i], "segment_ids": batch["segment_ids"][i], "domain": batch["domain"][i],
            "row": batch["row"][i], "teachers": {t: {k: v[i] for k, v in arrays.items()}
                                                 for t, arrays in batch["teachers"].items()}}


def collate(rows: list[dict]) -> dict:
    """Rows of :class:`CacheDataset` → one batch, as `chorus train` and :class:`~chorus.student.loss.DistillLoss`
    take it; ``labels`` (input ids, padding -100) and ``shift_labels`` (the next token of each scored position, else
    -100) for code that counts tokens with them (the loss itself does not read them)."""
    if not rows:
        raise ChorusError("collate: no rows to batch")
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "segment_ids", "domain", "row")}
    batch["teachers"] = {t: {k: torch.stack([r["teachers"][t][k] for r in rows]) for k in arrays}
                         for t, arrays in rows[0]["teachers"].items()}
    real = batch["segment_ids"] > 0
    batch["labels"] = batch["input_ids"].masked_fill(~real, -100)
    # the next token of each position the loss scores (both ends real), as Trainer counts a step's tokens
    batch["shift_labels"] = batch["input_ids"][:, 1:].masked_fill(~(real[:, :-1] & real[:, 1:]), -100)
    return batch
