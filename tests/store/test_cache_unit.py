"""The writer protocol of one teacher cache (store/writers.py) on a tiny store, no teacher model: who creates the
unit, who may claim a shard, and when a writer is fenced out. End-to-end runs: tests/reliability/test_writers.py."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

from chorus.errors import ChorusError
from chorus.store import ArraySpec, CacheUnit, ShardLeases, Store, TeacherManifest, value_params, writers

SPECS = [ArraySpec("x", (4,), "int32")]
UNIT = "teachers/t"


def manifest(**changes) -> TeacherManifest:
    base = dict(name="t", model="m", revision="r", weights_fingerprint="w", dtype="float32", device="cpu", top_k=8,
                num_samples=0, seed=0, value_codec="fp16", value_params=value_params("fp16"), corpus_fingerprint="c",
                tokenizer_fingerprint="tok", vocab_size=300, fingerprint="fa", created_by="test")
    return TeacherManifest(**(base | changes))


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(str(tmp_path / "c.zarr"), "w")


@pytest.fixture(autouse=True)
def bounded_waits(monkeypatch):
    """Every wait in these tests ends within a few naps: a join still looping after 50 is a bug, not a slow test."""
    naps = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        assert len(naps) <= 50, f"join still waiting after {len(naps)} naps"
        time.sleep(min(seconds, 0.02))

    monkeypatch.setattr(writers, "time", SimpleNamespace(monotonic=time.monotonic, sleep=nap))


@pytest.fixture
def said(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(writers, "say", lines.append)
    return lines


def joined(store: Store, m: TeacherManifest | None = None, **kw) -> CacheUnit:
    unit = CacheUnit(store, m or manifest())
    unit.join(SPECS, 8, 4, **({"worker": 0, "overwrite": False} | kw))
    return unit


def commit_shard(store: Store, shard: int, fingerprint: str = "fa", value: int = 1) -> None:
    store.write_shard(UNIT, shard, shard * 4, {"x": np.full((4, 4), value, np.int32)}, fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------------- settings
def test_differences_name_each_changed_setting():
    assert writers.differences(manifest(), manifest(top_k=16, seed=3)) == "top_k 8 → 16; seed 0 → 3"
    assert writers.differences(manifest(), manifest(device="cuda")) == (
        "the target math: made by another chorus version")  # device is not a setting of the cache


# ---------------------------------------------------------------------------------------------- create or join
def test_worker_0_creates_the_unit_with_its_arrays_and_manifest_last(store, said):
    unit = joined(store)
    assert unit.name == "t" and unit.unit == UNIT
    assert store.teacher_manifest("t") == manifest() and unit.current() == manifest() and unit.is_ours()
    arr = store.array(UNIT, "x")
    assert arr.shape == (8, 4) and arr.chunks == (4, 4)
    assert not store.fs.exists(f"{store.root}/teachers/_leases/create-t.json")  # the creator lease is released
    assert said == []


def test_joining_a_unit_with_the_same_settings_keeps_its_commits(store, said):
    joined(store)
    commit_shard(store, 0)
    for worker in (0, 1):
        joined(store, worker=worker)
        joined(store, worker=worker, overwrite=True)
    assert store.committed(UNIT) == {0}


def test_a_unit_made_with_other_settings_is_refused_naming_the_difference(store):
    joined(store)
    for worker in (0, 1):
        with pytest.raises(ChorusError, match=r"^cache 't' in '.*c\.zarr' was made with other settings \(top_k 8 → 16\); "
                                              r"pass --overwrite to replace it, or choose another --name$"):
            joined(store, manifest(top_k=16, fingerprint="fb"), worker=worker)
    assert store.teacher_manifest("t").fingerprint == "fa"


def test_overwrite_replaces_a_unit_of_other_settings(store, said):
    joined(store)
    commit_shard(store, 0)
    joined(store, manifest(top_k=16, fingerprint="fb"), overwrite=True)
    assert store.teacher_manifest("t").fingerprint == "fb" and store.committed(UNIT) == set()
    assert said == ["replacing cache 't' (top_k 8 → 16)"]


def test_overwrite_is_refused_while_another_writer_is_live(store, said):
    joined(store)
    with ShardLeases(store, UNIT, heartbeat_s=60) as other:
        with pytest.raises(ChorusError, match=r"^cache 't' in '.*' is being written by another job \(pid \d+ on "
                                              r".*\); stop it \(or let it finish\) before --overwrite replaces"):
            joined(store, manifest(fingerprint="fb"), overwrite=True)
        assert other.claim(0) is None
    assert store.teacher_manifest("t").fingerprint == "fa"


def test_a_half_created_unit_is_replaced_by_worker_0(store, said):
    store.group.require_group(UNIT)  # a creator killed before its manifest
    assert CacheUnit(store, manifest()).current() is None
    joined(store)
    assert store.teacher_manifest("t") == manifest() and said == []


def test_an_unreadable_unit_is_refused_unless_worker_0_overwrites(store, said):
    joined(store)
    store.fs.pipe_file(f"{store.root}/{UNIT}/zarr.json", b"{not json")
    for kw in ({"worker": 0, "overwrite": False}, {"worker": 1, "overwrite": True}):
        with pytest.raises(ChorusError, match=r"^cache 't' in '.*' is unreadable \(teacher 't' in .*not valid JSON.*\); "
                                              r"rerun with --overwrite to rebuild it$"):
            joined(store, **kw)


def test_worker_0_rebuilds_an_unreadable_unit_under_overwrite(store, said):
    joined(store)
    store.fs.pipe_file(f"{store.root}/{UNIT}/zarr.json", b"{not json")
    joined(store, overwrite=True)
    assert store.teacher_manifest("t") == manifest()


def test_an_unreadable_unit_error_keeps_only_its_first_line(store, monkeypatch):
    def two_lines(self):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(CacheUnit, "current", two_lines)
    with pytest.raises(ChorusError, match=r"is unreadable \(first line\); rerun") as err:
        joined(store, worker=1)
    assert "second line" not in str(err.value)


def test_other_workers_wait_for_worker_0(store, said, monkeypatch):
    unit = CacheUnit(store, manifest())
    naps = []

    def sleep(s):  # worker 0 creates the unit while worker 1 waits
        naps.append(s)
        if len(naps) == 2:
            joined(store)

    monkeypatch.setattr(writers.time, "sleep", sleep)
    unit.join(SPECS, 8, 4, worker=1, overwrite=False)
    assert naps == [0.5, 0.5] and said == ["waiting for worker 0 to create cache 't'"]
    assert unit.is_ours()


def test_other_workers_give_up_when_worker_0_never_comes(store, said, monkeypatch):
    monkeypatch.setattr(writers, "WAIT_FOR_CREATOR_S", 0.3)
    start = time.monotonic()
    with pytest.raises(ChorusError, match=r"^cache 't' was not created within 0s; start the worker with --shard 0/N "
                                          r"\(it creates the cache\), then the others$"):
        CacheUnit(store, manifest()).join(SPECS, 8, 4, worker=1, overwrite=False)
    assert 0.3 <= time.monotonic() - start < 5
    assert not store.fs.exists(f"{store.root}/{UNIT}")


def test_worker_0_waits_for_another_creator_then_joins_its_unit(store, said, monkeypatch):
    other = ShardLeases(store, "teachers")
    assert other.claim_key("create-t") is None  # another "worker 0" job is creating the unit
    naps = []

    def sleep(s):
        naps.append(s)
        if len(naps) == 3:  # ... and it finishes
            other.release_key("create-t")
            joined(store)

    monkeypatch.setattr(writers.time, "sleep", sleep)
    joined(store)
    assert naps == [0.2, 0.2, 0.2] and len(said) == 1
    assert re.fullmatch(r"waiting for another job \(pid \d+ on .+ \(heartbeat \d+s ago\)\) to create cache 't'", said[0])


def test_worker_0_that_finds_the_unit_made_meanwhile_joins_it(store, said, monkeypatch):
    calls = []
    real = CacheUnit.current

    def current(self):  # the first look finds nothing, the look under the creator lease finds the other's unit
        calls.append(1)
        if len(calls) == 1:
            return None
        if len(calls) == 2:
            other = CacheUnit(store, self.manifest)
            other._create(SPECS, 8, 4, old=None)
            commit_shard(store, 0)
        return real(self)

    monkeypatch.setattr(CacheUnit, "current", current)
    joined(store)
    assert store.committed(UNIT) == {0}  # joined, not recreated
    assert not store.fs.exists(f"{store.root}/teachers/_leases/create-t.json")


def test_worker_0_that_finds_another_unit_made_meanwhile_refuses_it(store, said, monkeypatch):
    calls = []
    real = CacheUnit.current

    def current(self):
        calls.append(1)
        if len(calls) == 1:
            return None
        if len(calls) == 2:
            CacheUnit(store, manifest(top_k=16, fingerprint="fb"))._create(SPECS, 8, 4, old=None)
        return real(self)

    monkeypatch.setattr(CacheUnit, "current", current)
    with pytest.raises(ChorusError, match=r"made with other settings \(top_k 16 → 8\)"):
        joined(store)
    assert store.teacher_manifest("t").fingerprint == "fb"
    assert not store.fs.exists(f"{store.root}/teachers/_leases/create-t.json")


def test_overwrite_names_the_unit_found_under_the_creator_lease(store, said, monkeypatch):
    joined(store)
    real, calls = CacheUnit.current, []

    def current(self):  # another job replaces the unit between the first look and the look under the lease
        calls.append(1)
        if len(calls) == 2:
            store.delete_unit(UNIT)
            CacheUnit(store, manifest(top_k=32, fingerprint="fc"))._create(SPECS, 8, 4, old=None)
        return real(self)

    monkeypatch.setattr(CacheUnit, "current", current)
    joined(store, manifest(top_k=16, fingerprint="fb"), overwrite=True)
    assert said == ["replacing cache 't' (top_k 32 → 16)"] and store.teacher_manifest("t").top_k == 16


def test_overwrite_of_a_unit_removed_meanwhile_names_the_one_it_saw(store, said, monkeypatch):
    joined(store)
    real, calls = CacheUnit.current, []

    def current(self):
        calls.append(1)
        if len(calls) == 2:
            store.delete_unit(UNIT)
        return real(self)

    monkeypatch.setattr(CacheUnit, "current", current)
    joined(store, manifest(top_k=16, fingerprint="fb"), overwrite=True)
    assert said == ["replacing cache 't' (top_k 8 → 16)"] and store.teacher_manifest("t").top_k == 16


def test_the_creator_lease_is_released_when_creating_fails(store, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store, "create_arrays", boom)
    with pytest.raises(OSError, match="disk full"):
        joined(store)
    assert ShardLeases(store, "teachers").claim_key("create-t") is None


def test_current_is_none_while_the_unit_is_deleted_under_it(store, monkeypatch):
    joined(store)
    unit = CacheUnit(store, manifest())

    def gone(name):
        raise FileNotFoundError(name)

    monkeypatch.setattr(store, "teacher_manifest", gone)
    assert unit.current() is None and not unit.is_ours()


# ---------------------------------------------------------------------------------------------- fence
def test_fence_stops_a_writer_whose_cache_was_replaced(store, said):
    a = joined(store)
    a.fence()
    joined(store, manifest(top_k=16, fingerprint="fb"), overwrite=True)
    with pytest.raises(ChorusError, match=r"^cache 't' in '.*c\.zarr' was replaced by another writer \(--overwrite\) "
                                          r"while this one ran; this writer stops without committing: rerun it only "
                                          r"if its settings are wanted$"):
        a.fence()


def test_fence_with_a_shard_checks_its_lease(store):
    a = joined(store)
    mine, theirs = ShardLeases(store, UNIT), ShardLeases(store, UNIT, stale_s=-1)
    mine.claim(0)
    a.fence(mine, 0)
    a.fence(mine)  # no shard: the lease is not looked at
    theirs.claim(0)
    with pytest.raises(ChorusError, match="shard 0 of teachers/t .* taken over"):
        a.fence(mine, 0)
    a.fence(None, 0)


# ---------------------------------------------------------------------------------------------- claim
def test_claim_takes_a_free_shard(store):
    a = joined(store)
    leases = ShardLeases(store, UNIT)
    assert a.claim(leases, 1) is True and leases.holds(1)


def test_claim_leaves_a_shard_held_by_a_live_writer(store, said):
    a = joined(store)
    other, leases = ShardLeases(store, UNIT), ShardLeases(store, UNIT)
    other.claim(1)
    assert a.claim(leases, 1) is False and other.holds(1)
    assert len(said) == 1 and said[0].startswith("shard 1 of teachers/t is being written by pid ")
    assert said[0].endswith("; leaving it to that writer")


@pytest.mark.parametrize("fingerprint", ["fa", ""])
def test_claim_leaves_a_shard_committed_meanwhile_and_releases_it(store, fingerprint):
    a = joined(store)
    commit_shard(store, 1, fingerprint)
    leases = ShardLeases(store, UNIT)
    assert a.claim(leases, 1) is False
    assert not leases.holds(1) and not store.fs.exists(leases._path("000001"))
    assert store.committed(UNIT) == {1}


def test_claim_rewrites_a_shard_committed_for_the_replaced_cache(store):
    a = joined(store)
    commit_shard(store, 1, "old")  # by a writer fenced out by an --overwrite
    leases = ShardLeases(store, UNIT)
    assert a.claim(leases, 1) is True and leases.holds(1)
    assert store.committed(UNIT) == set()


def test_claim_rewrites_an_unreadable_commit_record(store):
    a = joined(store)
    commit_shard(store, 1)
    store.fs.pipe_file(store.commit_path(UNIT, 1), b"{torn")
    leases = ShardLeases(store, UNIT)
    assert a.claim(leases, 1) is True and leases.holds(1)
    assert store.committed(UNIT) == set()


def test_claim_by_a_fenced_out_writer_stops_it_and_keeps_the_new_record(store, said):
    a = joined(store)
    joined(store, manifest(top_k=16, fingerprint="fb"), overwrite=True)
    commit_shard(store, 1, "fb")  # the new cache's record
    leases = ShardLeases(store, UNIT)
    with pytest.raises(ChorusError, match=r"^cache 'teachers/t' in '.*' was replaced by another writer \(--overwrite\) "
                                          r"while this one ran; this writer stops without committing$"):
        a.claim(leases, 1)
    assert not leases.holds(1) and store.commit(UNIT, 1).fingerprint == "fb"


# ---------------------------------------------------------------------------------------------- corrupt commits
def test_forget_corrupt_forgets_only_bad_shards_of_this_worker(store, said):
    a = joined(store)
    for shard in (0, 1):
        commit_shard(store, shard)
    for shard in (0, 1):  # both shards' bytes go bad; this worker owns shard 1 only
        path = store.chunk_path(UNIT, "x", shard)
        store.fs.pipe_file(path, store.encode_chunk(UNIT, "x", np.full((4, 4), 9, np.int32)))
    a.forget_corrupt([1, 5])
    assert store.committed(UNIT) == {0}
    assert said == ["rewriting teachers/t/x shard 1 (rows 4:8) (its bytes do not match the commit record)"]


def test_forget_corrupt_reads_shard_numbers_of_several_digits(store, said, monkeypatch):
    a = joined(store)
    monkeypatch.setattr(store, "verify", lambda unit: [f"{unit}/x shard 12 (rows 48:52): missing != crc32c:0"])
    forgot = []
    monkeypatch.setattr(store, "forget_commit", lambda unit, shard: forgot.append((unit, shard)))
    a.forget_corrupt([1, 12])
    assert forgot == [(UNIT, 12)]
    a.forget_corrupt([1, 2])
    assert forgot == [(UNIT, 12)]


def test_the_manifest_of_the_created_unit_round_trips(store):
    joined(store)
    raw = json.loads(store.fs.cat_file(f"{store.root}/{UNIT}/zarr.json"))
    assert TeacherManifest.from_dict(raw["attributes"]["chorus"]) == manifest()
