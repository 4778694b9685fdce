"""`chorus inspect`: per-domain teacher statistics (format v2) against numpy on known values; v1 caches noted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chorus.commands.report import NO_STATS, describe, inspect_command
from chorus.store import (
    TAIL_BETAS,
    ArraySpec,
    CorpusManifest,
    Store,
    TeacherManifest,
    TokenizerInfo,
    encode_targets,
    target_specs,
    value_params,
)

ROWS, RPS, L, V, K = 10, 4, 6, 40, 4
DOMAINS = ("code", "prose")


@pytest.fixture
def store_with_stats(tmp_path):
    """A corpus with padding and two documents per row, a v2 teacher with known statistics and a v1 teacher."""
    rng = np.random.default_rng(0)
    store = Store.open(str(tmp_path / "s.zarr"), "w")
    seg = np.ones((ROWS, L), dtype=np.uint16)
    seg[:, 3:] = 2
    seg[::3, 4:] = 0  # padding at the end of some rows
    corpus = {"input_ids": rng.integers(0, V, (ROWS, L)).astype(np.int32), "segment_ids": seg,
              "domain": (np.arange(ROWS) % 2).astype(np.uint16), "split": np.zeros(ROWS, np.uint8)}
    store.create_arrays("corpus", [ArraySpec("input_ids", (L,), "int32"), ArraySpec("segment_ids", (L,), "uint16"),
                                   ArraySpec("domain", (), "uint16"), ArraySpec("split", (), "uint8")], ROWS, RPS)
    tok = TokenizerInfo(name="t", vocab_size=V, fingerprint="tf", vocab_fingerprint="vf", eos_id=0, pad_id=1)
    m = CorpusManifest(fingerprint="cf", tokenizer=tok, seq_len=L, num_rows=ROWS, rows_per_shard=RPS, domains=DOMAINS,
                       num_tokens=int((seg > 0).sum()), split_rows={"train": ROWS}, source={}, created_by="test")
    logits = rng.normal(size=(ROWS, L, V)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, -1)[..., :K]
    vals = np.take_along_axis(logp, ids, -1).astype(np.float32)
    tail = logp.copy()
    np.put_along_axis(tail, ids, -np.inf, -1)
    stats = {"log_tail": np.log(np.exp(tail).sum(-1)), "entropy": -(np.exp(logp) * logp).sum(-1),
             "gold_logprob": np.take_along_axis(logp, np.roll(corpus["input_ids"], -1, 1)[..., None], -1)[..., 0],
             "tail_logz": np.stack([np.log(np.exp(b * tail).sum(-1)) for b in TAIL_BETAS], -1)}
    stats = {k: v.astype(np.float32) for k, v in stats.items()}
    stats["gold_logprob"][:, -1] = 0.0
    params = value_params("fp16")
    for name, betas in (("v2", TAIL_BETAS), ("v1", ())):
        tm = TeacherManifest(name=name, model="m", revision="r", weights_fingerprint="w", dtype="float32", device="cpu",
                             top_k=K, num_samples=0, seed=0, value_codec="fp16", value_params=params, corpus_fingerprint="cf",
                             tokenizer_fingerprint="tf", vocab_size=V, fingerprint=name, created_by="test", status="complete",
                             tail_betas=betas, format_version=2 if betas else 1)
        store.create_arrays(f"teachers/{name}", target_specs(L, K, 0, V, "fp16", params, tail_betas=betas), ROWS, RPS)
        store.write_teacher_manifest(tm)
    for shard in range(-(-ROWS // RPS)):
        lo, hi = shard * RPS, min(shard * RPS + RPS, ROWS)
        store.write_shard("corpus", shard, lo, {k: v[lo:hi] for k, v in corpus.items()})
        part = {k: v[lo:hi] for k, v in stats.items()} | {"tail_betas": TAIL_BETAS}
        store.write_shard("teachers/v2", shard, lo, encode_targets(ids[lo:hi], vals[lo:hi], vocab_size=V, codec="fp16",
                                                                   params=params, stats=part))
        store.write_shard("teachers/v1", shard, lo, encode_targets(ids[lo:hi], vals[lo:hi], vocab_size=V, codec="fp16",
                                                                   params=params))
    store.write_manifest(m)
    return store.url, corpus, stats


def test_inspect_reports_per_domain_means_over_positions_that_predict_a_real_token(store_with_stats):
    url, corpus, stats = store_with_stats
    info = describe(Store.open(url, "r"))
    st = info["teachers"]["v2"]["statistics"]
    assert info["teachers"]["v2"]["format_version"] == 2 and st["tail_betas"] == list(TAIL_BETAS)
    seg = corpus["segment_ids"]
    real = np.zeros(seg.shape, dtype=bool)
    real[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] > 0)
    fp16 = {k: v.astype(np.float16).astype(np.float64) for k, v in stats.items()}
    for d, name in enumerate(DOMAINS):
        mask = real & (corpus["domain"] == d)[:, None]
        r = st["domains"][name]
        assert r["positions"] == mask.sum()
        assert r["mean_entropy"] == pytest.approx(fp16["entropy"][mask].mean(), rel=1e-9)
        assert r["mean_tail_mass"] == pytest.approx(np.exp(fp16["log_tail"][mask]).mean(), rel=1e-9)
        assert r["mean_nll"] == pytest.approx(-fp16["gold_logprob"][mask].mean(), rel=1e-9)
    assert st["all"]["positions"] == real.sum()
    per_array = info["teachers"]["v2"]["bytes_per_token"]
    assert st["bytes_per_token"] == pytest.approx(per_array["stats"] + per_array["tail_logz"])
    assert info["teachers"]["v1"]["statistics"] is None and info["teachers"]["v1"]["note"] == NO_STATS


def test_inspect_text_and_json_show_statistics_and_the_v1_note(store_with_stats, capsys):
    url, _, _ = store_with_stats
    assert inspect_command(url) == 0
    out = capsys.readouterr().out
    assert "no statistics (format v1): recache for exact targets" in out
    assert "teacher NLL" in out and "tail mass" in out and "(all)" in out
    assert inspect_command(url, as_json=True) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["teachers"]["v2"]["statistics"]["domains"]) == set(DOMAINS)


def test_inspect_reads_at_most_max_shards(store_with_stats):
    from chorus.commands.report import teacher_statistics

    url, _, _ = store_with_stats
    store = Store.open(url, "r")
    st = teacher_statistics(store, store.teacher_manifest("v2"), store.manifest, max_shards=2)
    assert st["shards_read"] == 2 and st["shards_committed"] == 3
