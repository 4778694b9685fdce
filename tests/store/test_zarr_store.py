"""The store's own rules, one per test (store/zarr_store.py): how a store opens, where teachers and arrays are
found, how a shard is encoded, committed, read back and verified. The suite every backend passes: test_store.py."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from chorus import failpoints
from chorus.errors import ChorusError, IntegrityError, StillCreating
from chorus.store import ArraySpec, CorpusManifest, ShardCommit, Store, TeacherManifest, checksum, value_params
from chorus.store import zarr_store as zs
from chorus.store.fs import CREATING_KEY, MANIFEST_KEY
from tests.store.test_manifest import corpus

UNIT = "teachers/t"


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path) -> str:
    return str(tmp_path / "s.zarr") if request.param == "local" else f"memory://zs-{uuid.uuid4().hex}"


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store.open(str(tmp_path / "s.zarr"), "w")
    s.create_arrays(UNIT, [ArraySpec("x", (3,), "int32"), ArraySpec("y", (), "uint8", "none")], 10, 4)
    return s


def manifest(name: str = "t", **changes) -> TeacherManifest:
    base = dict(name=name, model="m", revision="r", weights_fingerprint="w", dtype="float32", device="cpu",
                top_k=8, num_samples=0, seed=0, value_codec="fp16", value_params=value_params("fp16"),
                corpus_fingerprint="c", tokenizer_fingerprint="tok", vocab_size=300, fingerprint="f",
                created_by="test")
    return TeacherManifest(**(base | changes))


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.integers(-2**31, 2**31 - 1, (n, 3), dtype=np.int32),
            "y": rng.integers(0, 255, n, dtype=np.uint8)}


def read_only(store: Store) -> bool:
    try:
        store.group.attrs["probe"] = 1
    except ValueError as e:
        assert "read-only" in str(e)
        return True
    del store.group.attrs["probe"]
    return False


# ---------------------------------------------------------------------------------------------- opening
def test_open_w_replaces_a_chorus_store_and_marks_it_as_being_created(url):
    old = Store.open(url, "w")
    old.create_arrays(UNIT, [ArraySpec("x", (3,), "int32")], 8, 4)
    old.write_shard(UNIT, 0, 0, {"x": np.ones((4, 3), np.int32)})
    new = Store.open(url, "w")
    assert new.url == url and not new.fs.exists(f"{new.root}/{UNIT}")
    assert new.group.attrs[CREATING_KEY] is True and not read_only(new)
    assert Store.exists(url)


def test_open_w_refuses_a_folder_that_is_not_a_store(url):
    fs, root = zs.fsspec.core.url_to_fs(url) if "://" in url else (zs.fsspec.filesystem("file"), url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/keep.txt", b"mine")
    with pytest.raises(ChorusError, match=rf"^'{url}' exists and is not a chorus store; refusing to replace it"):
        Store.open(url, "w")
    assert fs.cat_file(f"{root}/keep.txt") == b"mine"


def test_open_a_creates_a_store_without_marking_it_and_keeps_an_existing_one(url):
    a = Store.open(url, "a")
    assert Store.exists(url) and CREATING_KEY not in a.group.attrs and not read_only(a)
    a.create_arrays(UNIT, [ArraySpec("x", (3,), "int32")], 8, 4)
    a.write_shard(UNIT, 1, 4, {"x": np.ones((4, 3), np.int32)})
    again = Store.open(url, "a")
    assert again.committed(UNIT) == {1} and not read_only(again)


def test_open_r_is_read_only_and_the_default(url):
    Store.open(url, "w")
    for store in (Store.open(url, "r"), Store.open(url)):
        assert store.url == url and read_only(store)
        assert CREATING_KEY in store.group.attrs  # it reads what "w" wrote


def test_open_r_of_a_missing_store_names_it(url):
    with pytest.raises(ChorusError, match=rf"^no chorus store at '{url}'; run `chorus prepare --out {url}` first$"):
        Store.open(url, "r")


def test_storage_options_reach_the_filesystem_and_zarr(monkeypatch):
    seen = {}
    real = zarr.storage.FsspecStore.from_url

    def from_url(target, **kw):
        seen.update(kw)
        return real(target, **kw)

    monkeypatch.setattr(zarr.storage.FsspecStore, "from_url", from_url)
    url = f"memory://zs-{uuid.uuid4().hex}"
    store = Store.open(url, "w", {"chorus_probe": 1})
    assert store.fs.storage_options == {"chorus_probe": 1}
    assert seen["storage_options"] == {"chorus_probe": 1} and seen["read_only"] is False
    Store.open(url, "r", {"chorus_probe": 1})
    assert seen["read_only"] is True
    to_fs, used = zs.fsspec.core.url_to_fs, []
    monkeypatch.setattr(zs.fsspec.core, "url_to_fs", lambda target, **kw: used.append(kw) or to_fs(target, **kw))
    assert Store.exists(url, {"chorus_probe": 2}) and used == [{"chorus_probe": 2}]


@pytest.mark.parametrize("message, shown", [("first line\nsecond line", "first line"), ("", "RuntimeError")])
def test_a_failure_to_open_is_one_line_naming_the_store(url, monkeypatch, message, shown):
    def boom(**kw):
        raise RuntimeError(message)

    monkeypatch.setattr(zarr, "open_group", boom)
    with pytest.raises(ChorusError, match=rf"^cannot open store '{url}': {shown}$"):
        Store.open(url, "w")


def test_the_root_has_no_trailing_slash():
    assert Store("u", None, "/a/b//", None).root == "/a/b"
    assert Store("u", None, "/a/bX/", None).root == "/a/bX"


def test_a_store_is_zarr_v3_even_over_a_v2_group(tmp_path):
    zarr.open_group(str(tmp_path / "v2"), mode="w", zarr_format=2)
    assert Store.open(str(tmp_path / "v2"), "a").group.metadata.zarr_format == 3


def test_exists_looks_for_the_root_group(url):
    url += "X"  # a name may end in any letter
    assert not Store.exists(url)
    Store.open(url, "w")
    assert Store.exists(url) and Store.exists(url + "/")
    if "://" not in url:
        os.remove(os.path.join(url, "zarr.json"))
        assert not Store.exists(url)


# ---------------------------------------------------------------------------------------------- teachers
def test_teacher_names_are_the_sorted_units_with_group_metadata(url):
    store = Store.open(url, "w")
    assert store.teacher_names() == []
    for name in ("bX", "a"):
        store.write_teacher_manifest(manifest(name))
    store.fs.makedirs(f"{store.root}/teachers/not-a-unit", exist_ok=True)
    store.fs.pipe_file(f"{store.root}/teachers/not-a-unit/notes.txt", b"x")
    assert store.teacher_names() == ["a", "bX"]
    assert store.teacher_manifest("bX") == manifest("bX")


def test_the_corpus_manifest_is_the_root_attribute(store):
    with pytest.raises(ChorusError, match=rf"^'{store.url}' is a zarr group but not a chorus store \(no 'chorus' "
                                          r"attribute\)$"):
        store.manifest  # noqa: B018
    m = CorpusManifest.from_dict(corpus())
    store.write_manifest(m)
    assert Store.open(store.url, "r").manifest == m


def test_an_unknown_teacher_names_the_known_ones(store, tmp_path):
    store.write_teacher_manifest(manifest("a"))
    with pytest.raises(ChorusError, match=rf"^no teacher 'zz' in store '{store.url}' \(teachers: a, t\); run "
                                          r"`chorus cache` first$"):
        store.teacher_manifest("zz")
    empty = Store.open(str(tmp_path / "e.zarr"), "w")
    with pytest.raises(ChorusError, match=r"\(teachers: none\)"):
        empty.teacher_manifest("zz")


def test_a_teacher_without_a_manifest_is_still_being_created(store):
    with pytest.raises(StillCreating, match=rf"^teacher 't' in '{store.url}' is still being created \(no manifest "
                                            r"yet\); wait for `chorus cache`, or rerun it with --overwrite"):
        store.teacher_manifest("t")
    raw = json.loads(store.fs.cat_file(f"{store.root}/{UNIT}/zarr.json"))
    del raw["attributes"]
    store.fs.pipe_file(f"{store.root}/{UNIT}/zarr.json", json.dumps(raw).encode())
    with pytest.raises(StillCreating):
        store.teacher_manifest("t")


def test_a_teacher_with_unreadable_metadata_is_named(store):
    store.fs.pipe_file(f"{store.root}/{UNIT}/zarr.json", b"\xff\xfe")
    with pytest.raises(ChorusError, match=rf"^teacher 't' in '{store.url}': its zarr.json is not valid JSON; "
                                          r"rebuild it with `chorus cache --name t \.\.\. --overwrite`$"):
        store.teacher_manifest("t")


def test_a_teacher_whose_manifest_names_another_is_refused(store):
    grp = store.group.require_group(UNIT)
    grp.attrs[MANIFEST_KEY] = manifest("u").to_dict()
    with pytest.raises(ChorusError, match=rf"^teacher 't' in '{store.url}': its manifest names it 'u'; rebuild it "
                                          r"with `chorus cache --name t \.\.\. --overwrite`$"):
        store.teacher_manifest("t")


def test_delete_unit_forgets_its_arrays_only(store):
    store.create_arrays("teachers/tt", [ArraySpec("x", (3,), "int32")], 10, 4)
    kept = store.array("teachers/tt", "x")
    store.delete_unit(UNIT)
    assert not store.fs.exists(f"{store.root}/{UNIT}")
    assert store.array("teachers/tt", "x") is kept  # "teachers/t" is no prefix of "teachers/tt/"
    with pytest.raises(ChorusError, match=rf"^store '{store.url}' has no array 'teachers/t/x'$"):
        store.array(UNIT, "x")
    store.delete_unit("teachers/never")  # nothing there: nothing to do


# ---------------------------------------------------------------------------------------------- arrays
def test_arrays_are_chunked_by_shard_with_the_codecs_of_their_spec(tmp_path):
    s = Store.open(str(tmp_path / "c.zarr"), "w")
    s.create_arrays("u", [ArraySpec("z", (3,), "int32", "zstd", 7), ArraySpec("b16", (3,), "float16", "blosc", 5),
                          ArraySpec("b8", (3,), "uint8", "blosc", 2), ArraySpec("n", (3,), "uint8", "none"),
                          ArraySpec("ids", (3,), "uint16", serializer="chorus.topk_ids")], 10, 4)
    again = Store.open(str(tmp_path / "c.zarr"), "r")
    codecs = {n: again.array("u", n).metadata.codecs for n in ("z", "b16", "b8", "n", "ids")}
    assert codecs["z"] == (BytesCodec(endian="little"), ZstdCodec(level=7, checksum=False))
    b16, b8 = codecs["b16"][1], codecs["b8"][1]
    assert isinstance(b16, BloscCodec) and (b16.cname.value, b16.clevel, b16.shuffle.value, b16.typesize) == (
        "zstd", 5, "shuffle", 2)
    assert (b8.cname.value, b8.clevel, b8.shuffle.value, b8.typesize) == ("zstd", 2, "noshuffle", 1)
    assert codecs["n"] == (BytesCodec(endian=None),)
    assert type(codecs["ids"][0]).__name__ == "TopkIdsCodec"
    arr = again.array("u", "z")
    assert arr.shape == (10, 3) and arr.chunks == (4, 3) and arr.fill_value == 0
    assert again.array_names("u") == ["b16", "b8", "ids", "n", "z"]


def test_unknown_codecs_are_refused_by_name(tmp_path):
    s = Store.open(str(tmp_path / "c.zarr"), "w")
    with pytest.raises(ChorusError, match=r"^unknown compressor 'lz9'; expected one of: zstd, blosc, none$"):
        s.create_arrays("u", [ArraySpec("a", (3,), "int32", "lz9")], 8, 4)
    with pytest.raises(ChorusError, match=r"^unknown serializer 'nope'; expected bytes or a registered zarr codec$"):
        s.create_arrays("u", [ArraySpec("a", (3,), "int32", serializer="nope")], 8, 4)


def test_a_shard_of_zeros_written_through_zarr_is_still_stored(store):
    store.array(UNIT, "x")[0:4] = 0
    assert store.fs.exists(store.chunk_path(UNIT, "x", 0))


def test_array_names_skip_commits_and_other_folders(url):
    store = Store.open(url, "w")
    store.create_arrays(UNIT, [ArraySpec("x", (3,), "int32"), ArraySpec("yX", (), "uint8")], 8, 4)
    store.write_shard(UNIT, 0, 0, {"x": np.ones((4, 3), np.int32), "yX": np.ones(4, np.uint8)})
    store.fs.makedirs(f"{store.root}/{UNIT}/_leases", exist_ok=True)
    store.fs.pipe_file(f"{store.root}/{UNIT}/_leases/a.json", b"{}")
    store.fs.pipe_file(f"{store.root}/{UNIT}/_commits/zarr.json", b"{}")  # even one that looks like an array
    assert store.array_names(UNIT) == ["x", "yX"]


def test_arrays_open_writable_only_in_a_writable_store(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    ro = Store.open(store.url, "r")
    with pytest.raises(ValueError, match="read-only"):
        ro.array(UNIT, "x")[4:8] = 1
    rw = Store.open(store.url, "a")
    rw.array(UNIT, "x")[4:8] = 1
    np.testing.assert_array_equal(rw.array(UNIT, "x")[4:8], 1)


def test_nbytes_counts_the_stored_chunks_without_metadata(store):
    assert store.nbytes(UNIT, "x") == 0
    store.write_shard(UNIT, 0, 0, rows(4))
    store.write_shard(UNIT, 2, 8, rows(2))
    sizes = [len(store.fs.cat_file(store.chunk_path(UNIT, "x", s))) for s in (0, 2)]
    assert store.nbytes(UNIT, "x") == sum(sizes)


def test_resize_rows_grows_the_arrays(store):
    store.resize_rows(UNIT, ["x", "y"], 14)
    assert Store.open(store.url, "r").array(UNIT, "x").shape == (14, 3)


# ---------------------------------------------------------------------------------------------- shards
def test_a_shard_is_written_then_committed_at_the_failpoints(store, monkeypatch):
    points = []
    monkeypatch.setattr(failpoints, "hit", points.append)
    seen = []
    commit = store.write_shard(UNIT, 1, 4, rows(4), before_commit=seen.append)
    assert points == ["chunk", "chunk", "shard-written", "commit"]
    assert seen == [commit] and commit.fingerprint == "" and (commit.row_start, commit.row_stop) == (4, 8)
    assert commit == store.commit(UNIT, 1)


def test_before_commit_may_withhold_the_record(store):
    def fenced(commit):
        raise ChorusError("fenced")

    with pytest.raises(ChorusError, match="fenced"):
        store.write_shard(UNIT, 0, 0, rows(4), before_commit=fenced)
    assert store.commit(UNIT, 0) is None and store.fs.exists(store.chunk_path(UNIT, "x", 0))


def test_arrays_of_a_shard_must_agree_on_rows(store):
    data = rows(4) | {"y": np.zeros(3, np.uint8)}
    with pytest.raises(ValueError, match=r"^arrays of shard 0 disagree on row count: \[3, 4\]$"):
        store.write_shard(UNIT, 0, 0, data)


@pytest.mark.parametrize("shape", [(4,), (4, 2), (5, 3)])
def test_data_that_does_not_fit_the_chunks_is_refused(store, shape):
    with pytest.raises(IntegrityError, match=rf"^teachers/t/x: data of shape \({shape[0]}, ?{shape[1:] and shape[1]}"
                                             r"\)? does not fit chunks \(4, 3\) of '.*' \(the unit was replaced"):
        store.encode_chunk(UNIT, "x", np.zeros(shape, np.int32))


def test_a_short_last_shard_is_padded_with_the_fill_value(store):
    data = rows(2)
    store.write_shard(UNIT, 2, 8, data)
    np.testing.assert_array_equal(store.read_shard(UNIT, 2, ["x"])["x"], data["x"])
    full = np.asarray(store.array(UNIT, "x")[8:10])
    np.testing.assert_array_equal(full, data["x"])  # plain zarr agrees
    assert store.encode_chunk(UNIT, "x", data["x"]) == store.encode_chunk(
        UNIT, "x", np.concatenate([data["x"], np.zeros((2, 3), np.int32)]))


def test_encoding_follows_the_arrays_codecs(store, tmp_path):
    s = Store.open(str(tmp_path / "c.zarr"), "w")
    s.create_arrays("u", [ArraySpec("ids", (3,), "uint16", serializer="chorus.topk_ids"),
                          ArraySpec("z", (3,), "int32", "zstd", 9)], 8, 4)
    ids = np.array([[1, 2, 3], [1, 2, 4], [7, 1, 2], [1, 2, 3]], np.uint16)
    s.write_shard("u", 0, 0, {"ids": ids, "z": np.arange(12, dtype=np.int32).reshape(4, 3)})
    np.testing.assert_array_equal(np.asarray(s.array("u", "ids")[0:4]), ids)  # zarr decodes what chorus encoded
    np.testing.assert_array_equal(s.read_shard("u", 0, ["ids"])["ids"], ids)
    raw = s.fs.cat_file(s.chunk_path("u", "z", 0))
    assert raw == zs.numcodecs.Zstd(level=9).encode(np.arange(12, dtype="<i4").tobytes())


@pytest.mark.parametrize("compressor", [ZstdCodec(level=1), ZstdCodec(level=19, checksum=True),
                                        BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=4), None])
def test_a_chunk_is_encoded_to_the_bytes_zarr_writes(store, compressor):
    """Chorus encodes a shard itself (so its checksum is of the bytes it wrote): they must be zarr's own."""
    rng = np.random.default_rng(0)
    data = (rng.zipf(1.5, (4, 256)) % 1000).astype(np.int32)
    arr = store.group.require_group(UNIT).create_array("z", shape=(8, 256), chunks=(4, 256), dtype="int32",
                                                       compressors=compressor, fill_value=0)
    arr[0:4] = data
    assert store.encode_chunk(UNIT, "z", data) == store.fs.cat_file(store.chunk_path(UNIT, "z", 0))


def test_encoding_and_decoding_refuse_codecs_they_do_not_know(store):
    grp = store.group.require_group(UNIT)
    grp.create_array("gz", shape=(8, 3), chunks=(4, 3), dtype="int32", compressors=zarr.codecs.GzipCodec())
    grp.create_array("sh", shape=(8, 3), chunks=(4, 3), shards=(8, 3), dtype="int32")
    store.array(UNIT, "gz")[0:4] = 1
    raw = store.fs.cat_file(store.chunk_path(UNIT, "gz", 0))
    with pytest.raises(ChorusError, match=r"^array teachers/t/gz uses codec GzipCodec, which this writer cannot "
                                          r"encode$"):
        store.encode_chunk(UNIT, "gz", np.ones((4, 3), np.int32))
    with pytest.raises(ChorusError, match=r"^array teachers/t/gz uses codec GzipCodec, which this reader cannot "
                                          r"decode$"):
        store._decode(UNIT, "gz", raw)
    with pytest.raises(ChorusError, match=r"^array teachers/t/sh uses serializer ShardingCodec, which this writer "
                                          r"cannot encode$"):
        store.encode_chunk(UNIT, "sh", np.ones((4, 3), np.int32))


def test_a_chunk_of_the_wrong_size_is_an_integrity_error(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    foreign = zs.numcodecs.Zstd().encode(np.zeros(5, np.int32).tobytes())
    with pytest.raises(IntegrityError, match=rf"^teachers/t/x of '{store.url}': a chunk decodes to 20 bytes, its "
                                             r"metadata \(shape \(4, 3\), int32\) needs 48; the array metadata was "
                                             r"edited or the chunk is foreign"):
        store._decode(UNIT, "x", foreign)


def test_a_corrupt_codec_chunk_is_an_integrity_error(tmp_path):
    s = Store.open(str(tmp_path / "c.zarr"), "w")
    s.create_arrays("u", [ArraySpec("ids", (3,), "uint16", serializer="chorus.topk_ids")], 8, 4)
    s.write_shard("u", 0, 0, {"ids": np.ones((4, 3), np.uint16)})
    raw = zs.numcodecs.Zstd().encode(b"\x00" * 3)
    with pytest.raises(IntegrityError, match=r"^u/ids of '.*': chorus\.topk_ids: .*; run `chorus verify "):
        s._decode("u", "ids", raw)


def test_decoded_rows_have_the_native_dtype(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    got = store.read_shard(UNIT, 0, ["x", "y"])
    assert got["x"].dtype == np.dtype("int32") and got["x"].dtype.isnative and got["y"].dtype == np.uint8


def test_put_whole_leaves_no_temporary_file(store, monkeypatch):
    points = []
    monkeypatch.setattr(failpoints, "hit", points.append)
    path = f"{store.root}/deep/er/obj"
    store.put_whole(path, b"abc")
    assert store.fs.cat_file(path) == b"abc" and os.listdir(os.path.dirname(path)) == ["obj"]
    assert points == ["chunk"]


# ---------------------------------------------------------------------------------------------- commits
def test_a_commit_record_is_sorted_indented_json(store):
    commit = store.write_shard(UNIT, 3, 12, rows(4), fingerprint="fp")
    raw = store.fs.cat_file(store.commit_path(UNIT, 3))
    assert store.commit_path(UNIT, 3).endswith("/teachers/t/_commits/000003.json")
    assert raw == json.dumps(commit.to_dict(), sort_keys=True, indent=1).encode()


def test_a_conflicting_commit_names_the_shard(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    with pytest.raises(IntegrityError, match=r"^shard 0 of teachers/t was already committed with other content; two "
                                             r"writers disagree: rerun with --overwrite to rebuild this unit$"):
        store.write_shard(UNIT, 0, 0, rows(4, seed=1))


def test_forget_commit_removes_one_record(store):
    for shard in (0, 1):
        store.write_shard(UNIT, shard, 4 * shard, rows(4))
    store.forget_commit(UNIT, 1)
    assert store.committed(UNIT) == {0}


def test_committed_reads_shard_numbers_from_record_names(url):
    store = Store.open(url, "w")
    store.create_arrays(UNIT, [ArraySpec("x", (3,), "int32")], 8, 4)
    store.write_shard(UNIT, 1, 4, {"x": np.ones((4, 3), np.int32)})
    base = f"{store.root}/{UNIT}/_commits"
    for name in ("000012.json", "notes.json", "000003.json.tmp-1-2", "7", "000004.jsonX", "12345ab.json", "1a.json"):
        store.fs.pipe_file(f"{base}/{name}", b"{}")
    assert store.committed(UNIT) == {1, 12}
    assert store.is_complete(UNIT, 2) and not store.is_complete(UNIT, 3)


def test_commits_of_a_single_shard_and_of_none(url):
    store = Store.open(url, "w")
    store.create_arrays(UNIT, [ArraySpec("x", (3,), "int32")], 10, 4)
    assert store.commits(UNIT) == {} and store.committed(UNIT) == set()
    store.write_shard(UNIT, 2, 8, {"x": np.ones((2, 3), np.int32)})
    commits = store.commits(UNIT)
    assert list(commits) == [2] and commits[2].row_stop == 10


def test_commits_clean_the_temporary_files_of_dead_writers(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    base = f"{store.root}/{UNIT}/_commits"
    dead = f"{base}/000001.json.tmp-999999999-1"
    live = f"{base}/000002.json.tmp-{os.getpid()}-1"
    store.fs.pipe_file(dead, b"{")
    store.fs.pipe_file(live, b"{")
    assert list(store.commits(UNIT)) == [0]
    assert not store.fs.exists(dead) and store.fs.exists(live)


def test_an_unreadable_commit_record_is_named(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    path = store.commit_path(UNIT, 0)
    store.fs.pipe_file(path, b'{"unit": ')
    for read in (lambda: store.commits(UNIT), lambda: store.commit(UNIT, 0)):
        with pytest.raises(IntegrityError, match=rf"^commit record {path} is unreadable \(.+\); run `chorus verify "
                                                 rf"{store.url}`$"):
            read()
    store.fs.pipe_file(path, json.dumps({"unit": UNIT}).encode())
    with pytest.raises(IntegrityError, match=r"unreadable \(commit record: required field 'shard' is missing\)"):
        store.commit(UNIT, 0)


def test_a_commit_of_another_cache_names_both_fingerprints(store):
    store.write_shard(UNIT, 0, 0, rows(4), fingerprint="old")
    store.write_shard(UNIT, 1, 4, rows(4))  # no fingerprint (a record before 0.1.1): accepted
    with pytest.raises(IntegrityError, match=rf"^shard 0 of {UNIT} in '{store.url}' was committed for another cache "
                                             r"\(fingerprint old, the manifest says new\): a writer overlapped an "
                                             r"--overwrite; rerun `chorus cache` with --overwrite to rebuild it$"):
        store.commits(UNIT, fingerprint="new")
    assert sorted(store.commits(UNIT, fingerprint="old")) == [0, 1]


# ---------------------------------------------------------------------------------------------- reading
def test_read_shard_trusts_the_commits_row_range(store):
    data = rows(4)
    store.write_shard(UNIT, 1, 4, data)
    commit = store.commit(UNIT, 1)
    short = ShardCommit(unit=UNIT, shard=1, row_start=4, row_stop=6, checksums=commit.checksums)
    np.testing.assert_array_equal(store.read_shard(UNIT, 1, ["x"], commit=short)["x"], data["x"][:2])


def test_read_shard_names_an_array_the_commit_lacks(store):
    store.write_shard(UNIT, 0, 0, {"x": rows(4)["x"]})
    with pytest.raises(ChorusError, match=r"^shard 0 of teachers/t has no array 'y'$"):
        store.read_shard(UNIT, 0, ["x", "y"])


def test_read_shard_names_a_missing_chunk(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    store.fs.rm(store.chunk_path(UNIT, "y", 0))
    with pytest.raises(IntegrityError, match=rf"^teachers/t/y shard 0 of '{store.url}' is committed but its chunk is "
                                             rf"missing; run `chorus verify {store.url}` and rebuild what it names$"):
        store.read_shard(UNIT, 0, ["x", "y"])
    assert store.verify(UNIT) == [f"teachers/t/y shard 0 (rows 0:4): missing != "
                                  f"{store.commit(UNIT, 0).checksums['y']}"]


def test_read_shard_without_verification_returns_the_bytes(store):
    data = rows(4)
    store.write_shard(UNIT, 0, 0, data)
    other = store.encode_chunk(UNIT, "x", rows(4, seed=5)["x"])
    store.put_whole(store.chunk_path(UNIT, "x", 0), other)
    with pytest.raises(IntegrityError, match="checksum mismatch in teachers/t/x shard 0 \\(rows 0:4\\)"):
        store.read_rows(UNIT, "x", 0, 4)
    np.testing.assert_array_equal(store.read_rows(UNIT, "x", 0, 4, verify=False), rows(4, seed=5)["x"])


def test_read_rows_stitches_committed_shards(store, monkeypatch):
    data = {k: np.concatenate([rows(4, s)[k] for s in range(2)] + [rows(2, 2)[k]]) for k in ("x", "y")}
    for shard in range(3):
        lo, hi = 4 * shard, min(4 * shard + 4, 10)
        store.write_shard(UNIT, shard, lo, {k: v[lo:hi] for k, v in data.items()})
    calls = []
    real = Store.commits
    monkeypatch.setattr(Store, "commits", lambda self, unit, **kw: calls.append(unit) or real(self, unit, **kw))
    np.testing.assert_array_equal(store.read_rows(UNIT, "x", 3, 9), data["x"][3:9])
    assert calls == [UNIT]  # one listing for all the shards it reads
    np.testing.assert_array_equal(store.read_rows(UNIT, "y", 0, 10), data["y"])
    empty = store.read_rows(UNIT, "x", 4, 4)
    assert empty.shape == (0,) and empty.dtype == np.int32


def test_verify_accepts_a_record_of_either_checksum(store):
    store.write_shard(UNIT, 0, 0, rows(4))
    record = store.commit(UNIT, 0)
    sha = {n: checksum(store.fs.cat_file(store.chunk_path(UNIT, n, 0)), "sha256") for n in record.checksums}
    store.forget_commit(UNIT, 0)
    store._create_commit(ShardCommit(unit=UNIT, shard=0, row_start=0, row_stop=4, checksums=sha))
    assert store.verify(UNIT) == []
    np.testing.assert_array_equal(store.read_shard(UNIT, 0, ["x"])["x"], rows(4)["x"])
