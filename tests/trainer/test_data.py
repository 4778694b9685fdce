"""Streaming rows + cached targets: exact epochs across workers and ranks, exact resume, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chorus.distill.targets import teacher_dist
from chorus.errors import ChorusError
from chorus.store import Store, decode_values, encode_values, value_params
from chorus.student.data import CachedRows, StreamLoader, positions
from tests.trainer.conftest import bigram_teacher, copy_store, write_teacher


def _rows(loader) -> list[int]:
    return [r for b in loader for r in b["row"].tolist()]


def _train_rows(url: str) -> np.ndarray:
    s = Store.open(url, "r")
    return np.flatnonzero(s.read_rows("corpus", "split", 0, s.manifest.num_rows) == 0)


def test_every_train_row_once_per_epoch_with_workers_and_ranks(teacher_store):
    seen = []
    per_rank = []
    for rank in range(2):
        ds = CachedRows(teacher_store, batch_size=4, teachers=["a"], epochs=1, rank=rank, world_size=2, shuffle_buffer=40)
        batches = list(StreamLoader(ds, num_workers=2))
        per_rank.append([b["row"].tolist() for b in batches])
        seen += [r for b in batches for r in b["row"].tolist()]
    assert sorted(seen) == _train_rows(teacher_store).tolist()  # each train row exactly once
    # the global batch does not depend on the number of ranks: one rank of 8 rows sees the same rows, in order
    single = [b["row"].tolist() for b in CachedRows(teacher_store, batch_size=8, teachers=["a"], epochs=1,
                                                    rank=0, world_size=1, shuffle_buffer=40)]
    interleaved = [r0 + r1 for r0, r1 in zip(per_rank[0], per_rank[1] + [[]])]
    assert interleaved == single


def test_targets_are_the_cached_rows(teacher_store, vocab_size):
    store = Store.open(teacher_store, "r")
    ds = CachedRows(teacher_store, batch_size=5, teachers=["b"], samples=True, epochs=1, seed=3)
    batch = next(iter(ds))
    for i, row in enumerate(batch["row"].tolist()):
        np.testing.assert_array_equal(batch["input_ids"][i].numpy(), store.read_rows("corpus", "input_ids", row, row + 1)[0])
        ids = store.read_rows("teachers/b", "topk_ids", row, row + 1)[0]
        m = store.teacher_manifest("b")
        logp = decode_values(store.read_rows("teachers/b", "topk_logprobs", row, row + 1)[0], m.value_codec, m.value_params)
        np.testing.assert_array_equal(batch["teachers"]["b"]["topk_ids"][i].numpy(), ids)
        np.testing.assert_array_equal(batch["teachers"]["b"]["topk_logprobs"][i].numpy(), logp)
        assert (batch["teachers"]["b"]["sample_counts"][i].sum(-1) == 8).all()
        assert batch["domain"][i] == store.read_rows("corpus", "domain", row, row + 1)[0]


def test_resume_from_state_gives_the_identical_remaining_sequence(teacher_store):
    def make():
        return CachedRows(teacher_store, batch_size=8, teachers=["a", "c"], seed=7, shuffle_buffer=64)

    first = StreamLoader(make(), num_workers=2)
    it = iter(first)
    head = [next(it)["row"].tolist() for _ in range(38)]
    state = first.state_dict()
    rest = [next(it) for _ in range(10)]  # crosses into epoch 2 (332 train rows, 41.5 batches)
    resumed = make()
    resumed.load_state_dict(state)
    again = iter(StreamLoader(resumed, num_workers=0))
    for want in rest:
        got = next(again)
        assert got["row"].tolist() == want["row"].tolist()
        torch.testing.assert_close(got["teachers"]["c"]["topk_logprobs"], want["teachers"]["c"]["topk_logprobs"])
    epoch0 = [r for b in head for r in b]
    assert len(set(epoch0)) == len(epoch0)  # no repeat inside the epoch
    assert state["epoch"] == 0 and state["position"] == 38 * 8
    # another epoch, another order
    ds = make()
    assert not np.array_equal(ds.epoch_order(0), ds.epoch_order(1))
    assert sorted(ds.epoch_order(0)) == sorted(ds.epoch_order(1))


def test_state_from_other_data_settings_is_refused(teacher_store):
    ds = CachedRows(teacher_store, batch_size=4, seed=1)
    other = CachedRows(teacher_store, batch_size=4, seed=2)
    with pytest.raises(ChorusError, match="seed"):
        other.load_state_dict(ds.state_dict())


def test_split_and_domain_filters(teacher_store):
    store = Store.open(teacher_store, "r")
    split = store.read_rows("corpus", "split", 0, store.manifest.num_rows)
    domain = store.read_rows("corpus", "domain", 0, store.manifest.num_rows)
    rows = _rows(CachedRows(teacher_store, batch_size=16, split="valid", domains=["prose"], epochs=1))
    expected = np.flatnonzero((split == 1) & (domain == store.manifest.domains.index("prose")))
    assert sorted(rows) == expected.tolist()
    with pytest.raises(ChorusError, match="unknown domain"):
        CachedRows(teacher_store, batch_size=4, domains=["poetry"])


def test_positions_mask_padding_and_align_gold():
    ids = torch.tensor([[5, 6, 7, 1, 1], [8, 9, 10, 11, 12]])
    segs = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]], dtype=torch.int32)
    pos = positions({"input_ids": ids, "segment_ids": segs, "domain": torch.tensor([0, 2])})
    assert pos.select.tolist() == [0, 1, 4, 5, 6, 7]  # row 0: 5→6, 6→7; row 1: every position
    assert pos.gold.tolist() == [6, 7, 9, 10, 11, 12]
    assert pos.domain.tolist() == [0, 0, 2, 2, 2, 2]


def test_q8_values_are_decoded_per_manifest(tmp_path, prepared_store, vocab_size):
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    table = bigram_teacher(vocab_size, seed=4)
    write_teacher(url, "q", table, top_k=8, codec="q8")
    batch = next(iter(CachedRows(url, batch_size=4, teachers=["q"], epochs=1, shuffle=False)))
    got = batch["teachers"]["q"]["topk_logprobs"]
    ids = batch["input_ids"].numpy()
    exact = np.sort(table(ids), axis=-1)[..., ::-1][..., :8].astype(np.float32)
    params = value_params("q8")
    np.testing.assert_array_equal(got.numpy(), decode_values(encode_values(exact, "q8", params), "q8", params))
    np.testing.assert_allclose(got.numpy(), exact, atol=0.25)  # the companded 8-bit code is coarse only far out
    d = teacher_dist(batch["teachers"]["q"], torch.arange(4), target="topk_tail", vocab_size=vocab_size)
    assert ((d.tail >= 0) & (d.tail <= 1)).all()


@pytest.mark.parametrize(
    "kind, kwargs, message",
    [
        ("incomplete", {"status": "incomplete", "shards": [0, 1]}, "teacher 'bad' is not complete"),
        ("corpus", {"corpus_fingerprint": "0" * 32, "shards": None}, "teacher 'bad' was cached from another corpus"),
        ("vocab", {"tokenizer_fingerprint": "f" * 32, "vocab_size": 999, "shards": None}, "teacher 'bad' uses another tokenizer"),
    ],
)
def test_unjoinable_teacher_is_refused_by_name(tmp_path, prepared_store, vocab_size, kind, kwargs, message):
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    write_teacher(url, "bad", bigram_teacher(vocab_size, seed=9), top_k=4, **kwargs)
    with pytest.raises(ChorusError, match=message) as err:
        CachedRows(url, batch_size=4, teachers=["bad"])
    assert "\n" not in str(err.value)


def test_missing_teacher_and_missing_samples_are_refused(teacher_store, tmp_path, prepared_store, vocab_size):
    with pytest.raises(ChorusError, match="no teacher 'zzz'"):
        CachedRows(teacher_store, batch_size=4, teachers=["zzz"])
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    write_teacher(url, "nosamples", bigram_teacher(vocab_size, seed=2), top_k=4)
    with pytest.raises(ChorusError, match="teacher 'nosamples' has no sampled targets"):
        CachedRows(url, batch_size=4, teachers=["nosamples"], samples=True)


def test_exclude_rows_leaves_out_exactly_the_rows_train_rows_picks(teacher_store):
    def rows(**kw) -> set[int]:
        return set(CachedRows(teacher_store, batch_size=4, teachers=[], epochs=1, **kw).rows.tolist())

    every, picked, rest = rows(), rows(max_rows=7), rows(exclude_rows=7)
    assert len(picked) == 7 and picked | rest == every and not picked & rest  # a teacher never sees a student's rows
    # with a domain filter, the same global selection is excluded (a specialist keeps off the students' rows too)
    store = Store.open(teacher_store, "r")
    domain = store.read_rows("corpus", "domain", 0, store.manifest.num_rows)
    d0 = rows(domains=[store.manifest.domains[0]], exclude_rows=7)
    assert d0 == {r for r in every - picked if domain[r] == 0}
    with pytest.raises(ChorusError, match="exclude_rows"):
        rows(exclude_rows=0)


# ---------------------------------------------------------------------------------------------- scale
def _synthetic_store(url: str, *, shards: int, rps: int, seq_len: int = 16, vocab: int = 300, domain_of_shard=None,
                     valid_every: int = 0, index: bool = True, seed: int = 0) -> str:
    """A corpus written shard by shard (``domain_of_shard(s)``: one domain per shard, as `prepare` writes a
    directory dataset); ``valid_every``: every n-th row held out (0: none); ``index``: write the row index."""
    from chorus.store import ArraySpec, CorpusManifest, TokenizerInfo, fingerprint
    from chorus.store.index import write_row_index

    rng = np.random.default_rng(seed)
    store = Store.open(url, "w")
    n = shards * rps
    store.create_arrays("corpus", [ArraySpec("input_ids", (seq_len,), "int32"), ArraySpec("segment_ids", (seq_len,), "uint16"),
                                   ArraySpec("domain", (), "uint16"), ArraySpec("split", (), "uint8")], n, rps)
    split = (np.arange(n) % valid_every == valid_every - 1).astype(np.uint8) if valid_every else np.zeros(n, np.uint8)
    domain = np.repeat([domain_of_shard(s) if domain_of_shard else s % 3 for s in range(shards)], rps).astype(np.uint16)
    for s in range(shards):
        lo, hi = s * rps, (s + 1) * rps
        store.write_shard("corpus", s, lo, {"input_ids": rng.integers(2, vocab, (rps, seq_len), dtype=np.int32),
                                            "segment_ids": np.ones((rps, seq_len), np.uint16),
                                            "domain": domain[lo:hi], "split": split[lo:hi]})
    tok = TokenizerInfo(name="synthetic", vocab_size=vocab, fingerprint=fingerprint("tok", vocab),
                        vocab_fingerprint=fingerprint("vocab", vocab), eos_id=0, pad_id=1)
    m = CorpusManifest(fingerprint=fingerprint("synthetic", url, shards, rps, seed), tokenizer=tok, seq_len=seq_len,
                       num_rows=n, rows_per_shard=rps, domains=("a", "b", "c"), num_tokens=n * seq_len,
                       split_rows={"train": int((split == 0).sum()), "valid": int((split == 1).sum())},
                       source={"synthetic": True}, created_by="test")
    if index:
        write_row_index(store, split, domain, fingerprint=m.fingerprint)
    store.write_manifest(m)
    return url


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["stop"] == y["stop"]
        for key in ("input_ids", "segment_ids", "domain", "row"):
            assert torch.equal(x[key], y[key])
        for t in x["teachers"]:
            for name, v in x["teachers"][t].items():
                w = y["teachers"][t][name]
                assert v.dtype == w.dtype and torch.equal(v.view(torch.uint8), w.view(torch.uint8)), (t, name)


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_the_same_batches_in_the_same_order_for_0_1_and_2_workers(teacher_store, rank, world):
    def batches(workers: int, start: int = 0) -> list[dict]:
        ds = CachedRows(teacher_store, batch_size=6, teachers=["b", "c"], seed=5, epochs=2,
                        shuffle_buffer=16, shuffle_shards=3, rank=rank, world_size=world)
        ds._position = start
        return list(StreamLoader(ds, num_workers=workers))

    ref = batches(0)
    assert len({r for b in ref for r in b["row"].tolist()}) > 0
    _same_batches(batches(1), ref)
    _same_batches(batches(2), ref)
    _same_batches(batches(2, start=ref[9]["stop"]), ref[10:])  # a resumed stream with workers: the same remainder


def test_a_stream_loader_continues_where_it_stopped_unless_its_state_changed(teacher_store):
    ds = CachedRows(teacher_store, batch_size=8, teachers=["a"], seed=2, shuffle_buffer=16)
    ref = [b["row"].tolist() for _, b in zip(range(12), CachedRows(teacher_store, batch_size=8, teachers=["a"], seed=2,
                                                                   shuffle_buffer=16))]
    loader = StreamLoader(ds, num_workers=2)
    first = [b["row"].tolist() for _, b in zip(range(5), loader)]
    live = loader._live
    second = [b["row"].tolist() for _, b in zip(range(4), loader)]
    assert loader._live is live  # the same pipeline (threads), not a restart
    assert first + second == ref[:9]
    ds.load_state_dict({**ds.state_dict(), "epoch": 0, "position": 8})
    assert [b["row"].tolist() for _, b in zip(range(2), loader)] == ref[1:3] and loader._live is not live
    loader.close()


def test_batches_mix_domains_when_every_shard_holds_one(tmp_path):
    # 24 shards written domain by domain (8 of a, then 8 of b, then 8 of c), as prepare writes a directory
    url = _synthetic_store(str(tmp_path / "s.zarr"), shards=24, rps=16, domain_of_shard=lambda s: s // 8)
    ds = CachedRows(url, batch_size=16, epochs=1, seed=1, shuffle_buffer=32)
    kinds = [len(set(b["domain"].tolist())) for b in ds]
    assert np.mean([k >= 2 for k in kinds]) >= 0.9 and np.mean([k == 3 for k in kinds]) >= 0.5
    # each shard is decoded once: read side by side, dropped after its last row
    loads = []
    ds2 = CachedRows(url, batch_size=16, epochs=1, seed=1, shuffle_buffer=32)
    original = ds2._load
    ds2._load = lambda shard: loads.append(shard) or original(shard)
    assert sorted(r for b in ds2 for r in b["row"].tolist()) == list(range(24 * 16))
    assert sorted(loads) == list(range(24))


def test_the_row_index_equals_a_scan_and_an_old_store_reads_the_same(tmp_path, prepared_store):
    from chorus.store.index import INDEX_UNIT, read_row_index, scan_row_index

    store = Store.open(prepared_store, "r")
    indexed = read_row_index(store, store.manifest)
    assert indexed is not None  # prepare wrote it
    for got, want in zip(indexed, scan_row_index(store, store.manifest)):
        np.testing.assert_array_equal(got, want)
    old = copy_store(prepared_store, tmp_path / "old.zarr")
    Store.open(old, "a").delete_unit(INDEX_UNIT)  # a store from before the index
    assert read_row_index(Store.open(old, "r"), store.manifest) is None
    for kw in ({}, {"split": "valid", "max_rows": 5, "stratify": True}, {"max_rows": 30}, {"exclude_rows": 9}):
        a = [b["row"].tolist() for b in CachedRows(prepared_store, batch_size=4, epochs=1, **kw)]
        b = [b["row"].tolist() for b in CachedRows(old, batch_size=4, epochs=1, **kw)]
        assert a == b


def test_fp16_delta_values_are_decoded_bit_for_bit(tmp_path, prepared_store):
    from chorus.student.data import _Teacher, _values

    params = {"delta": True}  # the v1 fp16 encoding, which the loader decodes itself (new caches use a zarr codec)
    stored = np.random.default_rng(0).integers(0, 1 << 16, (3, 5, 64), dtype=np.uint16)  # sums wrap around
    t = _Teacher("x", (), "fp16", params, None)
    want = decode_values(stored, "fp16", params, dtype=np.float16)
    assert np.array_equal(_values(stored, t).numpy().view(np.uint16), want.view(np.uint16))


def test_stratified_rows_are_even_over_domains_and_few_shards(tmp_path):
    url = _synthetic_store(str(tmp_path / "s.zarr"), shards=40, rps=16, domain_of_shard=lambda s: [0, 0, 0, 1, 2][s % 5],
                           valid_every=1)
    ds = CachedRows(url, batch_size=8, split="valid", max_rows=30, stratify=True, epochs=1)
    dom = ds.domain_of[ds.rows]
    assert len(ds.rows) == 30 and np.bincount(dom).tolist() == [10, 10, 10]
    assert len(np.unique(ds.rows // 16)) <= 6  # whole shards, not one per row
    assert len(np.unique(ds.rows)) == 30


def test_a_corrupt_shard_stops_the_threaded_loader_naming_it(tmp_path, teacher_store):
    from chorus.errors import IntegrityError

    url = copy_store(teacher_store, tmp_path / "s.zarr")
    store = Store.open(url, "r")
    path = store.chunk_path("teachers/a", "topk_ids", 2)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    ds = CachedRows(url, batch_size=8, teachers=["a"], epochs=1, seed=4)
    with pytest.raises(IntegrityError, match="teachers/a/topk_ids shard 2"):
        list(StreamLoader(ds, num_workers=2))


def test_a_torch_dataloader_with_worker_processes_gives_the_same_batches(teacher_store):
    from torch.utils.data import DataLoader

    def make() -> CachedRows:
        return CachedRows(teacher_store, batch_size=8, teachers=["a"], epochs=1, seed=6, shuffle_buffer=16)

    ref = list(make())
    got = list(DataLoader(make(), batch_size=None, num_workers=2))  # micro-batches j ≡ worker (mod 2), in order
    _same_batches(got, ref)


def test_state_for_another_row_order_is_refused(teacher_store):
    ds = CachedRows(teacher_store, batch_size=4, seed=1)
    with pytest.raises(ChorusError, match="row order"):
        ds.load_state_dict({**ds.state_dict(), "lanes": ds.lanes + 1})
