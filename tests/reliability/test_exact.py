"""Exact where claimed (issue 24, item 5): weights, pooled targets and the combination grid against the TRUE
dense float64 distributions.

The truth is float64 logits per teacher (Gaussian and Zipf-like tails, fp32-representable so the teacher's own
fp32 pass sees exactly them); its softmax is the true distribution. The cached form is made by the cache's own
path — ``chunked_targets`` (what ``Teacher.targets`` runs on a CPU) on those logits through an identity LM head
(``F.linear(x, I) == x`` bit for bit), then, for ``storage="fp16"``, ``encode_targets`` → ``decode_topk`` /
``decode_stats`` as ``chorus cache`` writes and the loader reads — and handed to the one target builder exactly as
the loader hands a batch over. Nothing in a reference uses chorus's tail model, imputation or ``to_dense``.

Where chorus is exact (gold log-probs, cached entropy, the context signal, the pooled head on ids every teacher
resolves, every loss given its target) the tolerance is the fp32 (and, stored, fp16) rounding of the cached values,
``lp_tol``. Where the sparse form cannot be exact (the agreement JSD, a softened entropy, pooled mass on ids a
teacher does not resolve) each test states a bound computable from the cache and asserts it at every position.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chorus.distill.blend import pooled_nll
from chorus.distill.ensemble import OPERATORS, mean_pairwise_jsd
from chorus.distill.losses import LOSSES, STUDENT_TAIL_FLOOR, TEACHER_TAIL_FLOOR, chunked_distill_loss
from chorus.distill.sparse import valid_mask
from chorus.distill.targets import TARGETS, TargetBuilder, check_combination, context_loglik
from chorus.distill.targets import WEIGHTINGS as ALL_WEIGHTINGS
from chorus.errors import ChorusError
from chorus.store import TAIL_BETAS, decode_samples, decode_stats, decode_topk, encode_targets, value_params
from chorus.student.data import positions
from chorus.teacher.model import chunked_targets

LN2 = math.log(2.0)
U32 = 2.0**-24  # fp32 unit roundoff
U16 = 2.0**-11  # fp16 unit roundoff (the cache stores log-probs and statistics in fp16)


# ---------------------------------------------------------------------------------------------- the truth


def true_logits(kind: str, b: int, length: int, v: int, seed: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, V) float64 logits whose values are fp32 numbers (the teacher's fp32 pass sees them exactly).

    ``gaussS``: N(0, S²) logits; ``zipfA``: −A·log rank + N(0, 0.3²) jitter in a random id order (a heavy tail);
    with ``base``: base + N(0, 0.7²), a teacher similar to the one ``base`` came from."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, length, v)
    if base is not None:
        z = base + 0.7 * torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind.startswith("gauss"):
        z = float(kind[5:]) * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        r = torch.arange(1, v + 1, dtype=torch.float64)
        z = -float(kind[4:]) * r.log() + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        z = torch.gather(z, -1, torch.argsort(torch.rand(shape, generator=g), -1))
    return z.float().double()


def cache_batch(logits: list[torch.Tensor], input_ids: torch.Tensor, segment_ids: torch.Tensor, *, k: int,
                storage: str, samples: int = 0) -> tuple[dict, list]:
    """Teachers' (B, L, V) float64 logits → (batch as ``CachedRows`` hands it over, their manifests).

    ``storage="fp32"``: the cache pass's float32 outputs as they are (the statistics before the codec);
    ``"fp16"``: through the store's codec (fp16 values and statistics, uint8 tail curve), decoded as a reader does."""
    v = logits[0].shape[-1]
    teachers, manifests = {}, []
    for i, z in enumerate(logits):
        name = f"t{i}"
        with torch.inference_mode():
            out = chunked_targets(z.float(), torch.eye(v), None, input_ids, top_k=k, num_samples=samples, seed=i,
                                  row_start=0, tail_betas=TAIL_BETAS)
        host = {n: t.numpy() for n, t in out.items()}
        if storage == "fp32":
            arrays = {n: torch.from_numpy(a) for n, a in host.items() if n != "draws"}
            if samples:
                enc = encode_targets(host["topk_ids"], host["topk_logprobs"], vocab_size=v, codec="fp16",
                                     params=value_params("fp16"), draws=host["draws"])
                arrays["sample_ids"] = torch.from_numpy(enc["sample_ids"].astype(np.int64))
                arrays["sample_counts"] = torch.from_numpy(enc["sample_counts"].astype(np.int64))
        else:
            params = value_params("fp16")
            stats = {f: host[f] for f in ("log_tail", "entropy", "gold_logprob", "tail_logz")} | {"tail_betas": TAIL_BETAS}
            enc = encode_targets(host["topk_ids"], host["topk_logprobs"], vocab_size=v, codec="fp16", params=params,
                                 draws=host.get("draws"), stats=stats)
            m = SimpleNamespace(name=name, value_codec="fp16", value_params=params, has_stats=True, vocab_size=v,
                                top_k=k, tail_betas=TAIL_BETAS, num_samples=samples)
            ids, values = decode_topk(enc, m)
            arrays = {"topk_ids": torch.from_numpy(ids), "topk_logprobs": torch.from_numpy(values)}
            arrays |= {n: torch.from_numpy(a) for n, a in decode_stats(enc, m, values[..., -1]).items()}
            if samples:
                sid, cnt = decode_samples(enc, m)
                arrays |= {"sample_ids": torch.from_numpy(sid), "sample_counts": torch.from_numpy(cnt)}
        teachers[name] = arrays
        manifests.append(SimpleNamespace(name=name, temperature=1.0, tail_betas=TAIL_BETAS))
    batch = {"teachers": teachers, "segment_ids": segment_ids, "input_ids": input_ids,
             "domain": torch.zeros(input_ids.shape[0], dtype=torch.long)}
    return batch, manifests


def rows(b: int, length: int, v: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and segment ids: two documents in row 0, one in the others, the last row padded."""
    ids = torch.randint(0, v, (b, length), generator=torch.Generator().manual_seed(seed))
    seg = torch.ones(b, length, dtype=torch.int32)
    seg[0, length // 2:] = 2
    seg[-1, -2:] = 0
    return ids, seg


def flat(x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) → the selected (N, ...) positions, as ``teacher_dist`` takes them."""
    return x[:, :-1].reshape(-1, *x.shape[2:])[select]


# ---------------------------------------------------------------------------------------------- dense references


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a log(a / b) over the last dim, 0 · log 0 = 0 (float64)."""
    return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)


def js(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """JSD(½) in nats over the last dim."""
    m = 0.5 * (a + b)
    return 0.5 * kl(a, m) + 0.5 * kl(b, m)


def entropy_of(q: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(q, q).sum(-1)


def power_mean(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """M_α(w; x) = (Σ_t w_t x_t^α)^{1/α} over dim 1 of x (N, T, ...), w (N, T) summing to 1; α = 0 is Π x_t^{w_t}
    (0 wherever a teacher of positive weight has x = 0: the log pool's veto)."""
    w = w.double().reshape(*w.shape, *([1] * (x.dim() - 2)))
    if alpha == 0.0:
        on = w > 0
        log = torch.where(on, w * x.clamp_min(1e-300).log(), 0.0).sum(1)
        return torch.where((on & (x == 0)).any(1), 0.0, log.exp())
    return (w * x**alpha).sum(1) ** (1.0 / alpha)


ALPHA = {"mixture": 1.0, "geometric": 0.0, "power": 0.5}  # the builder's power pool runs at its default α = 0.5


def dense_pool(q: torch.Tensor, w: torch.Tensor, operator: str) -> torch.Tensor:
    """(N, V) pool of full distributions q (N, T, V) with weights w (N, T); a vetoed-empty geometric row is the
    linear pool (ensemble.py's documented fallback)."""
    g = power_mean(q, w, ALPHA[operator])
    g = torch.where(g.sum(-1, keepdim=True) > 0, g, power_mean(q, w, 1.0))
    return g / g.sum(-1, keepdim=True)


def dense_soften(q: torch.Tensor, t: float, kind: str = "power") -> torch.Tensor:
    """q^{1/T} renormalized (zeros stay zero), or the linear softening (softening.py): q/T + (1 − 1/T)/V for T > 1,
    T·q + (1 − T)·δ for T < 1, δ uniform over the ids of largest probability."""
    if t == 1.0:
        return q
    if kind == "linear" and t > 1.0:
        return q / t + (1.0 - 1.0 / t) / q.shape[-1]
    if kind == "linear":
        top = q == q.max(-1, keepdim=True).values
        return t * q + (1.0 - t) * top / top.sum(-1, keepdim=True)
    s = torch.where(q > 0, q.clamp_min(1e-300) ** (1.0 / t), 0.0)
    return s / s.sum(-1, keepdim=True)


LIKELIHOOD_FLOOR = 1e-12  # ensemble.LIKELIHOOD_FLOOR, a documented constant of the weighting's definition


def dense_weights(weighting: str, q: torch.Tensor, prior: torch.Tensor, *, beta: float, gold: torch.Tensor,
                  ctx: torch.Tensor | None = None, h: torch.Tensor | None = None,
                  gold_lp: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T) weights of the definitions on full distributions q (N, T, V): prior · exp(β · signal), normalized.
    ``h`` / ``gold_lp``: entropy / gold log-prob to use instead of q's (a sampled target's come from the cached
    statistics of the full teacher, not from the samples)."""
    log_prior = prior.double().log()
    if weighting == "none":
        return torch.softmax(log_prior, -1)
    if weighting == "confidence":
        signal = -beta * (entropy_of(q) if h is None else h)
    elif weighting == "likelihood":
        lp = q.gather(2, gold[:, None, None].expand(-1, q.shape[1], 1))[..., 0].log() if gold_lp is None else gold_lp
        signal = beta * lp.clamp_min(math.log(LIKELIHOOD_FLOOR))
    elif weighting == "agreement":
        t = q.shape[1]
        j = torch.stack([torch.stack([js(q[:, a], q[:, b]) for b in range(t)], -1) for a in range(t)], 1)
        signal = -beta * j.sum(-1) / (t - 1)
    else:  # context
        signal = beta * ctx
    return torch.softmax(log_prior + signal, -1)


def dense_context(gold_lp: torch.Tensor, segment_ids: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """(N,) Σ of the gold log-probs (B, L) at the earlier positions of each selected position's document."""
    b, length = segment_ids.shape
    out = torch.zeros(b, length, dtype=torch.float64)
    for r in range(b):
        for j in range(length):
            i = j
            while i > 0 and segment_ids[r, i - 1] == segment_ids[r, j]:
                i -= 1
            out[r, j] = gold_lp[r, i:j].sum()
    return flat(out, select)


def gold_logprobs(z: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) true log-prob of each row's next token (0 at a row's end, as cached)."""
    lp = torch.log_softmax(z, -1)[:, :-1].gather(2, input_ids[:, 1:, None])[..., 0]
    return torch.cat([lp, torch.zeros(lp.shape[0], 1, dtype=lp.dtype)], 1)


# ---------------------------------------------------------------------------------------------- weights


B, L, V, K = 4, 17, 512, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest, and the suite shares its cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BETA = 0.7  # the weightings' sharpness, not 1, so a dropped β shows


def teachers(family: str) -> list[torch.Tensor]:
    """Three teachers' (B, L, V) true logits: ``mixed`` = Gaussian σ = 6, one like it, a Zipf-like one (the gold is
    often deep in a tail, sometimes below the likelihood floor); ``sharp`` = Gaussian σ = 4.5 and two like it but
    sharper; ``gaussS`` / ``zipfA`` = three similar teachers."""
    if family == "mixed":
        z0 = true_logits("gauss6", B, L, V, 1)
        return [z0, true_logits("", B, L, V, 2, base=z0), true_logits("zipf1.1", B, L, V, 3)]
    if family == "sharp":  # one head, ever sharper (logits × 1.6, × 2.5): tails of very different mass
        z0 = true_logits("gauss4.5", B, L, V, 1)
        return [z0, true_logits("", B, L, V, 2, base=1.6 * z0), true_logits("", B, L, V, 3, base=2.5 * z0)]
    z0 = true_logits(family, B, L, V, 1)
    return [z0, true_logits("", B, L, V, 2, base=z0), true_logits("", B, L, V, 3, base=z0)]


@pytest.fixture(scope="module")
def built():
    """{(family, storage): (logits, batch, manifests, positions)} built once per module."""
    cache = {}

    def get(family: str, storage: str):
        if (family, storage) not in cache:
            z = teachers(family)
            ids, seg = rows(B, L, V)
            batch, manifests = cache_batch(z, ids, seg, k=K, storage=storage)
            cache[family, storage] = z, batch, manifests, positions(batch)
        return cache[family, storage]

    return get


def prior_of(n: int) -> torch.Tensor:
    """(N, 3) global × per-domain prior, different at every position."""
    g = torch.Generator().manual_seed(5)
    return 0.2 + torch.rand(n, 3, generator=g)


def build(get, family, storage, *, weighting="none", operator="mixture", temperature=1.0, softening="power"):
    """The builder's Targets for a family's cache, the (N, T, V) TRUE teachers softened as the builder softens
    them, the prior, positions, logits and batch."""
    z, batch, manifests, pos = get(family, storage)
    builder = TargetBuilder(manifests, V, operator=operator, weighting=weighting, temperature=temperature,
                            calibrated=False, beta=BETA, softening=softening, warn=False)
    prior = prior_of(len(pos.select))
    out = builder.build(batch, pos.select, pos.gold, prior)
    q = torch.stack([dense_soften(flat(torch.softmax(zz, -1), pos.select), temperature, softening) for zz in z], 1)
    return out, q, prior, pos, z, batch


def assert_weights(w: torch.Tensor, ref: torch.Tensor, log_tol: torch.Tensor) -> None:
    """|log w − log ref| ≤ log_tol, as |w − ref| ≤ ref·(e^tol − 1) + 1e-30: a weight below fp32's normal range
    (~1e-38; a document's likelihood ratios reach e^-100) may underflow to 0."""
    err = (w.double() - ref).abs()
    tol = ref * torch.expm1(log_tol) + 1e-30
    worst = int((err / tol).flatten().argmax())
    assert bool((err <= tol).all()), (f"weight {float(w.flatten()[worst]):.6g}, true {float(ref.flatten()[worst]):.6g}: "
                                      f"off by {float(err.flatten()[worst]):.3g} > {float(tol.flatten()[worst]):.3g}")


# The cached value of a log-prob x: fp32 — the cache pass's log-softmax over V and its gather, off by a few fp32
# roundings of numbers of size |x| and log Z, ≤ 8·u32·(1 + |x| + |log Z|) with room (|log Z| ≤ 30 here);
# fp16 — one more rounding to fp16 of the stored statistic, |x|·u16.
def lp_tol(x: torch.Tensor, storage: str) -> torch.Tensor:
    fp32 = 8 * U32 * (31 + x.abs())
    return fp32 + (x.abs() * U16 if storage == "fp16" else 0.0)


CASES = [("fp32", 1.0), ("fp32", 2.0), ("fp32", 0.5), ("fp16", 1.0)]  # grid temperatures: exact power softening
SOFTENED = [(*c, "power") for c in CASES] + [("fp32", 2.0, "linear"), ("fp32", 0.5, "linear")]
@pytest.mark.parametrize("storage,temperature,softening", SOFTENED)
def test_likelihood_weights_are_the_true_gold_probability(built, storage, temperature, softening):
    """w ∝ prior · max(p_t(gold), 1e-12)^β with p_t the TRUE softened teacher (the gold is mostly outside the
    top-k). |Δ log w_t| ≤ β·(ε_t + max_s ε_s), ε the cached gold log-prob's error (``lp_tol``); softening by a grid
    T moves it by ε·(1/T) plus the log-normalizer's error (same size)."""
    out, q, prior, pos, _, batch = build(built, "mixed", storage, weighting="likelihood", temperature=temperature,
                                         softening=softening)
    ref = dense_weights("likelihood", q, prior, beta=BETA, gold=pos.gold)
    lp = q.gather(2, pos.gold[:, None, None].expand(-1, 3, 1))[..., 0].log()
    outside = ~(flat(batch["teachers"]["t0"]["topk_ids"], pos.select) == pos.gold[:, None]).any(-1)
    assert float(outside.double().mean()) > 0.5  # the gold is mostly outside the cached top-k
    if (temperature, softening) == (0.5, "power"):  # and below the floor at some positions
        assert bool((lp < math.log(LIKELIHOOD_FLOOR)).any())
    eps = lp_tol(lp * temperature, storage) * (1 / temperature + 1)  # the T = 1 log-prob's error, through softening
    tol = BETA * (eps + eps.max(-1, keepdim=True).values)
    assert_weights(out.weights, ref, tol)


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_pooled_gold_likelihood_is_the_true_mixture_likelihood(built, storage):
    """blend.pooled_nll from the cached gold log-probs = −log Σ_t w_t p_t(gold) of the true teachers (blend.py's
    exactness claim), within the cached log-probs' error (a log-sum-exp moves by at most the largest one's)."""
    out, q, prior, pos, _, batch = build(built, "mixed", storage)
    cached = torch.stack([flat(batch["teachers"][f"t{i}"]["gold_logprob"], pos.select) for i in range(3)], -1)
    lp = q.gather(2, pos.gold[:, None, None].expand(-1, 3, 1))[..., 0].log()
    w = prior / prior.sum(-1, keepdim=True)
    ref = -torch.logsumexp(w.double().log() + lp, -1)
    err = (pooled_nll(cached, w).double() - ref).abs()
    assert bool((err <= lp_tol(lp, storage).max(-1).values).all()), float(err.max())


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_context_weights_are_the_true_document_likelihood(built, storage):
    """The context signal at position j is Σ_{i < j in j's document} log p_t(x_{i+1}) of the TRUE teacher, and the
    weights softmax(log prior + β·signal). A sum of n cached log-probs is off by at most the sum of their errors."""
    z, batch, manifests, pos = built("mixed", storage)
    ctx = context_loglik(batch, [m.name for m in manifests], pos.select).double()
    gold = [gold_logprobs(zz, batch["input_ids"]) for zz in z]
    ref = torch.stack([dense_context(g, batch["segment_ids"], pos.select) for g in gold], -1)
    tol = torch.stack([dense_context(lp_tol(g, storage), batch["segment_ids"], pos.select) for g in gold], -1)
    assert bool(((ctx - ref).abs() <= tol + 1e-6).all()), float((ctx - ref).abs().max())
    assert float(ref.abs().max()) > 50  # documents long enough that an off-by-one position would show
    out, _, prior, _, _, _ = build(built, "mixed", storage, weighting="context")
    w = dense_weights("context", None, prior, beta=BETA, gold=pos.gold, ctx=ref)
    bound = BETA * (tol + tol.max(-1, keepdim=True).values) + 1e-6
    assert_weights(out.weights, w, bound)


def slope_bracket(d) -> torch.Tensor:
    """(N,) width of the interval that the tail's mean log-prob A'(1) must lie in, from the tail curve's knots alone:
    A is convex, so A'(1) lies between the secants on either side of the knot at 1 (above the last knot: every
    tail log-prob is ≤ the k-th explicit one). Chorus's three-point slope is a mix of the same two secants.
    The knots themselves carry fp32 error; it enters each secant divided by the knot spacing."""
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), d.tail_fn.betas.double()])
    n_tail = (V - valid_mask(d).sum(-1)).double()
    a = torch.cat([n_tail.log()[:, None], d.tail_fn.logz.double()], -1)
    i = int(torch.isclose(betas, torch.ones(1, dtype=torch.float64)).nonzero()[0, 0])
    h = betas[1:] - betas[:-1]
    left = (a[:, i] - a[:, i - 1]) / h[i - 1]
    kth = torch.where(valid_mask(d), d.logp, float("inf")).min(-1).values.double()
    right = (a[:, i + 1] - a[:, i]) / h[i] if i + 1 < len(betas) else kth
    knot_err = 2 * lp_tol(a.abs().max(-1).values, "fp32") / h.min()
    return right - left + 2 * knot_err


def even_tail_gap(d) -> torch.Tensor:
    """(N,) how far the even-tail entropy can be above the true one: H_even − H = τ·KL(tail/τ ‖ uniform over its n
    ids) ∈ [0, τ·log(n·p_max/τ)], and every tail id is ≤ the k-th explicit value."""
    n_tail = (V - valid_mask(d).sum(-1)).double()
    kth = torch.where(valid_mask(d), d.logp, float("inf")).min(-1).values.double()
    tau = d.tail.double()
    return torch.where(tau > 0, tau * (n_tail.log() + kth - tau.clamp_min(1e-300).log()).clamp_min(0), 0.0)


@pytest.mark.parametrize("storage,temperature,softening", SOFTENED)
def test_confidence_weights_are_the_true_entropy(built, storage, temperature, softening):
    """w ∝ prior · exp(−β·H(p_t)), H of the TRUE softened teacher. At T = 1 H is the cached exact entropy (error:
    ``lp_tol``). Softened, chorus uses H = −Σ_k q log q − τ·A'(1) with A'(1) from the tail curve's knots (power, and
    linear T < 1, which scales the curve), so the stated bound is |ΔH| ≤ τ·(width of A'(1)'s convexity bracket,
    ``slope_bracket``); linear T > 1 drops the curve (softening.py) and uses the even-tail entropy, within
    ``even_tail_gap`` of the truth. Both at every position."""
    out, q, prior, pos, _, _ = build(built, "mixed", storage, weighting="confidence", temperature=temperature,
                                     softening=softening)
    h_true = entropy_of(q)
    h_tol = lp_tol(h_true, storage)
    if temperature != 1.0:
        gap = even_tail_gap if (softening, temperature > 1) == ("linear", True) else (lambda d: d.tail.double() * slope_bracket(d))
        h_tol = h_tol + torch.stack([gap(d) for d in out.dists], -1)
    ref = dense_weights("confidence", q, prior, beta=BETA, gold=pos.gold)
    assert_weights(out.weights, ref, BETA * (h_tol + h_tol.max(-1, keepdim=True).values))


def jsd_bracket(a, b) -> torch.Tensor:
    """(N,) how far ANY reading of two sparse teachers' JSD can be from the true one. Split the vocabulary into the
    ids both resolve (both supports: exact values) and the rest R (masses a(R), b(R) exact). The true JSD and chorus's
    (its imputed ids and out-of-union bucket split R, keeping both masses) are both Σ_both f(a_i, b_i) + a JSD
    over some split of R, which lies between f(a(R), b(R)) (R unsplit: data processing) and ½ln2·(a(R) + b(R))
    (disjoint splits), f(x, y) = ½x log(2x/(x+y)) + ½y log(2y/(x+y))."""
    va, vb = valid_mask(a), valid_mask(b)
    in_b = ((a.ids[:, :, None] == b.ids[:, None, :]) & vb[:, None, :]).any(-1) & va  # (N, k_a) ids b resolves too
    in_a = ((b.ids[:, :, None] == a.ids[:, None, :]) & va[:, None, :]).any(-1) & vb
    ra = torch.where(va & ~in_b, a.logp.double().exp(), 0.0).sum(-1) + a.tail.double()
    rb = torch.where(vb & ~in_a, b.logp.double().exp(), 0.0).sum(-1) + b.tail.double()
    f = 0.5 * (torch.special.xlogy(ra, 2 * ra / (ra + rb)) + torch.special.xlogy(rb, 2 * rb / (ra + rb)))
    return 0.5 * LN2 * (ra + rb) - f


@pytest.mark.parametrize("storage,temperature,softening", SOFTENED)
def test_agreement_weights_within_the_unresolved_jsd(built, storage, temperature, softening):
    """w ∝ prior · exp(−β · mean_s JSD(p_t, p_s)) against the TRUE pairwise JSDs. Not exact: the JSD of two
    distributions on ids only one of them resolves is unknown. Stated bound, per position: |ΔJSD(a, b)| ≤
    ``jsd_bracket`` (the mass neither pins down, computable from the cache), so |Δlog w_t| ≤ β·(δ_t + max_s δ_s),
    δ_t the mean bracket of t's pairs. The training log's mean_pairwise_jsd is held to the same bracket."""
    family = "sharp"  # one head, tails of different mass: the bracket is narrow, the out-of-union term is not
    out, q, prior, pos, _, _ = build(built, family, storage, weighting="agreement", temperature=temperature,
                                     softening=softening)
    t = q.shape[1]
    # precision: the values read are off by lp_tol(|log p|) relative, so the JSD, a sum of p·log-ratios, by ≲ 2·lp_tol(H)
    slack = 2 * lp_tol(1 + entropy_of(q).max(-1).values, storage)
    delta = torch.stack([sum(jsd_bracket(out.dists[a], out.dists[b]) for b in range(t) if b != a) / (t - 1)
                         for a in range(t)], -1) + slack[:, None]
    ref = dense_weights("agreement", q, prior, beta=BETA, gold=pos.gold)
    assert_weights(out.weights, ref, BETA * (delta + delta.max(-1, keepdim=True).values))
    pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
    true_mean = sum(js(q[:, a], q[:, b]) for a, b in pairs) / len(pairs)
    bracket = sum(jsd_bracket(out.dists[a], out.dists[b]) for a, b in pairs) / len(pairs) + slack
    assert bool(((mean_pairwise_jsd(out.dists).double() - true_mean).abs() <= bracket).all())


# ---------------------------------------------------------------------------------------------- pooled targets


def membership(d, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ids (N, U): (N, U) bool whether d resolves each (in its support) and (N, U) its probability there (0 if not)."""
    hit = (ids[:, :, None] == d.ids[:, None, :]) & valid_mask(d)[:, None, :]
    return hit.any(-1), torch.where(hit, d.logp.double().exp()[:, None, :], 0.0).sum(-1)


def pooling_bound(dists, w: torch.Tensor, pooled, operator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stated per-position bound, from the cache alone. Buckets: the pooled support's ids, one for the rest.
    In bucket c the true unnormalized pool g_c = M_α(w; p_t(c)) lies in a box [lo_c, hi_c]: an id teacher t resolves
    has its exact p_t; one it does not has 0 ≤ p_t ≤ p_t,(k) (its k-th value); the rest bucket has 0 ≤ g ≤ M_α(w; τ)
    (Hölder / Minkowski: Σ_i M_α(p(i)) ≤ M_α(Σ_i p(i)) for α ∈ [0, 1]); for the mixture also g ≥ Σ_t w_t(τ_t −
    n_t·p_t,(k)), n_t the pooled ids t misses. Chorus's pool lies in the same box (its imputed values are ≤ the
    k-th value, its out-of-union mass is M_α of what is left of each tail). So, W = Σ_c (hi_c − lo_c):

        TV ≤ ½·W (mixture: both sum to 1),   TV ≤ W / Σ_c lo_c (geometric, power: ‖g/G − g'/G'‖₁ ≤ 2‖g − g'‖₁/G).

    Returns (bound (N,), both (N, U) whether every teacher resolves the pooled id, width (N, U) of each id's box)."""
    alpha = ALPHA[operator]
    valid = valid_mask(pooled)
    ids = torch.where(valid, pooled.ids, -1)
    known, value = zip(*(membership(d, ids) for d in dists))
    known, value = torch.stack(known, 1), torch.stack(value, 1)  # (N, T, U)
    kth = torch.stack([torch.where(valid_mask(d), d.logp, float("inf")).min(-1).values.double().exp()
                       for d in dists], 1)
    tau = torch.stack([d.tail.double() for d in dists], 1)
    lo = torch.where(valid, power_mean(torch.where(known, value, 0.0), w, alpha), 0.0)
    hi = torch.where(valid, power_mean(torch.where(known, value, kth[:, :, None]), w, alpha), 0.0)
    n_miss = (~known & valid[:, None, :]).sum(-1).double()
    rest_lo = (w.double() * (tau - n_miss * kth).clamp_min(0)).sum(-1) if alpha == 1.0 else torch.zeros_like(tau[:, 0])
    rest_hi = power_mean(tau, w, alpha)
    width = (hi - lo).sum(-1) + rest_hi - rest_lo
    bound = 0.5 * width if alpha == 1.0 else width / (lo.sum(-1) + rest_lo)
    return bound, known.all(1) & valid, hi - lo


def bucket_tv(pooled, dense: torch.Tensor) -> torch.Tensor:
    """(N,) TV between the sparse pooled target and a dense one over the pooled support's ids plus one bucket for
    the rest: the resolution every sparse loss works at."""
    valid = valid_mask(pooled)
    q = torch.where(valid, dense.gather(1, torch.where(valid, pooled.ids, 0)), 0.0)
    p = torch.where(valid, pooled.logp.double().exp(), 0.0)
    return 0.5 * ((p - q).abs().sum(-1) + (pooled.tail.double() - (1 - q.sum(-1))).abs())


WEIGHTINGS = ("none", "likelihood", "confidence", "agreement", "context")


@pytest.mark.parametrize("family", ["gauss4.5", "zipf1.1"])
@pytest.mark.parametrize("storage,temperature,softening", SOFTENED)
@pytest.mark.parametrize("operator", ["mixture", "geometric", "power"])
def test_pooled_target_against_the_true_pool(built, operator, storage, temperature, softening, family):
    """Each operator and weighting, pooled by the builder from the cache, against the dense pool of the TRUE
    softened teachers with the weights the builder used (the weights tests hold those to the truth):

    - head, where the math is exact: on ids every teacher resolves, the mixture's values and the geometric/power
      pools' ratios (log q_i − log q_j) are the true ones, to the cached values' precision;
    - mixture, every pooled id: |q̂_i − q_i| ≤ Σ_{t missing i} w_t·p_t,(k);
    - every position: bucket TV ≤ ``pooling_bound`` (+ the precision slack).

    Measured here (fp32, power softening): TV reaches ≤ 0.36 of the mixture's bound and ≤ 0.2 of the others'; the mixture's ids reach
    ≤ 0.66 of their own bound. Where the teachers' tails hold much of the mass (Zipf-like, T = 2) the geometric and
    power bounds exceed 1: the sparse form does not determine those pools there (a tail id's p_t may be ~0), and
    only the head check says something."""
    for weighting in WEIGHTINGS:
        out, q, _, pos, _, _ = build(built, family, storage, weighting=weighting, operator=operator,
                                     temperature=temperature, softening=softening)
        w = out.weights.double()
        truth = dense_pool(q, w, operator)
        pooled = out.pooled
        valid = valid_mask(pooled)
        log_hat = torch.where(valid, pooled.logp.double(), 0.0)
        log_true = torch.where(valid, truth.gather(1, torch.where(valid, pooled.ids, 0)).log(), 0.0)
        bound, both, width = pooling_bound(out.dists, w, pooled, operator)
        # precision: each cached log-prob is off by lp_tol (fp32; + fp16) — a relative error of the mass it carries
        h = entropy_of(q).max(-1).values
        rel = lp_tol(log_true.abs() + 1, storage) / temperature + lp_tol(h, storage)[:, None]
        where = f"{operator}/{weighting} {softening} T={temperature} {storage} {family}"
        assert bool(both.any(-1).all()), where  # some id every teacher resolves, at every position
        if operator == "mixture":
            err = (log_hat - log_true).abs()
            assert bool((err[both] <= 2 * rel[both]).all()), f"{where}: head off by {float(err[both].max()):.3g}"
            mass = (log_hat.exp() - log_true.exp()).abs()
            assert bool(((mass <= width + 2 * rel * log_true.exp()) | ~valid).all()), where
        else:
            c = torch.where(both, log_hat - log_true, float("nan"))
            spread = c.nan_to_num(-math.inf).max(-1).values - c.nan_to_num(math.inf).min(-1).values
            assert bool((spread <= 4 * rel.max(-1).values).all()), f"{where}: head ratios off by {float(spread.max()):.3g}"
        tv = bucket_tv(pooled, truth)
        slack = 2 * lp_tol(h, storage) / temperature
        assert bool((tv <= bound + slack).all()), (
            f"{where}: TV {float(tv[(tv - bound).argmax()]):.4g} > bound {float(bound[(tv - bound).argmax()]):.4g}")


# ---------------------------------------------------------------------------------------------- the combination grid


GV, GK, GM = 64, 16, 8  # the grid's vocabulary, top-k and samples per position
TEACHER_T = (1.0, 1.5, 0.7)  # calibrated temperatures: T_t·T hits grid knots and falls between them
KD_WEIGHT = 0.5
DIVERGENCE_ARGS = {"jsd": 0.5, "skew_kl": 0.1}  # losses.jsd's β and skew_kl's α (their defaults)


def resolved_logits(b: int, length: int, seed: int) -> list[torch.Tensor]:
    """Three teachers that their sparse form describes completely: at each position one top-k set shared by all of
    them (their own values and order inside it) and a flat tail (every other id one value, below the k-th). So
    no value any operator, weighting or softening needs is unknown — imputation, the out-of-union bucket, the tail
    curve's slope and JSD outside the support are all exact — and every topk_tail cell must equal its dense
    reference to fp32 precision. The price: a flat tail is also what the even-tail guess assumes, so the grid cannot
    see tail-shape errors (such as softening.py:79's, which the likelihood test finds); unresolved tails are the
    pooling and weights tests' business, with their bounds."""
    g = torch.Generator().manual_seed(seed)
    support = torch.argsort(torch.rand(b, length, GV, generator=g), -1)[..., :GK]
    out = []
    for _ in range(3):
        head = 3.0 + 2.0 * torch.randn(b, length, GK, generator=g, dtype=torch.float64)
        floor = head.min(-1).values - 0.5 - 2.0 * torch.rand(b, length, generator=g, dtype=torch.float64)
        z = floor[..., None].expand(b, length, GV).clone().scatter_(-1, support, head)
        out.append(z.float().double())
    return out


@pytest.fixture(scope="module")
def grid_batch():
    ids, seg = rows(2, 9, GV, seed=3)
    z = resolved_logits(2, 9, seed=4)
    batch, manifests = cache_batch(z, ids, seg, k=GK, storage="fp32", samples=GM)
    for m, t in zip(manifests, TEACHER_T):
        m.temperature = t
    pos = positions(batch)
    x = (1.5 * torch.randn(len(pos.select), GV, generator=torch.Generator().manual_seed(9))).float()  # student logits
    return z, batch, manifests, pos, x


def reference_cell(z, batch, pos, x, *, target, loss, operator, weighting, temperature, calibrated, softening):
    """The cell from its definitions, densely in float64 on the TRUE teachers: (loss, CE mean, KD mean, (N,) D)."""
    sel = pos.select
    n = len(sel)
    p = torch.stack([flat(torch.softmax(zz, -1), sel) for zz in z], 1)  # (N, T, V) at T = 1
    if target == "samples":  # the empirical distribution of the cached draws
        base = torch.zeros_like(p)
        for i in range(3):
            a = batch["teachers"][f"t{i}"]
            base[:, i].scatter_add_(1, flat(a["sample_ids"], sel).long(), flat(a["sample_counts"], sel).double())
        base = base / base.sum(-1, keepdim=True)
    elif target == "topk_renorm":  # the top-k renormalized, nothing outside
        top = torch.zeros_like(p, dtype=torch.bool).scatter_(2, p.topk(GK, -1).indices, True)
        base = torch.where(top, p, 0.0)
        base = base / base.sum(-1, keepdim=True)
    else:
        base = p
    explicit = base > 0
    if target == "topk_tail":
        explicit = torch.zeros_like(p, dtype=torch.bool).scatter_(2, p.topk(GK, -1).indices, True)
    q = torch.empty_like(base)
    for i in range(3):
        t_i = TEACHER_T[i] if calibrated else 1.0
        if softening == "power":
            q[:, i] = dense_soften(base[:, i], t_i * temperature)
        else:
            q[:, i] = dense_soften(dense_soften(base[:, i], t_i), temperature, "linear")
    prior = prior_of(n)
    if weighting == "context":
        ctx = torch.stack([dense_context(gold_logprobs(zz, batch["input_ids"]), batch["segment_ids"], sel) for zz in z], -1)
        w = dense_weights("context", q, prior, beta=BETA, gold=pos.gold, ctx=ctx)
    elif target == "samples":  # sample-independent weights: the full teacher's cached entropy and gold log-prob
        w = dense_weights(weighting, q, prior, beta=BETA, gold=pos.gold, h=entropy_of(p),
                          gold_lp=p.gather(2, pos.gold[:, None, None].expand(-1, 3, 1))[..., 0].log())
    else:
        w = dense_weights(weighting, q, prior, beta=BETA, gold=pos.gold)
    pooled = dense_pool(q, w, operator)
    support = explicit.any(1) & (pooled > 0)  # the pooled support: the union of the explicit ids, minus any vetoed
    s_t = torch.softmax(x.double() / temperature, -1)

    def buckets(d):  # (N, V + 1): the support's ids, then everything else as one bucket (0 at absent buckets)
        return torch.cat([torch.where(support, d, 0.0), torch.where(support, 0.0, d).sum(-1, keepdim=True)], -1)

    pb, sb = buckets(pooled), buckets(s_t)
    has_rest = ~support.all(-1)
    if loss == "forward_kl":
        d = kl(pb, sb)
    elif loss == "reverse_kl":  # a zero teacher tail is floored (losses.TEACHER_TAIL_FLOOR: a finite penalty)
        pb[:, -1] = torch.where(has_rest, pb[:, -1].clamp_min(TEACHER_TAIL_FLOOR), 0.0)
        d = kl(sb, pb)
    elif loss == "jsd":
        b_ = DIVERGENCE_ARGS["jsd"]
        m = b_ * pb + (1 - b_) * sb
        d = b_ * kl(pb, m) + (1 - b_) * kl(sb, m)
    else:
        a_ = DIVERGENCE_ARGS["skew_kl"]
        d = kl(pb, a_ * pb + (1 - a_) * sb)
    assert bool((sb[:, -1][has_rest] > 100 * STUDENT_TAIL_FLOOR).all())  # the student's tail floor never binds
    ce = -torch.log_softmax(x.double(), -1).gather(1, pos.gold[:, None])[:, 0]
    kd = temperature**2 * d
    return ((1 - KD_WEIGHT) * ce + KD_WEIGHT * kd).mean(), ce.mean(), kd.mean(), d


CELLS = [(target, loss, operator, weighting, temperature, calibrated, softening)
         for target, loss, operator, weighting, temperature, calibrated in itertools.product(
             TARGETS, sorted(LOSSES), OPERATORS, ALL_WEIGHTINGS, (1.0, 2.0, 0.5), (False, True))
         for softening in (("power", "linear") if temperature != 1.0 else ("power",))
         if not (temperature < 1.0 and calibrated)]  # sharpening: uncalibrated only (runtime)
# fp32 throughout (the teacher's log-softmax, softening, pooling, the student's log-softmax): every value the loss
# reads carries a relative error of a few u32 times the log-probs' size (≤ 30 nats here), so a per-position
# divergence of O(1) is within ~1e-5 of the float64 value. Stated: |Δ| ≤ 2e-5 + 2e-5·|value|.
RTOL, ATOL = 2e-5, 2e-5


@pytest.mark.parametrize("target", TARGETS)
def test_every_grid_cell_equals_its_dense_reference(grid_batch, target):
    """Every target × loss × operator × weighting × T × calibrated × softening cell the builder accepts: the
    training loss (chunked, fused — what `chorus train` runs), its CE and KD means, and the per-position divergence,
    against the float64 computation of the cell's definitions on the true teachers. The losses are K+1-bucket
    divergences by design (the pooled support plus one bucket for the rest, losses.py), so the reference computes
    exactly that partition of the dense target and the dense student; topk_renorm's target is the top-k
    renormalized by design and samples' the empirical distribution of the draws, so their references are those
    definitions computed densely. Refused cells must be exactly those check_combination refuses."""
    z, batch, manifests, pos, x = grid_batch
    prior = prior_of(len(pos.select))
    bad, compared, refused = [], 0, 0
    for cell in [c for c in CELLS if c[0] == target]:
        _, loss, operator, weighting, temperature, calibrated, softening = cell
        try:
            builder = TargetBuilder(manifests, GV, target=target, loss=loss, operator=operator, weighting=weighting,
                                    temperature=temperature, calibrated=calibrated, beta=BETA, softening=softening,
                                    warn=False)
        except ChorusError:
            refused += 1
            assert target == "samples", cell
            continue
        out = builder.build(batch, pos.select, pos.gold, prior)
        h = x.clone().requires_grad_()
        value, metrics = chunked_distill_loss(h, torch.eye(GV), pos.gold, out.pooled, loss_fn=loss, kd_weight=KD_WEIGHT,
                                              temperature=temperature, chunk_size=16)
        d = LOSSES[loss](out.pooled, F.log_softmax(x / temperature, -1)).double()
        ref_loss, ref_ce, ref_kd, ref_d = reference_cell(z, batch, pos, x, target=target, loss=loss, operator=operator,
                                                         weighting=weighting, temperature=temperature,
                                                         calibrated=calibrated, softening=softening)
        got = torch.stack([value.detach().double(), metrics["ce"].double(), metrics["kd"].double()])
        want = torch.stack([ref_loss, ref_ce, ref_kd])
        err_d = ((d - ref_d).abs() - RTOL * ref_d.abs()).max()
        err = ((got - want).abs() - RTOL * want.abs()).max()
        if float(err) > ATOL or float(err_d) > ATOL:
            bad.append(f"{cell}: loss/ce/kd {got.tolist()} vs {want.tolist()}, worst position D off by "
                       f"{float((d - ref_d).abs().max()):.3g}")
        compared += 1
    expected = sum(1 for c in CELLS if c[0] == target and _accepted(c))
    assert compared == expected and compared + refused == sum(1 for c in CELLS if c[0] == target)
    assert not bad, f"{len(bad)} of {compared} cells differ:\n" + "\n".join(bad[:10])


def _accepted(cell) -> bool:
    target, loss, operator, weighting, temperature, calibrated, _ = cell
    try:
        check_combination(target=target, loss=loss, operator=operator, weighting=weighting, temperature=temperature,
                          teacher_temperatures=TEACHER_T if calibrated else (1.0,) * 3, has_stats=(True,) * 3)
    except ChorusError:
        return False
    return True
