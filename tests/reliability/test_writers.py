"""Overlapping writers never leave a mixed cache that reads as valid: commit records checksum the bytes their
writer encoded and carry the cache fingerprint, shards are leased before they are written, and ``--overwrite``
is refused while another writer is live (and fences it out when its lease has lapsed). Local disk and moto S3."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest

from chorus.commands import cache
from chorus.config import CacheConfig
from chorus.errors import ChorusError, IntegrityError
from chorus.store import ArraySpec, CacheUnit, ShardLeases, Store, writers
from chorus.store.check import problems
from tests.pipeline.conftest import CACHE_ARGS, read_cache


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "w.zarr"), {}
    url, opts = request.getfixturevalue("s3_bucket")
    return f"{url}/w.zarr", opts


def _store(url: str, opts: dict) -> Store:
    store = Store.open(url, "w", opts)
    store.create_arrays("teachers/t", [ArraySpec("x", (4,), "int32")], 8, 4)
    return store


def test_commit_checksums_the_bytes_this_writer_encoded(where):
    """Writer B overwrites the chunk between A's write and A's commit: A's record must not bless B's bytes."""
    url, opts = where
    store = _store(url, opts)
    theirs = np.full((4, 4), 7, dtype=np.int32)

    def writer_b_strikes(_commit):
        store.put_whole(store.chunk_path("teachers/t", "x", 0), store.encode_chunk("teachers/t", "x", theirs))

    commit = store.write_shard("teachers/t", 0, 0, {"x": np.ones((4, 4), np.int32)}, fingerprint="fa",
                               before_commit=writer_b_strikes)
    assert commit.fingerprint == "fa"
    assert len(store.verify("teachers/t")) == 1
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.read_shard("teachers/t", 0, ["x"])


def test_commit_of_another_cache_is_refused_on_read(where):
    url, opts = where
    store = _store(url, opts)
    store.write_shard("teachers/t", 0, 0, {"x": np.ones((4, 4), np.int32)}, fingerprint="old")
    with pytest.raises(IntegrityError, match="committed for another cache"):
        store.commits("teachers/t", fingerprint="new")


def test_all_zero_chunk_survives_reopening(where):
    url, opts = where
    _store(url, opts).write_shard("teachers/t", 1, 4, {"x": np.zeros((4, 4), np.int32)})
    again = Store.open(url, "r", opts)
    assert (again.read_shard("teachers/t", 1, ["x"])["x"] == 0).all() and again.verify("teachers/t") == []


def test_a_leased_shard_is_refused_to_a_second_writer_until_stale(where):
    url, opts = where
    store = _store(url, opts)
    a = ShardLeases(store, "teachers/t", heartbeat_s=60, stale_s=60).start()
    b = ShardLeases(store, "teachers/t", heartbeat_s=60, stale_s=60).start()
    try:
        assert a.claim(0) is None and a.holds(0)
        holder = b.claim(0)
        assert holder is not None and holder["owner"] == a.owner  # live: refused
        b.stale_s = -1  # A's heartbeat lapsed (e.g. a frozen host): B takes over, and A is fenced at its commit
        assert b.claim(0) is None and b.holds(0)
        with pytest.raises(ChorusError, match="taken over by another writer"):
            a.check(0)
    finally:
        a.close()
        b.close()


def test_a_dead_writers_lease_is_taken_over_at_once(tmp_path):
    store = _store(str(tmp_path / "d.zarr"), {})
    a = ShardLeases(store, "teachers/t", stale_s=3600)
    a.claim(3)
    record = store.fs.cat_file(a._path("000003")).replace(str(os.getpid()).encode(), b"999999999")
    store.fs.pipe_file(a._path("000003"), record)  # as if a kill -9 left it: its pid is gone
    assert ShardLeases(store, "teachers/t", stale_s=3600).claim(3) is None


# ---------------------------------------------------------------------------------------------- real cache runs
def _cfg(url: str, teacher: str, opts: dict, **kw) -> CacheConfig:
    return CacheConfig(store=url, teacher=teacher, storage_options=opts, **{**CACHE_ARGS, **kw})


def _copy_store(src: str, where: tuple[str, dict]) -> str:
    url, opts = where
    if not opts:
        shutil.copytree(src, url)
        return url
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    fs.put(src, root, recursive=True)
    return url


@pytest.mark.slow
def test_overlapping_shard_specs_never_mix(small_store, teacher_dir, where, reference_cache):
    """`--shard 0/2` and `--shard 0/4` at once (shards 0, 4, 8 overlap), then the rest: every shard is leased
    by one writer, the cache verifies, and it equals the single-run reference bit for bit."""
    url = _copy_store(small_store, where)
    opts = where[1]
    errors = []

    def go(**kw):
        try:
            cache.run(_cfg(url, teacher_dir, opts, **kw))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    a = threading.Thread(target=go, kwargs={"shard": "0/2", "batch_size": 4})
    b = threading.Thread(target=go, kwargs={"shard": "0/4", "batch_size": 4})
    a.start()
    b.start()
    a.join()
    b.join()
    assert not errors, errors
    cache.run(_cfg(url, teacher_dir, opts, shard="1/2"))
    store = Store.open(url, "r", opts)
    assert list(problems(store)) == [] and store.verify("teachers/tiny") == []
    assert store.teacher_manifest("tiny").status == "complete"
    arrays, _ = read_cache(url, "tiny", opts)
    for n, ref in reference_cache[0].items():
        np.testing.assert_array_equal(arrays[n], ref, err_msg=n)


@pytest.mark.slow
def test_overlapping_writers_of_other_bytes_leave_each_shard_whole(small_store, teacher_dir, tmp_path, monkeypatch):
    """Two overlapping writers (``--shard 0/2`` and ``0/4``) whose teachers give other bytes — writer B's top-k
    log-probs shifted, a stand-in for any setting the fingerprint cannot see — so that a shard written by both would
    mix them: every committed shard is wholly A's or wholly B's, its checksum verifies, and each shard B committed is
    one A left to it. Both writers meet in their first batch, so without leases they compute one shard at once: with
    the lease claim and its re-check disabled, this test fails every time (a mixed shard or a conflicting commit)."""
    from chorus.teacher import model as _teacher

    real = _teacher.Teacher.targets
    first = threading.Barrier(2, timeout=60)  # both writers in their first batch at once: overlap guaranteed
    started: set[str] = set()

    def targets(self, *args, **kw):
        name = threading.current_thread().name
        if name not in started:
            started.add(name)
            first.wait()
        out = real(self, *args, **kw)
        if threading.current_thread().name == "B":
            out["topk_logprobs"] = out["topk_logprobs"] - 0.25
        return out

    monkeypatch.setattr(_teacher.Teacher, "targets", targets)
    url = str(tmp_path / "w.zarr")
    shutil.copytree(small_store, url)
    errors = []

    def go(**kw):
        try:
            cache.run(_cfg(url, teacher_dir, {}, samples=0, **kw))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, name=n, kwargs={"shard": spec, "batch_size": 2})
               for n, spec in (("A", "0/2"), ("B", "0/4"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = Store.open(url, "r")
    assert store.verify("teachers/tiny") == []
    ref = str(tmp_path / "ref.zarr")
    shutil.copytree(small_store, ref)
    monkeypatch.setattr(_teacher.Teacher, "targets", real)
    cache.run(_cfg(ref, teacher_dir, {}, samples=0))
    want = Store.open(ref, "r")
    by = {"A": 0, "B": 0}
    for shard in sorted(store.commits("teachers/tiny")):
        got = store.read_shard("teachers/tiny", shard, ["topk_logprobs"])["topk_logprobs"].astype(np.float64)
        a = want.read_shard("teachers/tiny", shard, ["topk_logprobs"])["topk_logprobs"].astype(np.float64)
        finite = np.isfinite(a)
        d = got[finite] - a[finite]  # fp16 values: each within a few ulps of its writer's shift
        whole = {w: bool((np.abs(d - shift) < 0.02).all()) for w, shift in (("A", 0.0), ("B", -0.25))}
        assert sum(whole.values()) == 1, (shard, np.unique(np.round(d, 2)))  # one writer's bytes, never a mix
        by[next(w for w, ok in whole.items() if ok)] += 1
    assert by["A"] and sum(by.values()) == len(store.commits("teachers/tiny"))


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, small_store, teacher_dir):
    out = str(tmp_path_factory.mktemp("ref") / "store.zarr")
    shutil.copytree(small_store, out)
    cache.run(_cfg(out, teacher_dir, {}))
    return read_cache(out, "tiny")


@pytest.mark.slow
def test_overwrite_during_a_run_is_refused_then_fences_the_old_writer(small_store, teacher_dir, where,
                                                                      monkeypatch):
    url = _copy_store(small_store, where)
    opts = where[1]
    seen: dict = {"calls": 0}
    claim = CacheUnit.claim

    def during_a(self, leases, shard):
        store, unit = self.store, self.unit
        seen["calls"] += 1
        if seen["calls"] == 2:  # writer A has committed shard 0 and is about to take shard 1
            deadline = time.monotonic() + 30
            while not store.commits(unit) and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(ChorusError, match="being written by another job"):
                cache.run(_cfg(url, teacher_dir, opts, top_k=16, overwrite=True))
            seen["refused"] = True
            with monkeypatch.context() as m:  # A's lease lapsed (frozen host): B replaces the cache anyway
                m.setattr(writers, "live_writers", lambda *a, **k: [])
                m.setattr(CacheUnit, "claim", claim)
                seen["b"] = cache.run(_cfg(url, teacher_dir, opts, top_k=16, overwrite=True))
        return claim(self, leases, shard)

    monkeypatch.setattr(CacheUnit, "claim", during_a)
    with pytest.raises(ChorusError, match="replaced by another writer"):
        cache.run(_cfg(url, teacher_dir, opts, top_k=8))
    assert seen.get("refused") and seen["b"].status == "complete" and seen["b"].top_k == 16
    store = Store.open(url, "r", opts)
    m = store.teacher_manifest("tiny")
    assert m.top_k == 16 and m.status == "complete"
    assert list(problems(store)) == [] and store.verify("teachers/tiny") == []
    assert {c.fingerprint for c in store.commits("teachers/tiny").values()} == {m.fingerprint}
    arrays, _ = read_cache(url, "tiny", opts)
    assert arrays["topk_ids"].shape[-1] == 16
