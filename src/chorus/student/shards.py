"""Decoded shards of one reader, and the background pipeline that decodes and collates ahead of the consumer.

Every decoded shard carries an *expiry*: the stream offset of its last row (from the epoch order), so it is
dropped as soon as the stream has passed it, never while a later batch still needs it, and decoded once per
epoch. With an executor, shards are decoded ahead, side by side (reads, zstd/blosc and CRC release the GIL).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

DONE = object()


class ShardCache:
    def __init__(self, load: Callable[[int], dict], executor: ThreadPoolExecutor | None = None) -> None:
        self.load, self.executor = load, executor
        self.entries: dict[int, list] = {}  # shard -> [decoded dict | Future | None, expiry]

    def need(self, shard: int, expiry: int) -> None:
        """Note that ``shard`` is needed up to stream offset ``expiry``; with an executor, start decoding it."""
        entry = self.entries.get(shard)
        if entry is None:
            self.entries[shard] = [self.executor.submit(self.load, shard) if self.executor else None, expiry]
        elif expiry > entry[1]:
            entry[1] = expiry

    def get(self, shard: int, expiry: int) -> dict:
        self.need(shard, expiry)
        entry = self.entries[shard]
        if entry[0] is None:
            entry[0] = self.load(shard)
        elif isinstance(entry[0], Future):
            entry[0] = entry[0].result()
        return entry[0]

    def release(self, offset: int) -> None:
        """Drop every shard whose last row lies before stream offset ``offset``."""
        for shard in [s for s, (_, expiry) in self.entries.items() if expiry < offset]:
            data = self.entries.pop(shard)[0]
            if isinstance(data, Future):
                data.cancel()


def pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    return batch


def prefetch(plan: Iterable[tuple], make: Callable[[tuple, ShardCache], dict | None], load: Callable[[int], dict], *,
             threads: int, lookahead: int, depth: int, pin_memory: bool = False) -> Iterator[tuple[dict | None, int]]:
    """(batch or None for an empty slice, stream offset after it), in plan order, built on a background thread.

    ``plan`` yields (rows, first offset, stop offset, {shard: expiry}); the shards of the next ``lookahead``
    planned batches are decoded by ``threads`` threads while the batch before them is collated by ``make``."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chorus-shards")
        cache = ShardCache(load, pool)
        ahead: deque = deque()
        try:
            for item in plan:
                ahead.append(item)
                for shard, expiry in item[3].items():
                    cache.need(shard, expiry)
                if len(ahead) > lookahead:
                    first = ahead.popleft()
                    batch = make(first, cache)
                    if not put((pin(batch) if pin_memory and batch is not None else batch, first[2])):
                        return
            while ahead:
                first = ahead.popleft()
                batch = make(first, cache)
                if not put((pin(batch) if pin_memory and batch is not None else batch, first[2])):
                    return
            put(DONE)
        except BaseException as e:  # re-raised in the consumer
            put(e)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    thread = threading.Thread(target=produce, name="chorus-loader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
