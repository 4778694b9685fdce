"""Sparse next-token distributions: an explicit support plus an evenly spread tail.

A teacher cache stores, per position, the top-k ids with their log-probabilities
normalized over the *full* vocabulary, so the mass outside the support,
``tail = 1 - sum(p_topk)``, is known. Everything downstream (softening, losses,
ensembles, calibration) works on :class:`SparseDist` and never builds an ``(N, V)``
tensor, except :func:`to_dense`, which exists for tests and references.

Even-tail convention: the tail mass is spread evenly over the ``V - n_valid`` ids
that are not in the explicit support, so the representation always denotes one
full-vocabulary distribution and every operator has an exact dense meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from chorus.errors import ChorusError

NEG_INF = float("-inf")


@dataclass
class SparseDist:
    """A distribution over a vocabulary of size V per position, N positions.

    ids:   (N, S) int64 explicit support ids (unique within a row among valid entries)
    logp:  (N, S) float32 log-probabilities of those ids (normalized over the FULL vocab);
           -inf marks padding slots (ids there are ignored, use 0)
    tail:  (N,) float32 probability mass outside the explicit support, in [0, 1]
    vocab_size: int V

    The tail is spread evenly over the V - n_valid ids not in the support ("even-tail"
    convention). Invariant: tail == 0 wherever n_valid == V (no ids left to hold it).
    """

    ids: Tensor
    logp: Tensor
    tail: Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        # Shape checks only: value checks would force a device sync on every batch.
        if self.ids.dim() != 2 or self.logp.shape != self.ids.shape:
            raise ChorusError(
                f"sparse targets need ids and logp of one shape (N, S); "
                f"got {tuple(self.ids.shape)} and {tuple(self.logp.shape)}"
            )
        if self.tail.shape != self.ids.shape[:1]:
            raise ChorusError(
                f"sparse targets need a tail of shape (N,) = ({self.ids.shape[0]},); "
                f"got {tuple(self.tail.shape)}"
            )
        if self.vocab_size < 1:
            raise ChorusError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @property
    def n_positions(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: slice | Tensor) -> SparseDist:
        """The positions selected by ``index`` (a slice or an index/bool tensor over N)."""
        return SparseDist(self.ids[index], self.logp[index], self.tail[index], self.vocab_size)

    def to(self, device: torch.device | str) -> SparseDist:
        return SparseDist(
            self.ids.to(device), self.logp.to(device), self.tail.to(device), self.vocab_size
        )


# ---------------------------------------------------------------------------- helpers


def valid_mask(dist: SparseDist) -> Tensor:
    """(N, S) bool: explicit entries that are not padding."""
    return dist.logp > NEG_INF


def n_tail_ids(dist: SparseDist) -> Tensor:
    """(N,) int64: how many vocabulary ids share the tail (V - n_valid)."""
    return dist.vocab_size - valid_mask(dist).sum(-1)


def log_tail_share(dist: SparseDist) -> Tensor:
    """(N,) float32: log-probability of each single id outside the support, log(tail / n_tail).

    -inf where the tail is empty (tail == 0 or no id outside the support)."""
    n_tail = n_tail_ids(dist).to(torch.float32)
    has_tail = (dist.tail > 0) & (n_tail > 0)
    share = torch.log(dist.tail.clamp_min(1e-45)) - torch.log(n_tail.clamp_min(1.0))
    return torch.where(has_tail, share, torch.full_like(share, NEG_INF))


def _sanitize(ids: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    """int64 ids with 0 at padding, fp32 logp with -inf at padding (NaN counts as padding)."""
    logp = logp.to(torch.float32)
    valid = logp > NEG_INF  # False for NaN as well
    logp = torch.where(valid, logp, torch.full_like(logp, NEG_INF))
    ids = torch.where(valid, ids.long(), torch.zeros_like(ids, dtype=torch.long))
    return ids, logp


def _check_vocab(vocab_size: int, width: int, what: str) -> None:
    if width > vocab_size:
        raise ChorusError(f"{what} has {width} ids per position but the vocabulary has only {vocab_size}")


def _check_logprobs(logprobs: Tensor) -> None:
    # Encoded cache values (e.g. uint16 codes) would otherwise be read as log-probs silently.
    if not logprobs.dtype.is_floating_point:
        raise ChorusError(
            f"top-k log-probs must be a floating-point tensor, got {logprobs.dtype}: "
            "decode the stored values before building targets"
        )


# ------------------------------------------------------------------------ constructors


# fp16 keeps 11 significant bits: a stored log-prob is off by at most |logp|·2^-11.
FP16_REL_ERROR = 2.0**-11


def from_topk(
    ids: Tensor, logprobs: Tensor, vocab_size: int, *, rel_error: float = FP16_REL_ERROR, abs_error: float = 0.0
) -> SparseDist:
    """Top-k as cached: ids (N, k) any int dtype, logprobs (N, k) fp16/fp32 normalized
    over the full vocabulary. tail = clamp(1 - sum exp(logprobs), 0, 1) in fp32.

    Rows whose explicit mass exceeds 1 (fp16 rounding) or that cover the whole vocabulary
    are renormalized over the support with tail 0, so every row is a distribution. So are
    rows whose tail is below the rounding noise of the stored values, Σ p_i·(|logp_i|·rel_error
    + abs_error): such a "tail" is an artefact of storage, and softening with T > 1 would
    spread it over V - k ids and inflate it (n·(τ/n)^{1/T}) into real mass."""
    _check_vocab(vocab_size, ids.shape[-1], "top-k targets")
    _check_logprobs(logprobs)
    ids, logp = _sanitize(ids, logprobs)
    n_valid = (logp > NEG_INF).sum(-1)
    p = logp.exp()
    mass = p.sum(-1)
    finite = torch.where(logp > NEG_INF, logp.abs(), torch.zeros_like(logp))
    noise = (p * (finite * rel_error + abs_error)).sum(-1)
    renorm = (mass > 0) & ((1.0 - mass <= noise) | (n_valid >= vocab_size))
    log_mass = torch.where(renorm, mass.log(), torch.zeros_like(mass))
    logp = logp - log_mass[:, None]
    tail = torch.where(renorm, torch.zeros_like(mass), (1.0 - mass).clamp(0.0, 1.0))
    return SparseDist(ids, logp, tail, vocab_size)


def from_topk_renormalized(ids: Tensor, logprobs: Tensor, vocab_size: int) -> SparseDist:
    """Top-k renormalized over its own support, tail 0: the common but biased baseline
    (it claims the teacher puts zero mass outside its top-k). Rows with no valid entry
    become uniform (tail 1)."""
    _check_vocab(vocab_size, ids.shape[-1], "top-k targets")
    _check_logprobs(logprobs)
    ids, logp = _sanitize(ids, logprobs)
    lse = torch.logsumexp(logp, dim=-1)
    empty = lse == NEG_INF
    logp = logp - torch.where(empty, torch.zeros_like(lse), lse)[:, None]
    tail = empty.to(torch.float32)
    return SparseDist(ids, logp, tail, vocab_size)


def from_samples(ids: Tensor, counts: Tensor, vocab_size: int) -> SparseDist:
    """Sampled targets: ids (N, m) drawn with replacement and deduplicated, counts (N, m)
    integer (0 = padding). p = counts / sum(counts), tail 0.

    The empirical distribution of samples is an unbiased estimate of the teacher's, so
    the KD gradient it gives is unbiased (random-sampling KD, Anshumann et al., ACL 2025),
    unlike a renormalized top-k. Rows with no sample become uniform (tail 1)."""
    _check_vocab(vocab_size, ids.shape[-1], "sample targets")
    counts = counts.to(torch.float32)
    total = counts.sum(-1, keepdim=True)
    logp = torch.log(counts) - torch.log(total.clamp_min(1.0))  # log 0 = -inf marks padding
    ids, logp = _sanitize(ids, logp)
    tail = (total[:, 0] <= 0).to(torch.float32)
    return SparseDist(ids, logp, tail, vocab_size)


# ------------------------------------------------------------------------- operations


def soften(dist: SparseDist, temperature: float) -> SparseDist:
    """Probability-domain softening: q ∝ p^{1/T} over the full vocabulary.

    Each of the n_tail ids outside the support has p = tail / n_tail, so the softened
    tail mass is n_tail · (tail / n_tail)^{1/T} before normalization. Computed in the log
    domain. T = 1 returns the input unchanged; ranking is preserved; entropy is
    non-decreasing in T; T → ∞ gives the uniform distribution over ids of positive mass
    and T → 0 the argmax. A zero tail stays zero (log 0 = -inf)."""
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ChorusError(f"temperature must be a positive finite number, got {temperature}")
    if t == 1.0:
        return dist
    scaled = dist.logp / t  # padding stays -inf
    n_tail = n_tail_ids(dist).to(torch.float32)
    log_tail_mass = torch.log(n_tail) + log_tail_share(dist) / t  # -inf when no tail
    log_z = torch.logsumexp(torch.cat([scaled, log_tail_mass[:, None]], dim=-1), dim=-1)
    return SparseDist(
        dist.ids, scaled - log_z[:, None], torch.exp(log_tail_mass - log_z), dist.vocab_size
    )


def entropy(dist: SparseDist) -> Tensor:
    """(N,) full-vocabulary entropy in nats under the even-tail convention:
    H = -Σ_support p log p - tail · log(tail / n_tail)."""
    valid = valid_mask(dist)
    safe = torch.where(valid, dist.logp, torch.zeros_like(dist.logp))
    h_explicit = -(safe.exp() * safe * valid).sum(-1)
    share = log_tail_share(dist)
    h_tail = torch.where(share > NEG_INF, -dist.tail * share, torch.zeros_like(share))
    return h_explicit + h_tail


def sorted_support(dist: SparseDist) -> tuple[Tensor, Tensor]:
    """(N, S) ids sorted ascending with padding moved last as the sentinel V, and the
    matching (N, S) logp. The sentinel never equals a real id, so lookups cannot match it."""
    keys = torch.where(valid_mask(dist), dist.ids, torch.full_like(dist.ids, dist.vocab_size))
    keys, order = torch.sort(keys, dim=-1)
    return keys, torch.gather(dist.logp, 1, order)


def log_prob_of(dist: SparseDist, ids: Tensor) -> Tensor:
    """(N, j) log-probabilities of arbitrary ids (N, j): the explicit value where the id is
    in the support, else its even-tail share. Binary search, no (N, j, S) broadcast."""
    keys, logp = sorted_support(dist)
    query = ids.long().contiguous()
    idx = torch.searchsorted(keys, query).clamp_max(keys.shape[-1] - 1)
    found = torch.gather(keys, 1, idx) == query
    share = log_tail_share(dist)[:, None].expand_as(query)
    return torch.where(found, torch.gather(logp, 1, idx), share)


def prob_of(dist: SparseDist, ids: Tensor) -> Tensor:
    """(N, j) probabilities of arbitrary ids (N, j); see :func:`log_prob_of`."""
    return log_prob_of(dist, ids).exp()


def to_dense(dist: SparseDist) -> Tensor:
    """(N, V) float32 dense probabilities, for tests and references only."""
    n, v = dist.n_positions, dist.vocab_size
    dense = log_tail_share(dist).exp()[:, None].expand(n, v + 1).clone()
    # Padding slots write into a spare column V that is dropped afterwards.
    index = torch.where(valid_mask(dist), dist.ids, torch.full_like(dist.ids, v))
    dense.scatter_(1, index, dist.logp.exp())
    return dense[:, :v]
