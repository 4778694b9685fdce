"""The one target builder: a batch's cached teacher arrays → the sparse target a student learns from.

Train, eval, calibrate and the benchmarks all build targets here, so softening, weighting and
pooling follow one rule set:

    per teacher    decode (top-k + exact statistics, or samples) → soften by T_t · T
    per token      weights = prior (global × per-domain) × weighting (confidence / agreement / likelihood)
    pool           operator (mixture / geometric / power) over the teachers' supports

T_t is teacher t's calibrated temperature and T the KD temperature: every teacher is softened *before*
pooling (soften∘soften = one softening by the product), so the pooled target needs no tail curve of its
own; for the geometric pool this equals softening the pooled target. The loss then compares the pooled
target with the student at temperature T (losses.py).

:func:`check_combination` is the one place that decides what is sound. Sampled targets are an unbiased
estimate of the teacher only for forward KL at T = 1, pooled linearly with weights that do not depend
on the samples; every other combination with samples is refused, naming the sound alternatives.
A top-k cache without statistics (format v1) still works, with a one-line warning: its softening,
entropy, gold likelihood and imputation use the even-tail guess.

A cross-tokenizer teacher (teacher/cross.py) has positions with no sound target, cached as the hard label
with entropy ``NO_TARGET_ENTROPY``: :func:`teacher_dist` turns them into the exact one-hot distribution of the
gold token (so a single teacher's KD term there is the hard-label cross-entropy, for forward KL exactly), and
:meth:`TargetBuilder.build` gives such a teacher weight 0 at those positions whenever another teacher has a
target there (the pool then falls back to the other teachers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from chorus.distill import ensemble
from chorus.distill.losses import LOSSES
from chorus.distill.softening import SOFTENINGS, get_softening
from chorus.distill.sparse import SparseDist, from_samples, from_topk, from_topk_renormalized, soften
from chorus.distill.tail import Stats
from chorus.errors import ChorusError
from chorus.progress import say
from chorus.store.manifest import no_target

TARGETS = ("topk_tail", "topk_renorm", "samples")
STATS_ARRAYS = ("log_tail", "entropy", "gold_logprob")
# "context": each teacher weighted by how well it predicted the document so far (see context_loglik)
WEIGHTINGS = (*ensemble.WEIGHTINGS, "context")


def check_combination(*, target: str, loss: str, operator: str, weighting: str, temperature: float,
                      teacher_temperatures: Sequence[float] = (), has_stats: Sequence[bool] = ()) -> None:
    """Raise a one-line ChorusError for an unknown or unsound target × loss × operator × weighting ×
    temperature combination; return None for a sound one."""
    if target not in TARGETS:
        raise ChorusError(f"unknown target '{target}'; expected one of: {', '.join(TARGETS)}")
    if loss not in LOSSES:
        raise ChorusError(f"unknown loss '{loss}'; expected one of: {', '.join(LOSSES)}")
    if operator not in ensemble.OPERATORS:
        raise ChorusError(f"unknown operator '{operator}'; expected one of: {', '.join(ensemble.OPERATORS)}")
    if weighting not in WEIGHTINGS:
        raise ChorusError(f"unknown weighting '{weighting}'; expected one of: {', '.join(WEIGHTINGS)}")
    if weighting == "context" and not all(has_stats):
        raise ChorusError("the context weighting needs every teacher's cached gold log-probs (format v2 statistics): "
                          "recache the teachers with `chorus cache --overwrite`, or use another weighting")
    for what, t in [("temperature", temperature), *(("teacher temperature", x) for x in teacher_temperatures)]:
        if not (isinstance(t, (int, float)) and 0 < t < float("inf")):
            raise ChorusError(f"{what} must be a positive finite number, got {t}")
    if target != "samples":
        return
    many = len(teacher_temperatures) > 1
    if loss != "forward_kl":
        raise ChorusError(f"sampled targets are unbiased only for forward KL, not {loss}: use loss forward_kl, "
                          f"or target topk_tail with {loss}")
    if temperature != 1.0 or any(t != 1.0 for t in teacher_temperatures):
        raise ChorusError("sampled targets are unbiased only at T = 1: set temperature 1 and calibrated: false, "
                          "or use target topk_tail to soften or calibrate")
    if many and operator != "mixture":
        raise ChorusError(f"sampled targets can only be pooled by mixture (a linear pool of unbiased estimates is "
                          f"unbiased), not {operator}: use aggregate mixture, or target topk_tail for {operator}")
    if many and weighting == "agreement":
        raise ChorusError("the agreement weighting is computed from the samples themselves, which biases sampled "
                          "targets: use weighting none, confidence or likelihood (from cached statistics), "
                          "or target topk_tail")
    if many and weighting in ("confidence", "likelihood") and not all(has_stats):
        raise ChorusError(f"the {weighting} weighting of sampled targets needs every teacher's cached statistics "
                          "(format v2) so the weights do not depend on the samples: recache the teachers, or use "
                          "weighting none")


def _stats(arrays: dict, take, *, tail_betas: Tensor | None, masked: Tensor | None) -> Stats | None:
    if "log_tail" not in arrays:
        return None
    log_tail, entropy, gold = take("log_tail"), take("entropy"), take("gold_logprob")
    tail = take("tail_logz") if "tail_logz" in arrays and tail_betas is not None else None
    if masked is not None:  # the one-hot gold: no tail, no entropy, log-prob 0
        log_tail = log_tail.masked_fill(masked, float("-inf"))
        entropy = entropy.masked_fill(masked, 0.0)
        gold = gold.masked_fill(masked, 0.0)
        tail = None if tail is None else tail.masked_fill(masked[:, None], float("-inf"))
    return Stats(log_tail, entropy, gold, tail, tail_betas)


def _take(arrays: dict, select: Tensor, device: torch.device | str):
    def take(name: str) -> Tensor:
        a = arrays[name].to(device, non_blocking=True)
        if a.dtype in (torch.uint16, torch.uint32):  # few kernels take them: widen before indexing
            a = a.long()
        return a[:, :-1].reshape(-1, *a.shape[2:])[select]
    return take


def no_target_mask(arrays: dict, select: Tensor, device: torch.device | str = "cpu") -> Tensor | None:
    """(N,) bool: the selected positions where this teacher has no target (a cross-tokenizer teacher's masked
    positions); None without statistics (a v1 cache, which has a target everywhere). No device sync."""
    if "entropy" not in arrays:
        return None
    return no_target(_take(arrays, select, device)("entropy"))


def teacher_dist(arrays: dict, select: Tensor, *, target: str, vocab_size: int, device: torch.device | str = "cpu",
                 tail_betas: Sequence[float] = ()) -> SparseDist:
    """One teacher's SparseDist at T = 1 over the selected positions (``select`` indexes the flattened
    (B·(L−1)) positions). ``arrays`` is a batch's decoded arrays of that teacher (data.CachedRows);
    with statistics in them the distribution is exact (from_topk/from_samples with ``stats``). Positions with
    no target (see the module doc) are the one-hot distribution of the gold token, cached in the top-1 slot."""
    take = _take(arrays, select, device)
    masked = no_target_mask(arrays, select, device)
    betas = torch.tensor(tuple(tail_betas), dtype=torch.float32, device=device) if len(tail_betas) else None
    stats = _stats(arrays, take, tail_betas=betas, masked=masked)
    if target == "samples":  # a masked position's draws are all the gold token already
        return from_samples(take("sample_ids"), take("sample_counts"), vocab_size, stats=stats)
    if target not in ("topk_renorm", "topk_tail"):
        raise ChorusError(f"unknown target '{target}'; expected one of: {', '.join(TARGETS)}")
    ids, logp = take("topk_ids"), take("topk_logprobs")
    if masked is not None:  # exactly [0, -inf, ...] whatever the value codec rounded -inf to
        one_hot = torch.full_like(logp, float("-inf"))
        one_hot[:, 0] = 0.0
        logp = torch.where(masked[:, None], one_hot, logp)
    if target == "topk_renorm":
        return from_topk_renormalized(ids, logp, vocab_size)
    return from_topk(ids, logp, vocab_size, stats=stats)


def context_loglik(batch: dict, names: Sequence[str], select: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """(N, T) each teacher's log-likelihood of its position's document so far: at position j,
    Σ_{i < j, same segment} log p_t(x_{i+1} | x_≤i), from the cached exact gold log-probs.

    It reads only tokens up to j — what the student sees when it predicts x_{j+1} — so weights built on
    it are gold-free and route a corpus without domain labels: the posterior of a mixture of experts
    after the document's first j tokens (Jacobs et al., 1991), tempered by β in :func:`pool`."""
    seg = batch["segment_ids"].to(device)[:, :-1]
    b, n = seg.shape
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(start, torch.arange(n, device=seg.device).expand(b, n), 0).cummax(1).values
    lps, masks = [], []
    for name in names:
        arrays = batch["teachers"][name]
        lps.append(arrays["gold_logprob"].to(device)[:, :-1].double())
        masks.append(no_target(arrays["entropy"].to(device)[:, :-1]) if "entropy" in arrays else torch.zeros_like(seg, dtype=torch.bool))
    lp_all, masked = torch.stack(lps, -1), torch.stack(masks, -1)
    covered = (~masked).double()  # a teacher without a target there is scored like the mean of those with one
    fill = (lp_all * covered).sum(-1, keepdim=True) / covered.sum(-1, keepdim=True).clamp_min(1.0)
    lp_all = torch.where(masked, fill, lp_all)
    out = []
    for t in range(len(names)):
        lp = torch.where(seg > 0, lp_all[..., t], 0.0)
        before = lp.cumsum(1) - lp  # Σ over i < j in the row
        out.append((before - before.gather(1, first)).reshape(-1)[select])  # ... from the segment's start
    return torch.stack(out, -1).float()


def pool(dists: list[SparseDist], prior: Tensor, *, operator: str, weighting: str, gold: Tensor,
         alpha: float = 0.5, beta: float = 1.0, context: Tensor | None = None) -> tuple[SparseDist, Tensor]:
    """(pooled SparseDist, (N, T) weight each teacher received per token). ``prior`` (N, T) holds the
    global × per-domain weights; ``weighting`` reweights them per token (``context``: (N, T) from
    :func:`context_loglik`), then ``operator`` pools. One teacher is returned as is."""
    if len(dists) == 1:
        return dists[0], torch.ones(dists[0].n_positions, 1, device=prior.device)
    if weighting == "context":
        if context is None:
            raise ChorusError("the context weighting needs each teacher's log-likelihood of the document so far")
        w = torch.softmax(prior.clamp_min(1e-30).log() + beta * context, dim=-1)
    elif weighting == "confidence":
        w = ensemble.confidence_weights(dists, beta, prior=prior)
    elif weighting == "agreement":
        w = ensemble.agreement_weights(dists, beta, prior=prior)
    elif weighting == "likelihood":
        w = ensemble.likelihood_weights(dists, gold, beta, prior=prior)
    elif weighting == "none":
        w = prior / prior.sum(-1, keepdim=True)
    else:
        raise ChorusError(f"unknown weighting '{weighting}'; expected one of: {', '.join(WEIGHTINGS)}")
    return ensemble.aggregate(dists, operator=operator, weights=w, alpha=alpha), w


@dataclass
class Targets:
    """pooled: the target at the KD temperature over N positions; weights (N, T); dists: each teacher's
    softened distribution (for diagnostics)."""

    pooled: SparseDist
    weights: Tensor
    dists: list[SparseDist]


@dataclass
class TargetBuilder:
    """Builds the target of every batch for ``teachers`` (their manifests: name, temperature, tail_betas).

    ``temperature`` is the KD temperature; ``calibrated`` applies each teacher's fitted temperature;
    ``softening`` the operator of the KD temperature (softening.py: power q ∝ p^{1/T}, or linear). The
    calibrated temperature was fitted as a power softening and stays one."""

    teachers: Sequence
    vocab_size: int
    target: str = "topk_tail"
    loss: str = "forward_kl"
    operator: str = "mixture"
    weighting: str = "none"
    temperature: float = 1.0
    calibrated: bool = True
    alpha: float = 0.5
    beta: float = 1.0
    warn: bool = True
    softening: str = "power"
    teacher_temperatures: dict = field(default_factory=dict)  # {name: T} replacing calibrated ones (a blend's)
    temperatures: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.temperatures = tuple(float(self.teacher_temperatures.get(t.name, t.temperature)) if self.calibrated
                                  else 1.0 for t in self.teachers)
        get_softening(self.softening)  # an unknown name fails here, not mid-run
        has_stats = [bool(t.tail_betas) for t in self.teachers]
        check_combination(target=self.target, loss=self.loss, operator=self.operator, weighting=self.weighting,
                          temperature=self.temperature, teacher_temperatures=self.temperatures, has_stats=has_stats)
        old = [t.name for t, ok in zip(self.teachers, has_stats) if not ok]
        if old and self.warn and self.target == "topk_tail":
            say(f"warning: teacher(s) {', '.join(old)} have no cached statistics (format v1): softening, entropy, "
                "gold likelihood and imputed ids use the even-tail guess; recache with `chorus cache --overwrite` "
                "for exact targets")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def teacher(self, i: int, arrays: dict, select: Tensor, device: torch.device | str = "cpu") -> SparseDist:
        """Teacher i's distribution softened by its calibrated temperature × the KD temperature."""
        d = teacher_dist(arrays, select, target=self.target, vocab_size=self.vocab_size, device=device,
                         tail_betas=self.teachers[i].tail_betas)
        if self.softening == "power":  # soften∘soften = one softening by the product
            t = self.temperatures[i] * self.temperature
            return d if t == 1.0 else soften(d, t)
        d = d if self.temperatures[i] == 1.0 else soften(d, self.temperatures[i])
        return SOFTENINGS[self.softening](d, self.temperature)

    def build(self, batch: dict, select: Tensor, gold: Tensor, prior: Tensor,
              device: torch.device | str = "cpu") -> Targets:
        """The pooled target of a batch's positions ``select`` (N,), gold (N,), prior (N, T)."""
        dists = [self.teacher(i, batch["teachers"][t.name], select, device) for i, t in enumerate(self.teachers)]
        if len(dists) > 1:
            prior = self._without_missing(batch, select, prior, device)
        ctx = context_loglik(batch, self.names, select, device) if self.weighting == "context" else None
        pooled, w = pool(dists, prior, operator=self.operator, weighting=self.weighting, gold=gold,
                         alpha=self.alpha, beta=self.beta, context=ctx)
        return Targets(pooled, w, dists)

    def _without_missing(self, batch: dict, select: Tensor, prior: Tensor, device: torch.device | str) -> Tensor:
        """(N, T) prior with weight 0 for a teacher at the positions where it has no target and another has one
        (where none has, every teacher's target is the same hard label and the prior stays)."""
        masks = [no_target_mask(batch["teachers"][t.name], select, device) if getattr(t, "tokenizer_mapping", None)
                 else None for t in self.teachers]  # only a cross-tokenizer teacher has positions without a target
        if all(m is None for m in masks):
            return prior
        masked = torch.stack([torch.zeros(prior.shape[0], dtype=torch.bool, device=prior.device) if m is None
                              else m.to(prior.device) for m in masks], -1)
        drop = masked & ~masked.all(-1, keepdim=True)
        return prior.masked_fill(drop, 0.0)
