"""Format v2 statistics: encode → decode against exact values from full distributions; manifest versions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chorus.errors import ChorusError
from chorus.store import (
    STATS_FIELDS,
    TAIL_BETAS,
    CorpusManifest,
    ShardCommit,
    TeacherManifest,
    decode_stats,
    decode_topk,
    encode_targets,
    target_specs,
    value_params,
)


# ---------------------------------------------------------------------------------------------- dense reference
def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return top[..., 0] + np.log(np.exp(x - top).sum(-1))


def dense_statistics(logp: np.ndarray, topk_ids: np.ndarray, next_ids: np.ndarray, betas) -> dict[str, np.ndarray]:
    """The truth, in float64, straight from full log-probs [..., V] (no tail model): log τ, entropy, gold
    log-prob (next_ids [...]), A(β) = log Σ_tail p^β [..., G], and the largest tail log-prob [...]."""
    logp = np.asarray(logp, dtype=np.float64)
    tail = logp.copy()
    np.put_along_axis(tail, topk_ids, -np.inf, axis=-1)
    with np.errstate(invalid="ignore"):
        plogp = np.where(logp > -np.inf, np.exp(logp) * logp, 0.0)
    return {
        "log_tail": _logsumexp(tail),
        "entropy": -plogp.sum(-1),
        "gold_logprob": np.take_along_axis(logp, next_ids[..., None], -1)[..., 0],
        "tail_logz": np.stack([_logsumexp(b * tail) for b in betas], -1),
        "tail_max": tail.max(-1),
    }


def tail_logz_allowance(*, stored_log_tail, true_log_tail, stored_kth, true_tail_max, n_tail, betas) -> np.ndarray:
    """How far a decoded A(β) may be from the exact one [..., G]: the coding bound |β−1|·log(n·p_k/τ)/510 (with the
    stored τ and decoded p_k a reader has) + the fp16 rounding of log τ, which moves the bounds by up to
    max(1, β)·|Δ log τ| + where the decoded p_k fell below the largest tail probability (coarse codecs), the
    bound L1 it breaks by |β − 1|·(log p_max − log p_k) + float32 output rounding."""
    b = np.asarray(betas, dtype=np.float64)
    lt = np.asarray(stored_log_tail, np.float64)[..., None]
    lk = np.asarray(stored_kth, np.float64)[..., None]
    coding = np.abs(b - 1) * np.maximum(np.log(n_tail) + lk - lt, 0.0) / 510
    rounding = np.maximum(1.0, b) * np.abs(lt - np.asarray(true_log_tail, np.float64)[..., None])
    broken = np.abs(b - 1) * np.maximum(np.asarray(true_tail_max, np.float64)[..., None] - lk, 0.0)
    return coding + rounding + broken + 1e-5 * (1 + np.abs(lt))


def gaussian_case(sigma: float, *, n: int = 3000, vocab: int = 512, k: int = 16, seed: int = 0):
    """Full distributions with N(0, σ²) logits, their top-k and a gold token drawn from each."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, vocab)) * sigma
    logp = z - _logsumexp(z)[:, None]
    order = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    p = np.exp(logp)
    gold = (rng.random(n)[:, None] > np.cumsum(p, -1)).sum(-1).clip(max=vocab - 1)
    return logp, order, gold


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("codec", ["fp16", "q8"])
@pytest.mark.parametrize("sigma", [3.0, 6.0])
def test_statistics_round_trip_within_the_coding_bound(sigma, codec):
    vocab, k = 512, 16
    logp, ids, gold = gaussian_case(sigma, vocab=vocab, k=k)
    truth = dense_statistics(logp, ids, gold, TAIL_BETAS)
    vals = np.take_along_axis(logp, ids, -1).astype(np.float32)
    stats = {f: truth[f][None].astype(np.float32) for f in (*STATS_FIELDS, "tail_logz")} | {"tail_betas": TAIL_BETAS}
    params = value_params(codec)
    arrays = encode_targets(ids[None], vals[None], vocab_size=vocab, codec=codec, params=params, stats=stats)
    specs = {s.name: s for s in target_specs(1, k, 0, vocab, codec, params, tail_betas=TAIL_BETAS)}
    assert {n: arrays[n].dtype for n in ("stats", "tail_logz")} == {n: np.dtype(specs[n].dtype) for n in ("stats", "tail_logz")}
    assert arrays["stats"].shape == (1, len(logp), 3) and arrays["tail_logz"].shape == (1, len(logp), len(TAIL_BETAS))

    manifest = _teacher(top_k=k, vocab_size=vocab, value_codec=codec, value_params=params, tail_betas=TAIL_BETAS)
    _, kth = decode_topk(arrays, manifest)
    got = decode_stats(arrays, manifest, kth[..., -1])
    got = {f: v[0] for f, v in got.items()}
    assert all(v.dtype == np.float32 for v in got.values())
    for f in STATS_FIELDS:  # exactly fp16 rounding of the exact values, nothing more
        np.testing.assert_array_equal(got[f], truth[f].astype(np.float32).astype(np.float16).astype(np.float32), err_msg=f)

    err = np.abs(got["tail_logz"] - truth["tail_logz"])
    allowed = tail_logz_allowance(stored_log_tail=got["log_tail"], true_log_tail=truth["log_tail"],
                                  stored_kth=kth[0, :, -1], true_tail_max=truth["tail_max"], n_tail=vocab - k,
                                  betas=TAIL_BETAS)
    assert (err <= allowed).all(), float((err - allowed).max())
    assert err.mean() < 0.01  # 8 bits between the bounds: fine where the bounds are tight, bounded where not


def test_the_tail_bounds_hold_for_full_distributions():
    """L0 (chord) and L1 (every tail p ≤ p_k) bracket the exact A(β), with exact τ and p_k: the code can always reach it."""
    from chorus.store import tail_bounds

    logp, ids, gold = gaussian_case(4.0, n=2000)
    truth = dense_statistics(logp, ids, gold, TAIL_BETAS)
    kth = np.take_along_axis(logp, ids[:, -1:], -1)[:, 0]
    l0, l1 = tail_bounds(truth["log_tail"], kth, logp.shape[-1] - ids.shape[-1], TAIL_BETAS)
    lo, hi = np.minimum(l0, l1), np.maximum(l0, l1)
    a = truth["tail_logz"]
    assert (a >= lo - 1e-9).all() and (a <= hi + 1e-9).all()


def test_empty_tail_decodes_to_minus_inf():
    vocab = k = 8
    logp = np.log(np.full((1, 3, vocab), 1.0 / vocab))
    ids = np.argsort(-logp, -1, kind="stable")
    stats = {"log_tail": np.full((1, 3), -np.inf, np.float32), "entropy": np.full((1, 3), np.log(vocab), np.float32),
             "gold_logprob": np.zeros((1, 3), np.float32), "tail_logz": np.full((1, 3, 6), -np.inf, np.float32),
             "tail_betas": TAIL_BETAS}
    params = value_params("fp16")
    arrays = encode_targets(ids, logp.astype(np.float32), vocab_size=vocab, codec="fp16", params=params, stats=stats)
    manifest = _teacher(top_k=k, vocab_size=vocab, value_codec="fp16", value_params=params, tail_betas=TAIL_BETAS)
    got = decode_stats(arrays, manifest, decode_topk(arrays, manifest)[1][..., -1])
    assert np.isneginf(got["log_tail"]).all() and np.isneginf(got["tail_logz"]).all()


def test_decode_stats_of_a_v1_cache_is_refused():
    manifest = _teacher(format_version=1)
    with pytest.raises(ChorusError, match="no statistics") as err:
        decode_stats({}, manifest, np.zeros(1))
    assert "\n" not in str(err.value)


def test_target_specs_add_the_statistics_only_with_tail_betas():
    names = [s.name for s in target_specs(32, 8, 0, 300, "fp16")]
    assert names == ["topk_ids", "topk_logprobs"]
    specs = {s.name: s for s in target_specs(32, 8, 0, 300, "fp16", tail_betas=TAIL_BETAS)}
    assert specs["stats"].row_shape == (32, 3) and specs["stats"].dtype == "float16"
    assert specs["tail_logz"].row_shape == (32, len(TAIL_BETAS)) and specs["tail_logz"].dtype == "uint8"


# ---------------------------------------------------------------------------------------------- manifests
def _teacher(**changes) -> TeacherManifest:
    base = dict(name="t", model="m", revision="r", weights_fingerprint="w", dtype="float32", device="cpu", top_k=8,
                num_samples=0, seed=0, value_codec="fp16", value_params=value_params("fp16"), corpus_fingerprint="c",
                tokenizer_fingerprint="tok", vocab_size=300, fingerprint="f", created_by="test")
    return TeacherManifest(**(base | changes))


def test_new_teacher_manifests_are_v2_and_round_trip():
    m = _teacher(tail_betas=TAIL_BETAS)
    assert m.format_version == 2 and m.has_stats
    again = TeacherManifest.from_dict(m.to_dict())
    assert again == m and again.tail_betas == TAIL_BETAS


def test_a_v1_teacher_manifest_still_parses_without_statistics():
    data = _teacher().to_dict()
    del data["tail_betas"]
    data["format_version"] = 1
    m = TeacherManifest.from_dict(data)
    assert m.format_version == 1 and not m.has_stats and m.tail_betas == ()
    del data["format_version"]  # none recorded: the oldest version
    assert TeacherManifest.from_dict(data).format_version == 1


@pytest.mark.parametrize("version", [0, 3, "2", True, 2.0])
def test_unknown_teacher_format_versions_are_refused(version):
    data = _teacher().to_dict() | {"format_version": version}
    with pytest.raises(ChorusError, match="expected format_version 1 or 2"):
        TeacherManifest.from_dict(data)


def test_a_v1_manifest_with_statistics_is_refused():
    data = _teacher(tail_betas=TAIL_BETAS).to_dict() | {"format_version": 1}
    with pytest.raises(ChorusError, match="format_version 1 has no statistics"):
        TeacherManifest.from_dict(data)


@pytest.mark.parametrize("kind", [CorpusManifest, ShardCommit])
def test_other_records_stay_at_version_1(kind):
    assert kind.FORMAT_VERSIONS == (1,)
    commit = ShardCommit(unit="u", shard=0, row_start=0, row_stop=1, checksums={})
    if kind is ShardCommit:
        assert ShardCommit.from_dict(commit.to_dict()) == commit
        with pytest.raises(ChorusError, match="expected format_version 1, got 2"):
            ShardCommit.from_dict(dataclasses.replace(commit, format_version=2).to_dict())
    else:
        with pytest.raises(ChorusError, match="expected format_version 1, got 2"):
            CorpusManifest.from_dict({"format_version": 2})
