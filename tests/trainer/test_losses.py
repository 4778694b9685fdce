import math

import pytest
import torch
import torch.nn.functional as F

from chorus.distill.losses import (
    LOSSES,
    chunked_distill_loss,
    cross_entropy,
    distill_loss_from_logits,
    forward_kl,
    get_loss,
    jsd,
    masked_mean,
    reverse_kl,
    skew_kl,
)
from chorus.distill.sparse import SparseDist, from_samples, from_topk, from_topk_renormalized, soften
from chorus.errors import ChorusError

# ------------------------------------------------------------- dense references


def dense_forward_kl(p_logp, s_logp):
    return F.kl_div(s_logp, p_logp, log_target=True, reduction="none").sum(-1)


def dense_reverse_kl(p_logp, s_logp):
    return F.kl_div(p_logp, s_logp, log_target=True, reduction="none").sum(-1)


def _kl(a, log_a, log_b):
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def dense_jsd(p_logp, s_logp, beta=0.5):
    p, s = p_logp.exp(), s_logp.exp()
    m = beta * p + (1 - beta) * s
    return beta * _kl(p, p_logp, m.log()) + (1 - beta) * _kl(s, s_logp, m.log())


def dense_skew_kl(p_logp, s_logp, alpha=0.1):
    p, s = p_logp.exp(), s_logp.exp()
    return _kl(p, p_logp, (alpha * p + (1 - alpha) * s).log())


DENSE = {
    "forward_kl": dense_forward_kl,
    "reverse_kl": dense_reverse_kl,
    "jsd": dense_jsd,
    "skew_kl": dense_skew_kl,
}


def full_support(n=6, v=11, seed=0):
    """Teacher with k = V (every id explicit, in shuffled order, tail 0) and a student."""
    g = torch.Generator().manual_seed(seed)
    p_logp = (torch.randn(n, v, generator=g) * 2).log_softmax(-1)
    order = torch.argsort(torch.rand(n, v, generator=g), dim=-1)
    dist = from_topk(order, p_logp.gather(1, order), v)
    s_logits = torch.randn(n, v, generator=g) * 2
    return dist, p_logp, s_logits


# --------------------------------------------------------- sparse == dense at k = V


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_full_support_equals_dense_reference(name):
    dist, p_logp, s_logits = full_support()
    assert torch.all(dist.tail == 0)
    s1 = s_logits.clone().requires_grad_()
    s2 = s_logits.clone().requires_grad_()
    sparse = LOSSES[name](dist, s1.log_softmax(-1))
    dense = DENSE[name](p_logp, s2.log_softmax(-1))
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    sparse.sum().backward()
    dense.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_tail_bucket_equals_dense_divergence_over_k_plus_1_buckets(name):
    """With k < V the loss is the dense divergence between the K+1-bucket collapses."""
    g = torch.Generator().manual_seed(1)
    n, v, k = 5, 30, 6
    p_logp = (torch.randn(n, v, generator=g) * 2).log_softmax(-1)
    top = p_logp.topk(k)
    dist = from_topk(top.indices, top.values, v)
    s_logp = torch.randn(n, v, generator=g).log_softmax(-1)
    s_top = s_logp.gather(1, top.indices)
    p_b = torch.cat([top.values, torch.log1p(-top.values.exp().sum(-1, keepdim=True))], -1)
    s_b = torch.cat([s_top, torch.log1p(-s_top.exp().sum(-1, keepdim=True))], -1)
    torch.testing.assert_close(LOSSES[name](dist, s_logp), DENSE[name](p_b, s_b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_tail_and_padding_give_finite_values_and_gradients(name):
    v = 12
    ids = torch.tensor([[3, 7, 0], [5, 0, 0]])
    logp = torch.log(torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]]))  # zeros = padding
    dist = SparseDist(ids, logp, torch.zeros(2), v)
    logits = torch.randn(2, v, requires_grad=True)
    loss = LOSSES[name](dist, logits.log_softmax(-1))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_forward_kl_zero_tail_has_no_tail_term():
    v = 10
    dist = SparseDist(torch.tensor([[2, 4]]), torch.log(torch.tensor([[0.25, 0.75]])), torch.zeros(1), v)
    s_logp = torch.randn(1, v).log_softmax(-1)
    expected = (0.25 * (math.log(0.25) - s_logp[0, 2])) + (0.75 * (math.log(0.75) - s_logp[0, 4]))
    torch.testing.assert_close(forward_kl(dist, s_logp), expected.reshape(1))


def test_collapsed_student_tail_still_gets_a_gradient():
    """A student with (almost) no mass outside the support is pulled back towards τ."""
    v = 8
    dist = from_topk(torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.3]])), v)
    logits = torch.tensor([[30.0, 30.0] + [-30.0] * 6], requires_grad=True)
    forward_kl(dist, logits.log_softmax(-1)).sum().backward()
    assert torch.all(logits.grad[0, 2:] < 0)  # descent raises the tail logits


def test_losses_are_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(2)
    p_logp = torch.randn(4, 20, generator=g).log_softmax(-1)
    top = p_logp.topk(5)
    dist = from_topk(top.indices, top.values, 20)
    for fn in LOSSES.values():
        torch.testing.assert_close(fn(dist, p_logp), torch.zeros(4), atol=1e-6, rtol=0)


def test_divergence_parameters_are_validated():
    dist, _, s = full_support()
    with pytest.raises(ChorusError):
        jsd(dist, s.log_softmax(-1), beta=1.0)
    with pytest.raises(ChorusError):
        skew_kl(dist, s.log_softmax(-1), alpha=0.0)
    with pytest.raises(ChorusError):
        forward_kl(dist, torch.zeros(3, 3))


def test_cross_entropy_matches_torch_and_ignores_minus_100():
    logits = torch.randn(6, 9)
    gold = torch.tensor([1, -100, 3, 8, -100, 0])
    got = cross_entropy(logits.log_softmax(-1), gold)
    ref = F.cross_entropy(logits, gold, ignore_index=-100, reduction="none")
    torch.testing.assert_close(got, ref)


def test_get_loss_unknown_lists_choices():
    assert get_loss("jsd") is jsd
    with pytest.raises(ChorusError, match="forward_kl, reverse_kl, jsd, skew_kl"):
        get_loss("kl")


def test_masked_mean_ignores_masked_values_even_inf():
    values = torch.tensor([1.0, float("inf"), 3.0])
    mask = torch.tensor([True, False, True])
    assert float(masked_mean(values, mask)) == 2.0
    assert float(masked_mean(values, torch.zeros(3, dtype=torch.bool))) == 0.0


# ------------------------------------------------------------------------ drivers


def _problem(n=37, h=8, v=23, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    bias = torch.randn(v, generator=g) * 0.1
    t_logp = (torch.randn(n, v, generator=g) * 2).log_softmax(-1)
    top = t_logp.topk(k)
    targets = from_topk(top.indices, top.values.half(), v)
    gold = torch.randint(0, v, (n,), generator=g)
    gold[::4] = -100
    return hidden, weight, bias, gold, targets


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("fused", [True, False])
def test_chunked_equals_unchunked_loss_and_gradients(name, temperature, fused):
    hidden, weight, bias, gold, targets = _problem()
    kwargs = dict(loss_fn=name, kd_weight=0.7, temperature=temperature)
    h1, w1, b1 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss1, m1 = chunked_distill_loss(h1, w1, gold, targets, chunk_size=8, lm_head_bias=b1, fused=fused, **kwargs)
    loss1.backward()
    h2, w2, b2 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss2, m2 = distill_loss_from_logits(F.linear(h2, w2, b2), gold, targets, **kwargs)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, b.grad)
    assert m1.keys() == {"ce", "kd"}
    assert float(m1["ce"]) == pytest.approx(float(m2["ce"]), rel=1e-5)
    assert float(m1["kd"]) == pytest.approx(float(m2["kd"]), rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_saves_no_full_vocab_tensor_for_backward(fused):
    hidden, weight, _, gold, targets = _problem(n=64, v=50)
    hidden.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_distill_loss(
            hidden, weight, gold, targets, loss_fn="forward_kl", kd_weight=0.5, chunk_size=16, fused=fused
        )
    loss.backward()
    assert max(saved) < 64 * 50 // 2


def test_fused_loss_computes_the_logits_once_and_scales_with_the_upstream_gradient():
    """The fused path takes each chunk's head matmul once (forward); checkpointing takes it twice."""
    hidden, weight, bias, gold, targets = _problem(n=40)
    calls = {True: 0, False: 0}
    real_linear = F.linear

    for fused in (True, False):
        def counting(*a, _f=fused, **k):
            calls[_f] += 1
            return real_linear(*a, **k)

        h = hidden.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "linear", counting)
            loss, _ = chunked_distill_loss(h, weight, gold, targets, loss_fn="forward_kl", kd_weight=0.5,
                                           chunk_size=8, lm_head_bias=bias, fused=fused)
            (3.0 * loss).backward()
        if fused:
            fused_grad = h.grad
        else:
            torch.testing.assert_close(fused_grad, h.grad)  # the upstream 3.0 reaches both alike
    assert calls == {True: 5, False: 10}


def test_pure_cross_entropy_without_targets():
    hidden, weight, _, gold, _ = _problem()
    loss, metrics = chunked_distill_loss(hidden, weight, gold, None, loss_fn="forward_kl", kd_weight=0.5)
    ref = F.cross_entropy(hidden @ weight.T, gold, ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    assert float(metrics["ce"]) == pytest.approx(float(ref), rel=1e-5)


def test_pure_kd_with_an_impossible_gold_token_logs_no_nan():
    """kd_weight 1 and a gold token the student gives −inf (a banned token the data still holds) while the teacher
    puts all its mass elsewhere: the CE term (infinite) has weight 0 and stays out of the loss, which is the KD
    alone — finite, with finite gradients; the logged CE is inf, never NaN (0·inf was)."""
    torch.manual_seed(0)
    n, v = 6, 11
    logits = torch.randn(n, v)
    gold = torch.randint(1, v, (n,))
    logits[torch.arange(n), gold] = float("-inf")
    logits.requires_grad_(True)
    targets = from_topk_renormalized(torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), v)  # all on id 0
    loss, metrics = distill_loss_from_logits(logits, gold, targets, loss_fn="forward_kl", kd_weight=1.0)
    ref = masked_mean(-logits.log_softmax(-1)[:, 0], gold != -100)
    torch.testing.assert_close(loss, ref)
    assert float(metrics["ce"]) == float("inf") and torch.isfinite(metrics["kd"])
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_temperature_one_is_the_plain_divergence():
    hidden, weight, _, gold, targets = _problem()
    logits = hidden @ weight.T
    loss, _ = distill_loss_from_logits(logits, gold, targets, loss_fn="forward_kl", kd_weight=1.0)
    ref = masked_mean(forward_kl(targets, logits.log_softmax(-1)), gold != -100)
    torch.testing.assert_close(loss, ref)


def test_temperature_softens_the_student_and_scales_by_t_squared():
    """The target arrives softened (the target builder's job); the loss softens the student."""
    hidden, weight, _, gold, targets = _problem()
    logits = hidden @ weight.T
    loss, _ = distill_loss_from_logits(
        logits, gold, soften(targets, 3.0), loss_fn=reverse_kl, kd_weight=1.0, temperature=3.0
    )
    kd = reverse_kl(soften(targets, 3.0), (logits / 3.0).log_softmax(-1)) * 9.0
    torch.testing.assert_close(loss, masked_mean(kd, gold != -100))


def test_divergence_kwargs_reach_the_loss():
    hidden, weight, _, gold, targets = _problem()
    logits = hidden @ weight.T
    a, _ = distill_loss_from_logits(
        logits, gold, targets, loss_fn="jsd", kd_weight=1.0, divergence_kwargs={"beta": 0.9}
    )
    ref = masked_mean(jsd(targets, logits.log_softmax(-1), beta=0.9), gold != -100)
    torch.testing.assert_close(a, ref)


def test_bad_kd_weight_is_a_chorus_error():
    hidden, weight, _, gold, targets = _problem()
    with pytest.raises(ChorusError):
        chunked_distill_loss(hidden, weight, gold, targets, loss_fn="jsd", kd_weight=1.5)


# ------------------------------------------------------------------ gradient bias


def _zipf_case(v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, v + 1, dtype=torch.float64) ** 1.1
    p = (p / p.sum())[torch.randperm(v, generator=g)]
    z = torch.randn(v, generator=g, dtype=torch.float64)
    return p.float(), z.float()


def _grad(dist: SparseDist, z: torch.Tensor) -> torch.Tensor:
    """Mean over rows of d forward_kl / d logits, for one logits vector broadcast to N rows."""
    logits = z.expand(dist.n_positions, -1).clone().requires_grad_()
    forward_kl(dist, logits.log_softmax(-1)).sum().backward()
    return logits.grad.mean(0).double()


def test_gradient_bias_tail_bucket_and_samples_beat_renormalized_topk():
    """Expected gradient w.r.t. student logits, against the dense forward-KL gradient s - p."""
    v, k, m, draws = 50, 10, 16, 4000
    p, z = _zipf_case(v)
    s = z.softmax(-1).double()
    dense_grad = s - p.double()
    top = p.log().topk(k)
    ids, lps = top.indices[None], top.values[None]

    bias_tail = _grad(from_topk(ids, lps, v), z) - dense_grad
    bias_renorm = _grad(from_topk_renormalized(ids, lps, v), z) - dense_grad

    g = torch.Generator().manual_seed(0)
    picks = torch.multinomial(p.expand(draws, v), m, replacement=True, generator=g)
    counts = torch.zeros(draws, v, dtype=torch.long).scatter_add_(1, picks, torch.ones_like(picks))
    samples = from_samples(torch.arange(v).expand(draws, v), counts, v)
    bias_samples = _grad(samples, z) - dense_grad
    mc_error = math.sqrt(float((p * (1 - p)).sum()) / (m * draws))  # ‖std error‖ of the mean

    assert bias_tail.norm() < bias_renorm.norm()
    assert bias_samples.norm() < bias_renorm.norm()
    assert bias_samples.norm() < 4 * mc_error  # unbiased within Monte Carlo error
    # the tail bucket is exact on the explicit ids; its bias lives on the tail ids only
    assert bias_tail[top.indices].abs().max() < 1e-6


def test_tail_bucket_gradient_is_exact_when_student_tail_matches_even_tail():
    v, k = 50, 10
    p, _ = _zipf_case(v)
    top = p.topk(k)
    tail_ids = torch.ones(v, dtype=torch.bool)
    tail_ids[top.indices] = False
    p_even = p.clone()
    p_even[tail_ids] = p[tail_ids].sum() / (v - k)  # true teacher tail is even
    z = torch.randn(v)
    z[tail_ids] = 0.3  # student's tail is proportional to the even tail
    dist = from_topk(top.indices[None], p_even[top.indices].log()[None], v)
    dense_grad = z.softmax(-1).double() - p_even.double()
    torch.testing.assert_close(_grad(dist, z), dense_grad, atol=1e-6, rtol=0)
