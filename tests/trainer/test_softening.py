"""The softening family: each operator's axioms (property-based), and what the linear one keeps exact."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chorus.distill import sparse
from chorus.distill.softening import SOFTENINGS, linear
from chorus.distill.tail import Stats
from chorus.distill.targets import TargetBuilder
from chorus.store import TAIL_BETAS

OPERATORS = sorted(SOFTENINGS)
FAST = settings(max_examples=40, deadline=None)


@st.composite
def sparse_dists(draw):
    """A top-k SparseDist (even-tail convention) cut from a random full distribution, some ids of zero mass."""
    v = draw(st.integers(3, 12))
    logits = draw(st.lists(st.floats(-6, 6, allow_nan=False), min_size=v, max_size=v))
    zeros = draw(st.lists(st.booleans(), min_size=v, max_size=v))
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    if not all(zeros):
        p = torch.where(torch.tensor(zeros), 0.0, p)
        p = p / p.sum()
    k = draw(st.integers(1, v))
    top = torch.topk(p, k)
    return sparse.from_topk(top.indices[None], top.values.log().float()[None], v, rel_error=0.0)


def dense(d: sparse.SparseDist) -> torch.Tensor:
    return sparse.to_dense(d)[0].double()


def entropy(q: torch.Tensor) -> float:
    q = q[q > 0]
    return float(-(q * q.log()).sum())


@pytest.mark.parametrize("name", OPERATORS)
@FAST
@given(d=sparse_dists(), t=st.floats(0.05, 20))
def test_result_is_a_distribution_and_ranking_is_kept(name, d, t):
    p, q = dense(d), dense(SOFTENINGS[name](d, t))
    assert (q >= 0).all() and abs(float(q.sum()) - 1) < 1e-5
    bigger = p[:, None] > p[None, :] + 1e-6
    assert (q[:, None] >= q[None, :] - 1e-6)[bigger].all()


@pytest.mark.parametrize("name", OPERATORS)
@FAST
@given(d=sparse_dists())
def test_identity_at_one(name, d):
    out = SOFTENINGS[name](d, 1.0)
    torch.testing.assert_close(dense(out), dense(d))


@pytest.mark.parametrize("name", OPERATORS)
@FAST
@given(d=sparse_dists(), ts=st.lists(st.floats(0.05, 30), min_size=2, max_size=5))
def test_entropy_rises_with_the_parameter(name, d, ts):
    hs = [entropy(dense(SOFTENINGS[name](d, t))) for t in sorted(ts)]
    assert all(a <= b + 1e-5 for a, b in zip(hs, hs[1:]))


@pytest.mark.parametrize("name", OPERATORS)
@FAST
@given(d=sparse_dists(), t=st.floats(0.05, 20))
def test_continuous_in_the_parameter(name, d, t):
    a, b = dense(SOFTENINGS[name](d, t)), dense(SOFTENINGS[name](d, t * (1 + 1e-4)))
    assert float((a - b).abs().sum()) < 1e-2


@pytest.mark.parametrize("name", OPERATORS)
@FAST
@given(d=sparse_dists())
def test_limits_argmax_and_uniform(name, d):
    p = dense(d)
    top = p >= p.max() - 1e-6
    runner_up = torch.where(top, 0.0, p).max()
    assume(float(p.max() - runner_up) > 1e-3)  # near-ties (rounding-level) have no well-defined argmax limit
    sharp = dense(SOFTENINGS[name](d, 1e-4))
    assert float(sharp[top].sum()) > 0.99  # all mass on the largest ids
    flat = dense(SOFTENINGS[name](d, 1e5))
    # power: uniform over the ids of positive mass; linear: uniform over the whole vocabulary
    support = (p > 0) if name == "power" else torch.ones_like(p, dtype=torch.bool)
    torch.testing.assert_close(flat[support], torch.full_like(flat[support], 1 / int(support.sum())), atol=2e-3, rtol=0)
    assert float(flat[~support].sum()) < 1e-3


def _exact_case(t_seed: int = 0, v: int = 400, k: int = 16):
    """A Zipf-like full distribution, its top-k with the exact cached statistics (the truth is the dense p)."""
    g = torch.Generator().manual_seed(t_seed)
    logits = torch.randn(3, v, generator=g, dtype=torch.float64) * 2.5
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, k)
    tail = logp.clone().scatter_(1, top.indices, float("-inf"))
    gold = torch.tensor([5, top.indices[1, 0].item(), 7])
    stats = Stats(torch.logsumexp(tail, -1).float(), (-(logp.exp() * logp).sum(-1)).float(),
                  logp.gather(1, gold[:, None])[:, 0].float(),
                  torch.stack([torch.logsumexp(b * tail, -1) for b in TAIL_BETAS], -1).float(),
                  torch.tensor(TAIL_BETAS, dtype=torch.float32))
    return logp.exp(), top.indices, sparse.from_topk(top.indices, top.values.float(), v, stats=stats), gold


def _dense_linear(p: torch.Tensor, t: float) -> torch.Tensor:
    if t >= 1:
        return p / t + (1 - 1 / t) / p.shape[-1]
    return t * p + (1 - t) * torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1])


@pytest.mark.parametrize("t", [0.5, 2.0, 4.0])
def test_linear_is_exact_on_the_support_and_tail_bucket(t):
    p, ids, d, gold = _exact_case()
    q, out = _dense_linear(p, t), linear(d, t)
    torch.testing.assert_close(out.logp.exp().double(), q.gather(1, ids), atol=1e-6, rtol=1e-5)
    tail_truth = q.sum(-1) - q.gather(1, ids).sum(-1)
    torch.testing.assert_close(out.tail.double(), tail_truth, atol=1e-6, rtol=1e-5)
    if t > 1:  # the gold token's probability stays exact
        torch.testing.assert_close(out.gold_logp.double(), q.gather(1, gold[:, None])[:, 0].log(), atol=1e-5, rtol=1e-5)
    else:  # sharpening scales the tail: its curve A_q(β) = log Σ_tail q^β stays exact at every knot
        tail_q = q.clone().scatter_(1, ids, 0.0)
        truth = torch.stack([torch.log((tail_q ** b).sum(-1)) for b in out.tail_fn.betas.tolist()], -1)
        torch.testing.assert_close(out.tail_fn.logz.double(), truth, atol=1e-4, rtol=1e-5)


def test_builder_applies_the_chosen_softening():
    class T:  # a teacher manifest as the builder reads it
        name, temperature, tail_betas = "a", 1.0, ()

    b = TargetBuilder([T()], 10, temperature=2.0, softening="linear")
    arrays = {"topk_ids": torch.tensor([1, 2]).expand(1, 2, 2).clone(),  # (B, L, k): one row of two positions
              "topk_logprobs": torch.log(torch.tensor([0.6, 0.3])).expand(1, 2, 2).clone()}
    got = b.teacher(0, arrays, torch.tensor([0]))
    torch.testing.assert_close(got.logp.exp()[0], torch.tensor([0.6 / 2 + 0.05, 0.3 / 2 + 0.05]))
    assert math.isclose(float(got.tail[0]), 0.1 / 2 + 0.5 * 8 / 10, rel_tol=1e-5)
    with pytest.raises(Exception, match="unknown softening 'cubic'"):
        TargetBuilder([T()], 10, softening="cubic")
