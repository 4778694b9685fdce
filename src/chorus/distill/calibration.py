"""Per-teacher calibration: a post-hoc temperature fitted on held-out gold tokens, and the
expected calibration error used to report it.

Temperature scaling (Guo et al., 2017) applied in the probability domain to the cached
sparse distribution, so that a careful teacher is not drowned out by an overconfident one
when teachers are pooled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from chorus.distill.sparse import IGNORE_INDEX, SparseDist, gold_log_prob, soften
from chorus.errors import ChorusError

DEFAULT_POSITIONS = 1 << 20  # held-out positions calibrate and blend fit on without --max-rows
# Probability floor for the gold token: a zero-tail teacher that misses the gold would
# otherwise make the NLL infinite for every T.
PROB_FLOOR = 1e-12
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_ITERATIONS = 80  # bracket shrinks by 0.618^80 ≈ 2e-17: far below fp32 resolution


def _gold_nll_fn(dist: SparseDist, gold: Tensor):
    """A function T -> mean gold NLL under soften(dist, T): exact from the cached statistics (gold
    log-prob and tail curve) when the distribution has them, else under the even-tail guess."""
    keep = gold != IGNORE_INDEX
    if not bool(keep.any()):
        raise ChorusError("fit_temperature needs at least one position with a gold token (not -100)")
    d = dist.rows(keep)
    g = gold[keep].long()
    floor = math.log(PROB_FLOOR)

    def nll(t: float) -> float:
        return float(-gold_log_prob(soften(d, t), g).clamp_min(floor).double().mean())

    return nll


def fit_temperature(
    dist: SparseDist, gold: Tensor, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The T in ``bounds`` minimizing the mean gold-token NLL under soften(dist, T).

    dist over N positions, gold (N,) long (-100 = ignored). With β = 1/T the NLL is
    log Σ_i p_i^β - β log p_gold, convex in β, hence unimodal in log T: a golden-section
    search on log T finds the minimum deterministically. The sum over the tail is the cached
    A(β) (exact at the grid, interpolated between), so the fit finds the *real* temperature."""
    lo, hi = (float(b) for b in bounds)
    if not 0.0 < lo < hi:
        raise ChorusError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    nll = _gold_nll_fn(dist, gold)
    a, b = math.log(lo), math.log(hi)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = nll(math.exp(c)), nll(math.exp(d))
    for _ in range(_ITERATIONS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = nll(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = nll(math.exp(d))
    return math.exp((a + b) / 2.0)


def top1_confidence(dist: SparseDist, gold: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) probability of the explicit argmax and (N,) bool whether it is the gold token,
    the inputs of :func:`expected_calibration_error`."""
    idx = dist.logp.argmax(-1, keepdim=True)
    conf = torch.gather(dist.logp, 1, idx)[:, 0].exp()
    pred = torch.gather(dist.ids, 1, idx)[:, 0]
    return conf, pred == gold


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> float:
    """Standard ECE (Guo et al., 2017): equal-width confidence bins (lo, hi] over [0, 1],
    Σ_b (n_b / N) · |accuracy_b - mean confidence_b|. confidence (N,) in [0, 1], correct (N,) bool."""
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ChorusError(
            f"confidence and correct must both be (N,); got {tuple(confidence.shape)} and {tuple(correct.shape)}"
        )
    if confidence.numel() == 0:
        raise ChorusError("expected_calibration_error needs at least one position")
    if n_bins < 1:
        raise ChorusError(f"n_bins must be >= 1, got {n_bins}")
    conf = confidence.double().clamp(0.0, 1.0)
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct.double(), minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / conf.numel())
