"""Sampled targets: the uniforms behind ``chorus cache --samples`` and the inverse-CDF draws they make.

The uniforms are a counter-based hash of (seed, row, position, draw) computed with integer ops where the logits
are, so a position's draws do not depend on the batch, the chunk, the shard split or the device.
"""

from __future__ import annotations

import hashlib

import torch

from chorus.errors import ChorusError


def row_keys(seed: int, row_start: int, rows: int) -> torch.Tensor:
    """(rows, 2) int64 keys, each in [0, 2^32), of corpus rows ``row_start ..``, from (seed, global row index):
    a rerun, another batch size or another shard split gives a row the same keys."""
    keys = []
    for r in range(row_start, row_start + rows):
        digest = hashlib.blake2b(f"chorus-samples|{seed}|{r}".encode(), digest_size=8).digest()
        keys.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")))
    return torch.tensor(keys, dtype=torch.int64).reshape(rows, 2)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x · c mod 2^32 for int64 ``x`` in [0, 2^32) and a constant c < 2^32, exact on any device: x is split into
    16-bit halves so no product reaches 2^63 (int64 overflow is not defined behaviour to rely on)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * (c & 0xFFFF)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) with full avalanche ("lowbias32", C. Wellons' hash-prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def position_uniforms(keys: torch.Tensor, positions: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(N, 2) int64 row keys and (N,) int64 positions in the row → (N, M) float32 uniforms in [0, 1), computed
    where the keys are (generated on the device: no host random numbers, no copy).

    Counter-based: draw m of position t is a keyed hash of the counter t·M + m (three rounds of :func:`_mix32`
    keyed by the row's two keys), 24 bits → float32 exactly. Integer ops only, so the uniforms are the same bits on
    any device and do not depend on the batch, the chunk or which positions share the call. Positions · M must stay
    below 2^32 (:func:`check_sampler`)."""
    counter = positions[:, None] * num_samples + torch.arange(num_samples, device=positions.device)
    k0, k1 = keys[:, :1], keys[:, 1:]
    x = _mix32(counter ^ k0)
    x = _mix32((x + k1) & 0xFFFFFFFF)
    x = _mix32(x ^ k0)
    return (x >> 8).to(torch.float32) * 2.0**-24


def check_sampler(length: int, num_samples: int) -> None:
    """Refuse rows too long for the sampler's 32-bit counter (L · M < 2^32: e.g. L = 131 072 allows M ≤ 32 767)."""
    if length * num_samples >= 1 << 32:
        raise ChorusError(f"--samples {num_samples} with rows of {length} tokens exceeds the sampler's 2^32 draws per "
                          f"row; use at most {((1 << 32) - 1) // length} samples")


def row_uniforms(seed: int, row_start: int, rows: int, length: int, num_samples: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows·L, M) float32 uniforms of rows ``row_start ..`` on ``device`` (:func:`position_uniforms`)."""
    check_sampler(length, num_samples)
    keys = row_keys(seed, row_start, rows).to(device).repeat_interleave(length, 0)
    pos = torch.arange(length, device=device).repeat(rows)
    return position_uniforms(keys, pos, num_samples)


def draw_ids(logp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(N, V) fp32 log-probs and (N, M) uniforms on the same device → (N, M) int64 ids drawn with replacement
    (random-sampling KD, Anshumann et al., ACL 2025: the counts are an unbiased sparse estimate of the distribution).

    Inverse-CDF sampling: the uniforms are located in the fp32 cumulative sum of the probabilities (tokens
    below ~1e-7 probability, under the cumsum's rounding, are the only ones misrepresented). Measured and not
    taken: a two-level search (block sums, then inside M blocks) — the exp over V costs more than the scan, and at
    V = 8192 the M gathered blocks are half the vocabulary."""
    cdf = torch.exp(logp).cumsum_(-1)
    draws = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    return draws.clamp_(max=logp.shape[-1] - 1)


# vocabulary entries per block, of the two-level inverse CDF (draw_ids_blocked) and of the block top-k
# (position.block_topk): ~sqrt(V / M) keeps both levels small — at V = 128k and M = 32, ~2000 block sums per
# position and M · 64 = 2048 entries inside the drawn blocks (larger blocks cost much of the target pass:
# docs/measurements.md)
SAMPLE_BLOCK = 64


def block_stats(z: torch.Tensor, block: int = SAMPLE_BLOCK, *, sums: bool = True) -> tuple[torch.Tensor, ...]:
    """(N, V) logits → (N, ⌈V / block⌉) fp32 maxima of blocks of ``block`` consecutive ids (the last one short)
    and, with ``sums``, each block's sum of exp(z − its maximum) (0 for a block of −inf): one reduction, which
    ``torch.compile`` turns into one pass over the logits."""
    n, vocab = z.shape
    blocks = -(-vocab // block)
    padded = torch.nn.functional.pad(z, (0, blocks * block - vocab), value=float("-inf")).view(n, blocks, block)
    padded = padded.float()
    maxima = padded.amax(-1)
    if not sums:
        return (maxima,)
    shift = torch.where(torch.isfinite(maxima), maxima, torch.zeros_like(maxima))
    return maxima, torch.exp(padded - shift[..., None]).sum(-1)


def scale_block_sums(maxima: torch.Tensor, sums: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """:func:`block_stats`' per-block sums rescaled to Σ exp(z − m) over each block, for (N, 1) fp32 m ≥ the
    row's maximum."""
    scale = torch.exp(torch.where(torch.isfinite(maxima), maxima - m, torch.full_like(maxima, float("-inf"))))
    return sums * scale


def draw_ids_blocked(z: torch.Tensor, m: torch.Tensor, uniforms: torch.Tensor, sums: torch.Tensor,
                     block: int = SAMPLE_BLOCK) -> torch.Tensor:
    """(N, V) logits, (N, 1) fp32 m, (N, M) uniforms and the blocks' sums of exp(z − m) (:func:`block_stats`,
    :func:`scale_block_sums`) → (N, M) int64 ids drawn with replacement: :func:`draw_ids`' inverse CDF in two levels,
    for a GPU, where a scan over all of V is ~3 passes through memory: the block of each draw from the running sum
    of the block sums, then the id inside from the running sum of exp(z − m) over that block alone (M · block
    entries per position instead of V).

    The same distribution; a draw differs from the one-level search only where its uniform is within fp32 rounding
    of a boundary (the sums are added in another order). Row-wise: independent of the other positions."""
    n, vocab = z.shape
    cdf = sums.cumsum(-1)
    target = uniforms * cdf[:, -1:]
    b = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    rest = target - torch.where(b > 0, cdf.gather(-1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    ids = b[..., None] * block + torch.arange(block, device=z.device)  # (N, M, block)
    inside = ids < vocab
    e = z.gather(-1, ids.clamp(max=vocab - 1).view(n, -1)).view(ids.shape).float()
    e = torch.exp(e - m[:, :, None]).masked_fill_(~inside, 0.0).cumsum_(-1)
    offset = torch.searchsorted(e, rest[..., None], right=True)[..., 0].clamp_(max=block - 1)
    return (b * block + offset).clamp_(max=vocab - 1)
