"""The softening family: operators that flatten (T > 1) or sharpen (T < 1) a sparse teacher distribution.

Every operator here satisfies, for a distribution p over V ids and a parameter T ∈ (0, ∞)
(tests/trainer/test_softening.py checks each property):
identity (T = 1 returns p), ranking preservation (p_i > p_j ⇒ q_i > q_j, ties stay ties), continuity in T,
entropy non-decreasing in T, the argmax as T → 0 and a uniform distribution as T → ∞.

- ``power`` (:func:`chorus.distill.sparse.soften`): q ∝ p^{1/T}, Hinton's temperature; exact for a cached
  tail through its curve A(β). As T → ∞ it tends to the uniform distribution over ids of positive mass, and it
  multiplies ratios: at T = 2 a tail of many tiny probabilities can become most of the mass.
- ``linear``: the straight path argmax ← p → uniform. T ≥ 1: q = p/T + (1 − 1/T)·u, u uniform over all V ids
  (label smoothing of the teacher, Szegedy et al. 2016; it moves mass additively, so the tail gains exactly
  (1 − 1/T)·n_tail/V whatever its shape). T < 1: q = T·p + (1 − T)·δ, δ uniform over the ids of largest
  probability. Entropy is concave along each segment, maximal at u and zero at δ (when one id is largest),
  with slope H(p) + log max p ≥ 0 at p on the sharpening side, so it rises with T on both.

What is exact on the sparse representation (support + tail bucket): for ``linear`` every explicit entry and
the tail mass, so the K+1-bucket losses see exactly the dense operator's target. For T < 1 the tail is
scaled by T, so its curve is exact too (A_q(β) = A_p(β) + β log T) and so is the entropy through it. For
T > 1 the tail's shape after mixing is not a function of the cached curve: the result drops the curve and
its tail follows the even-tail convention (mixing toward uniform makes the tail more even, never less);
the gold token's probability stays exact. Continuity in p holds for ``power`` and for ``linear`` at T ≥ 1;
for T < 1 the argmax set jumps where two top ids tie, as any argmax limit must.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from chorus.distill.sparse import NEG_INF, SparseDist, log_tail_share, n_tail_ids, soften, valid_mask
from chorus.distill.tail import Tail
from chorus.errors import ChorusError


def _check(t: float) -> float:
    t = float(t)
    if not (t > 0 and math.isfinite(t)):
        raise ChorusError(f"temperature must be a positive finite number, got {t}")
    return t


def linear(dist: SparseDist, temperature: float) -> SparseDist:
    """The linear softening of ``dist`` (N positions) at ``temperature``: toward uniform over the V ids for
    T > 1, toward the argmax for T < 1 (see the module docstring for what is exact)."""
    t = _check(temperature)
    if t == 1.0:
        return dist
    valid = valid_mask(dist)
    v = dist.vocab_size
    if t > 1.0:
        lam = 1.0 - 1.0 / t
        n_tail = n_tail_ids(dist).to(torch.float32)
        logp = torch.where(valid, torch.logaddexp(dist.logp + math.log(1 - lam),
                                                  torch.full_like(dist.logp, math.log(lam / v))), NEG_INF)
        tail = dist.tail * (1 - lam) + lam * n_tail / v
        gold = None if dist.gold_logp is None else torch.logaddexp(dist.gold_logp + math.log(1 - lam),
                                                                   torch.full_like(dist.gold_logp, math.log(lam / v)))
        return SparseDist(dist.ids, logp, tail, v, None, None, gold)
    # T < 1: mass 1 − T moves onto the largest ids, shared evenly among ties. Under the even-tail
    # convention the tail ids tie with the top when their share equals it (an all-tail row: every tail id).
    top = torch.where(valid, dist.logp, NEG_INF).max(-1, keepdim=True).values
    is_top = valid & (dist.logp == top)
    share_log = log_tail_share(dist)
    n_tail = n_tail_ids(dist).to(torch.float32)
    tail_top = (share_log > NEG_INF) & (share_log >= top[:, 0]) if dist.tail_fn is None else torch.zeros_like(dist.tail, dtype=torch.bool)
    count = is_top.sum(-1).to(torch.float32) + torch.where(tail_top, n_tail, 0.0)
    has = count > 0  # rows with a cached tail and no explicit entry keep their distribution
    share = ((1 - t) / count.clamp_min(1))[:, None]
    p = dist.logp.exp() * t + torch.where(is_top, share, 0.0)
    logp = torch.where(valid, torch.where(has[:, None], p.log(), dist.logp), NEG_INF)
    scale = torch.where(has, t, 1.0)
    tail = dist.tail * scale + torch.where(tail_top, share[:, 0] * n_tail, 0.0)
    tail_fn = None
    if dist.tail_fn is not None:  # every tail id is scaled by the same factor: A_q(β) = A_p(β) + β log(scale)
        tail_fn = Tail(dist.tail_fn.betas, dist.tail_fn.logz + dist.tail_fn.betas.to(scale)[None, :] * scale.log()[:, None])
    gold = None
    if dist.gold_logp is not None:  # exact too: the gold gains the top's share when it is a top id (its value is the
        # top's, up to the fp16 rounding of a stored value)
        at_top = has & ((dist.gold_logp - top[:, 0]).abs() <= 2.0 ** -10 * top[:, 0].abs().clamp_min(1.0))
        gold = (dist.gold_logp.exp() * scale + torch.where(at_top, share[:, 0], 0.0)).log()
    return SparseDist(dist.ids, logp, tail, v, tail_fn, None, gold)


SOFTENINGS: dict[str, Callable[[SparseDist, float], SparseDist]] = {"power": soften, "linear": linear}


def get_softening(name: str) -> Callable[[SparseDist, float], SparseDist]:
    if name not in SOFTENINGS:
        raise ChorusError(f"unknown softening '{name}'; expected one of: {', '.join(SOFTENINGS)}")
    return SOFTENINGS[name]
