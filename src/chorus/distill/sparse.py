"""Sparse next-token distributions: an explicit support plus the mass outside it (the tail).

A teacher cache stores, per position, the top-k ids with their log-probabilities
normalized over the *full* vocabulary, and (format v2) exact statistics of the full
distribution: log tail mass, entropy, gold log-prob and the tail's softening curve
(:mod:`chorus.distill.tail`). Everything downstream (softening, losses, ensembles,
calibration) works on :class:`SparseDist` and never builds an ``(N, V)`` tensor, except
:func:`to_dense`, which exists for tests and references.

With statistics (``tail_fn``, ``exact_entropy``, ``gold_logp``), the gold token's probability is exact, and so
are softening and entropy at the cached temperatures β (between them, up to the tail curve's interpolation:
the bound is tested in tests/reliability/test_exact.py). Without
them (format v1 caches, pooled or hand-built distributions) the *even-tail* convention applies:
the tail mass is spread evenly over the ``V - n_valid`` ids outside the support, so the
representation denotes one full-vocabulary distribution with an exact dense meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from chorus.distill import tail as _tail
from chorus.distill.tail import Stats, Tail
from chorus.errors import ChorusError

NEG_INF = float("-inf")


IGNORE_INDEX = -100  # the label of a position with no next token (Hugging Face's convention)


@dataclass
class SparseDist:
    """A distribution over a vocabulary of size V per position, N positions.

    ids:   (N, S) int64 explicit support ids (unique within a row among valid entries)
    logp:  (N, S) float32 log-probabilities of those ids (normalized over the FULL vocab);
           -inf marks padding slots (ids there are ignored, use 0)
    tail:  (N,) float32 probability mass outside the explicit support, in [0, 1]
    vocab_size: int V

    Optional exact statistics of the full distribution (from a format v2 cache):
    tail_fn        A(β) = log Σ_{i ∉ support} p_i^β at knots (softening is exact, see tail)
    exact_entropy  (N,) entropy of the full distribution
    gold_logp      (N,) log-prob of each position's gold token
    Without them the tail is spread evenly over the V - n_valid ids not in the support
    ("even-tail" convention). Invariant: tail == 0 wherever n_valid == V.
    """

    ids: Tensor
    logp: Tensor
    tail: Tensor
    vocab_size: int
    tail_fn: Tail | None = None
    exact_entropy: Tensor | None = None
    gold_logp: Tensor | None = None

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

    @property
    def exact(self) -> bool:
        """Whether the tail is described by cached statistics rather than the even-tail guess."""
        return self.tail_fn is not None

    def rows(self, index: slice | Tensor) -> SparseDist:
        """The positions selected by ``index`` (a slice or an index/bool tensor over N)."""
        pick = (lambda t: None if t is None else t[index])
        return SparseDist(self.ids[index], self.logp[index], self.tail[index], self.vocab_size,
                          None if self.tail_fn is None else self.tail_fn.rows(index),
                          pick(self.exact_entropy), pick(self.gold_logp))

    def to(self, device: torch.device | str) -> SparseDist:
        move = (lambda t: None if t is None else t.to(device))
        return SparseDist(self.ids.to(device), self.logp.to(device), self.tail.to(device), self.vocab_size,
                          None if self.tail_fn is None else self.tail_fn.to(device),
                          move(self.exact_entropy), move(self.gold_logp))


def cat(dists: list[SparseDist]) -> SparseDist:
    """Concatenate distributions over one vocabulary along positions (supports padded to one width)."""
    width = max(d.ids.shape[1] for d in dists)
    ids = torch.cat([torch.nn.functional.pad(d.ids, (0, width - d.ids.shape[1])) for d in dists])
    logp = torch.cat([torch.nn.functional.pad(d.logp, (0, width - d.logp.shape[1]), value=NEG_INF) for d in dists])

    def join(get):
        parts = [get(d) for d in dists]
        return None if any(p is None for p in parts) else torch.cat(parts)

    logz = join(lambda d: None if d.tail_fn is None else d.tail_fn.logz)
    tail_fn = None if logz is None else Tail(dists[0].tail_fn.betas, logz)
    return SparseDist(ids, logp, torch.cat([d.tail for d in dists]), dists[0].vocab_size, tail_fn,
                      join(lambda d: d.exact_entropy), join(lambda d: d.gold_logp))


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
    ids: Tensor, logprobs: Tensor, vocab_size: int, *, stats: Stats | None = None,
    rel_error: float = FP16_REL_ERROR, abs_error: float = 0.0
) -> SparseDist:
    """Top-k as cached: ids (N, k) any int dtype, logprobs (N, k) fp16/fp32 normalized
    over the full vocabulary.

    With ``stats`` (format v2) the tail is the exact cached τ, never 1 − Σ of decoded values
    (which a lossy codec or fp16 rounding would corrupt): the top-k values are rescaled to hold
    exactly 1 − τ, and the distribution carries the exact entropy, gold log-prob and tail curve.

    Without: tail = clamp(1 - sum exp(logprobs), 0, 1) in fp32.

    Rows whose explicit mass exceeds 1 (fp16 rounding) or that cover the whole vocabulary
    are renormalized over the support with tail 0, so every row is a distribution. So are
    rows whose tail is below the rounding noise of the stored values, Σ p_i·(|logp_i|·rel_error
    + abs_error): such a "tail" is an artefact of storage, and softening with T > 1 would
    spread it over V - k ids and inflate it (n·(τ/n)^{1/T}) into real mass."""
    _check_vocab(vocab_size, ids.shape[-1], "top-k targets")
    _check_logprobs(logprobs)
    ids, logp = _sanitize(ids, logprobs)
    if stats is not None:
        return _with_stats(ids, logp, vocab_size, stats)
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


def _with_stats(ids: Tensor, logp: Tensor, vocab_size: int, stats: Stats) -> SparseDist:
    n_tail = vocab_size - (logp > NEG_INF).sum(-1)
    log_tail = torch.where(n_tail > 0, stats.log_tail.float().clamp_max(0.0), NEG_INF)
    tail = log_tail.exp()
    # the explicit entries hold exactly 1 - τ (log1p(-τ) stays accurate for tiny τ)
    lse = torch.logsumexp(logp, dim=-1)
    shift = torch.where(lse > NEG_INF, torch.log1p(-tail.clamp_max(1.0 - 1e-7)) - lse, torch.zeros_like(lse))
    tail_fn = stats.tail()
    if tail_fn is not None:
        tail_fn = Tail(tail_fn.betas, torch.where(log_tail[:, None] > NEG_INF, tail_fn.logz, NEG_INF))
    return SparseDist(ids, logp + shift[:, None], tail, vocab_size, tail_fn,
                      stats.entropy.float(), stats.gold_logp.float())


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


def from_samples(ids: Tensor, counts: Tensor, vocab_size: int, *, stats: Stats | None = None) -> SparseDist:
    """Sampled targets: ids (N, m) drawn with replacement and deduplicated, counts (N, m)
    integer (0 = padding). p = counts / sum(counts), tail 0.

    The empirical distribution of samples is an unbiased estimate of the teacher's, so
    the KD gradient it gives is unbiased (random-sampling KD, Anshumann et al., ACL 2025),
    unlike a renormalized top-k. Rows with no sample become uniform (tail 1). ``stats`` attach
    the teacher's exact entropy and gold log-prob (sample-independent per-token weights)."""
    _check_vocab(vocab_size, ids.shape[-1], "sample targets")
    counts = counts.to(torch.float32)
    total = counts.sum(-1, keepdim=True)
    logp = torch.log(counts) - torch.log(total.clamp_min(1.0))  # log 0 = -inf marks padding
    ids, logp = _sanitize(ids, logp)
    tail = (total[:, 0] <= 0).to(torch.float32)
    if stats is None:
        return SparseDist(ids, logp, tail, vocab_size)
    return SparseDist(ids, logp, tail, vocab_size, None, stats.entropy.float(), stats.gold_logp.float())


# ------------------------------------------------------------------------- operations


def soften(dist: SparseDist, temperature: float) -> SparseDist:
    """Probability-domain softening: q ∝ p^{1/T} over the full vocabulary.

    With a tail curve (format v2 statistics) the softened tail mass is exp(A(1/T)), exact at the
    cached grid and interpolated between (see :mod:`chorus.distill.tail`). Without one, each of
    the n_tail ids outside the support holds tail / n_tail (the even-tail guess), so the softened
    tail is n_tail · (tail / n_tail)^{1/T}. Computed in the log domain. T = 1 returns the input
    unchanged; ranking is preserved; entropy is non-decreasing in T; T → ∞ gives the uniform
    distribution over ids of positive mass and T → 0 the argmax. A zero tail stays zero."""
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ChorusError(f"temperature must be a positive finite number, got {temperature}")
    if t == 1.0:
        return dist
    beta = 1.0 / t
    scaled = dist.logp * beta  # padding stays -inf
    n_tail = n_tail_ids(dist).to(torch.float32)
    if dist.tail_fn is not None:
        log_tail_mass, _ = _tail.evaluate(dist.tail_fn, torch.log(n_tail), beta)
        log_tail_mass = torch.where(dist.tail > 0, log_tail_mass, NEG_INF)
    else:
        log_tail_mass = torch.log(n_tail) + log_tail_share(dist) * beta  # -inf when no tail
    log_z = torch.logsumexp(torch.cat([scaled, log_tail_mass[:, None]], dim=-1), dim=-1)
    tail_fn = None if dist.tail_fn is None else _tail.rescale(dist.tail_fn, beta, log_z)
    gold = None if dist.gold_logp is None else dist.gold_logp * beta - log_z
    return SparseDist(dist.ids, scaled - log_z[:, None], torch.exp(log_tail_mass - log_z), dist.vocab_size,
                      tail_fn, None, gold)


def entropy(dist: SparseDist) -> Tensor:
    """(N,) full-vocabulary entropy in nats: the cached exact value when there is one; with a tail
    curve, H = -Σ_support p log p - τ·A'(1) (A'(1) = the tail's mean log-prob); else the even-tail
    value H = -Σ_support p log p - tail · log(tail / n_tail)."""
    if dist.exact_entropy is not None:
        return dist.exact_entropy
    valid = valid_mask(dist)
    safe = torch.where(valid, dist.logp, torch.zeros_like(dist.logp))
    h_explicit = -(safe.exp() * safe * valid).sum(-1)
    if dist.tail_fn is not None:
        _, slope = _tail.evaluate(dist.tail_fn, torch.log(n_tail_ids(dist).to(torch.float32)), 1.0)
        return h_explicit - torch.where(dist.tail > 0, dist.tail * slope, 0.0)
    share = log_tail_share(dist)
    h_tail = torch.where(share > NEG_INF, -dist.tail * share, torch.zeros_like(share))
    return h_explicit + h_tail


def log_missing(dist: SparseDist) -> Tensor:
    """(N,) log-prob to impute for an id outside the support that another teacher ranks highly.

    With a tail curve: the geometric mean of two estimates of such an id — the k-th (smallest explicit)
    value, which bounds every tail id from above, and the tail's size-biased mean Σ p_i² / τ =
    exp(A(2) − A(1)), the expected probability of a tail id drawn by its own mass. Measured on two
    similar teachers against dense geometric/power pooling (tests/trainer/test_targets.py), the midpoint
    beat either end and the k-th value minus a constant. Without a tail curve: the even-tail share."""
    if dist.tail_fn is None:
        return log_tail_share(dist)
    log_n = torch.log(n_tail_ids(dist).to(torch.float32))
    a2, _ = _tail.evaluate(dist.tail_fn, log_n, 2.0)
    a1, _ = _tail.evaluate(dist.tail_fn, log_n, 1.0)
    kth = torch.where(valid_mask(dist), dist.logp, float("inf")).min(-1).values
    est = 0.5 * (torch.minimum(a2 - a1, kth) + kth)
    return torch.where((dist.tail > 0) & torch.isfinite(est), est, NEG_INF)


def gold_log_prob(dist: SparseDist, gold: Tensor) -> Tensor:
    """(N,) log-prob of each position's gold token: the cached exact value when there is one,
    else the explicit value or the even-tail estimate (:func:`log_prob_of`). -100 gives 0."""
    ignore = gold == IGNORE_INDEX
    if dist.gold_logp is not None:
        return torch.where(ignore, 0.0, dist.gold_logp)
    query = torch.where(ignore, torch.zeros_like(gold), gold).long()[:, None]
    return torch.where(ignore, 0.0, log_prob_of(dist, query)[:, 0])


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
