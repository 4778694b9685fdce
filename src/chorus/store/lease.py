"""Shard leases: a writer claims a shard (create-only) before it computes and writes it.

``<unit>/_leases/<shard>.json`` holds the owner (host, pid, a per-writer random id) and a heartbeat time; a
writer also holds ``<unit>/_leases/writer-<id>.json`` for its whole run, so ``--overwrite`` can see that another
writer is live and refuse. A background thread rewrites the heartbeat of every held lease. A lease is *stale*
(anyone may take it over) when its heartbeat is older than ``stale_s`` or its owner is a dead process on this
host (a kill -9 resumes at once, without waiting out the heartbeat).

Chosen over attempt-unique chunk keys because it keeps the standard zarr chunk layout (a cache stays a plain
zarr group any reader opens) and costs two small objects per shard (create + delete), the same on a local disk
and on S3, whose create-only PUT (``If-None-Match: *``) makes the claim atomic. A takeover race (two writers
seeing the same stale lease) is narrowed by re-reading the lease before commit and closed by the commit record:
it checksums the bytes its writer encoded, so interleaved chunks never verify.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from chorus import failpoints
from chorus.errors import ChorusError

LEASES = "_leases"
HEARTBEAT_S = float(os.environ.get("CHORUS_LEASE_HEARTBEAT_S", 10))
STALE_S = float(os.environ.get("CHORUS_LEASE_STALE_S", 60))
HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale(info: dict, *, stale_s: float = STALE_S, now: float | None = None) -> bool:
    """Whether a lease record no longer protects its shard."""
    now = time.time() if now is None else now
    if not isinstance(info, dict) or not isinstance(info.get("heartbeat"), (int, float)):
        return True
    if info.get("host") == HOST and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        return True
    return now - info["heartbeat"] > stale_s


def describe(info: dict) -> str:
    age = time.time() - info.get("heartbeat", 0)
    return f"pid {info.get('pid')} on {info.get('host')} (heartbeat {age:.0f}s ago)"


class ShardLeases:
    """The leases one writer holds on one unit of ``store``; use as a context manager (releases all on exit)."""

    def __init__(self, store, unit: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.store, self.unit, self.heartbeat_s, self.stale_s = store, unit, heartbeat_s, stale_s
        self.owner = uuid.uuid4().hex
        self.base = f"{store.root}/{unit}/{LEASES}"
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ records
    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": HOST, "pid": os.getpid(), "heartbeat": time.time()}).encode()

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}.json"

    def _read(self, key: str) -> dict | None:
        try:
            return json.loads(self.store.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn record (killed mid-write on a filesystem without atomic create): stale
            return {}

    def _create(self, key: str) -> bool:
        try:
            self.store.fs.makedirs(self.base, exist_ok=True)
            self.store._create_only(self._path(key), self._record())
        except FileExistsError:
            return False
        with self._lock:
            self._held.add(key)
        return True

    # ------------------------------------------------------------------ claiming
    def start(self) -> "ShardLeases":
        """Announce this writer (``writer-<id>``) and start the heartbeat."""
        self._create(f"writer-{self.owner}")
        self._thread = threading.Thread(target=self._beat, name="chorus-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def claim(self, shard: int) -> dict | None:
        """Claim ``shard``: None when claimed, else the record of the live writer that holds it."""
        return self.claim_key(f"{shard:06d}")

    def claim_key(self, key: str) -> dict | None:
        """Claim the lease ``key`` (a shard's, or e.g. ``create-<name>`` for creating a unit)."""
        for _ in range(3):
            if self._create(key):
                return None
            info = self._read(key)
            if info is None:
                continue  # released between our attempt and the read: try again
            if info.get("owner") == self.owner:
                return None
            if not is_stale(info, stale_s=self.stale_s):
                return info
            try:  # take over a dead writer's lease
                self.store.fs.rm(self._path(key))
            except FileNotFoundError:
                pass
        info = self._read(key)
        return info or {"owner": "?", "host": "?", "pid": "?", "heartbeat": time.time()}

    def holds(self, shard: int) -> bool:
        info = self._read(f"{shard:06d}")
        return info is not None and info.get("owner") == self.owner

    def check(self, shard: int) -> None:
        """Raise unless this writer still holds ``shard`` (called right before its commit)."""
        if not self.holds(shard):
            raise ChorusError(f"shard {shard} of {self.unit} in '{self.store.url}' was taken over by another writer "
                              "while this one wrote it (its heartbeat stalled?); this writer stops, its shard is not "
                              "committed: rerun the same command to resume")

    def release(self, shard: int) -> None:
        self._drop(f"{shard:06d}")

    def release_key(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        with self._lock:
            held = key in self._held
            self._held.discard(key)
        if held and (info := self._read(key)) is not None and info.get("owner") == self.owner:
            try:
                self.store.fs.rm(self._path(key))
            except FileNotFoundError:
                pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                keys = list(self._held)
            for key in keys:
                info = self._read(key)
                if info is not None and info.get("owner") == self.owner:
                    try:
                        self.store.put_whole(self._path(key), self._record())
                        failpoints.hit("lease-renew")
                    except OSError:
                        pass  # the next beat retries; a lease that goes stale is re-checked before commit

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            keys = list(self._held)
        for key in keys:
            try:
                self._drop(key)
            except OSError:
                pass  # a lease left behind goes stale by itself

    def __enter__(self) -> "ShardLeases":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def live_writers(store, unit: str, *, stale_s: float = STALE_S) -> list[dict]:
    """The records of every live (not stale) lease in ``unit``: a writer is at work on it."""
    base = f"{store.root}/{unit}/{LEASES}"
    try:
        paths = [p for p in store.fs.ls(base, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []
    live = []
    for p in paths:
        try:
            info = json.loads(store.fs.cat_file(p))
        except (FileNotFoundError, ValueError):
            continue
        if not is_stale(info, stale_s=stale_s):
            live.append(info)
    return live
