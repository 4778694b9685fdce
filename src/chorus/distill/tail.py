"""A teacher's tail — its mass outside the cached top-k — as the cache's exact statistics describe it.

The cache (format v2) stores, per position, the exact log tail mass log τ, the entropy, the gold token's
log-prob, and A(β) = log Σ_{i ∉ top-k} p_i^β at a grid of β (store/targets.py). A is convex in β (a
log-sum-exp of functions linear in β) with A(0) = log n (n ids outside the support) and A(1) = log τ;
softening by T needs A(1/T). Between the knots we use a cubic Hermite interpolant with three-point
(parabolic) slopes; beyond the last knot the last secant is extended. The softened target stays close to
dense softening, far closer than the even-tail guess (bounds checked by tests/trainer/test_targets.py; figures:
docs/measurements.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class Tail:
    """A(β) at knots: betas (G,) ascending and > 0, logz (N, G). Rows with an empty tail hold -inf.

    The grid ``betas`` stays on the host whatever the device of ``logz``: the interpolation reads knots
    as numbers, and reading them from an accelerator would cost a host sync per batch."""

    betas: Tensor
    logz: Tensor

    def rows(self, index) -> Tail:
        return Tail(self.betas, self.logz[index])

    def to(self, device) -> Tail:
        return Tail(self.betas, self.logz.to(device))


@dataclass
class Stats:
    """Exact per-position statistics of a teacher, decoded from its cache (all float32).

    log_tail (N,) log τ; entropy (N,) of the full distribution; gold_logp (N,) log-prob of the gold next
    token; tail_logz (N, G) A(β) at ``tail_betas`` (G,), or None when only the scalars were read."""

    log_tail: Tensor
    entropy: Tensor
    gold_logp: Tensor
    tail_logz: Tensor | None = None
    tail_betas: Tensor | None = None

    def tail(self) -> Tail | None:
        """The knots of A: the grid plus β = 1 (log τ, exact)."""
        if self.tail_logz is None or self.tail_betas is None:
            return None
        betas = torch.cat([self.tail_betas.detach().to("cpu", torch.float64), torch.ones(1, dtype=torch.float64)])
        logz = torch.cat([self.tail_logz.float(), self.log_tail[:, None].float()], dim=-1)
        order = torch.argsort(betas)
        return Tail(betas[order], logz[:, order.to(logz.device)])


def evaluate(tail: Tail, log_n: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """(A(γ), A'(γ)), each (N,), from the knots plus A(0) = log_n (N,) (log of the ids outside the support)."""
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), tail.betas.double().cpu()])  # host: no sync
    values = torch.cat([log_n[:, None].double(), tail.logz.double()], dim=-1)
    empty = ~torch.isfinite(values).all(-1)
    values = torch.where(empty[:, None], torch.zeros_like(values), values)
    h = betas[1:] - betas[:-1]  # (G,) on the host
    h_dev = h.to(values.device)
    d = (values[:, 1:] - values[:, :-1]) / h_dev  # secant slopes (N, G)
    g = float(gamma)
    if g >= float(betas[-1]):  # beyond the grid: the last secant, extended
        a = values[:, -1] + (g - float(betas[-1])) * d[:, -1]
        slope = d[:, -1]
    else:
        m = torch.empty_like(values)
        m[:, 0], m[:, -1] = d[:, 0], d[:, -1]
        m[:, 1:-1] = (h_dev[1:] * d[:, :-1] + h_dev[:-1] * d[:, 1:]) / (h_dev[:-1] + h_dev[1:])
        i = int(torch.searchsorted(betas, torch.tensor([g], dtype=betas.dtype), right=True)) - 1
        i = min(max(i, 0), len(h) - 1)
        hi = float(h[i])
        t = (g - float(betas[i])) / hi
        v0, v1, m0, m1 = values[:, i], values[:, i + 1], m[:, i] * hi, m[:, i + 1] * hi
        a = (2 * t**3 - 3 * t**2 + 1) * v0 + (t**3 - 2 * t**2 + t) * m0 + (-2 * t**3 + 3 * t**2) * v1 + (t**3 - t**2) * m1
        slope = ((6 * t**2 - 6 * t) * v0 + (3 * t**2 - 4 * t + 1) * m0 + (-6 * t**2 + 6 * t) * v1 + (3 * t**2 - 2 * t) * m1) / hi
    a = torch.where(empty, torch.full_like(a, NEG_INF), a)
    slope = torch.where(empty, torch.zeros_like(slope), slope)
    return a.float(), slope.float()


def rescale(tail: Tail, beta: float, log_z: Tensor) -> Tail:
    """The tail of q = p^β / Z: A_q(γ) = A_p(βγ) − γ log Z, so the knots move to β_g / β."""
    betas = tail.betas / beta
    return Tail(betas, tail.logz - betas.to(tail.logz)[None, :] * log_z[:, None])
