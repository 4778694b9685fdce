"""The chorus zarr codecs for top-k targets: bit-exact round trips against the plain encoding on realistic top-k
(Zipf- and Gaussian-logit distributions), through zarr itself, and refusal of corrupt chunks."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from chorus.store import Store, decode_topk, decode_values, encode_targets, encode_values, target_specs, value_params
from chorus.store.codecs import (
    FP16_CODEC,
    IDS_CODEC,
    CodecError,
    TopkFp16Codec,
    TopkIdsCodec,
    decode_fp16,
    decode_ids,
    encode_fp16,
    encode_ids,
)


def topk_case(kind: str, *, rows: int = 6, length: int = 64, vocab: int = 4096, k: int = 32, seed: int = 0):
    """Top-k ids [rows, L, k] and float32 log-probs (descending) of full distributions over ``vocab``: "zipf" — a
    Zipfian prior over the vocabulary perturbed per position (frequent ids recur in every top-k, as in a real LM);
    "gaussian" — N(0, 3²) logits (no id structure at all)."""
    rng = np.random.default_rng(seed)
    if kind == "zipf":
        prior = -1.1 * np.log(np.arange(1, vocab + 1))[rng.permutation(vocab)]
        z = prior + rng.normal(size=(rows * length, vocab)) * 1.5
    else:
        z = rng.normal(size=(rows * length, vocab)) * 3.0
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    vals = np.take_along_axis(logp, ids, -1)
    return ids.reshape(rows, length, k), vals.reshape(rows, length, k).astype(np.float32)


# ---------------------------------------------------------------------------------------------- ids
@pytest.mark.parametrize("kind", ["zipf", "gaussian"])
@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int64"])
def test_ids_round_trip_exactly(kind, dtype):
    ids, _ = topk_case(kind)
    ids = ids.astype(dtype)
    back = decode_ids(encode_ids(ids), ids.shape, ids.dtype)
    assert back.dtype == ids.dtype and back.shape == ids.shape
    np.testing.assert_array_equal(back, ids)


@pytest.mark.parametrize("distinct", [1, 200, 255, 256, 3000, 65280 - 64 * 254, 70_000])
def test_ids_round_trip_at_every_dictionary_size(distinct):
    """One-byte ranks only, the two-byte codes, and beyond their reach (the uint32 side stream)."""
    rng = np.random.default_rng(distinct)
    vocab = rng.choice(200_000, size=distinct, replace=False).astype(np.uint32)
    ids = np.concatenate([vocab, vocab[rng.zipf(1.3, size=5000).clip(max=distinct) - 1]])
    rng.shuffle(ids)
    back = decode_ids(encode_ids(ids), ids.shape, ids.dtype)
    np.testing.assert_array_equal(back, ids)


def test_ids_of_uint8_and_empty_chunks_round_trip():
    ids = np.arange(256, dtype=np.uint8).repeat(3)
    np.testing.assert_array_equal(decode_ids(encode_ids(ids), ids.shape, ids.dtype), ids)
    empty = np.zeros((0, 4, 8), dtype=np.uint16)
    assert decode_ids(encode_ids(empty), empty.shape, empty.dtype).shape == empty.shape


def test_ids_encoding_is_deterministic_and_smaller_on_frequent_ids():
    """The same ids give the same bytes (commit checksums, export's re-encode check); ids that recur across
    positions, as a real LM's do, code below their 2 bytes each even before zstd."""
    ids, _ = topk_case("zipf")
    ids = ids.astype(np.uint16)
    assert encode_ids(ids) == encode_ids(ids.copy())
    assert len(encode_ids(ids)) < 1.8 * ids.size


def test_negative_ids_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        encode_ids(np.array([3, -1], dtype=np.int64))


@pytest.mark.parametrize("cut", ["short", "header", "rank"])
def test_corrupt_id_chunks_are_refused(cut):
    ids = np.arange(300, dtype=np.uint16).repeat(2)  # 300 distinct ids: ranks 254-299 take two bytes
    blob = bytearray(encode_ids(ids))
    if cut == "short":
        blob = blob[:-1]
    elif cut == "header":
        blob[0:2] = b"XX"
    else:  # a second byte past the dictionary's end
        blob[-1] = 255
    with pytest.raises(CodecError):
        decode_ids(bytes(blob), ids.shape, ids.dtype)


def _plain_decode_ids(blob: bytes, shape, dtype) -> np.ndarray:
    """The ids format read the plain way (one rank per position, in order): the reference for the blocked decoder."""
    import struct

    dtype = np.dtype(dtype)
    _, _, a, n_dict, n_two, n_far = struct.unpack_from("<2sBBIII", blob)
    at = 16
    dictionary = np.frombuffer(blob, dtype=dtype.newbyteorder("<"), count=n_dict, offset=at)
    at += n_dict * dtype.itemsize
    size = int(np.prod(shape))
    first = np.frombuffer(blob, np.uint8, size, at).tolist()
    second = iter(np.frombuffer(blob, np.uint8, n_two, at + size).tolist())
    far = iter(np.frombuffer(blob, "<u4", n_far, at + size + n_two).tolist())
    ranks = [f if f < a else next(far) if f == 255 else a + (f - a) * 256 + next(second) for f in first]
    return dictionary[np.array(ranks, dtype=np.int64)].astype(dtype).reshape(shape)


@pytest.mark.parametrize("block", [7, 1000, 1 << 16])
@pytest.mark.parametrize("distinct", [200, 3000, 70_000])
@pytest.mark.parametrize("two_byte_share", [0.3, 0.95])
def test_blocked_id_decoding_equals_the_plain_reading(monkeypatch, block, distinct, two_byte_share):
    """Blocks of any size (a block boundary inside every stream), sparse and dense two-byte codes (the two ways of
    placing second bytes) and far ranks give the encoder's input, as the format read plainly does."""
    import chorus.store.codecs as codecs

    monkeypatch.setattr(codecs, "_IDS_BLOCK", block)
    rng = np.random.default_rng(distinct)
    vocab = rng.choice(200_000, size=distinct, replace=False).astype(np.uint32)
    n_one = max(1, int(4000 * (1 - two_byte_share)))
    ids = np.concatenate([vocab, np.repeat(vocab[:50], n_one // 50 + 1), vocab[rng.integers(0, distinct, 4000 - n_one)]])
    rng.shuffle(ids)
    ids = ids[: len(ids) // 8 * 8].reshape(-1, 8)
    blob = encode_ids(ids)
    np.testing.assert_array_equal(decode_ids(blob, ids.shape, ids.dtype), ids)
    np.testing.assert_array_equal(_plain_decode_ids(blob, ids.shape, ids.dtype), ids)


@pytest.mark.parametrize("cut", ["second bytes past the dictionary", "far rank past it", "one far rank too few",
                                 "a second byte too many", "a stray first byte 255"])
def test_corrupt_two_byte_and_far_streams_are_refused(monkeypatch, cut):
    import struct

    import chorus.store.codecs as codecs

    monkeypatch.setattr(codecs, "_IDS_BLOCK", 1000)
    distinct = 70_000 if "far" in cut else 3000
    ids = np.arange(distinct, dtype=np.uint32).repeat(2)
    blob = bytearray(encode_ids(ids))
    _, _, a, n_dict, n_two, n_far = struct.unpack_from("<2sBBIII", blob)
    first = 16 + 4 * n_dict
    firsts = np.frombuffer(bytes(blob[first: first + ids.size]), np.uint8)
    if cut == "second bytes past the dictionary":  # the last two-byte row is not full: its second byte 255 is past it
        blob[first + ids.size: first + ids.size + n_two] = b"\xff" * n_two
    elif cut == "far rank past it":
        blob[-4:] = (n_dict + 5).to_bytes(4, "little")
    elif cut == "one far rank too few":  # a far position's first byte made a two-byte one
        blob[first + int(np.flatnonzero(firsts == 255)[0])] = a
    elif cut == "a second byte too many":  # a one-byte rank's first byte made two-byte
        blob[first + int(np.flatnonzero(firsts < a)[0])] = a
    else:
        blob[first + int(np.flatnonzero(firsts >= a)[-1])] = 255
    with pytest.raises(CodecError):
        decode_ids(bytes(blob), ids.shape, ids.dtype)


def test_split_point_reaches_every_rank_in_two_bytes_while_it_can():
    from chorus.store.codecs import _split_point

    for n in (256, 300, 511, 5000, 19_624, 48_960):  # beyond 64 + 191·256 = 48 960 the rarest go to uint32
        a = _split_point(n)
        assert 64 <= a <= 254 and a + (255 - a) * 256 >= n


# ---------------------------------------------------------------------------------------------- fp16 values
@pytest.mark.parametrize("kind", ["zipf", "gaussian"])
@pytest.mark.parametrize("k", [1, 2, 8, 64])
def test_fp16_values_round_trip_bit_exactly_as_the_plain_encoding(kind, k):
    _, vals = topk_case(kind, k=max(k, 1))
    plain = encode_values(vals[..., :k], "fp16", {})  # float16, today's values
    back = decode_fp16(encode_fp16(plain), plain.shape)
    assert back.dtype == np.float16
    np.testing.assert_array_equal(back.view(np.uint16), plain.view(np.uint16))
    # and the same log-probs as the delta-coded (v1) layout decodes to
    v1 = decode_values(encode_values(vals[..., :k], "fp16", {"delta": True}), "fp16", {"delta": True}, dtype=np.float16)
    np.testing.assert_array_equal(back.view(np.uint16), v1.view(np.uint16))


@pytest.mark.parametrize("elements", [1, 64, 1000, 1 << 15])
def test_fp16_sums_in_chunks_of_any_size_exactly(monkeypatch, elements):
    """The running sums along k, taken a few rows at a time (and one row when a row is longer than a chunk), are
    numpy's uint16 cumsum of the stored differences: the plain encoding's bits."""
    import chorus.store.codecs as codecs

    monkeypatch.setattr(codecs, "_CUMSUM_ELEMENTS", elements)
    _, vals = topk_case("zipf", rows=5, k=64)
    plain = vals.astype(np.float16)
    np.testing.assert_array_equal(decode_fp16(encode_fp16(plain), plain.shape).view(np.uint16), plain.view(np.uint16))
    bits = plain.view(np.uint16).reshape(-1, 64)
    diffs = np.concatenate([bits[:, :1], bits[:, 1:] - bits[:, :-1]], 1)
    np.testing.assert_array_equal(np.cumsum(diffs, 1, dtype=np.uint16), bits)


def test_fp16_any_bit_pattern_round_trips():
    """Not only descending log-probs: -inf (masked positions), ±0, NaN payloads, rising values, big jumps."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 65536, size=(300, 16), dtype=np.uint16)
    bits[0] = [0xFC00, 0x0000, 0x8000, 0x7E01, 0xFE00, 0x3C00, 0x0001, 0xFFFF, 0, 0, 0, 0, 0xFC00, 0xFC00, 1, 2]
    vals = bits.view(np.float16)
    np.testing.assert_array_equal(decode_fp16(encode_fp16(vals), vals.shape).view(np.uint16), bits)


def test_corrupt_value_chunks_are_refused():
    _, vals = topk_case("zipf", rows=2)
    blob = bytearray(encode_fp16(vals.astype(np.float16)))
    with pytest.raises(CodecError):
        decode_fp16(bytes(blob[:-2]), vals.shape)
    head_escapes = int.from_bytes(blob[12:16], "little")
    blob[12:16] = (head_escapes + 1).to_bytes(4, "little")
    with pytest.raises(CodecError):
        decode_fp16(bytes(blob) + b"\0\0", vals.shape)


# ---------------------------------------------------------------------------------------------- through zarr
def test_a_plain_zarr_reader_gets_the_real_ids_and_log_probs(tmp_path):
    """The codecs are recorded in the arrays' zarr metadata: opening the arrays again (no chorus code but the
    registered codecs) yields the real arrays, bit for bit."""
    ids, vals = topk_case("zipf", rows=4)
    ids, vals16 = ids.astype(np.uint16), vals.astype(np.float16)
    group = zarr.open_group(str(tmp_path / "t.zarr"), mode="w", zarr_format=3)
    for name, data, codec in (("topk_ids", ids, TopkIdsCodec()), ("topk_logprobs", vals16, TopkFp16Codec())):
        arr = group.create_array(name, shape=data.shape, chunks=(2, *data.shape[1:]), dtype=data.dtype,
                                 serializer=codec, compressors=ZstdCodec(level=3), fill_value=0)
        arr[:] = data
    again = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert again["topk_ids"].metadata.codecs[0].to_dict() == {"name": IDS_CODEC}
    assert again["topk_logprobs"].metadata.codecs[0].to_dict() == {"name": FP16_CODEC}
    np.testing.assert_array_equal(again["topk_ids"][:], ids)
    np.testing.assert_array_equal(again["topk_logprobs"][:].view(np.uint16), vals16.view(np.uint16))
    np.testing.assert_array_equal(again["topk_ids"][1:3, 5], ids[1:3, 5])  # partial reads decode whole chunks


def test_the_codecs_refuse_other_dtypes(tmp_path):
    group = zarr.open_group(str(tmp_path / "t.zarr"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="float16"):
        group.create_array("x", shape=(4, 8), chunks=(2, 8), dtype="float32", serializer=TopkFp16Codec())
    with pytest.raises(ValueError, match="integer"):
        group.create_array("y", shape=(4, 8), chunks=(2, 8), dtype="float16", serializer=TopkIdsCodec())


# ---------------------------------------------------------------------------------------------- the store
def _store_round_trip(url: str, params: dict, ids: np.ndarray, vals: np.ndarray):
    rows, length, k = ids.shape
    store = Store.open(url, "w")
    specs = target_specs(length, k, 0, 4096, "fp16", params)
    store.create_arrays("teachers/t", specs, rows, rows)
    arrays = encode_targets(ids, vals, vocab_size=4096, codec="fp16", params=params)
    store.write_shard("teachers/t", 0, 0, arrays)
    back = Store.open(url, "r").read_shard("teachers/t", 0, ["topk_ids", "topk_logprobs"])

    class M:
        value_codec, value_params = "fp16", params

    return decode_topk(back, M), specs


def test_a_v1_cache_still_decodes():
    """Caches written before the zarr codecs (delta-coded uint16 values, uint16 ids, bytes + zstd/blosc) read back
    the same ids and values as the plain encoding, whatever this version writes for new caches."""
    ids, vals = topk_case("zipf", rows=3)
    (got_ids, got_vals), specs = _store_round_trip("memory://codecs-v1", {"delta": True}, ids, vals)
    assert {s.name: s.dtype for s in specs}["topk_logprobs"] == "uint16"
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_vals, vals.astype(np.float16).astype(np.float32))


def test_new_caches_use_the_codecs_and_decode_exactly():
    params = value_params("fp16")
    assert params["zarr_codecs"] == {"topk_ids": IDS_CODEC, "topk_logprobs": FP16_CODEC} and not params["delta"]
    ids, vals = topk_case("zipf", rows=3)
    (got_ids, got_vals), _ = _store_round_trip("memory://codecs-v2", params, ids, vals)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_vals, vals.astype(np.float16).astype(np.float32))
    assert Store.open("memory://codecs-v2", "r").array("teachers/t", "topk_ids").metadata.codecs[0].to_dict() == \
        {"name": IDS_CODEC}



def test_the_store_reads_and_writes_without_torch(tmp_path):
    """The store imports no torch: a reader with numpy alone decodes every codec bit for bit as the torch path does,
    and still refuses a corrupt chunk (torch is blocked in a fresh interpreter, so nothing can fall back to it)."""
    import subprocess
    import sys

    ids, vals = topk_case("zipf", rows=3, length=40)
    ids[0, 0, 0] = 4000  # a rare id: a two-byte rank
    blobs = {"ids": encode_ids(ids.astype(np.int32)), "vals": encode_fp16(vals.astype(np.float16))}
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
    from chorus.store.codecs import _IDS_HEAD
    _, _, a, n_dict, _, _ = _IDS_HEAD.unpack_from(blobs["ids"])
    first = _IDS_HEAD.size + 4 * n_dict
    bad = bytearray(blobs["ids"])
    at = first + next(i for i, f in enumerate(bad[first: first + ids.size]) if a <= f < 254)
    bad[at] = 254  # still a two-byte rank, now past the end of the table: only the gather can see it
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(CodecError):
        decode_ids(bytes(bad), ids.shape, np.int32)
    script = f"""
import sys; sys.modules["torch"] = None
import numpy as np
import chorus.store
from chorus.store.codecs import CodecError, decode_fp16, decode_ids
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "the store imported torch"
d = {str(tmp_path)!r}
np.save(d + "/ids.npy", decode_ids(open(d + "/ids", "rb").read(), {ids.shape}, np.int32))
np.save(d + "/vals.npy", decode_fp16(open(d + "/vals", "rb").read(), {vals.shape}))
try:
    decode_ids(open(d + "/bad", "rb").read(), {ids.shape}, np.int32)
except CodecError:
    print("refused")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused" in out.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), ids)
    assert np.load(tmp_path / "vals.npy").tobytes() == decode_fp16(blobs["vals"], vals.shape).tobytes()
    assert np.load(tmp_path / "vals.npy").tobytes() == vals.astype(np.float16).tobytes()
