"""Trainer fixtures: stores with teacher caches written directly through the Store API, so every
target is known exactly (synthetic teachers) or comes from a model built in the test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from chorus.store import Store, TeacherManifest, encode_values, fingerprint, target_specs, value_params

STUDENT_YAML = "model_type: llama\nhidden_size: {hidden}\nintermediate_size: {inter}\nnum_hidden_layers: {layers}\n" \
               "num_attention_heads: 2\nnum_key_value_heads: 2\nmax_position_embeddings: 64\ntie_word_embeddings: false\n"


def student_yaml(path: Path, hidden: int = 32, layers: int = 2) -> str:
    path.write_text(STUDENT_YAML.format(hidden=hidden, inter=2 * hidden, layers=layers))
    return str(path)


def copy_store(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def write_teacher(url: str, name: str, logprobs_fn: Callable[[np.ndarray], np.ndarray], *, top_k: int = 16,
                  samples: int = 0, codec: str = "fp16", status: str = "complete", seed: int = 0,
                  corpus_fingerprint: str | None = None, tokenizer_fingerprint: str | None = None,
                  vocab_size: int | None = None, shards: list[int] | None = None, stats: bool = True) -> TeacherManifest:
    """Cache a teacher whose full log-probs at each position are ``logprobs_fn(input_ids (n, L)) -> (n, L, V)``:
    the top-k (normalized over the full vocabulary), with ``samples`` M draws compacted to ids/counts, and with
    ``stats`` the exact statistics of the full distribution (format v2; False writes a v1 cache)."""
    from chorus.store import TAIL_BETAS, compact_samples, encode_stats

    store = Store.open(url, "a")
    m = store.manifest
    v = m.tokenizer.vocab_size
    manifest = TeacherManifest(
        name=name, model=f"synthetic:{name}", revision="none", weights_fingerprint=fingerprint(name), dtype="fp32",
        device="cpu", top_k=top_k, num_samples=samples, seed=seed, value_codec=codec, value_params=value_params(codec),
        corpus_fingerprint=corpus_fingerprint or m.fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint or m.tokenizer.fingerprint,
        vocab_size=vocab_size or v, fingerprint=fingerprint(name, top_k, samples, seed), created_by="test",
        status="incomplete", tail_betas=TAIL_BETAS if stats else (), format_version=2 if stats else 1,
    )
    store.write_teacher_manifest(manifest)
    specs = target_specs(m.seq_len, top_k, samples, v, codec, tail_betas=manifest.tail_betas)
    store.create_arrays(f"teachers/{name}", specs, m.num_rows, m.rows_per_shard)
    rng = np.random.default_rng(seed)
    corpus = store.read_rows("corpus", "input_ids", 0, m.num_rows)
    for shard in range(m.num_shards) if shards is None else shards:
        lo, hi = m.shard_rows(shard)
        ids = corpus[lo:hi]
        logp = np.asarray(logprobs_fn(ids), dtype=np.float64)
        order = np.argsort(-logp, axis=-1, kind="stable")[..., :top_k]
        arrays = {"topk_ids": order.astype(np.dtype(target_specs(1, 1, 0, v, codec)[0].dtype)),
                  "topk_logprobs": encode_values(np.take_along_axis(logp, order, -1).astype(np.float32), codec,
                                                 value_params(codec))}
        if samples:
            p = np.exp(logp).reshape(-1, v)
            cdf = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
            u = rng.random((len(p), samples))
            draws = np.minimum((u[:, :, None] > cdf[:, None, :]).sum(-1), v - 1)
            sid, cnt = compact_samples(draws, samples)
            specs = {s.name: s.dtype for s in target_specs(1, 1, samples, v, codec)}
            arrays["sample_ids"] = sid.reshape(hi - lo, m.seq_len, samples).astype(specs["sample_ids"])
            arrays["sample_counts"] = cnt.reshape(hi - lo, m.seq_len, samples).astype(specs["sample_counts"])
        if stats:
            arrays.update(encode_stats(dense_stats(logp, order, ids, TAIL_BETAS), arrays["topk_logprobs"],
                                       n_tail=v - top_k, codec=codec, params=value_params(codec)))
        store.write_shard(f"teachers/{name}", shard, lo, arrays)
    manifest = manifest.replace(status=status)
    store.write_teacher_manifest(manifest)
    return manifest


def dense_stats(logp: np.ndarray, order: np.ndarray, ids: np.ndarray, betas) -> dict:
    """The exact statistics of full log-probs (n, L, V) with top-k ids ``order`` (n, L, k), computed densely
    in float64: the reference the cache's statistics are held to."""
    def logsumexp(x, axis):
        return torch.logsumexp(torch.from_numpy(np.ascontiguousarray(x)), dim=axis).numpy()

    tail = logp.copy()
    np.put_along_axis(tail, order, -np.inf, axis=-1)
    gold = np.zeros(ids.shape, dtype=np.float64)
    gold[:, :-1] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None].astype(np.int64), -1)[..., 0]
    p = np.exp(logp)
    return {"log_tail": logsumexp(tail, axis=-1), "entropy": -(p * logp).sum(-1), "gold_logprob": gold,
            "tail_logz": np.stack([logsumexp(b * tail, axis=-1) for b in betas], -1), "tail_betas": tuple(betas)}


def bigram_teacher(vocab: int, seed: int, sharpness: float = 3.0) -> Callable[[np.ndarray], np.ndarray]:
    """A fixed random bigram model: log p(next | current) from a seeded table."""
    table = torch.log_softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * sharpness,
                              dim=-1).numpy()
    return lambda ids: table[ids]


@pytest.fixture(scope="session")
def vocab_size(prepared_store) -> int:
    return Store.open(prepared_store, "r").manifest.tokenizer.vocab_size


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory, prepared_store, vocab_size) -> str:
    """The prepared store plus three complete synthetic bigram teachers a, b, c (k = 16; b also 8 samples)."""
    url = copy_store(prepared_store, tmp_path_factory.mktemp("teachers") / "store.zarr")
    for i, name in enumerate("abc"):
        write_teacher(url, name, bigram_teacher(vocab_size, seed=i + 1), top_k=16, samples=8 if name == "b" else 0, seed=i)
    return url


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and two pytest workers share two cores."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # for subprocesses (torchrun, the CLI)


def cache_teacher(url: str, name: str, model_dir: str, tokenizer: str, top_k: int = 32) -> None:
    """Cache a real model's top-k with `chorus cache` (the model is loaded here, in the test, never by training)."""
    from chorus.commands import cache
    from chorus.config import CacheConfig

    cache.run(CacheConfig(store=url, teacher=model_dir, name=name, tokenizer=tokenizer, top_k=top_k, device="cpu",
                          dtype="fp32", batch_size=16))


def run_until_checkpoint(monkeypatch, cfg, step: int) -> None:
    """Run ``chorus train`` and kill it (KeyboardInterrupt) right after it writes the checkpoint of ``step``."""
    from chorus.commands import train
    from chorus.student import training

    real_save = training._save_checkpoint

    def save_then_die(out, at, *args, **kwargs):
        real_save(out, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt  # the process dies right after this checkpoint

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    monkeypatch.setattr(training, "_save_checkpoint", real_save)
