"""A background shard writer: the teacher never waits on the device→host copy, encoding or the store.

The recipe hands each batch's target tensors (still on the device) to :meth:`ShardWriter.put` and goes
on with the next batch. On a GPU, ``put`` only queues their copies into pinned host memory on a side stream
(after the batch's kernels, before the next batch's, with no wait: the copy engine overlaps the next forward).
A single thread waits for each batch's copies, assembles whole shards, encodes them
and calls ``Store.write_shard``, which commits each shard only once all of its arrays are written. The
queue is bounded, so a slow store applies back-pressure instead of filling memory. The first error in
the thread (a NaN found while encoding, a network failure) is re-raised in the caller's thread at its
next ``put`` or at ``close``; shards not yet complete are dropped, never committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from chorus.store import Store

_STOP = object()


@dataclass
class _Shard:
    """Host buffers of one shard being assembled from batches."""

    row_start: int
    num_rows: int
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    filled: int = 0


@dataclass
class _Batch:
    shard: int
    row_start: int  # the shard's first row
    num_rows: int  # the shard's row count
    offset: int  # this batch's first row within the shard
    tensors: dict[str, torch.Tensor]
    copied: object = None  # a CUDA event: the tensors are pinned host copies, complete once it has passed


def to_host_async(tensors: dict[str, torch.Tensor], stream: "torch.cuda.Stream | None") -> tuple[dict[str, torch.Tensor], object]:
    """CUDA tensors → pinned host copies queued on ``stream`` after the work already queued on the current one,
    and the CUDA event that marks them done (nothing waits here); tensors elsewhere come back as they are, with None."""
    if stream is None or not any(t.is_cuda for t in tensors.values()):
        return tensors, None
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    host = {}
    with torch.cuda.stream(stream):
        for name, t in tensors.items():
            t.record_stream(stream)  # the caching allocator must not hand its memory out before the copy ran
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record(stream)
    return host, event


class ShardWriter:
    """``encode(shard, row_start, host_arrays) -> arrays`` runs on the thread for each complete shard
    (it may raise to refuse the shard); ``before_commit(shard)`` runs after its chunks are written and before
    its commit record (it may raise to withhold it); ``on_commit(shard, arrays)`` is called after its commit.
    Commit records carry ``fingerprint``."""

    def __init__(self, store: Store, unit: str, *, encode: Callable[[int, int, dict[str, np.ndarray]], dict[str, np.ndarray]],
                 on_commit: Callable[[int, dict[str, np.ndarray]], None] | None = None, max_queue: int = 2,
                 fingerprint: str = "", before_commit: Callable[[int], None] | None = None) -> None:
        self.store, self.unit, self.encode, self.on_commit = store, unit, encode, on_commit
        self.fingerprint, self.before_commit = fingerprint, before_commit
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._shards: dict[int, _Shard] = {}
        self.committed: list[int] = []
        self._copy_stream: torch.cuda.Stream | None = None
        self._thread = threading.Thread(target=self._run, name="chorus-shard-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller's thread
    def put(self, shard: int, row_start: int, num_rows: int, offset: int, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one batch (rows ``offset ..`` of a shard of ``num_rows`` rows starting at ``row_start``)."""
        item = _Batch(shard, row_start, num_rows, offset, *self._to_host(tensors))
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _to_host(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], object]:
        if self._copy_stream is None and any(t.is_cuda for t in tensors.values()):
            self._copy_stream = torch.cuda.Stream(next(t.device for t in tensors.values() if t.is_cuda))
        return to_host_async(tensors, self._copy_stream)

    def close(self) -> None:
        """Write every complete shard still queued, stop the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            while self._thread.is_alive():
                try:
                    self._queue.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the caller failed: still commit the shards it finished (a rerun resumes after them)
            self.close()
        except Exception:
            pass  # the caller's exception is the one to report

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain so the caller never blocks on a full queue
            try:
                self._add(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e

    def _add(self, batch: _Batch) -> None:
        if batch.copied is not None:
            batch.copied.synchronize()  # this batch's copies only: the device goes on with the next batch
        host = {name: t.cpu().numpy() for name, t in batch.tensors.items()}
        shard = self._shards.get(batch.shard)
        if shard is None:
            shard = self._shards[batch.shard] = _Shard(batch.row_start, batch.num_rows)
            for name, a in host.items():
                shard.buffers[name] = np.empty((batch.num_rows, *a.shape[1:]), dtype=a.dtype)
        n = len(next(iter(host.values())))
        for name, a in host.items():
            shard.buffers[name][batch.offset: batch.offset + n] = a
        shard.filled += n
        if shard.filled == shard.num_rows:
            del self._shards[batch.shard]
            arrays = self.encode(batch.shard, shard.row_start, shard.buffers)
            check = None if self.before_commit is None else (lambda _c, s=batch.shard: self.before_commit(s))
            if check is not None:  # fenced out before writing a byte, not only before the commit
                check(None)
            self.store.write_shard(self.unit, batch.shard, shard.row_start, arrays, fingerprint=self.fingerprint,
                                   before_commit=check)
            self.committed.append(batch.shard)
            if self.on_commit is not None:
                self.on_commit(batch.shard, arrays)
