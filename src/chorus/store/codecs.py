"""Zarr v3 array→bytes codecs for a teacher's top-k targets: the stored bytes are smaller, the decoded arrays are
the real ids and float16 log-probs, bit for bit (so any zarr reader that has imported ``chorus.store``, which
registers them, reads real values; no application-side decoding is left to forget).

Each codec turns one chunk into a few byte streams and leaves the entropy coding to the compressor that follows it
in the array's codec chain (zstd): a byte-oriented entropy coder (zstd's Huffman literals) does well on streams of
small byte symbols, not on 2-byte symbols of which both bytes carry information.

``chorus.topk_ids`` (any integer dtype; used for ``topk_ids`` [N, L, k]): the ids that occur in the chunk, ordered
by how often they occur (ties by id), form its dictionary; each id is stored as its frequency rank r in an escape
byte code: r < A one byte r; then A ≤ first byte < 255 and a second byte for the next (255 − A)·256 ranks; the first
byte 255 and a uint32 for any rarer rank (A is as large as still lets every rank fit in two bytes). On a real
teacher's top-k ids this code is smaller under zstd than uint16 ids in probability order; measured and not taken:
ascending ids as gaps + the rank permutation (the order costs what sorting saves), zstd 19 on uint16, byte shuffle,
lexicographic sorting of positions (top-k lists share little beyond their first ids). Sizes: docs/measurements.md.

``chorus.topk_fp16`` (float16 [..., k], descending along the last axis; used for ``topk_logprobs``): the first
value of each position as its uint16 bit pattern, then each next value's difference from the previous one in
uint16 bit-pattern space (mod 2^16: lossless for any input, small for descending log-probs), one byte when it is
below 255, else the escape byte 255 and the uint16 difference in a side stream. The one-byte differences are
stored as position-major streams of slot groups (differences 1-3, 4-7, 8-15, 16-31, 32+): large near the top of the
distribution, small in the tail, each with its own Huffman table. Smaller than the v1 layout (byte-shuffled uint16
differences); fully slot-major would be slightly smaller, but undoing a transpose costs more decode time than it
saves (docs/measurements.md).

Chunk layout (little-endian): a 16-byte header (magic, version, parameters, stream lengths), then the streams.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec as ZarrArraySpec

IDS_CODEC = "chorus.topk_ids"
FP16_CODEC = "chorus.topk_fp16"

_IDS_HEAD = struct.Struct("<2sBBIII")  # b"CI", version, A, dictionary length, second bytes, far ranks
_FP16_HEAD = struct.Struct("<2sBBIII")  # b"CV", version, 0, positions, k, escapes
_ESC = 255
_IDS_BLOCK = 1 << 16  # ids decoded per step (decode_ids)
_CUMSUM_ELEMENTS = 1 << 15  # torch's GRAIN_SIZE: a cumsum of at most this many elements runs on the calling thread
_FP16_EDGES = (3, 7, 15, 31)  # difference columns where a new stream starts (measured: benchmarks/cache.py)


class CodecError(ValueError):
    """A chunk's bytes are not what the codec wrote (corrupt, truncated or foreign)."""


# ---------------------------------------------------------------------------------------------- ids
def _split_point(n_dict: int) -> int:
    """A: the number of one-byte ranks. As many as still lets every rank below 65 280 (the 2-byte codes' reach at
    A = 0) fit in one or two bytes, and at least 64 (a larger dictionary sends its rarest ids to the uint32 side
    stream: each of those occurs about once)."""
    if n_dict <= _ESC:
        return _ESC
    return int(min(_ESC - 1, max(64, (_ESC * 256 - n_dict) // _ESC)))  # A + (255 − A)·256 ≥ n_dict


def encode_ids(ids: np.ndarray) -> bytes:
    """Integer array (any shape) → the codec's bytes (before the compressor)."""
    flat = np.ascontiguousarray(ids).reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError("chorus.topk_ids codes non-negative ids only")
    counts = np.bincount(flat, minlength=1) if flat.size else np.zeros(1, np.intp)
    vocab = np.flatnonzero(counts)
    by_freq = np.argsort(-counts[vocab], kind="stable")  # most frequent first, ties by id: deterministic bytes
    a = _split_point(len(vocab))
    two_cap = a + (_ESC - a) * 256  # ranks below this fit in one or two bytes
    # each id's bytes, by table (gathers over the chunk are the cost: ~4 passes of it)
    rank = np.arange(len(vocab), dtype=np.int64)
    first_of = np.zeros(len(counts), dtype=np.uint8)
    first_of[vocab[by_freq]] = np.where(rank < a, rank, np.minimum(a + (rank - a) // 256, _ESC))
    first = first_of[flat]
    escaped = flat[first >= a]
    if len(vocab) > two_cap:  # the rarest ranks: uint32 side stream
        rank_of = np.zeros(len(counts), dtype=np.int64)
        rank_of[vocab[by_freq]] = rank
        escaped_rank = rank_of[escaped]
        is_far = escaped_rank >= two_cap
        far = escaped_rank[is_far].astype("<u4")
        second = ((escaped_rank[~is_far] - a) % 256).astype(np.uint8)
    else:
        second_of = np.zeros(len(counts), dtype=np.uint8)
        second_of[vocab[by_freq]] = (rank - a) % 256
        second, far = second_of[escaped], np.zeros(0, dtype="<u4")
    dictionary = vocab[by_freq].astype(flat.dtype.newbyteorder("<"), copy=False)
    head = _IDS_HEAD.pack(b"CI", 1, a, len(vocab), len(second), len(far))
    return b"".join((head, dictionary.tobytes(), first.tobytes(), second.tobytes(), far.tobytes()))


def _torch() -> Any:
    """torch when it is installed (its gather and int16 cumsum decode faster than numpy's), else None: the store
    reads and writes without torch, bit for bit the same."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def decode_ids(data: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The codec's bytes → the integer array of ``shape`` and ``dtype``, exactly as encoded.

    (first byte, second byte) form a code ``first << 8 | second`` (second 0 for a one-byte rank) that a table maps
    to its id: code c < 256·A is the one-byte rank c >> 8, 256·A ≤ c < 0xFF00 the two-byte rank c − 255·A; a far
    rank (first byte 255) is patched in after. Decoded in blocks of ``_IDS_BLOCK`` ids so every temporary stays in
    cache (faster than whole-chunk index arrays: docs/measurements.md).
    """
    torch = _torch()
    buf = memoryview(data).cast("B")
    dtype = np.dtype(dtype)
    if len(buf) < _IDS_HEAD.size:
        raise CodecError(f"{IDS_CODEC}: a chunk of {len(buf)} bytes is shorter than its header")
    magic, version, a, n_dict, n_two, n_far = _IDS_HEAD.unpack_from(buf)
    size = int(np.prod(shape))
    want = _IDS_HEAD.size + n_dict * dtype.itemsize + size + n_two + 4 * n_far
    if magic != b"CI" or version != 1 or len(buf) != want:
        raise CodecError(f"{IDS_CODEC}: chunk of {len(buf)} bytes does not match its header (expected {want} for "
                         f"{size} ids, version 1); the chunk is corrupt or foreign")
    corrupt = CodecError(f"{IDS_CODEC}: the ranks do not match the chunk's dictionary of {n_dict} ids and its "
                         f"{n_two} second bytes and {n_far} far ranks; the chunk is corrupt")
    at = _IDS_HEAD.size
    dictionary = np.frombuffer(buf, dtype=dtype.newbyteorder("<"), count=n_dict, offset=at).astype(dtype)
    at += n_dict * dtype.itemsize
    first = np.frombuffer(buf, dtype=np.uint8, count=size, offset=at)
    second = np.frombuffer(buf, dtype=np.uint8, count=n_two, offset=at + size)
    far = np.frombuffer(buf, dtype="<u4", count=n_far, offset=at + size + n_two)
    if n_far and int(far.max()) >= n_dict:
        raise corrupt
    one = min(a, n_dict)  # one-byte ranks; two-byte ranks follow at code 256·A (only when the dictionary is longer)
    table = np.empty(256 * one + max(0, min(n_dict - a, (_ESC - a) * 256)), dtype=dtype)  # past its end: corrupt
    table[: 256 * one] = np.repeat(dictionary[:one], 256)
    table[256 * one:] = dictionary[a: a + len(table) - 256 * one]
    signed = np.dtype(f"i{dtype.itemsize}")  # torch gathers the same bits under a signed dtype
    table_t = torch.from_numpy(table.view(signed)) if torch else None
    out = np.empty(size, dtype=dtype)
    code, low = np.empty(min(size, _IDS_BLOCK), np.int32), np.empty(min(size, _IDS_BLOCK), np.uint8)
    code_low = code.view(np.uint8)[0 if sys.byteorder == "little" else 3:: 4]
    used = used_far = 0
    for lo in range(0, size, _IDS_BLOCK):
        f = first[lo: lo + _IDS_BLOCK]
        c, lw = code[: len(f)], low[: len(f)]
        np.left_shift(f, 8, out=c, dtype=np.int32)
        two = (f >= a) & (f != _ESC) if n_far else f >= a  # without far ranks a first byte 255 is out of the table
        n = int(np.count_nonzero(two))
        if n:
            if used + n > n_two:
                raise corrupt
            if n > 0.9 * len(f):  # the second bytes at their positions: dense, a boolean store (faster) and an or
                lw.fill(0)
                lw[two] = second[used: used + n]
                c |= lw
            else:  # else straight into the codes' low bytes (faster than the or)
                code_low[np.flatnonzero(two)] = second[used: used + n]
            used += n
        far_at = np.flatnonzero(f == _ESC) if n_far else ()
        if len(far_at):
            if used_far + len(far_at) > n_far:
                raise corrupt
            c[far_at] = 0
        try:
            if torch:
                torch.index_select(table_t, 0, torch.from_numpy(c), out=torch.from_numpy(out[lo: lo + len(f)].view(signed)))
            else:
                np.take(table, c, out=out[lo: lo + len(f)])
        except IndexError:
            raise corrupt from None
        if len(far_at):
            out[lo + far_at] = dictionary[far[used_far: used_far + len(far_at)]]
            used_far += len(far_at)
    if used != n_two or used_far != n_far:
        raise corrupt
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------- fp16 values
def _slot_groups(k: int) -> list[tuple[int, int]]:
    """Column ranges of the k − 1 differences stored as separate position-major streams: differences near the top
    of the distribution are large, in the tail small, and zstd codes each stream with its own Huffman table."""
    edges = [0] + [e for e in _FP16_EDGES if e < k - 1] + [k - 1]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def encode_fp16(values: np.ndarray) -> bytes:
    """float16 [..., k] → the codec's bytes (before the compressor)."""
    arr = np.ascontiguousarray(values, dtype=np.float16)
    k = arr.shape[-1] if arr.ndim else 1
    bits = arr.view(np.uint16).reshape(-1, k)
    firsts = bits[:, 0].astype("<u2")
    diff = bits[:, 1:] - bits[:, :-1]  # uint16: wraps mod 2^16, undone exactly by the cumulative sum
    small = np.where(diff < _ESC, diff, _ESC).astype(np.uint8)
    groups = [(np.ascontiguousarray(small[:, a:b]), np.ascontiguousarray(diff[:, a:b])) for a, b in _slot_groups(k)]
    # escaped differences group by group, row-major in each, as the decoder finds the escape bytes
    escapes = np.concatenate([d[g == _ESC] for g, d in groups] or [np.zeros(0, np.uint16)]).astype("<u2")
    head = _FP16_HEAD.pack(b"CV", 1, 0, len(bits), k, len(escapes))
    return b"".join((head, firsts.tobytes(), *(g.tobytes() for g, _ in groups), escapes.tobytes()))


def decode_fp16(data: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The codec's bytes → float16 [..., k] of ``shape``, bit for bit as encoded.

    The differences are laid out row by row, then summed along k in place by torch's int16 cumsum (mod 2^16,
    the same bits as numpy's uint16 cumsum, faster), ``_CUMSUM_ELEMENTS`` at a time (faster than a whole-chunk
    cumsum: docs/measurements.md)."""
    torch = _torch()
    buf = memoryview(data).cast("B")
    if len(buf) < _FP16_HEAD.size:
        raise CodecError(f"{FP16_CODEC}: a chunk of {len(buf)} bytes is shorter than its header")
    magic, version, _, n, k, n_esc = _FP16_HEAD.unpack_from(buf)
    want = _FP16_HEAD.size + 2 * n + n * (k - 1) + 2 * n_esc
    if magic != b"CV" or version != 1 or n * k != int(np.prod(shape)) or len(buf) != want:
        raise CodecError(f"{FP16_CODEC}: chunk of {len(buf)} bytes does not match its header or shape {shape}; "
                         "the chunk is corrupt or foreign")
    at = _FP16_HEAD.size
    out = np.empty((n, k), dtype=np.uint16)
    out[:, 0] = np.frombuffer(buf, dtype="<u2", count=n, offset=at)
    at += 2 * n
    escapes = np.frombuffer(buf, dtype="<u2", count=n_esc, offset=at + n * (k - 1))
    flat = out.reshape(-1)
    used = 0
    for a, b in _slot_groups(k):
        group = np.frombuffer(buf, dtype=np.uint8, count=n * (b - a), offset=at)
        at += n * (b - a)
        out[:, 1 + a: 1 + b] = group.reshape(n, b - a)
        where = np.flatnonzero(group == _ESC)  # escaped differences: their uint16 from the side stream
        if len(where):
            if used + len(where) > n_esc:
                raise CodecError(f"{FP16_CODEC}: more escape bytes than escaped differences; the chunk is corrupt")
            flat[where + where // (b - a) * (k - b + a) + 1 + a] = escapes[used: used + len(where)]
            used += len(where)
    if used != n_esc:
        raise CodecError(f"{FP16_CODEC}: {used} escape bytes for {n_esc} escaped differences; the chunk is corrupt")
    rows = max(1, _CUMSUM_ELEMENTS // max(k, 1))
    if torch:
        codes = torch.from_numpy(out.view(np.int16))
        for lo in range(0, n, rows):  # serial: torch's threads made a whole-chunk cumsum much slower
            codes[lo: lo + rows].cumsum_(1)
    else:
        for lo in range(0, n, rows):
            np.cumsum(out[lo: lo + rows], axis=1, dtype=np.uint16, out=out[lo: lo + rows])
    return out.view(np.float16).reshape(shape)


# ---------------------------------------------------------------------------------------------- zarr codecs
class _ChunkCodec(ArrayBytesCodec):
    """An array→bytes codec over whole chunks through a pair of numpy functions (sync; zarr runs it in threads)."""

    name = ""
    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "_ChunkCodec":
        if data.get("name") != cls.name:
            raise ValueError(f"expected codec name {cls.name!r}, got {data.get('name')!r}")
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    # Subclasses define encode_array(chunk) -> bytes and decode_array(data, shape, dtype) -> array.

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: "ZarrArraySpec") -> int:
        raise NotImplementedError  # zarr's protocol for variable-size output (its compressors answer the same)

    @staticmethod
    def _native(dtype: Any) -> np.dtype:
        return np.dtype(dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else dtype)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: "ZarrArraySpec") -> Buffer | None:
        blob = self.encode_array(np.asarray(chunk_array.as_numpy_array()))
        return chunk_spec.prototype.buffer.from_bytes(blob)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: "ZarrArraySpec") -> NDBuffer:
        dtype = chunk_spec.dtype.to_native_dtype()
        arr = self.decode_array(chunk_bytes.as_numpy_array(), tuple(chunk_spec.shape), dtype)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(arr)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: "ZarrArraySpec") -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: "ZarrArraySpec") -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)


@dataclass(frozen=True)
class TopkIdsCodec(_ChunkCodec):
    """``chorus.topk_ids``: frequency-ranked escape byte code of integer ids (module doc)."""

    name = IDS_CODEC

    def validate(self, *, shape: Any, dtype: Any, chunk_grid: Any) -> None:
        native = self._native(dtype)
        if native.kind not in "ui":
            raise ValueError(f"{IDS_CODEC} codes integer arrays, got {native}")

    def encode_array(self, chunk: np.ndarray) -> bytes:
        return encode_ids(chunk)

    def decode_array(self, data: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return decode_ids(data, shape, dtype)


@dataclass(frozen=True)
class TopkFp16Codec(_ChunkCodec):
    """``chorus.topk_fp16``: descending float16 rows as escape-byte differences of their bit patterns (module doc)."""

    name = FP16_CODEC

    def validate(self, *, shape: Any, dtype: Any, chunk_grid: Any) -> None:
        native = self._native(dtype)
        if native != np.float16:
            raise ValueError(f"{FP16_CODEC} codes float16 arrays, got {native}")

    def encode_array(self, chunk: np.ndarray) -> bytes:
        return encode_fp16(chunk)

    def decode_array(self, data: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return decode_fp16(data, shape)


register_codec(IDS_CODEC, TopkIdsCodec)
register_codec(FP16_CODEC, TopkFp16Codec)
