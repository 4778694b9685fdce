import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.distill.sparse import (
    SparseDist,
    entropy,
    from_samples,
    from_topk,
    from_topk_renormalized,
    log_prob_of,
    n_tail_ids,
    prob_of,
    soften,
    to_dense,
)
from chorus.errors import ChorusError

FAST = settings(max_examples=40, deadline=None)


def random_dist(seed: int, n: int, v: int, k: int, tail: str = "mixed") -> SparseDist:
    """Random sparse distribution: k distinct ids per row, some padding slots, and a tail
    that is positive, zero, or either ("mixed"). Always a valid full-vocab distribution."""
    return random_dist_from(torch.Generator().manual_seed(seed), n, v, k, tail)


def random_dist_from(g: torch.Generator, n: int, v: int, k: int, tail: str) -> SparseDist:
    """:func:`random_dist` drawing from a caller's generator (the ensemble tests share one)."""
    ids = torch.argsort(torch.rand(n, v, generator=g), dim=-1)[:, :k]
    w = torch.rand(n, k, generator=g) ** 3 + 1e-3
    pad = torch.rand(n, k, generator=g) < 0.2
    pad[:, 0] = False
    w = torch.where(pad, 0.0, w)
    t = torch.rand(n, generator=g) * 0.6 + 0.01
    if tail == "zero":
        t = torch.zeros(n)
    elif tail == "mixed":
        t = torch.where(torch.rand(n, generator=g) < 0.3, 0.0, t)
    t = torch.where((~pad).sum(-1) == v, 0.0, t)
    p = w / w.sum(-1, keepdim=True) * (1 - t[:, None])
    return SparseDist(torch.where(pad, 0, ids), p.log(), t, v)


def dense_soften(dense: torch.Tensor, t: float) -> torch.Tensor:
    q = dense.double() ** (1.0 / t)
    return q / q.sum(-1, keepdim=True)


def dense_entropy(dense: torch.Tensor) -> torch.Tensor:
    d = dense.double()
    return -torch.where(d > 0, d * d.clamp_min(1e-300).log(), 0.0).sum(-1)


dist_params = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(2, 30),  # V
    st.integers(1, 6),  # k
    st.sampled_from(["mixed", "zero", "positive"]),
)


def draw(params, n=4):
    seed, v, k, tail = params
    return random_dist(seed, n, v, min(k, v), tail)


# ------------------------------------------------------------------ constructors


def test_from_topk_tail_is_the_mass_outside_the_support():
    logp = torch.randn(5, 40).log_softmax(-1)
    top = logp.topk(7)
    d = from_topk(top.indices.int(), top.values.half(), 40)
    expected = 1 - top.values.half().float().exp().sum(-1)
    torch.testing.assert_close(d.tail, expected)
    assert d.ids.dtype == torch.int64 and d.logp.dtype == torch.float32
    torch.testing.assert_close(to_dense(d).sum(-1), torch.ones(5))


def test_from_topk_clamps_fp16_overshoot_and_renormalizes():
    logp = torch.log(torch.tensor([[0.6, 0.41]])).half()  # sums to 1.01
    d = from_topk(torch.tensor([[3, 1]]), logp, 10)
    assert float(d.tail) == 0.0
    torch.testing.assert_close(d.logp.exp().sum(-1), torch.ones(1))


def test_from_topk_full_vocab_has_zero_tail():
    logp = torch.randn(3, 6).log_softmax(-1)
    d = from_topk(torch.arange(6).expand(3, 6), logp, 6)
    assert torch.all(d.tail == 0)
    torch.testing.assert_close(to_dense(d), logp.exp())


def test_from_topk_renormalized_drops_the_tail():
    logp = torch.randn(4, 20).log_softmax(-1)
    top = logp.topk(5)
    d = from_topk_renormalized(top.indices, top.values, 20)
    assert torch.all(d.tail == 0)
    torch.testing.assert_close(d.logp.exp(), top.values.softmax(-1))


def test_from_samples_is_the_empirical_distribution():
    ids = torch.tensor([[4, 2, 0], [1, 0, 0]])
    counts = torch.tensor([[3, 1, 0], [5, 0, 0]])
    d = from_samples(ids, counts, 8)
    dense = to_dense(d)
    assert torch.all(d.tail == 0)
    torch.testing.assert_close(dense[0, [4, 2]], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(dense[1, 1], torch.tensor(1.0))
    assert int(n_tail_ids(d)[1]) == 7  # the padding slots are not support


def test_encoded_logprobs_are_rejected():
    with pytest.raises(ChorusError, match="floating-point"):
        from_topk(torch.tensor([[1, 2]]), torch.tensor([[100, 200]], dtype=torch.int32), 10)


def test_shape_mismatch_is_a_chorus_error():
    with pytest.raises(ChorusError):
        SparseDist(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2), 10)


# ------------------------------------------------------- lookups against dense


@FAST
@given(dist_params)
def test_dense_is_a_distribution_and_lookups_agree(params):
    d = draw(params)
    dense = to_dense(d)
    assert torch.all(dense >= 0)
    torch.testing.assert_close(dense.sum(-1), torch.ones(dense.shape[0]), atol=1e-5, rtol=0)
    query = torch.randint(0, d.vocab_size, (dense.shape[0], 9))
    torch.testing.assert_close(prob_of(d, query), dense.gather(1, query), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(entropy(d).double(), dense_entropy(dense), atol=1e-5, rtol=1e-5)


def test_log_prob_of_zero_tail_is_minus_inf():
    d = random_dist(0, 3, 12, 4, tail="zero")
    dense = to_dense(d)
    query = torch.arange(12).expand(3, 12)
    assert torch.equal(log_prob_of(d, query) == float("-inf"), dense == 0)


# ----------------------------------------------------------------- softening


def test_soften_identity_at_t1():
    d = random_dist(1, 4, 20, 5)
    assert soften(d, 1.0) is d


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_soften_rejects_bad_temperature(bad):
    with pytest.raises(ChorusError):
        soften(random_dist(1, 2, 10, 3), bad)


@FAST
@given(dist_params, st.floats(0.1, 10.0))
def test_soften_matches_dense_power(params, t):
    d = draw(params)
    got = to_dense(soften(d, t)).double()
    torch.testing.assert_close(got, dense_soften(to_dense(d), t), atol=1e-5, rtol=1e-4)


@FAST
@given(dist_params, st.floats(0.1, 10.0))
def test_soften_preserves_ranking(params, t):
    d = draw(params)
    before, after = to_dense(d).double(), to_dense(soften(d, t)).double()
    diff_before = before[:, :, None] - before[:, None, :]
    diff_after = after[:, :, None] - after[:, None, :]
    # strict order kept: p_i > p_j (clearly) implies q_i >= q_j; zeros stay zeros
    assert torch.all(diff_after[diff_before > 1e-6] >= -1e-7)
    assert torch.all(after[before == 0] == 0)


@FAST
@given(dist_params, st.floats(0.2, 5.0))
def test_soften_is_continuous_in_t(params, t):
    d = draw(params)
    a, b = to_dense(soften(d, t)), to_dense(soften(d, t * (1 + 1e-4)))
    assert float((a - b).abs().sum(-1).max()) < 1e-2


@FAST
@given(dist_params)
def test_soften_entropy_is_monotone_in_t(params):
    d = draw(params)
    temps = [0.1, 0.3, 0.7, 1.0, 1.5, 2.0, 4.0, 10.0, 50.0]
    h = torch.stack([entropy(soften(d, t)) for t in temps])
    assert torch.all(h[1:] >= h[:-1] - 1e-5)


def test_soften_high_temperature_approaches_uniform():
    d = random_dist(3, 4, 16, 5, tail="positive")
    dense = to_dense(soften(d, 1e4))
    torch.testing.assert_close(dense, torch.full_like(dense, 1 / 16), atol=1e-3, rtol=0)
    # with no tail, only the support keeps mass: uniform over it
    z = random_dist(3, 4, 16, 5, tail="zero")
    dz = to_dense(soften(z, 1e4))
    support = to_dense(z) > 0
    expected = support / support.sum(-1, keepdim=True)
    torch.testing.assert_close(dz, expected.float(), atol=1e-3, rtol=0)


def test_soften_low_temperature_approaches_argmax():
    d = random_dist(4, 6, 16, 5, tail="positive")
    dense = to_dense(d)
    sharp = to_dense(soften(d, 1e-3))
    top = dense.max(-1, keepdim=True).values
    ties = (dense >= top - 1e-7).float()
    torch.testing.assert_close(sharp, ties / ties.sum(-1, keepdim=True), atol=1e-4, rtol=0)


def test_soften_keeps_zero_tail_zero():
    d = random_dist(5, 4, 12, 3, tail="zero")
    for t in (0.3, 3.0):
        s = soften(d, t)
        assert torch.all(s.tail == 0)
        assert not torch.isnan(s.logp).any()


def test_entropy_of_uniform_is_log_v():
    d = SparseDist(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[-math.inf]]), torch.ones(1), 7)
    torch.testing.assert_close(entropy(d), torch.tensor([math.log(7)]))


def test_from_topk_drops_a_tail_that_is_fp16_rounding_noise():
    """A teacher whose top-k holds all but 1e-7 of its mass, stored in fp16: the apparent tail
    1 - Σ exp is rounding noise (up to ~1e-4); kept, softening at T = 2 would inflate it over
    V - k ids into most of the distribution."""
    import torch

    from chorus.distill.sparse import entropy, from_topk, soften

    V, k = 32000, 8
    probs = torch.tensor([[0.5, 0.2, 0.1, 0.08, 0.06, 0.03, 0.02, 0.01 - 1e-7]], dtype=torch.float64)
    stored = probs.log().to(torch.float16)
    ids = torch.arange(k)[None]
    d = from_topk(ids, stored, V)
    assert float(d.tail[0]) == 0.0
    soft = soften(d, 2.0)
    assert float(soft.tail[0]) == 0.0 and float(entropy(soft)[0]) < 2.5  # stays on the top-k
    # a real tail far above the noise is kept (within fp16 rounding)
    real = torch.tensor([[0.5, 0.2, 0.1, 0.08, 0.06, 0.03, 0.02, 0.001]])
    d = from_topk(ids, real.log().to(torch.float16), V)
    assert abs(float(d.tail[0]) - 0.009) < 1e-3
