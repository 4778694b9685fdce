"""The per-position target math, pure torch and row-wise over the vocabulary: top-k log-probs, sampled ids and the
exact statistics of format v2, for N positions at a time.

``position_targets`` works on fp32 log-probs (the reference, and the CPU pass, whose slabs stay in cache).
``logit_targets`` gives the same targets straight from the logits in the model's dtype — block maxima and sums, a
top-k among the best blocks, then ``logit_statistics``, reductions only (the log-partition, the top-k log-probs,
every tail sum), which ``torch.compile`` fuses — the GPU pass, where every eager op is a trip through memory. On a
CPU eager it is slower than ``position_targets``; compiled, with the statistics' exps as one exp and powers
(:func:`chain_powers`) and its sums in blocks (:func:`chain_statistics`), it is the CPU's ``--compile`` pass, faster
than ``position_targets`` compiled or eager (docs/measurements.md).
``compiled_targets`` runs a function through ``torch.compile``, falling back to it eager.
"""

from __future__ import annotations

import fractions
import functools
import math
from collections.abc import Sequence

import torch

from chorus.progress import say
from chorus.teacher.sampler import SAMPLE_BLOCK, block_stats, draw_ids, draw_ids_blocked, scale_block_sums


def _tail_sums(y: torch.Tensor, betas: Sequence[float]) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """(L, V) shifted tail log-probs y ≤ 0 → ({β: Σ_i exp(β·y_i)} (L,) for β = 1 and each of ``betas``, Σ_i exp(y_i)·y_i).

    The exps dominate the cost (and every op is a pass over (L, V) on a GPU), so one e = exp(r·y) serves a chain:
    Σ e² gives β = 2r, and up to two square roots give r/2 and r/4 — the default grid needs 3 exps for 7 sums.
    Two roots at most: a term that underflowed to 0 in fp32 (r·y < −103) would have been ≤ e^−26 ≈ 6e−12 of the
    largest term (1) at r/4, and well below at r/2; deeper chains would lose real mass."""
    todo = sorted({1.0, *betas}, reverse=True)
    sums: dict[float, torch.Tensor] = {}
    moment = torch.zeros(y.shape[:-1], device=y.device)

    def wanted(b: float) -> float | None:
        return next((t for t in todo if math.isclose(t, b, rel_tol=1e-9)), None)

    while todo:
        top = todo[0]
        root = wanted(top / 2) or top  # if β/2 is wanted too, β comes from its squares
        e = torch.exp(y) if root == 1.0 else torch.mul(y, root).exp_()  # (×1 is exact: one pass saved)
        if root != top:
            sums[top] = torch.linalg.vecdot(e, e)
            todo.remove(top)
        beta = root
        for depth in range(3):
            sums[beta] = e.sum(-1)
            todo.remove(beta)
            if beta == 1.0:
                moment = torch.linalg.vecdot(e, y)
            half = wanted(beta / 2)
            if half is None or depth == 2:
                break
            e.sqrt_()
            beta = half
        del e
    return sums, moment


def tail_statistics(logp: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, next_ids: torch.Tensor,
                    tail_betas: Sequence[float], last: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(N, V) fp32 log-probs, their (N, k) top-k ids and log-probs and (N,) next-token ids → exact per-position
    statistics on the device: ``log_tail``, ``entropy``, ``gold_logprob`` (N,), ``tail_logz`` (N, G).

    ``next_ids[t]`` is the row's token t + 1; ``last`` (N,) bool marks the positions that end a row (any next id,
    gold log-prob 0); None: the N positions are one row, whose last position is the end.
    log τ is a log-sum-exp over the tail ids, not log(1 − Σ_k p): that difference cancels catastrophically
    when the top-k hold nearly all the mass. Sums over the tail are taken relative to its largest log-prob m,
    so no exp under- or overflows: Σ_tail p^β = e^{β·m}·Σ exp(β·y), y = logp − m. The entropy (0·log 0 = 0) is
    the top-k's −Σ p log p plus the tail's −e^m·(m·Σ e^y + Σ e^y·y). Overwrites ``logp``; memory stays at two
    (N, V) fp32 tensors. Every op is row-wise, so a position's statistics do not depend on N."""
    gold = logp.gather(-1, next_ids[:, None])[:, 0]
    if last is None:
        gold[-1] = 0.0
    else:
        gold.masked_fill_(last, 0.0)
    y = logp.scatter_(-1, topk_ids, float("-inf"))
    m = y.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an empty tail: every sum is 0, every A is −inf
    y = y.sub_(m).clamp_(min=torch.finfo(torch.float32).min)  # −inf → lowest float: exp → 0 and 0·y = 0 (0·−inf is NaN)
    m = m[:, 0]
    sums, moment = _tail_sums(y, tail_betas)
    head = -(torch.exp(topk_logprobs) * topk_logprobs).nan_to_num_(nan=0.0).sum(-1)
    entropy = head - torch.exp(m) * (m * sums[1.0] + moment)
    betas = torch.tensor(tail_betas, dtype=torch.float32, device=y.device)
    a = torch.log(torch.stack([sums[b] for b in tail_betas], -1)).add_(m[:, None] * betas)  # A(β) = log Σ_tail p^β
    return {"log_tail": m + torch.log(sums[1.0]), "entropy": entropy, "gold_logprob": gold, "tail_logz": a}


def position_targets(logp: torch.Tensor, next_ids: torch.Tensor, last: torch.Tensor, uniforms: torch.Tensor | None, *,
                     top_k: int, tail_betas: Sequence[float]) -> dict[str, torch.Tensor]:
    """(N, V) fp32 log-probs of N positions (any rows), their (N,) next ids, (N,) row-end mask and (N, M) uniforms →
    ``topk_ids`` (N, k) int64 by descending log-prob, ``topk_logprobs`` (N, k), ``draws`` (N, M) int64 when
    ``uniforms`` is given, and the :func:`tail_statistics` when ``tail_betas`` is non-empty. Overwrites ``logp``.

    Every op is row-wise over V, so a position's targets do not depend on which positions share the call."""
    v, i = torch.topk(logp, top_k, dim=-1, sorted=True)
    out = {"topk_ids": i, "topk_logprobs": v}
    if uniforms is not None:
        out["draws"] = draw_ids(logp, uniforms)
    if tail_betas:
        out.update(tail_statistics(logp, i, v, next_ids, tail_betas, last))  # last: it overwrites logp
    return out


class _CompiledTargets:
    """:func:`position_targets` (or :func:`logit_statistics`, :func:`block_stats`) through ``torch.compile``.
    position_targets: inductor fuses its ~15 passes over V, faster on a CPU (docs/measurements.md); ids and top-k
    log-probs are the same bits, the statistics' sums reordered (within ~1e-6 relative, below their fp16 storage).
    logit_statistics and block_stats on a GPU: one kernel each instead of ~25 passes (the default there). One
    compile per slab shape (slow: docs/measurements.md); the first failure (no C++ compiler, no
    triton) falls back to the eager function, with a warning. Not what is compiled: top-k and scans (inductor 2.11
    failed to generate code for a cumsum fused with these reductions)."""

    def __init__(self, fn=None) -> None:
        self.eager = fn or position_targets
        self.fn = torch.compile(self.eager, dynamic=False)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any backend failure: compute the same targets without it
                self.failed = True

                say(f"warning: --compile failed ({(str(e).splitlines() or [type(e).__name__])[0]}); computing the "
                    "targets without it")
        return self.eager(*args, **kwargs)


@functools.cache
def compiled_targets(fn=None) -> _CompiledTargets:
    """The compiled :func:`position_targets`, or ``fn`` (:func:`logit_statistics`, :func:`block_stats`) compiled; one
    per function and process."""
    return _CompiledTargets(fn)


def logit_targets(z: torch.Tensor, next_ids: torch.Tensor, last: torch.Tensor, uniforms: torch.Tensor | None, *,
                  top_k: int, tail_betas: Sequence[float], statistics=None, blocks=None) -> dict[str, torch.Tensor]:
    """(N, V) logits in the model's dtype (its logit ops applied) → the targets of :func:`position_targets` of
    their fp32 log-softmax, equal up to fp32 rounding (the log-partition is summed in another order), without
    fp32 log-probs over V, in two passes over the logits:

    - :func:`block_stats` (``blocks``: it, or it compiled): the maxima of blocks of SAMPLE_BLOCK ids and, with
      ``uniforms``, their sums of exponentials;
    - top-(k+1) among the k+1 blocks with the largest maxima (:func:`block_topk`: ~3 % of V at V = 128k), in the
      logits' own dtype (the order is that of the log-probs, since z ↦ float(z) − log Z is increasing);
    - :func:`logit_statistics` (``statistics``: it, or it compiled — reductions only, no top-k and no scan, so
      ``torch.compile`` fuses them into one pass);
    - with ``uniforms``, inverse-CDF draws in two levels (:func:`draw_ids_blocked`: the blocks from their sums, then
      inside the M chosen blocks), not a scan over V.

    Row-wise like :func:`position_targets`: a position's targets do not depend on which positions share the call."""
    vocab = z.shape[-1]
    if vocab <= top_k or not tail_betas:  # no tail, or no statistics to fuse the log-partition into
        return position_targets(torch.log_softmax(z.float(), dim=-1), next_ids, last, uniforms, top_k=top_k,
                                tail_betas=tail_betas)
    reduced = (blocks or block_stats)(z, SAMPLE_BLOCK, sums=uniforms is not None)
    v, i = block_topk(z, reduced[0], top_k + 1)
    out = (statistics or logit_statistics)(z, v, next_ids, last, tail_betas=tail_betas)
    out["topk_ids"] = i[:, :top_k]
    if uniforms is not None:
        m = v[:, :1].float()
        out["draws"] = draw_ids_blocked(z, m, uniforms, scale_block_sums(reduced[0], reduced[1], m))
    return out


CPU_REDUCE_BLOCK = 4096  # inductor's CPU sums over more than this many elements use a (slower) cascade helper


def chain_statistics(*args, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`logit_statistics` as a CPU runs it: ``chain`` (one exp and powers), sums in blocks of CPU_REDUCE_BLOCK
    (a function of its own for :func:`compiled_targets`)."""
    return logit_statistics(*args, chain=True, block=CPU_REDUCE_BLOCK, **kwargs)


CHAIN_MAX_POWER = 192  # the largest power of the chain's base (its relative error: about this many fp32 roundings)


_PLANS: dict[tuple, tuple[int, dict[float, int]]] = {}  # power_plan's (a dict, not functools.cache: dynamo
# traces through either, and warns at a cache wrapper)


def power_plan(betas: tuple[float, ...], max_power: int = CHAIN_MAX_POWER) -> tuple[int, dict[float, int]]:
    """(d, {β: n}): the β of ``betas`` that are n/d with n ≤ ``max_power``, for the d ≤ ``max_power`` that covers
    most of them (the smallest such d). The default grid (1/4, 1/3, 1/2, 2/3, 1, 1/0.7, 2) is every n/84."""
    if (betas, max_power) in _PLANS:
        return _PLANS[betas, max_power]
    exact = {b: fractions.Fraction(b).limit_denominator(max_power) for b in betas}
    exact = {b: f for b, f in exact.items() if f > 0 and math.isclose(float(f), b, rel_tol=1e-12, abs_tol=0.0)}
    best: tuple[int, dict[float, int]] = (1, {})
    for d in range(1, max_power + 1):
        plan = {b: int(f * d) for b, f in exact.items() if (f * d).denominator == 1 and f * d <= max_power}
        if len(plan) > len(best[1]):
            best = (d, plan)
    _PLANS[betas, max_power] = best
    return best


def chain_powers(y: torch.Tensor, betas: Sequence[float]) -> dict[float, torch.Tensor]:
    """(N, V) y ≤ 0 → {β: exp(β·y)} for each of ``betas``: b = exp(y / d) once and each β = n/d of
    :func:`power_plan` as bⁿ by repeated squaring; a β the plan misses, its own exp. bⁿ carries n·(b's rounding)
    plus a rounding per product: ≤ ~2·10⁻⁵ relative at n = 168, less on real logits (docs/measurements.md);
    bⁿ underflows where e^(β·y) does. Eager, it holds ~log₂ n (N, V) powers at once."""
    d, plan = power_plan(tuple(sorted(set(betas))))
    memo: dict[int, torch.Tensor] = {}

    def power(n: int) -> torch.Tensor:
        if n not in memo:
            memo[n] = torch.exp(y / d) if n == 1 else power(n // 2) * power(n // 2) if n % 2 == 0 else power(n - 1) * power(1)
        return memo[n]

    return {b: power(plan[b]) if b in plan else torch.mul(y, b).exp_() for b in betas}


def exp_sums(y: torch.Tensor, betas: Sequence[float], chain: bool = False) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """(N, V) y ≤ 0 → ({β: Σ exp(β·y)} (N,) for β = 1 and each of ``betas``, Σ e^y·y).

    Without ``chain``: e = exp(y) gives β = 1, β = 2 (e·e) and the moment, every other β its own exp(β·y), summed
    and dropped one by one (faster on a GPU than roots and powers of e^y). With ``chain`` (a CPU, where a
    compiled pass over V is compute-bound and the exps are its cost): :func:`chain_powers` — the default grid in one
    exp, faster compiled (docs/measurements.md)."""
    betas = sorted({1.0, *betas})
    if chain:
        powers = chain_powers(y, betas)
        return {b: t.sum(-1) for b, t in powers.items()}, (powers[1.0] * y).sum(-1)
    e = torch.exp(y)
    sums = {b: (e if b == 1.0 else e * e if b == 2.0 else torch.mul(y, b).exp_()).sum(-1) for b in betas}
    return sums, (e * y).sum(-1)


def block_topk(z: torch.Tensor, maxima: torch.Tensor, k: int, block: int = SAMPLE_BLOCK) -> tuple[torch.Tensor, ...]:
    """(N, V) logits and their :func:`block_stats` maxima → ``torch.topk(z, k)`` (values, int64 ids; descending)
    taken among the k full blocks with the largest maxima and the short last block: every one of the k largest
    logits lies there (a logit in any other block has k blocks' maxima, k other logits, at or above it), so the
    values are topk's and the ids too but among exact ties. A top-k over ~k·block + V/block entries, not over V
    (on a GPU a top-k over V costs as much as the rest of the pass: docs/measurements.md)."""
    n, vocab = z.shape
    full = vocab // block
    if full < 4 * k:  # few blocks: the candidates would be much of the vocabulary
        return torch.topk(z, k, dim=-1, sorted=True)
    chosen = torch.topk(maxima[:, :full], k, dim=-1, sorted=False).indices
    ids = (chosen[..., None] * block + torch.arange(block, device=z.device)).view(n, k * block)
    if vocab > full * block:
        ids = torch.cat([ids, torch.arange(full * block, vocab, device=z.device).expand(n, -1)], -1)
    v, j = torch.topk(z.gather(-1, ids), k, dim=-1, sorted=True)
    return v, ids.gather(-1, j)


def logit_statistics(z: torch.Tensor, v: torch.Tensor, next_ids: torch.Tensor, last: torch.Tensor, *,
                     tail_betas: Sequence[float], chain: bool = False, block: int | None = None) -> dict[str, torch.Tensor]:
    """(N, V) logits and their (N, k+1) largest ``v`` (descending) → ``topk_logprobs`` (N, k) and the statistics of
    :func:`tail_statistics`, from sums over the tail only:

    - the tail is every logit below the k-th, relative to the (k+1)-th, the tail's largest: y = z − v_k ≤ 0;
      a logit tied with the k-th but left out of the top-k (counted: every logit above the k-th is in it) has
      y = 0 and adds 1 to each Σ exp(β·y) and 0 to the moment Σ e^y·y;
    - log Z = v_0 + log(Σ_top exp(v − v_0) + exp(v_k − v_0)·Σ_tail e^y): the log-partition is the top-k's terms
      plus the tail's, all positive (no cancellation), so no separate pass over V;
    - the sums: :func:`exp_sums` (``chain``: one exp and products, as on a CPU); with ``block``, over blocks of
      that many ids, then over the blocks (a CPU's: inductor sums a reduction longer than 4096 through a cascade
      helper, slower there and less accurate than blocks: docs/measurements.md).
    """
    k = v.shape[-1] - 1
    vf = v.float()
    kth, nxt = v[:, k - 1: k], vf[:, k:]
    nxt = torch.where(torch.isfinite(nxt), nxt, torch.zeros_like(nxt))  # an empty tail: every sum is 0
    n, vocab = z.shape
    x = z
    if block:  # (N, V / block, block), padded with −inf (below the k-th: a tail entry adding 0 to every sum)
        x = torch.nn.functional.pad(z, (0, -vocab % block), value=float("-inf")).view(n, -1, block)
        kth, nxt = kth[..., None], nxt[..., None]
    inside = x < kth
    ties = (inside[0].numel() - k) - inside.view(n, -1).sum(-1)  # logits equal to the k-th left in the tail
    lowest = torch.finfo(torch.float32).min  # exp → 0 and 0·y = 0 (0·−inf is NaN)
    y = torch.where(inside, torch.sub(x, nxt).clamp_(min=lowest), lowest)
    sums, moment = exp_sums(y, tail_betas, chain)
    if block:
        sums, moment, nxt = {b: t.sum(-1) for b, t in sums.items()}, moment.sum(-1), nxt[..., 0]
    sums = {b: t + ties for b, t in sums.items()}
    m0 = vf[:, :1]
    log_z = m0 + torch.log(torch.exp(vf[:, :k] - m0).sum(-1, keepdim=True) + torch.exp(nxt - m0) * sums[1.0][:, None])
    top = vf[:, :k] - log_z
    gold = z.gather(-1, next_ids[:, None]).float().sub_(log_z)[:, 0].masked_fill_(last, 0.0)
    mt = (nxt - log_z)[:, 0]  # the tail's largest log-prob
    head = -(torch.exp(top) * top).nan_to_num_(nan=0.0).sum(-1)
    entropy = head - torch.exp(mt) * (mt * sums[1.0] + moment)
    betas = torch.tensor(tail_betas, dtype=torch.float32, device=z.device)
    a = torch.log(torch.stack([sums[b] for b in tail_betas], -1)).add_(mt[:, None] * betas)
    return {"topk_logprobs": top, "log_tail": mt + torch.log(sums[1.0]), "entropy": entropy, "gold_logprob": gold,
            "tail_logz": a}
