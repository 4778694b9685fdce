"""One shared suite that every storage backend must pass: local directory, memory://, S3 (moto, loopback)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from chorus.errors import ChorusError, IntegrityError
from chorus.store import ArraySpec, Store

SPECS = [
    ArraySpec("input_ids", (6,), "int32"),
    ArraySpec("logp", (6, 3), "float16", "blosc"),
    ArraySpec("ids", (6, 3), "uint16", "zstd"),
    ArraySpec("counts", (6, 2), "uint8", "none"),
    ArraySpec("domain", (), "uint16"),
]


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request, tmp_path):
    """(url, storage_options) for a fresh store on each backend."""
    if request.param == "local":
        return str(tmp_path / "s.zarr"), {}
    if request.param == "memory":
        return f"memory://chorus-{uuid.uuid4().hex}", {}
    bucket, opts = request.getfixturevalue("s3_bucket")
    return f"{bucket}/s.zarr", opts


def _data(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, 2**31 - 1, (rows, 6), dtype=np.int32),
        "logp": (-rng.random((rows, 6, 3)) * 10).astype(np.float16),
        "ids": rng.integers(0, 65535, (rows, 6, 3), dtype=np.uint16),
        "counts": rng.integers(0, 255, (rows, 6, 2), dtype=np.uint8),
        "domain": np.zeros(rows, dtype=np.uint16),  # all zeros: must still be stored (== fill value)
    }


def _fill(store: Store, data: dict, rows: int, rps: int, shards=None) -> None:
    store.create_arrays("corpus", SPECS, rows, rps) if shards is None or 0 in shards else None
    for shard in range(-(-rows // rps)) if shards is None else shards:
        lo, hi = shard * rps, min(shard * rps + rps, rows)
        store.write_shard("corpus", shard, lo, {k: v[lo:hi] for k, v in data.items()})


def test_every_array_round_trips(store_url):
    url, opts = store_url
    data = _data(10)
    store = Store.open(url, "w", opts)
    _fill(store, data, 10, 4)
    again = Store.open(url, "a", opts)
    for name, expected in data.items():
        got = again.read_rows("corpus", name, 0, 10)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(again.read_rows("corpus", name, 3, 9), expected[3:9])
        np.testing.assert_array_equal(np.asarray(again.array("corpus", name)[:]), expected)  # plain zarr agrees
    assert sorted(again.commits("corpus")) == [0, 1, 2]
    assert again.verify("corpus") == []


def test_uncommitted_shard_is_invisible(store_url):
    url, opts = store_url
    data = _data(12)
    store = Store.open(url, "w", opts)
    _fill(store, data, 12, 4, shards=[0, 2])
    assert sorted(store.commits("corpus")) == [0, 2]
    with pytest.raises(ChorusError, match="shard 1 of corpus .* not committed"):
        store.read_rows("corpus", "input_ids", 0, 12)
    # the chunk bytes may even exist (a writer died before its commit): still invisible
    store.array("corpus", "input_ids")[4:8] = data["input_ids"][4:8]
    with pytest.raises(ChorusError, match="not committed"):
        store.read_shard("corpus", 1, ["input_ids"])
    np.testing.assert_array_equal(store.read_rows("corpus", "input_ids", 8, 12), data["input_ids"][8:12])


def test_flipped_byte_is_reported_naming_the_shard(store_url):
    url, opts = store_url
    store = Store.open(url, "w", opts)
    _fill(store, _data(12), 12, 4)
    path = store.chunk_path("corpus", "logp", 1)
    raw = bytearray(store.fs.cat_file(path))
    raw[len(raw) // 2] ^= 0xFF
    store.fs.pipe_file(path, bytes(raw))
    bad = store.verify("corpus")
    assert len(bad) == 1 and "corpus/logp shard 1" in bad[0]
    with pytest.raises(IntegrityError, match=r"corpus/logp shard 1 \(rows 4:8\)"):
        store.read_shard("corpus", 1, ["logp"])
    store.read_shard("corpus", 0, ["logp"])  # the others are fine


def test_commit_is_create_only_and_idempotent(store_url):
    url, opts = store_url
    data = _data(4)
    store = Store.open(url, "w", opts)
    _fill(store, data, 4, 4)
    _fill(store, data, 4, 4, shards=[0])  # the same shard again: identical commit, accepted
    other = _data(4, seed=1)
    with pytest.raises(IntegrityError, match="already committed with other content"):
        store.write_shard("corpus", 0, 0, other)


def test_missing_store_and_bad_urls(tmp_path):
    with pytest.raises(ChorusError, match="no chorus store"):
        Store.open(str(tmp_path / "nothing"), "r")
    with pytest.raises(ChorusError, match="no chorus store"):
        Store.open(f"memory://absent-{uuid.uuid4().hex}", "r")
    with pytest.raises(ChorusError, match="malformed store URL"):
        Store.open("s3://", "r")
    with pytest.raises(ChorusError, match="cannot use store URL 'nosuchproto://x/y': Protocol not known"):
        Store.open("nosuchproto://x/y", "r")


def test_unreachable_object_store_is_one_line_error():
    opts = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "retries": 0,
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(ChorusError, match="cannot open store 's3://nobucket/x'") as err:
        Store.open("s3://nobucket/x", "r", opts)
    assert "\n" not in str(err.value)


def test_commit_and_committed_read_single_records(store_url):
    url, opts = store_url
    store = Store.open(url, "w", opts)
    _fill(store, _data(10), 10, 4, shards=[0, 2])
    assert store.committed("corpus") == {0, 2} and not store.is_complete("corpus", 3)
    assert store.commit("corpus", 1) is None
    assert store.commit("corpus", 2) == store.commits("corpus")[2]


def test_the_row_index_is_checksummed_checked_and_verified(tmp_path, prepared_store):
    import shutil

    from chorus.store.check import problems
    from chorus.store.index import INDEX_UNIT, read_row_index, verify_corpus, write_row_index

    url = str(tmp_path / "s.zarr")
    shutil.copytree(prepared_store, url)
    store = Store.open(url, "r")
    m = store.manifest
    assert not list(problems(store)) and store.verify("corpus") == []
    split, domain = read_row_index(store, m)
    # an index whose content disagrees with the corpus (though well checksummed) is named by verify
    wrong = domain.copy()
    wrong[3] = (wrong[3] + 1) % len(m.domains)
    write_row_index(Store.open(url, "a"), split, wrong, fingerprint=m.fingerprint)
    assert any("index/domain: row 3 differs" in line for line in verify_corpus(Store.open(url, "r")))
    # one written for another corpus is refused by readers and by the structural check
    write_row_index(Store.open(url, "a"), split, domain, fingerprint="0" * 32)
    store = Store.open(url, "r")
    with pytest.raises(IntegrityError, match="row index"):
        read_row_index(store, m)
    assert any(INDEX_UNIT in p for p in problems(store))
    # flipped bytes in its chunk fail the checksum
    write_row_index(Store.open(url, "a"), split, domain, fingerprint=m.fingerprint)
    path = f"{url}/{INDEX_UNIT}/domain/c/0"
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch in index/domain"):
        read_row_index(Store.open(url, "r"), m)
    assert any("index/domain shard 0" in line for line in verify_corpus(Store.open(url, "r")))
