import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.distill.ensemble import (
    OPERATORS,
    WEIGHTINGS,
    aggregate,
    agreement_weights,
    confidence_weights,
    geometric,
    likelihood_weights,
    mean_pairwise_jsd,
    mixture,
    power,
    top1,
)
from chorus.distill.sparse import (
    SparseDist,
    entropy,
    from_topk,
    log_prob_of,
    soften,
    to_dense,
    valid_mask,
)
from chorus.errors import ChorusError
from tests.trainer.test_sparse import random_dist_from

FAST = settings(max_examples=12, deadline=None)
COMBOS = list(itertools.product(OPERATORS, WEIGHTINGS))
N = 3

# ------------------------------------------------------------------ generators


random_dist = random_dist_from  # k distinct ids per row (some padded), tail positive / zero / either


def perturb(d: SparseDist, eps: float, g: torch.Generator) -> SparseDist:
    """Relative noise of size eps on every positive probability; zeros stay zero."""
    logp = d.logp + eps * (2 * torch.rand(d.logp.shape, generator=g) - 1)
    tail = d.tail * (1 + eps * (2 * torch.rand(d.tail.shape, generator=g) - 1))
    total = torch.logsumexp(torch.cat([logp, tail.log()[:, None]], -1), -1)
    return SparseDist(d.ids, logp - total[:, None], tail / total.exp(), d.vocab_size)


case = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "v": st.integers(8, 30),
        "k": st.integers(1, 6),
        "t": st.integers(1, 3),
        "tail": st.sampled_from(["mixed", "zero", "positive"]),
        "alpha": st.sampled_from([-1.0, 0.5, 2.0]),
        "beta": st.sampled_from([0.5, 2.0]),
        "zero_weights": st.booleans(),
    }
)


def build(c):
    g = torch.Generator().manual_seed(c["seed"])
    dists = [random_dist(g, N, c["v"], min(c["k"], c["v"]), c["tail"]) for _ in range(c["t"])]
    w = torch.rand(N, c["t"], generator=g) + 0.05
    if c["zero_weights"] and c["t"] > 1:
        w[:, 0] = 0.0
    gold = torch.randint(0, c["v"], (N,), generator=g)
    gold[0] = -100
    return dists, w, gold, g


def pool(dists, w, gold, c, operator, weighting):
    return aggregate(
        dists, operator=operator, weights=w, weighting=weighting, gold=gold, alpha=c["alpha"], beta=c["beta"]
    )


def effective_weights(dists, w, gold, c, weighting):
    if weighting == "confidence":
        return confidence_weights(dists, c["beta"], prior=w)
    if weighting == "agreement":
        return agreement_weights(dists, c["beta"], prior=w)
    if weighting == "likelihood":
        return likelihood_weights(dists, gold, c["beta"], prior=w)
    return w / w.sum(-1, keepdim=True)


# ------------------------------------------------------------- dense references


def _normalize(q):
    return q / q.sum(-1, keepdim=True)


def dense_pool(dense, w, operator, alpha=0.5):
    """dense (T, N, V) float64, w (N, T): pool the full distributions directly."""
    w = w.double().T[:, :, None]  # (T, N, 1)
    mix = (w * dense).sum(0)
    if operator == "mixture" or (operator == "power" and alpha == 1.0):
        return _normalize(mix)
    on = w > 0
    vetoed = (on & (dense == 0)).any(0)
    if operator == "geometric" or abs(alpha) < 1e-6:
        logq = torch.where(on, w * dense.clamp_min(1e-300).log(), 0.0).sum(0)
        q = torch.where(vetoed, 0.0, (logq - logq.max(-1, keepdim=True).values).exp())
    elif alpha > 0:
        q = (torch.where(on, w * dense**alpha, 0.0)).sum(0) ** (1 / alpha)
    else:
        s = torch.where(on & ~vetoed, w * dense.clamp_min(1e-300) ** alpha, 0.0).sum(0)
        q = torch.where(vetoed, 0.0, s.clamp_min(1e-300) ** (1 / alpha))
    empty = q.sum(-1, keepdim=True) == 0  # veto emptied the pool: linear-pool fallback
    return _normalize(torch.where(empty, mix, q))


def dense_kl(p, q):
    p, q = p.double(), q.double()
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(0).log()), 0.0)
    return terms.sum(-1)


def dense_entropy(p):
    p = p.double()
    return -torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0).sum(-1)


def dense_jsd(a, b):
    m = (a + b) / 2
    return 0.5 * dense_kl(a, m) + 0.5 * dense_kl(b, m)


def stack_dense(dists):
    return torch.stack([to_dense(d).double() for d in dists])


def log_pool_defined(dists, w):
    """(N,) rows where some id has positive mass under every positive-weight teacher."""
    on = (w > 0).T[:, :, None]
    return ~(on & (stack_dense(dists) == 0)).any(0).all(-1)


# -------------------------------------------------------------------- properties


@pytest.mark.parametrize("operator,weighting", COMBOS)
@FAST
@given(c=case)
def test_pool_is_a_distribution_equal_to_the_dense_pool(operator, weighting, c):
    dists, w, gold, _ = build(c)
    out = pool(dists, w, gold, c, operator, weighting)
    dense = to_dense(out).double()
    assert torch.all(dense >= 0) and torch.all(out.tail >= 0)
    torch.testing.assert_close(dense.sum(-1), torch.ones(N, dtype=torch.float64), atol=1e-5, rtol=0)
    valid = valid_mask(out)
    for row in range(N):  # deduplicated support
        ids = out.ids[row][valid[row]]
        assert ids.unique().numel() == ids.numel()
    assert out.ids.shape[1] <= sum(d.ids.shape[1] for d in dists)
    w_eff = effective_weights(dists, w, gold, c, weighting)
    expected = dense_pool(stack_dense(dists), w_eff, operator, c["alpha"])
    torch.testing.assert_close(dense, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("operator,weighting", COMBOS)
@FAST
@given(c=case)
def test_support_inheritance(operator, weighting, c):
    """Checked on log-probs: a positive but tiny effective weight (e.g. likelihood weights
    of a teacher that missed the gold) can give mass below fp32's range in probability space."""
    dists, w, gold, _ = build(c)
    dense = stack_dense(dists)
    out = pool(dists, w, gold, c, operator, weighting)
    positive = log_prob_of(out, torch.arange(c["v"]).expand(N, -1)) > -math.inf
    on = (w > 0).T[:, :, None]
    given_by_all = ((dense > 0) | ~on).all(0)
    given_by_any = ((dense > 0) & on).any(0)
    assert torch.all(positive[given_by_all])
    if operator == "mixture" or (operator == "power" and c["alpha"] > 0):
        assert torch.all(positive[given_by_any])


@pytest.mark.parametrize("operator,weighting", COMBOS)
@FAST
@given(c=case)
def test_continuity_in_inputs_and_weights(operator, weighting, c):
    dists, w, gold, g = build(c)
    eps = 1e-4
    base = to_dense(pool(dists, w, gold, c, operator, weighting))
    moved_dists = [perturb(d, eps, g) for d in dists]
    moved_w = w * (1 + eps * (2 * torch.rand(w.shape, generator=g) - 1))
    moved = to_dense(pool(moved_dists, moved_w, gold, c, operator, weighting))
    assert float((base - moved).abs().sum(-1).max()) < 200 * eps


@pytest.mark.parametrize("operator,weighting", COMBOS)
@FAST
@given(c=case, teacher=st.integers(0, 2), factor=st.floats(1.5, 20.0))
def test_raising_a_weight_never_moves_the_pool_away_from_that_teacher(operator, weighting, c, teacher, factor):
    """For the weighted variants the per-token weights are functions of the inputs, so the
    knob raised is the prior weight (global / per-domain); it scales the effective weight."""
    c = {**c, "zero_weights": False}
    dists, w, gold, _ = build(c)
    t = teacher % len(dists)
    raised = w.clone()
    raised[:, t] *= factor
    p_t = to_dense(dists[t])
    kl_low = dense_kl(p_t, to_dense(pool(dists, w, gold, c, operator, weighting)))
    kl_high = dense_kl(p_t, to_dense(pool(dists, raised, gold, c, operator, weighting)))
    finite = torch.isfinite(kl_low)
    assert torch.all(kl_high[finite] <= kl_low[finite] + 1e-4)


@pytest.mark.parametrize("operator,weighting", COMBOS)
@FAST
@given(c=case)
def test_identical_teachers_give_that_teacher_back(operator, weighting, c):
    dists, w, gold, _ = build({**c, "t": 1})
    teachers = dists * 3
    w = torch.rand(N, 3) + 0.1
    out = pool(teachers, w, gold, c, operator, weighting)
    torch.testing.assert_close(to_dense(out), to_dense(dists[0]), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------- temperature coherence


@FAST
@given(c=case, temperature=st.floats(0.2, 8.0))
def test_geometric_pool_commutes_with_softening(c, temperature):
    """Exact wherever the log pool is defined. Rows where zero-tail teachers veto every id
    fall back to the linear pool, which does not commute; they are excluded here."""
    dists, w, _, _ = build(c)
    soften_then_pool = to_dense(geometric([soften(d, temperature) for d in dists], w))
    pool_then_soften = to_dense(soften(geometric(dists, w), temperature))
    defined = log_pool_defined(dists, w)
    torch.testing.assert_close(soften_then_pool[defined], pool_then_soften[defined], atol=2e-5, rtol=1e-4)


TEMPS = [0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 10.0]


@FAST
@given(c=case)
def test_geometric_pool_of_softened_teachers_gains_entropy_with_t(c):
    dists, w, _, _ = build(c)
    h = torch.stack([entropy(geometric([soften(d, t) for d in dists], w)) for t in TEMPS])
    defined = log_pool_defined(dists, w)  # vetoed rows fall back to the linear pool
    assert torch.all(h[1:, defined] >= h[:-1, defined] - 1e-5)


@pytest.mark.parametrize("operator,weighting", COMBOS)
@FAST
@given(c=case)
def test_pooled_then_softened_gains_entropy_with_t(operator, weighting, c):
    dists, w, gold, _ = build(c)
    out = pool(dists, w, gold, c, operator, weighting)
    h = torch.stack([entropy(soften(out, t)) for t in TEMPS])
    assert torch.all(h[1:] >= h[:-1] - 1e-5)


@FAST
@given(c=case)
def test_mixture_of_softened_teachers_is_bounded_by_a_monotone_entropy(c):
    """The mixture's entropy with T is not monotone (see the counterexamples below), but by
    concavity it stays above Σ_t w_t H(soften(p_t, T)), which is non-decreasing in T."""
    dists, w, _, _ = build(c)
    wn = w / w.sum(-1, keepdim=True)
    bounds = []
    for t in TEMPS:
        soft = [soften(d, t) for d in dists]
        bound = (wn * torch.stack([entropy(d) for d in soft], -1)).sum(-1)
        assert torch.all(entropy(mixture(soft, w)) >= bound - 1e-5)
        bounds.append(bound)
    b = torch.stack(bounds)
    assert torch.all(b[1:] >= b[:-1] - 1e-5)


def _full(rows):
    p = torch.tensor(rows, dtype=torch.float32)
    v = p.shape[-1]
    keep = p > 0
    ids = torch.where(keep, torch.arange(v), 0)
    return from_topk(ids, torch.where(keep, p.log(), -math.inf), v)


E = 1e-4
ENTROPY_COUNTEREXAMPLES = {
    # name: (operator, weighting, alpha, p1, p2, gold, T_high)
    "mixture": ("mixture", "none", 1.0, [[0.6, 0.4 - E, E]], [[E, 0.4 - E, 0.6]], 0, 3.0),
    "power_0.5": ("power", "none", 0.5, [[0.6, 0.4 - E, E]], [[E, 0.4 - E, 0.6]], 0, 2.0),
    "power_2": ("power", "none", 2.0, [[0.6, 0.4 - E, E]], [[E, 0.4 - E, 0.6]], 0, 3.0),
    "power_-1": (
        "power", "none", -1.0,
        [[0.0055, 0.8348, 0.0532, 0.0532, 0.0533]], [[0.9928, 0.0072, 0.0, 0.0, 0.0]], 2, 2.0,
    ),
    "geometric_confidence": (
        "geometric", "confidence", 0.5,
        [[0.0114, 0.9392, 0.0168, 0.0163, 0.0163]], [[0.0, 0.0008, 0.6797, 0.0, 0.3195]], 2, 2.0,
    ),
    "geometric_likelihood": (
        "geometric", "likelihood", 0.5,
        [[0.9956, 0.0044, 0.0, 0.0, 0.0]], [[0.0241, 0.0241, 0.4367, 0.4911, 0.0240]], 1, 2.0,
    ),
}


@pytest.mark.parametrize("name", sorted(ENTROPY_COUNTEREXAMPLES))
def test_axiom_failure_softened_teachers_can_lower_the_pooled_entropy(name):
    """Documented failure, not a bug: softening every teacher can *lower* the entropy of the
    mixture / α-pools (softening evens out each teacher, which can make two disagreeing
    teachers overlap more), and of pools whose per-token weights depend on the softened
    inputs. Only the geometric pool with fixed weights is monotone (it commutes with soften)."""
    operator, weighting, alpha, p1, p2, gold, t_high = ENTROPY_COUNTEREXAMPLES[name]
    dists = [_full(p1), _full(p2)]
    w = torch.tensor([0.5, 0.5])

    def h(t):
        soft = [soften(d, t) for d in dists]
        out = aggregate(soft, operator=operator, weights=w, weighting=weighting, gold=torch.tensor([gold]), alpha=alpha)
        return float(entropy(out))

    assert h(t_high) < h(1.0) - 1e-3


# ------------------------------------------------------------------- weightings


def test_confidence_weights_follow_dense_entropy():
    g = torch.Generator().manual_seed(0)
    dists = [random_dist(g, 4, 15, 4, "mixed") for _ in range(3)]
    prior = torch.rand(4, 3, generator=g) + 0.1
    h = torch.stack([dense_entropy(to_dense(d)) for d in dists], -1)
    expected = _normalize(prior.double() * torch.exp(-2.0 * h))
    torch.testing.assert_close(confidence_weights(dists, 2.0, prior=prior).double(), expected, atol=1e-5, rtol=1e-5)


def test_agreement_weights_follow_dense_jsd_and_penalize_the_outlier():
    g = torch.Generator().manual_seed(1)
    base = random_dist(g, 4, 15, 4, "positive")
    outlier = random_dist(g, 4, 15, 4, "positive")
    dists = [base, perturb(base, 0.05, g), outlier]
    dense = stack_dense(dists)
    jsd = torch.stack([torch.stack([dense_jsd(dense[a], dense[b]) for b in range(3)], -1) for a in range(3)], 1)
    expected = _normalize(torch.exp(-1.0 * jsd.sum(-1) / 2))
    got = agreement_weights(dists, 1.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, 2] < got[:, 0])


def test_likelihood_weights_follow_gold_probability():
    g = torch.Generator().manual_seed(2)
    dists = [random_dist(g, 5, 12, 3, "mixed") for _ in range(2)]
    gold = torch.tensor([0, 3, -100, 7, 11])
    dense = stack_dense(dists)
    p_gold = dense[:, torch.arange(5), gold.clamp_min(0)].T.clamp_min(1e-12)  # (N, T)
    expected = _normalize(p_gold**1.5)
    expected[2] = 0.5  # ignored position keeps the (uniform) prior
    torch.testing.assert_close(likelihood_weights(dists, gold, 1.5).double(), expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------- operator details


def test_power_limits_are_mixture_and_geometric():
    g = torch.Generator().manual_seed(3)
    dists = [random_dist(g, 4, 20, 5, "positive") for _ in range(3)]
    w = torch.tensor([0.2, 0.5, 0.3])
    torch.testing.assert_close(to_dense(power(dists, w, 1.0)), to_dense(mixture(dists, w)))
    torch.testing.assert_close(to_dense(power(dists, w, 1e-4)), to_dense(geometric(dists, w)), atol=1e-3, rtol=0)


def test_mixture_tail_is_each_teachers_tail_outside_the_union():
    v = 10
    a = SparseDist(torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.3]])), torch.tensor([0.2]), v)
    b = SparseDist(torch.tensor([[1, 2, 3]]), torch.log(torch.tensor([[0.4, 0.3, 0.2]])), torch.tensor([0.1]), v)
    out = mixture([a, b], torch.tensor([0.25, 0.75]))
    expected = 0.25 * 0.2 * (v - 4) / (v - 2) + 0.75 * 0.1 * (v - 4) / (v - 3)
    torch.testing.assert_close(out.tail, torch.tensor([expected]))


def test_geometric_veto_with_zero_tails_falls_back_to_the_mixture():
    a = _full([[1.0, 0.0, 0.0]])
    b = _full([[0.0, 0.0, 1.0]])
    w = torch.tensor([0.5, 0.5])
    out = geometric([a, b], w)
    torch.testing.assert_close(to_dense(out), torch.tensor([[0.5, 0.0, 0.5]]))


def test_diagnostics():
    g = torch.Generator().manual_seed(4)
    a, b = random_dist(g, 4, 15, 4, "mixed"), random_dist(g, 4, 15, 4, "mixed")
    torch.testing.assert_close(mean_pairwise_jsd([a, a]), torch.zeros(4), atol=1e-6, rtol=0)
    expected = dense_jsd(to_dense(a).double(), to_dense(b).double())
    torch.testing.assert_close(mean_pairwise_jsd([a, b]).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(mean_pairwise_jsd([a]) == 0)
    top = to_dense(a).gather(1, top1(a)[:, None])[:, 0]
    explicit_max = a.logp.exp().max(-1).values
    torch.testing.assert_close(top, explicit_max)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"operator": "median", "weights": torch.ones(2)}, "mixture, geometric, power"),
        ({"operator": "mixture", "weights": torch.ones(2), "weighting": "x"}, "none, confidence"),
        ({"operator": "mixture", "weights": torch.ones(3)}, "shape"),
        ({"operator": "mixture", "weights": torch.tensor([1.0, -1.0])}, ">= 0"),
        ({"operator": "mixture", "weights": torch.zeros(2)}, "positive sum"),
        ({"operator": "mixture", "weights": torch.ones(2), "weighting": "likelihood"}, "gold"),
    ],
)
def test_bad_arguments_are_chorus_errors(kwargs, match):
    g = torch.Generator().manual_seed(5)
    dists = [random_dist(g, 2, 10, 3, "mixed") for _ in range(2)]
    with pytest.raises(ChorusError, match=match):
        aggregate(dists, **kwargs)


def test_teachers_with_different_vocabularies_are_rejected():
    g = torch.Generator().manual_seed(6)
    with pytest.raises(ChorusError, match="tokenizer"):
        mixture([random_dist(g, 2, 10, 3, "mixed"), random_dist(g, 2, 11, 3, "mixed")], torch.ones(2))
