"""Encoding of a teacher's sparse targets in a store, shared by the writer (cache) and readers (trainer).

Arrays of ``teachers/<name>`` (row axis first, one chunk per shard):
  topk_ids       [N, L, k]  smallest unsigned int that holds the vocabulary; ids ordered by descending log-prob
  topk_logprobs  [N, L, k]  log-probs normalized over the FULL vocabulary, so the tail mass 1 - Σ exp is known
                           value_codec "fp16": float16; "q8": uint8 code q with logp = -q * step (step in params)
  sample_ids     [N, L, m]  (optional) unique ids drawn with replacement from the teacher's distribution
  sample_counts  [N, L, m]  their counts (sum to M at every position; 0 marks an empty slot)
"""

from __future__ import annotations

import numpy as np

from chorus.errors import ChorusError
from chorus.storage._store import ArraySpec

VALUE_CODECS = ("fp16", "q8")
Q8_MAX_NATS = 20.0  # q8 covers log-probs down to -20 nats (e^-20 ≈ 2e-9); lower values clip there


def id_dtype(vocab_size: int) -> str:
    for dt in ("uint8", "uint16", "uint32"):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return dt
    return "int64"


def count_dtype(num_samples: int) -> str:
    return "uint8" if num_samples <= 255 else "uint16" if num_samples <= 65535 else "uint32"


def value_params(codec: str) -> dict:
    if codec == "fp16":
        return {}
    if codec == "q8":
        return {"step": Q8_MAX_NATS / 255.0}
    raise ChorusError(f"unknown value codec '{codec}'; expected one of: {', '.join(VALUE_CODECS)}")


def target_specs(seq_len: int, top_k: int, num_samples: int, vocab_size: int, codec: str) -> list[ArraySpec]:
    vdtype = "float16" if codec == "fp16" else "uint8"
    specs = [
        ArraySpec("topk_ids", (seq_len, top_k), id_dtype(vocab_size), "zstd"),
        ArraySpec("topk_logprobs", (seq_len, top_k), vdtype, "zstd"),
    ]
    if num_samples:
        specs += [
            ArraySpec("sample_ids", (seq_len, num_samples), id_dtype(vocab_size), "zstd"),
            ArraySpec("sample_counts", (seq_len, num_samples), count_dtype(num_samples), "zstd"),
        ]
    return specs


def encode_values(logp: np.ndarray, codec: str, params: dict) -> np.ndarray:
    """float32 log-probs → stored values."""
    if codec == "fp16":
        return logp.astype(np.float16)
    step = params["step"]
    return np.clip(np.rint(-logp / step), 0, 255).astype(np.uint8)


def decode_values(stored: np.ndarray, codec: str, params: dict) -> np.ndarray:
    """Stored values → float32 log-probs."""
    if codec == "fp16":
        return stored.astype(np.float32)
    if codec == "q8":
        return stored.astype(np.float32) * np.float32(-params["step"])
    raise ChorusError(f"unknown value codec '{codec}' in manifest; expected one of: {', '.join(VALUE_CODECS)}")


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
