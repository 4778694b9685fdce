"""Sparse distillation losses: divergences between a cached teacher distribution and the
student's full-vocabulary log-probs, plus a chunked driver that never materializes an
(N, V) fp32 log-prob tensor beyond one chunk of positions.

Every divergence is computed over K+1 buckets: the teacher's explicit ids, plus one tail
bucket ("tail bucket": the student's mass outside the teacher's top-k, matched against the
teacher's tail mass τ). With k = V (tail 0, no id outside the support) each one equals its
dense counterpart exactly. All functions take (N, ...) tensors and return (N,) losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from chorus.distill.sparse import IGNORE_INDEX, NEG_INF, SparseDist, n_tail_ids, valid_mask
from chorus.errors import ChorusError

# Floor on the student's tail mass: below ~1e-6 the fp32 difference 1 - Σ s_i is rounding noise.
STUDENT_TAIL_FLOOR = 1e-6
# Reverse KL needs log p_tail; a zero teacher tail with student mass there is an infinite
# penalty, which we cap by flooring the teacher's tail probability.
TEACHER_TAIL_FLOOR = 1e-6

Divergence = Callable[..., Tensor]


@dataclass
class _Buckets:
    """K+1 buckets per position. log_p, log_s: (N, S+1) with -inf for absent buckets
    (padding slots, or the tail bucket where no id lies outside the support)."""

    log_p: Tensor
    log_s: Tensor
    present: Tensor  # (N, S+1) bool


def _student_log_tail(s_sup: Tensor, valid: Tensor) -> Tensor:
    """(N,) log of the student's mass outside the support, 1 - Σ_valid s_i.

    The floor passes gradients straight through: a student whose tail collapsed below the
    floor still feels the teacher's τ pulling it back up, instead of a dead clamp."""
    mass = torch.where(valid, s_sup.exp(), torch.zeros_like(s_sup)).sum(-1)
    tail = 1.0 - mass
    tail = tail + (STUDENT_TAIL_FLOOR - tail).clamp_min(0.0).detach()
    return tail.log()


@dataclass
class Gathered:
    """The student's log-probs already gathered at the target's ids, (N, S): lets the driver
    take CE and KD from one gather, so backward scatters into one (N, V) buffer, not two."""

    values: Tensor


def _support_ids(p: SparseDist) -> Tensor:
    """(N, S) the target's ids with padding slots pointed at id 0 (masked later)."""
    return torch.where(valid_mask(p), p.ids, torch.zeros_like(p.ids))


def _buckets(p: SparseDist, s_logp: Tensor | Gathered) -> _Buckets:
    """Gather the student's log-probs at the teacher's ids and add the tail bucket.
    p: (N, S) sparse target, s_logp: (N, V) fp32 student log-probs (or already Gathered)."""
    valid = valid_mask(p)
    if isinstance(s_logp, Gathered):
        s_sup = s_logp.values.float()
    else:
        if s_logp.shape != (p.n_positions, p.vocab_size):
            raise ChorusError(
                f"student log-probs have shape {tuple(s_logp.shape)}; the targets need "
                f"({p.n_positions}, {p.vocab_size}) (positions, vocabulary)"
            )
        s_sup = torch.gather(s_logp.float(), 1, _support_ids(p))
    neg_inf = torch.full_like(s_sup, NEG_INF)
    s_sup = torch.where(valid, s_sup, neg_inf)
    has_tail = n_tail_ids(p) > 0
    s_tail = torch.where(has_tail, _student_log_tail(s_sup, valid), NEG_INF)
    p_tail = torch.where(has_tail & (p.tail > 0), p.tail.clamp_min(1e-45).log(), NEG_INF)
    present = torch.cat([valid, has_tail[:, None]], dim=-1)
    log_p = torch.cat([p.logp, p_tail[:, None]], dim=-1)
    log_s = torch.cat([s_sup, s_tail[:, None]], dim=-1)
    return _Buckets(log_p, log_s, present)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """(N,) Σ_b a_b (log a_b - log b_b) over the last dim with 0·log 0 = 0.

    The double `where` keeps -inf out of both branches so backward never forms 0·inf."""
    pos = log_a > NEG_INF
    zero = torch.zeros_like(log_a)
    la = torch.where(pos, log_a, zero)
    lb = torch.where(pos, log_b, zero)
    return torch.where(pos, la.exp() * (la - lb), zero).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float, present: Tensor) -> Tensor:
    """log(w·a + (1-w)·b) per bucket, -inf for absent buckets (NaN-free backward)."""
    zero = torch.zeros_like(log_a)
    la = torch.where(present, log_a, zero)
    lb = torch.where(present, log_b, zero)
    # Where exactly one side is -inf logaddexp is well-defined; both -inf only when absent.
    mixed = torch.logaddexp(la + math.log(weight_a), lb + math.log1p(-weight_a))
    mixed = torch.where(present & ((log_a > NEG_INF) | (log_b > NEG_INF)), mixed, NEG_INF)
    return mixed


# ------------------------------------------------------------------------ divergences


def forward_kl(p: SparseDist, s_logp: Tensor) -> Tensor:
    """(N,) KL(p ‖ s) = Σ_i p_i (log p_i - log s_i) + τ (log τ - log s_tail)."""
    b = _buckets(p, s_logp)
    return _kl(b.log_p, b.log_s)


def reverse_kl(p: SparseDist, s_logp: Tensor) -> Tensor:
    """(N,) KL(s ‖ p) over the K+1 buckets. A zero teacher tail is floored at
    TEACHER_TAIL_FLOOR so student mass outside a tail-free support costs a large, finite
    penalty rather than infinity."""
    b = _buckets(p, s_logp)
    floor = math.log(TEACHER_TAIL_FLOOR)
    log_p = b.log_p.clone()
    log_p[:, -1] = torch.where(b.present[:, -1], log_p[:, -1].clamp_min(floor), NEG_INF)
    return _kl(b.log_s, log_p)


def jsd(p: SparseDist, s_logp: Tensor, beta: float = 0.5) -> Tensor:
    """(N,) generalized JSD(β) over the K+1 buckets, β weighting the teacher as in GKD
    (Agarwal et al., 2024): M = β p + (1-β) s, JSD = β KL(p‖M) + (1-β) KL(s‖M)."""
    if not 0.0 < beta < 1.0:
        raise ChorusError(f"jsd beta must lie strictly between 0 and 1, got {beta}")
    b = _buckets(p, s_logp)
    log_m = _log_mix(b.log_p, b.log_s, beta, b.present)
    return beta * _kl(b.log_p, log_m) + (1.0 - beta) * _kl(b.log_s, log_m)


def skew_kl(p: SparseDist, s_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """(N,) skew forward KL, KL(p ‖ α p + (1-α) s), over the K+1 buckets (DistiLLM, Ko et
    al., 2024): mixing a little of p into the student keeps the loss and its gradient
    bounded where the student puts almost no mass."""
    if not 0.0 < alpha < 1.0:
        raise ChorusError(f"skew_kl alpha must lie strictly between 0 and 1, got {alpha}")
    b = _buckets(p, s_logp)
    return _kl(b.log_p, _log_mix(b.log_p, b.log_s, alpha, b.present))


def cross_entropy(s_logp: Tensor, gold: Tensor) -> Tensor:
    """(N,) hard-label cross-entropy -log s(gold). gold (N,) long; IGNORE_INDEX (-100)
    positions give 0 (the caller's mask drops them)."""
    ignore = gold == IGNORE_INDEX
    safe = torch.where(ignore, torch.zeros_like(gold), gold).long()
    nll = -torch.gather(s_logp.float(), 1, safe[:, None])[:, 0]
    return torch.where(ignore, torch.zeros_like(nll), nll)


LOSSES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
}


def get_loss(name: str) -> Divergence:
    """The divergence registered under ``name``."""
    if name not in LOSSES:
        raise ChorusError(f"unknown loss {name!r}; expected one of: {', '.join(LOSSES)}")
    return LOSSES[name]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Scalar mean of values (N,) over mask (N,) bool; 0 when the mask is empty.
    Masked-out entries never leak (even inf/NaN ones)."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


# --------------------------------------------------------------------- distill drivers


def _resolve(loss_fn: Divergence | str) -> Divergence:
    return get_loss(loss_fn) if isinstance(loss_fn, str) else loss_fn


def _support_index(gold: Tensor, targets: SparseDist | None) -> Tensor:
    """(N, 1 + S) int64 ids where the T = 1 losses read the student: the gold token (id 0 where ignored), then the
    target's support."""
    g = torch.where(gold == IGNORE_INDEX, torch.zeros_like(gold), gold)[:, None].long()
    return g if targets is None else torch.cat([g, _support_ids(targets)], 1)


def _support_losses(picked: Tensor, gold: Tensor, targets: SparseDist | None, loss_fn: Divergence,
                    divergence_kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(N,) CE and (N,) KD at T = 1 from the student's log-probs ``picked`` at :func:`_support_index`: all the
    T = 1 losses read of the (N, V) log-probs."""
    ce = torch.where(gold == IGNORE_INDEX, torch.zeros_like(picked[:, 0]), -picked[:, 0])
    if targets is None:
        return ce, torch.zeros_like(ce)
    return ce, loss_fn(targets, Gathered(picked[:, 1:]), **divergence_kwargs)


def _per_position(
    logits: Tensor,
    gold: Tensor,
    targets: SparseDist | None,
    loss_fn: Divergence,
    temperature: float,
    divergence_kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor]:
    """(N,) CE and (N,) KD for one block of logits (N, V) of any dtype; fp32 inside."""
    logits = logits.float()
    log_s1 = F.log_softmax(logits, dim=-1)
    if targets is None:
        return cross_entropy(log_s1, gold), torch.zeros(gold.shape, device=logits.device)
    if temperature == 1.0:  # one gather for gold and support: a single (N, V) scatter in backward
        return _support_losses(torch.gather(log_s1, 1, _support_index(gold, targets)), gold, targets, loss_fn,
                               divergence_kwargs)
    ce = cross_entropy(log_s1, gold)
    s_logp = F.log_softmax(logits / temperature, dim=-1)
    # The targets come softened by T (targets.TargetBuilder, exactly, from the cached statistics);
    # T² keeps the KD gradient scale independent of T (Hinton et al., 2015).
    kd = loss_fn(targets, s_logp, **divergence_kwargs) * temperature**2
    return ce, kd


def _combine(
    ce: Tensor, kd: Tensor, gold: Tensor, kd_weight: float, has_targets: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """The masked mean of (1-w)·CE + w·KD, and the detached means of CE and KD as 0-d tensors (turning
    them into numbers is the caller's choice: a host sync, which a training step makes only on log steps)."""
    mask = gold != IGNORE_INDEX
    w = kd_weight if has_targets else 0.0
    # a term of weight 0 is left out, not multiplied by 0: an infinite CE (the gold's student logit −inf) is a
    # valid state of pure KD, and 0·inf would be NaN
    loss = masked_mean(kd if w == 1.0 else ce if w == 0.0 else (1.0 - w) * ce + w * kd, mask)
    metrics = {"ce": masked_mean(ce.detach(), mask), "kd": masked_mean(kd.detach(), mask)}
    return loss, metrics


def _check_weight(kd_weight: float) -> None:
    if not 0.0 <= kd_weight <= 1.0:
        raise ChorusError(f"kd_weight must lie in [0, 1], got {kd_weight}")


def distill_loss_from_logits(
    logits: Tensor,
    gold: Tensor,
    targets: SparseDist | None,
    *,
    loss_fn: Divergence | str,
    kd_weight: float,
    temperature: float = 1.0,
    divergence_kwargs: dict[str, Any] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Unchunked reference: logits (N, V), gold (N,) with -100 = ignore, targets over N
    positions or None (pure CE), already at temperature T (the target builder softens the teachers).
    Per position (1-w)·CE + w·T²·D(p_T, s_T), s_T = softmax(logits / T);
    returns the masked mean and detached {"ce", "kd"} means (0-d tensors)."""
    _check_weight(kd_weight)
    ce, kd = _per_position(
        logits, gold, targets, _resolve(loss_fn), temperature, divergence_kwargs or {}
    )
    return _combine(ce, kd, gold, kd_weight, targets is not None)


def _chunk_loss(ce: Tensor, kd: Tensor, mask: Tensor, w_kd: float, denom: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's masked (N,) CE and KD (masked entries never leak, even inf/NaN ones) and its share of the loss,
    ((1 − w)·ΣCE + w·ΣKD) / denom."""
    zero = torch.zeros_like(ce)
    ce, kd = torch.where(mask, ce, zero), torch.where(mask, kd, zero)
    return ce, kd, ((1.0 - w_kd) * ce + w_kd * kd).sum() / denom


def _logit_gradient(h: Tensor, weight: Tensor, bias: Tensor | None, gold: Tensor, targets: SparseDist | None,
                    fn: Divergence, kwargs: dict, mask: Tensor, w_kd: float,
                    denom: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of :class:`_FusedHeadLoss` at T = 1: the chunk's (N, V) logits ``F.linear(h, weight, bias)``, then
    (N,) masked CE and KD and the fp32 gradient of their share of the loss w.r.t. the logits. The T = 1 losses read
    the log-probs only at :func:`_support_index` (``picked``), so with g = ∂loss/∂picked (autograd over (N, 1 + S)
    values) and log s = z − logsumexp(z): ∂loss/∂z = scatter(g) − softmax(z)·Σg, written into the log-probs in
    place: one fp32 (N, V) buffer and four passes over it, where autograd keeps the log-probs, a scatter target and
    their gradient (on a CPU faster than HF's full-logits step, on a GPU as fast as autograd's, with less memory:
    docs/measurements.md)."""
    logits = F.linear(h, weight, bias)
    log_s = torch.log_softmax(logits, -1, dtype=torch.float32)  # one fused kernel, straight from the model's dtype
    del logits
    idx = _support_index(gold, targets)
    picked = log_s.gather(-1, idx).requires_grad_()
    with torch.enable_grad():
        ce, kd, chunk = _chunk_loss(*_support_losses(picked, gold, targets, fn, kwargs), mask, w_kd, denom)
        (g,) = torch.autograd.grad(chunk, picked)
    log_s.exp_().mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, idx, g)
    return ce.detach(), kd.detach(), log_s


class _FusedHeadLoss(torch.autograd.Function):
    """The chunked loss with its backward done in forward, chunk by chunk ("fused linear cross-entropy",
    as in Liger-Kernel / Cut Cross-Entropy, here in pure torch for every divergence): each chunk's logits
    are computed once, its loss and its gradients w.r.t. the chunk's hidden states and the head are taken
    at once, and the chunk's (chunk, V) tensors are freed. Backward only scales the stored gradients.
    Three matmuls per chunk (logits, dH, dW) against four with activation checkpointing (which recomputes
    the logits in backward), and peak memory one chunk's (chunk, V) fp32 plus the gradient buffers
    (the size of the hidden states and of the head). At T = 1 (every loss there reads the log-probs at the gold and
    support ids only) the gradient w.r.t. the logits is taken in closed form (:func:`_logit_gradient`); at other
    temperatures by autograd over the chunk.

    Outputs the loss and the detached CE and KD means; inputs as :func:`chunked_distill_loss`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, gold, targets, fn, temperature, kwargs, kd_weight, chunk_size):  # noqa: D401
        mask = gold != IGNORE_INDEX
        denom = mask.sum().clamp_min(1).to(torch.float32)
        w_kd = kd_weight if targets is not None else 0.0
        wants = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        grad_h = torch.zeros_like(hidden) if wants[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants[2] else None
        ce_sum = torch.zeros((), device=hidden.device)
        kd_sum = torch.zeros((), device=hidden.device)
        w_in = weight.detach().requires_grad_(wants[1])
        b_in = bias.detach().requires_grad_(wants[2]) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            tgt = targets.rows(sl) if targets is not None else None
            if temperature == 1.0:  # the gradient w.r.t. the logits in closed form, then the head's two matmuls
                h = hidden[sl]  # (forward runs without autograd: nothing to detach)
                ce, kd, g = _logit_gradient(h, weight, bias, gold[sl], tgt, fn, kwargs, mask[sl], w_kd, denom)
                g = g.to(weight.dtype)
                if wants[0]:
                    grad_h[sl] = (g @ weight).to(hidden.dtype)
                if wants[1]:
                    grad_w += (g.t() @ h.to(weight.dtype)).float()
                if wants[2]:
                    grad_b += g.sum(0).float()
            else:
                with torch.enable_grad():
                    h = hidden[sl].detach().requires_grad_(wants[0])
                    ce, kd, chunk = _chunk_loss(*_per_position(F.linear(h, w_in, b_in), gold[sl], tgt, fn,
                                                               temperature, kwargs), mask[sl], w_kd, denom)
                    leaves = [x for x, want in zip((h, w_in, b_in), wants) if want]
                    grads = iter(torch.autograd.grad(chunk, leaves)) if leaves else iter(())
                if wants[0]:
                    grad_h[sl] = next(grads)
                if wants[1]:
                    grad_w += next(grads)
                if wants[2]:
                    grad_b += next(grads)
            ce_sum += ce.detach().sum()
            kd_sum += kd.detach().sum()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        loss = ((1.0 - w_kd) * ce_sum + w_kd * kd_sum) / denom
        ce_mean, kd_mean = ce_sum / denom, kd_sum / denom
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return loss, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kd):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        out_h = grad_h * g_loss.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * g_loss).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * g_loss).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None, None, None


CPU_LOSS_CHUNK = 1024
GPU_LOSS_CHUNK_BYTES, GPU_LOSS_CHUNK_MAX = 2 << 30, 4096


def loss_chunk_size(vocab_size: int, device: torch.device, chunk_size: int | None = None, *,
                    closed_form: bool = True) -> int:
    """Positions per chunk of :func:`chunked_distill_loss`: ``chunk_size``, else 1024 on a CPU and on a GPU, for the
    fused path at T = 1 (``closed_form``: one fp32 (chunk, V) buffer), as many as one such buffer of 2 GiB holds,
    at most 4096 (every chunk is a dozen kernel launches from Python, which 1024-position chunks did not hide:
    docs/measurements.md). Other paths keep several (chunk, V) buffers through autograd: 1024."""
    if chunk_size is not None:
        return chunk_size
    if device.type == "cpu" or not closed_form:
        return CPU_LOSS_CHUNK
    return max(CPU_LOSS_CHUNK, min(GPU_LOSS_CHUNK_MAX, GPU_LOSS_CHUNK_BYTES // (4 * vocab_size) // 64 * 64))


def chunked_distill_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    gold: Tensor,
    targets: SparseDist | None,
    *,
    loss_fn: Divergence | str,
    kd_weight: float,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    lm_head_bias: Tensor | None = None,
    divergence_kwargs: dict[str, Any] | None = None,
    fused: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Same math as :func:`distill_loss_from_logits`, from hidden states (N, H) and the LM
    head (V, H) (+ bias (V,)), chunk_size positions at a time (None: :func:`loss_chunk_size`): an (N, V) fp32
    tensor never exists.

    With gradients wanted, the default ``fused=True`` takes each chunk's gradients in forward
    (:class:`_FusedHeadLoss`: the logits are computed once); ``fused=False`` runs each chunk under
    activation checkpointing instead (the logits are recomputed in backward: the reference path)."""
    _check_weight(kd_weight)
    wants_grad = hidden.requires_grad or lm_head_weight.requires_grad or (lm_head_bias is not None and lm_head_bias.requires_grad)
    closed_form = fused and torch.is_grad_enabled() and wants_grad and temperature == 1.0
    chunk_size = loss_chunk_size(lm_head_weight.shape[0], hidden.device, chunk_size, closed_form=closed_form)
    if chunk_size < 1:
        raise ChorusError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        raise ChorusError("chunked_distill_loss got zero positions")
    fn = _resolve(loss_fn)
    kwargs = divergence_kwargs or {}
    if fused and torch.is_grad_enabled() and wants_grad:
        loss, ce, kd = _FusedHeadLoss.apply(hidden, lm_head_weight, lm_head_bias, gold, targets, fn, temperature,
                                            kwargs, kd_weight, chunk_size)
        return loss, {"ce": ce, "kd": kd}

    def chunk_losses(h: Tensor, g: Tensor, tgt: SparseDist | None) -> tuple[Tensor, Tensor]:
        logits = F.linear(h, lm_head_weight, lm_head_bias)
        return _per_position(logits, g, tgt, fn, temperature, kwargs)

    ces, kds = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        tgt = targets.rows(sl) if targets is not None else None
        if torch.is_grad_enabled():
            ce, kd = checkpoint(chunk_losses, hidden[sl], gold[sl], tgt, use_reentrant=False)
        else:
            ce, kd = chunk_losses(hidden[sl], gold[sl], tgt)
        ces.append(ce)
        kds.append(kd)
    if not ces:
        raise ChorusError("chunked_distill_loss got zero positions")
    return _combine(torch.cat(ces), torch.cat(kds), gold, kd_weight, targets is not None)
