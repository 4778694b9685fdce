"""Shard leases, one rule per test: who holds a lease, when it is stale, what a heartbeat renews and what a
release removes (store/lease.py). The races they close are in tests/reliability/test_writers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from chorus.errors import ChorusError
from chorus.store import ArraySpec, ShardLeases, Store, describe, live_writers
from chorus.store import lease as lease_mod

UNIT = "teachers/t"


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store.open(str(tmp_path / "l.zarr"), "w")
    s.create_arrays(UNIT, [ArraySpec("x", (4,), "int32")], 8, 4)
    return s


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(store: Store, leases: ShardLeases, key: str, **record) -> None:
    """Write a lease record as another writer would have left it."""
    store.fs.makedirs(leases.base, exist_ok=True)
    store.fs.pipe_file(leases._path(key), json.dumps(record).encode())


def _record(store: Store, leases: ShardLeases, key: str) -> dict:
    return json.loads(store.fs.cat_file(leases._path(key)))


def _until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ---------------------------------------------------------------------------------------------- staleness
def test_a_fresh_record_of_a_live_process_is_not_stale():
    info = {"owner": "o", "host": lease_mod.HOST, "pid": os.getpid(), "heartbeat": 1000.0}
    assert not lease_mod.is_stale(info, stale_s=60, now=1000.0)
    assert not lease_mod.is_stale(info, stale_s=60, now=1060.0)  # exactly stale_s old: still held
    assert lease_mod.is_stale(info, stale_s=60, now=1060.5)
    assert not lease_mod.is_stale(info | {"heartbeat": 1000}, stale_s=60, now=1030.0)  # an integer time counts


def test_a_record_without_a_time_is_stale():
    assert lease_mod.is_stale({}, stale_s=60, now=0.0)
    assert lease_mod.is_stale({"owner": "o", "heartbeat": "yesterday"}, stale_s=60, now=0.0)
    assert lease_mod.is_stale(["not", "a", "record"], stale_s=60, now=0.0)


def test_a_dead_process_on_this_host_is_stale_at_once_but_not_on_another_host():
    info = {"owner": "o", "host": lease_mod.HOST, "pid": _dead_pid(), "heartbeat": 1000.0}
    assert lease_mod.is_stale(info, stale_s=60, now=1000.0)
    assert not lease_mod.is_stale(info | {"host": "elsewhere"}, stale_s=60, now=1000.0)
    assert not lease_mod.is_stale(info | {"pid": str(info["pid"])}, stale_s=60, now=1000.0)  # no pid to check


def test_is_stale_defaults_to_the_clock_and_the_configured_limit():
    info = {"owner": "o", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    assert not lease_mod.is_stale(info)
    assert lease_mod.is_stale(info | {"heartbeat": time.time() - lease_mod.STALE_S - 5})


def test_pid_alive_tells_live_from_dead_processes(monkeypatch):
    assert lease_mod._pid_alive(os.getpid())
    assert not lease_mod._pid_alive(_dead_pid())

    def not_ours(pid, sig):
        raise PermissionError(pid)

    monkeypatch.setattr(lease_mod.os, "kill", not_ours)
    assert lease_mod._pid_alive(12345)  # someone else's live process


def test_describe_names_the_holder_and_its_heartbeat_age(monkeypatch):
    monkeypatch.setattr(lease_mod.time, "time", lambda: 100.0)
    assert describe({"pid": 42, "host": "h1", "heartbeat": 93.2}) == "pid 42 on h1 (heartbeat 7s ago)"
    assert describe({}) == "pid None on None (heartbeat 100s ago)"  # no time recorded: the epoch


# ---------------------------------------------------------------------------------------------- claiming
def test_a_claim_writes_this_writers_record(store):
    a = ShardLeases(store, UNIT)
    assert a.base == f"{store.root}/{UNIT}/_leases" and a._path("000007") == f"{a.base}/000007.json"
    before = time.time()
    assert a.claim(7) is None and a.holds(7) and not a.holds(6)
    rec = _record(store, a, "000007")
    assert rec["owner"] == a.owner and rec["host"] == lease_mod.HOST and rec["pid"] == os.getpid()
    assert before <= rec["heartbeat"] <= time.time()
    assert a.claim(7) is None  # claiming again what it holds


def test_a_live_holder_is_returned_to_the_second_claimant(store):
    a, b = ShardLeases(store, UNIT), ShardLeases(store, UNIT)
    a.claim(1)
    holder = b.claim(1)
    assert holder is not None and holder["owner"] == a.owner and not b.holds(1)
    assert _record(store, a, "000001")["owner"] == a.owner  # left in place


def test_a_torn_lease_record_is_taken_over(store):
    a = ShardLeases(store, UNIT)
    store.fs.makedirs(a.base, exist_ok=True)
    store.fs.pipe_file(a._path("000002"), b'{"owner": "x", "hea')  # killed mid-write
    assert a._read("000002") == {}
    assert a.claim(2) is None and a.holds(2)


def test_a_lease_that_stays_taken_is_reported_after_three_tries(store, monkeypatch):
    """A stale lease that is re-created by someone else at every try: the claim gives up with its holder."""
    a = ShardLeases(store, UNIT)
    fresh = {"owner": "other", "host": "h", "pid": 1, "heartbeat": 0.0}
    _plant(store, a, "000003", **fresh)
    removed = []
    real_rm = store.fs.rm

    def rm_and_recreate(path, *args, **kw):
        real_rm(path, *args, **kw)
        removed.append(path)
        store.fs.pipe_file(path, json.dumps(fresh).encode())

    monkeypatch.setattr(store.fs, "rm", rm_and_recreate)
    holder = a.claim(3)
    assert holder == fresh and len(removed) == 3 and not a.holds(3)


def test_a_lease_released_between_the_try_and_the_read_is_claimed_on_the_next_try(store, monkeypatch):
    a = ShardLeases(store, UNIT)
    real_create = ShardLeases._create
    tries = []

    def create(self, key):
        tries.append(key)
        return False if len(tries) == 1 else real_create(self, key)  # first try: someone held it, then released

    monkeypatch.setattr(ShardLeases, "_create", create)
    assert a.claim(4) is None and len(tries) == 2 and a.holds(4)


def test_a_lease_that_vanishes_for_good_reports_an_unknown_holder(store, monkeypatch):
    a = ShardLeases(store, UNIT)
    monkeypatch.setattr(ShardLeases, "_create", lambda self, key: False)
    holder = a.claim(5)
    assert holder["owner"] == "?" and holder["host"] == "?" and holder["pid"] == "?"
    assert abs(holder["heartbeat"] - time.time()) < 60


def test_a_stale_lease_is_taken_over_even_if_its_file_is_gone_already(store, monkeypatch):
    a = ShardLeases(store, UNIT)
    _plant(store, a, "000006", owner="other", host="h", pid=1, heartbeat=0.0)
    real_rm = store.fs.rm

    def rm_twice(path, *args, **kw):  # another claimant removed it first
        real_rm(path, *args, **kw)
        raise FileNotFoundError(path)

    monkeypatch.setattr(store.fs, "rm", rm_twice)
    assert a.claim(6) is None and a.holds(6)


def test_check_names_the_shard_a_writer_lost(store):
    a, b = ShardLeases(store, UNIT), ShardLeases(store, UNIT, stale_s=-1)
    a.claim(2)
    a.check(2)
    b.claim(2)  # takes it over
    with pytest.raises(ChorusError, match=rf"^shard 2 of {UNIT} in '.*l\.zarr' was taken over by another writer "
                                          r"while this one wrote it \(its heartbeat stalled\?\); this writer stops, "
                                          r"its shard is not committed: rerun the same command to resume$"):
        a.check(2)


# ---------------------------------------------------------------------------------------------- release, heartbeat
def test_release_removes_only_this_writers_own_lease(store):
    a, b = ShardLeases(store, UNIT), ShardLeases(store, UNIT, stale_s=-1)
    a.claim(0)
    a.release(0)
    assert not store.fs.exists(a._path("000000"))
    assert b.claim(0) is None
    a._held.add("000000")  # a still believes it holds shard 0, which b took over
    a.release(0)
    assert b.holds(0) and "000000" not in a._held


def test_release_of_a_lease_never_claimed_leaves_the_record(store):
    a = ShardLeases(store, UNIT)
    _plant(store, a, "000001", owner=a.owner, host="h", pid=1, heartbeat=time.time())  # not in a's held set
    a.release(1)
    assert store.fs.exists(a._path("000001"))


def test_release_key_removes_a_named_lease(store):
    a = ShardLeases(store, UNIT)
    assert a.claim_key("create-t") is None
    a.release_key("create-t")
    assert not store.fs.exists(a._path("create-t"))


def test_release_of_a_lease_removed_meanwhile_is_quiet(store, monkeypatch):
    a = ShardLeases(store, UNIT)
    a.claim(3)

    def gone(path, *args, **kw):
        raise FileNotFoundError(path)

    monkeypatch.setattr(store.fs, "rm", gone)
    a.release(3)
    assert "000003" not in a._held


def test_a_running_writer_is_live_and_leaves_nothing_behind(store):
    with ShardLeases(store, UNIT, heartbeat_s=60) as a:
        assert a._thread is not None and a._thread.is_alive() and a._thread.daemon
        assert a._thread.name == "chorus-lease-heartbeat"
        assert a.claim(1) is None
        owners = sorted(r["owner"] for r in live_writers(store, UNIT))
        assert owners == [a.owner, a.owner]  # its writer-<id> record and its shard
        assert store.fs.exists(a._path(f"writer-{a.owner}"))
    assert not a._thread.is_alive()
    assert store.fs.ls(a.base, detail=False) == [] and live_writers(store, UNIT) == []


def test_close_without_start_releases_what_was_claimed(store):
    a = ShardLeases(store, UNIT)
    a.claim(2)
    a.close()
    assert not store.fs.exists(a._path("000002"))


def test_close_keeps_going_when_one_release_fails(store, monkeypatch):
    a = ShardLeases(store, UNIT)
    a.claim(1)
    a.claim(2)
    real_drop, dropped = ShardLeases._drop, []

    def drop(self, key):
        dropped.append(key)
        if len(dropped) == 1:
            raise OSError("network")
        real_drop(self, key)

    monkeypatch.setattr(ShardLeases, "_drop", drop)
    a.close()
    assert sorted(dropped) == ["000001", "000002"]
    assert sum(store.fs.exists(a._path(k)) for k in dropped) == 1  # the failed one goes stale by itself


def test_the_heartbeat_renews_every_held_lease(store, monkeypatch):
    points = []
    monkeypatch.setattr(lease_mod.failpoints, "hit", points.append)
    a = ShardLeases(store, UNIT, heartbeat_s=0.05)
    a.claim(0)
    first = _record(store, a, "000000")["heartbeat"]
    with a:
        assert _until(lambda: _record(store, a, "000000")["heartbeat"] > first)
        assert _until(lambda: _record(store, a, f"writer-{a.owner}")["heartbeat"] > first)
        assert _record(store, a, "000000")["owner"] == a.owner
    assert "lease-renew" in points  # a kill test can stop a writer right after a renewal


def test_the_heartbeat_never_renews_a_lease_taken_over(store):
    a = ShardLeases(store, UNIT, heartbeat_s=0.05)
    a.claim(0)
    theirs = {"owner": "other", "host": "h", "pid": 1, "heartbeat": 5.0}
    _plant(store, a, "000000", **theirs)
    with a:
        renewed = _record(store, a, f"writer-{a.owner}")["heartbeat"]
        assert _until(lambda: _record(store, a, f"writer-{a.owner}")["heartbeat"] > renewed)  # it beat
        assert _record(store, a, "000000") == theirs


def test_a_failed_renewal_is_retried_at_the_next_beat(store, monkeypatch):
    a = ShardLeases(store, UNIT, heartbeat_s=0.05)
    a.claim(0)
    first = _record(store, a, "000000")["heartbeat"]
    real_put, calls = store.put_whole, []

    def flaky(path, blob):
        calls.append(path)
        if len(calls) <= 2:
            raise OSError("network")
        real_put(path, blob)

    monkeypatch.setattr(store, "put_whole", flaky)
    with a:
        assert _until(lambda: _record(store, a, "000000")["heartbeat"] > first)


# ---------------------------------------------------------------------------------------------- live writers
def test_live_writers_skips_stale_torn_and_foreign_files(store):
    a = ShardLeases(store, UNIT)
    assert live_writers(store, UNIT) == []  # no _leases folder yet
    _plant(store, a, "000000", owner="live", host="h", pid=1, heartbeat=time.time())
    _plant(store, a, "000001", owner="stale", host="h", pid=1, heartbeat=time.time() - 3600)
    store.fs.pipe_file(f"{a.base}/000002.json", b"{torn")
    store.fs.pipe_file(f"{a.base}/notes.txt", json.dumps({"owner": "txt", "heartbeat": time.time()}).encode())
    assert [r["owner"] for r in live_writers(store, UNIT)] == ["live"]
    assert sorted(r["owner"] for r in live_writers(store, UNIT, stale_s=7200)) == ["live", "stale"]


def test_live_writers_reads_an_object_store():
    store = Store.open(f"memory://lease-{uuid.uuid4().hex}", "w")
    with ShardLeases(store, UNIT, heartbeat_s=60) as a:
        assert [r["owner"] for r in live_writers(store, UNIT)] == [a.owner]
