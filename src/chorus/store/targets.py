"""Encoding of a teacher's sparse targets in a store, shared by the writer (cache) and readers (trainer).

Arrays of ``teachers/<name>`` (row axis first, one chunk per shard):
  topk_ids       [N, L, k]  smallest unsigned int that holds the vocabulary; ids ordered by descending log-prob
  topk_logprobs  [N, L, k]  log-probs normalized over the FULL vocabulary, so the tail mass 1 - Σ exp is known;
                           coded by the manifest's ``value_codec`` and ``value_params`` (decode with
                           :func:`decode_values` or :func:`decode_topk`, never by reading the raw dtype):
                             "fp16" float16 (uint16 bit patterns when delta-coded); "q8" uint8 codes (below);
                             params["delta"]: each code after the first of a position is stored as its
                             difference (mod 2^bits) from the previous one. Values descend along k, so the
                             differences are small and compress better, losslessly.
  sample_ids     [N, L, m]  (optional) unique ids drawn with replacement from the teacher's distribution, by id
  sample_counts  [N, L, m]  their counts (sum to M at every position; 0 marks an empty slot)
  stats          [N, L, 3]  (format v2) float16 per-position statistics of the FULL distribution, fields in
                           ``STATS_FIELDS`` order: log τ (exact log mass outside the top-k), entropy (nats), log-prob
                           of the row's next token (0 at a row's last position)
  tail_logz      [N, L, G]  (format v2) uint8 codes of A(β) = log Σ_{i ∉ top-k} p_i^β at the manifest's ``tail_betas``
                           (what exact softening of the tail needs), coded between two bounds (see "statistics" below);
                           decode both with :func:`decode_stats`. A v1 cache (manifest ``tail_betas`` empty) has neither.

Chosen by measurement (benchmarks/cache.py, results in benchmarks/results/cache.json): ids in descending
probability order with zstd beat ascending ids with delta gaps once values are delta-coded, and byte-shuffle
(blosc) helps the 2-byte fp16 differences but not the 1-byte q8 ones or the ids. The statistics compress
best with blosc at a high level (``STATS_COMPRESSION``).

Zarr codecs (``codecs.py``; format "zarr_codecs" in the manifest's ``value_params``): a cache written where the
store can declare an array's serializer (``ArraySpec.serializer``) codes ``topk_ids`` with ``chorus.topk_ids`` (ids
by their frequency rank in the shard, in an escape byte code) and fp16 ``topk_logprobs`` with ``chorus.topk_fp16``
(bit-pattern differences in an escape byte code, stored array float16, so ``delta`` is false), zstd after both.
A zarr reader gets the real ids and log-probs; decoding is bit-exact. On a real teacher the codecs store fewer
bytes than uint16/zstd ids and blosc'd fp16 differences, and decode somewhat slower (docs/measurements.md). Caches
without "zarr_codecs" (all before it) read as before.

"q8" (opt-in, lossy) is companded: code q = round(255·sqrt(−logp / R)), logp = −R·(q/255)², R = 25 nats.
The step in log-prob grows with −logp, so the likely tokens, whose absolute probability error matters, get
fine steps (~0.004 nats near logp = 0) and the far tail coarse ones; a linear code with the same 8 bits
errs by up to ~4% of the top token's probability (kept decodable: params {"step": s}).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from chorus.errors import ChorusError
from chorus.store.codecs import FP16_CODEC, IDS_CODEC
from chorus.store.zarr_store import ArraySpec

# Whether this store layer can declare a serializer per array (the hook in _store.ArraySpec): new caches then use
# the chorus zarr codecs; without it they keep the plain layout, which every version reads.
ZARR_CODECS = "serializer" in getattr(ArraySpec, "__dataclass_fields__", {})

VALUE_CODECS = ("fp16", "q8")
Q8_RANGE_NATS = 25.0  # q8 covers log-probs down to -25 nats (e^-25 ≈ 1.4e-11); lower values clip there


def id_dtype(vocab_size: int) -> str:
    for dt in ("uint8", "uint16", "uint32"):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return dt
    return "int64"


def count_dtype(num_samples: int) -> str:
    return "uint8" if num_samples <= 255 else "uint16" if num_samples <= 65535 else "uint32"


def value_params(codec: str) -> dict:
    """The parameters a new cache records for ``codec`` (readers take them from the manifest)."""
    if codec == "fp16":
        if ZARR_CODECS:  # the codec takes the differences inside zarr: the stored array is the float16 log-probs
            return {"delta": False, "zarr_codecs": {"topk_ids": IDS_CODEC, "topk_logprobs": FP16_CODEC}}
        return {"delta": True}
    if codec == "q8":
        out: dict = {"delta": True, "sqrt_range": Q8_RANGE_NATS}
        return out | {"zarr_codecs": {"topk_ids": IDS_CODEC}} if ZARR_CODECS else out
    raise ChorusError(f"unknown value codec '{codec}'; expected one of: {', '.join(VALUE_CODECS)}")


def _value_dtype(codec: str, params: dict) -> str:
    if codec == "fp16":  # delta-coded fp16 bit patterns are integers, not floats (some would read as NaN)
        return "uint16" if params.get("delta") else "float16"
    return "uint8"


def target_specs(seq_len: int, top_k: int, num_samples: int, vocab_size: int, codec: str,
                 params: dict | None = None, *, tail_betas: Sequence[float] = ()) -> list[ArraySpec]:
    """The arrays of a teacher cache; ``tail_betas`` non-empty adds the statistics (format v2)."""
    params = value_params(codec) if params is None else params
    # byte-shuffle groups the mostly-zero high bytes of 2-byte value differences; no gain for 1-byte codes
    value_compressor = "blosc" if codec == "fp16" and params.get("delta") else "zstd"
    specs = [
        ArraySpec("topk_ids", (seq_len, top_k), id_dtype(vocab_size), "zstd"),
        ArraySpec("topk_logprobs", (seq_len, top_k), _value_dtype(codec, params), value_compressor),
    ]
    zarr_codecs = dict(params.get("zarr_codecs") or {})
    if zarr_codecs:
        if not ZARR_CODECS:
            raise ChorusError(f"this cache's arrays use zarr codecs {zarr_codecs}, which this version of chorus cannot "
                              "write; upgrade chorus")
        # the codec leaves the entropy coding to zstd (byte streams: no shuffle to gain)
        specs = [dataclasses.replace(s, compressor="zstd", serializer=zarr_codecs[s.name]) if s.name in zarr_codecs
                 else s for s in specs]
    if num_samples:
        specs += [
            ArraySpec("sample_ids", (seq_len, num_samples), id_dtype(vocab_size), "zstd"),
            ArraySpec("sample_counts", (seq_len, num_samples), count_dtype(num_samples), "zstd"),
        ]
    if tail_betas:
        specs += [
            ArraySpec("stats", (seq_len, len(STATS_FIELDS)), "float16", *STATS_COMPRESSION),
            ArraySpec("tail_logz", (seq_len, len(tail_betas)), "uint8", *STATS_COMPRESSION),
        ]
    return specs


# ---------------------------------------------------------------------------------------------- values
def _delta(codes: np.ndarray) -> np.ndarray:
    out = codes.copy()
    out[..., 1:] = codes[..., 1:] - codes[..., :-1]  # unsigned: wraps mod 2^bits, undone exactly by cumsum
    return out


def _undelta(codes: np.ndarray) -> np.ndarray:
    return np.cumsum(codes, axis=-1, dtype=codes.dtype)


def encode_values(logp: np.ndarray, codec: str, params: dict) -> np.ndarray:
    """float32 log-probs [..., k] (descending along k) → stored values."""
    if codec == "fp16":
        codes = np.ascontiguousarray(logp, dtype=np.float32).astype(np.float16).view(np.uint16)
        return _delta(codes) if params.get("delta") else codes.view(np.float16)
    if codec == "q8":
        neg = np.nan_to_num(-np.asarray(logp, dtype=np.float64), nan=np.inf)
        if "sqrt_range" in params:
            r = float(params["sqrt_range"])
            codes = np.rint(255.0 * np.sqrt(np.clip(neg, 0.0, r) / r)).astype(np.uint8)
        else:
            codes = np.clip(np.rint(neg / params["step"]), 0, 255).astype(np.uint8)
        return _delta(codes) if params.get("delta") else codes
    raise ChorusError(f"unknown value codec '{codec}'; expected one of: {', '.join(VALUE_CODECS)}")


def decode_values(stored: np.ndarray, codec: str, params: dict, *, dtype: Any = np.float32) -> np.ndarray:
    """Stored values [..., k] → log-probs in ``dtype``. The fp16 codec's values are exactly float16:
    ``dtype=np.float16`` returns them without numpy's slow half→float conversion (the trainer widens
    on its device instead)."""
    if codec == "fp16":
        codes = np.asarray(stored).view(np.uint16)
        return (_undelta(codes) if params.get("delta") else codes).view(np.float16).astype(dtype, copy=False)
    if codec == "q8":
        codes = _undelta(np.asarray(stored, dtype=np.uint8)) if params.get("delta") else np.asarray(stored, dtype=np.uint8)
        if "sqrt_range" in params:
            x = codes.astype(np.float32) / np.float32(255.0)
            return -np.float32(params["sqrt_range"]) * x * x
        return codes.astype(np.float32) * np.float32(-params["step"])
    raise ChorusError(f"unknown value codec '{codec}' in manifest; expected one of: {', '.join(VALUE_CODECS)}")


def plain_values(stored: np.ndarray, codec: str, params: dict) -> np.ndarray:
    """Stored values → the codec's values without delta coding: float16 log-probs (fp16) or uint8 codes (q8)."""
    if not params.get("delta"):
        return stored
    return _undelta(np.asarray(stored).view(np.uint16)).view(np.float16) if codec == "fp16" else _undelta(stored)


def stored_values(plain: np.ndarray, codec: str, params: dict) -> np.ndarray:
    """Inverse of :func:`plain_values`, exactly (delta coding is a bijection on the codes)."""
    if not params.get("delta"):
        return plain
    return _delta(np.asarray(plain, dtype=np.float16).view(np.uint16)) if codec == "fp16" else _delta(np.asarray(plain, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- samples
def compact_samples(draws: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws [P, M] (ids, with repeats) → unique ids and counts [P, width], ordered by id, 0-count padding."""
    p, m = draws.shape
    srt = np.sort(draws, axis=1)
    new = np.ones_like(srt, dtype=bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = np.cumsum(new, axis=1) - 1  # which unique slot each draw lands in
    ids = np.zeros((p, width), dtype=np.int64)
    counts = np.zeros((p, width), dtype=np.int64)
    rows = np.repeat(np.arange(p), m)
    np.add.at(counts, (rows, slot.ravel()), 1)
    ids[rows[new.ravel()], slot.ravel()[new.ravel()]] = srt.ravel()[new.ravel()]
    return ids, counts


# ---------------------------------------------------------------------------------------------- whole targets
def encode_targets(topk_ids: np.ndarray, topk_logprobs: np.ndarray, *, vocab_size: int, codec: str, params: dict,
                   draws: np.ndarray | None = None, stats: dict | None = None) -> dict[str, np.ndarray]:
    """One shard's targets → the arrays to store.

    topk_ids, topk_logprobs: [n, L, k] (descending log-prob along k); draws: [n, L, M] sampled ids or None;
    stats (format v2): float32 ``log_tail``, ``entropy``, ``gold_logprob`` [n, L] and ``tail_logz`` [n, L, G]
    (exact A(β) at ``tail_betas``, a sequence of G floats, also in the dict), or None."""
    out = {
        "topk_ids": topk_ids.astype(id_dtype(vocab_size)),
        "topk_logprobs": encode_values(topk_logprobs, codec, params),
    }
    if stats is not None:
        out.update(encode_stats(stats, out["topk_logprobs"], n_tail=vocab_size - topk_ids.shape[-1], codec=codec,
                                params=params))
    if draws is not None:
        n, length, m = draws.shape
        ids, counts = compact_samples(draws.reshape(n * length, m), m)
        out["sample_ids"] = ids.reshape(n, length, m).astype(id_dtype(vocab_size))
        out["sample_counts"] = counts.reshape(n, length, m).astype(count_dtype(m))
    return out


def _codec(manifest: Any) -> tuple[str, dict]:
    return manifest.value_codec, dict(manifest.value_params)


def decode_topk(arrays: dict[str, np.ndarray], manifest: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stored ``topk_ids``/``topk_logprobs`` → (ids int64 [n, L, k], log-probs float32 [n, L, k]),
    descending along k. ``manifest`` is the teacher's :class:`TeacherManifest`."""
    codec, params = _codec(manifest)
    return arrays["topk_ids"].astype(np.int64), decode_values(arrays["topk_logprobs"], codec, params)


def decode_samples(arrays: dict[str, np.ndarray], manifest: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stored ``sample_ids``/``sample_counts`` → (ids int64, counts int64) [n, L, m]; counts sum to M."""
    if manifest.num_samples == 0:
        raise ChorusError(f"teacher '{manifest.name}' was cached without samples; rerun `chorus cache` with --samples M")
    return arrays["sample_ids"].astype(np.int64), arrays["sample_counts"].astype(np.int64)


# ---------------------------------------------------------------------------------------------- statistics (v2)
# Per-position statistics computed from the full logits at cache time (format v2). Nothing downstream
# guesses the shape of the tail: softening, entropy, calibration and pooling read these.
#
#   stats      [N, L, 3] float16: log τ (exact log mass outside the top-k), entropy H of the full
#              distribution (nats), log p(gold) (the next token of the row; 0 at a row's last position)
#   tail_logz  [N, L, G] uint8:   A(β_g) = log Σ_{i ∉ top-k} p_i^β_g at the manifest's ``tail_betas``,
#              coded between two bounds that hold for every distribution (so 8 bits suffice):
#                L0(β) = (1 − β)·log n + β·log τ       (the chord of the convex A through A(0) = log n, A(1) = log τ)
#                L1(β) = log τ + (β − 1)·log p_k        (every tail id has p ≤ p_k, the k-th cached value)
#              A(β) lies between them (L1 ≤ A ≤ L0 for β < 1, L0 ≤ A ≤ L1 for β > 1); the code is the
#              position in that interval, so the error is ≤ |β − 1|·log(n·p_k/τ)/510 nats.
STATS_FIELDS = ("log_tail", "entropy", "gold_logprob")
# Softening needs A(1/T): the grid is T = 4, 3, 2, 1.5, 0.7, 0.5 (β = 1/T); β = 0 and 1 are known exactly.
TAIL_BETAS = (0.25, 1.0 / 3.0, 0.5, 2.0 / 3.0, 1.0 / 0.7, 2.0)
# blosc level 8 (zstd ~15 inside, byte-shuffled fp16): both arrays together compress smaller than with zstd 3 or 9
# on the sources of benchmarks/cache.py (docs/measurements.md)
STATS_COMPRESSION = ("blosc", 8)


def tail_bounds(log_tail: np.ndarray, kth_logp: np.ndarray, n_tail: int, betas) -> tuple[np.ndarray, np.ndarray]:
    """The two bounds L0, L1 of A(β) (see above) for every position and grid β: [..., G] each, float64."""
    b = np.asarray(betas, dtype=np.float64)
    lt = np.asarray(log_tail, dtype=np.float64)[..., None]
    lk = np.asarray(kth_logp, dtype=np.float64)[..., None]
    with np.errstate(invalid="ignore"):  # an empty tail with a -inf k-th value (masked positions): NaN, handled
        l0 = (1.0 - b) * math.log(max(n_tail, 1)) + b * lt
        l1 = lt + (b - 1.0) * lk
    return l0, l1


def encode_tail_logz(a: np.ndarray, log_tail: np.ndarray, kth_logp: np.ndarray, n_tail: int, betas) -> np.ndarray:
    """A(β) [..., G] → uint8 codes. ``kth_logp`` must be the k-th value *as a reader decodes it*."""
    l0, l1 = tail_bounds(log_tail, kth_logp, n_tail, betas)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty tail (τ = 0) makes both bounds -inf
        width = l1 - l0
        frac = np.where(np.abs(width) > 1e-12, (np.asarray(a, dtype=np.float64) - l0) / width, 0.0)
    frac = np.nan_to_num(frac, nan=0.0, posinf=1.0, neginf=0.0)  # an empty tail (τ = 0): any code decodes to -inf
    return np.rint(np.clip(frac, 0.0, 1.0) * 255.0).astype(np.uint8)


def decode_tail_logz(codes: np.ndarray, log_tail: np.ndarray, kth_logp: np.ndarray, n_tail: int, betas) -> np.ndarray:
    """uint8 codes [..., G] → A(β) float32 [..., G] (-inf where the tail is empty)."""
    l0, l1 = tail_bounds(log_tail, kth_logp, n_tail, betas)
    with np.errstate(invalid="ignore"):
        out = l0 + (np.asarray(codes, dtype=np.float64) / 255.0) * (l1 - l0)
    empty = ~np.isfinite(np.asarray(log_tail, dtype=np.float64))[..., None] | ~np.isfinite(out)
    return np.where(empty, -np.inf, out).astype(np.float32)


def encode_stats(stats: dict, stored_topk: np.ndarray, *, n_tail: int, codec: str, params: dict) -> dict[str, np.ndarray]:
    """Exact statistics (see :func:`encode_targets`) → the ``stats`` and ``tail_logz`` arrays to store.

    The tail_logz bounds use log τ as stored (fp16) and the k-th top-k value decoded from ``stored_topk`` (the
    stored ``topk_logprobs``), exactly what a reader has: encoder and decoder use bit-identical bounds."""
    betas = tuple(stats["tail_betas"])
    a = np.asarray(stats["tail_logz"], dtype=np.float32)
    if a.shape[-1] != len(betas):
        raise ValueError(f"tail_logz has {a.shape[-1]} values per position for {len(betas)} tail_betas")
    packed = np.stack([np.asarray(stats[f], dtype=np.float32) for f in STATS_FIELDS], axis=-1).astype(np.float16)
    kth = decode_values(stored_topk, codec, params)[..., -1]
    return {"stats": packed, "tail_logz": encode_tail_logz(a, packed[..., 0], kth, n_tail, betas)}


def decode_stats(arrays: dict[str, np.ndarray], manifest: Any, kth_logp: np.ndarray) -> dict[str, np.ndarray]:
    """Stored ``stats`` [..., 3] and ``tail_logz`` [..., G] → float32 ``log_tail``, ``entropy``, ``gold_logprob``
    [...] and ``tail_logz`` [..., G] (A at ``manifest.tail_betas``; -inf where the tail is empty).

    ``kth_logp`` [...]: the k-th (last) decoded top-k log-prob of the same positions (``decode_topk(...)[1][..., -1]``)."""
    if not manifest.has_stats:
        raise ChorusError(f"teacher '{manifest.name}' has no statistics (format v1 cache); "
                          "recache it with `chorus cache --overwrite` for exact targets")
    packed = np.asarray(arrays["stats"], dtype=np.float16)
    out = {f: packed[..., i].astype(np.float32) for i, f in enumerate(STATS_FIELDS)}
    out["tail_logz"] = decode_tail_logz(arrays["tail_logz"], packed[..., 0], kth_logp,
                                        manifest.vocab_size - manifest.top_k, manifest.tail_betas)
    return out
