"""The teacher: loading it, checking it against a store, and the pure per-batch target math.

``load_teacher`` resolves device and dtype, refuses a tokenizer whose vocabulary differs from the
store's, and fingerprints the weights. ``sparse_targets`` turns one batch of logits into top-k
log-probs (normalized over the full vocabulary, fp32 math), optional sampled ids and the exact
per-position statistics of format v2 (log tail mass, entropy, gold log-prob, tail log-partitions).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from chorus.errors import ChorusError
from chorus.pipeline._tokenizer import tokenizer_info
from chorus.storage import TokenizerInfo

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FINGERPRINT_SAMPLES = 4096  # elements hashed per weight tensor (evenly spaced, always including the first and last)
OutOfMemory = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


@dataclass
class Teacher:
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # the tokenizer's; logit columns past it are padded embedding rows, dropped before the softmax
    model_id: str  # hub id, or a local directory's basename (the path itself is not identity; the weights are)
    revision: str
    weights_fingerprint: str
    tokenizer_match: str  # "tokenizer" (same fingerprint) or "vocabulary" (same id table only)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids → (B, L, V) logits in the model's dtype (a view: padded columns are dropped).

        Plain causal attention over the whole packed row, no attention mask: position j sees tokens
        0..j of its row, which is exactly what the student sees when it trains on the same row."""
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits[..., : self.vocab_size]


# ---------------------------------------------------------------------------------------------- device
def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ChorusError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
        index = (local_rank or 0) % torch.cuda.device_count()
        return torch.device("cuda", index)
    if device == "cpu":
        return torch.device("cpu")
    raise ChorusError(f"--device: expected one of auto, cpu, cuda, got {device!r}")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it (fp16 otherwise), fp32 on CPU (where half precision is slow)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ChorusError(f"--dtype: expected one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- loading
def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_local(spec: str, what: str) -> None:
    """A path-like spec (./, /, ~) must be an existing directory; anything else may be a hub id."""
    if spec.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(spec)):
        raise ChorusError(f"{what} '{spec}' not found: no such directory")


def check_tokenizer(model: str, expected: TokenizerInfo, *, tokenizer: str | None, revision: str | None,
                    trust_remote_code: bool) -> str:
    """Load the teacher's tokenizer (``tokenizer`` or the model's own) and compare it with the store's.

    Same fingerprint → "tokenizer"; a different tokenizer with the identical id ↔ token table (e.g. another
    normalizer or chat template) → "vocabulary"; anything else is refused: the ids would mean other tokens."""
    from transformers import AutoTokenizer

    _check_local(model, "teacher")
    if tokenizer:
        _check_local(tokenizer, "tokenizer")
    spec = os.path.expanduser(tokenizer or model)
    try:
        tok = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError / hub errors / ValueError for unknown classes
        if tokenizer:
            raise ChorusError(f"tokenizer '{tokenizer}' could not be loaded ({_first_line(e)})") from None
        raise ChorusError(
            f"teacher '{model}' has no loadable tokenizer ({_first_line(e)}); "
            "pass --tokenizer DIR with the teacher's tokenizer so it can be checked against the store's"
        ) from None
    info = tokenizer_info(tok, spec)
    if info.fingerprint == expected.fingerprint:
        return "tokenizer"
    if info.vocab_fingerprint == expected.vocab_fingerprint:
        return "vocabulary"
    raise ChorusError(
        f"teacher '{model}' uses another vocabulary than the store (tokenizer '{info.name}', {info.vocab_size} tokens, "
        f"vs the store's '{expected.name}', {expected.vocab_size} tokens); chorus needs teachers that share the "
        "store's token ids: prepare a store with the teacher's tokenizer"
    )


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A deterministic digest of the weights as loaded (in the compute dtype).

    Covers every state-dict entry: its name, dtype and shape, and FINGERPRINT_SAMPLES evenly spaced
    elements (first and last included) converted to float64 on the host, so it is the same on any device.
    It does not read every element (a 70B model would take minutes): two checkpoints that differ only
    between sampled elements hash alike, which no real fine-tune or re-training does. Never random."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        if n == 0:
            continue
        idx = torch.linspace(0, n - 1, steps=min(n, FINGERPRINT_SAMPLES), dtype=torch.float64).round().long()
        sample = flat[idx.to(flat.device)].to("cpu", torch.float64).numpy()
        h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()


def _model_id(model: str) -> str:
    path = os.path.expanduser(model)
    return os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else model


def load_teacher(model: str, *, vocab_size: int, device: torch.device, dtype: torch.dtype, revision: str | None,
                 trust_remote_code: bool, tokenizer_match: str) -> Teacher:
    """An ``AutoModelForCausalLM`` in eval mode on ``device``, checked to score every token of the vocabulary."""
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(model)
    _check_local(model, "teacher")
    kwargs = {"revision": revision} if revision else {}
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        hint = "; pass --trust-remote-code if you trust its code" if "trust_remote_code" in str(e) else ""
        raise ChorusError(f"teacher '{model}' could not be loaded ({_first_line(e)}){hint}") from None
    rows = net.get_output_embeddings().weight.shape[0] if net.get_output_embeddings() is not None else net.config.vocab_size
    if rows < vocab_size:
        raise ChorusError(
            f"teacher '{model}' scores {rows} tokens but the store's tokenizer has {vocab_size}; "
            "it cannot give a distribution over the store's vocabulary"
        )
    net.to(device).eval().requires_grad_(False)
    rev = getattr(net.config, "_commit_hash", None) or revision or ("local" if os.path.isdir(path) else "main")
    return Teacher(net, device, dtype, vocab_size, _model_id(model), str(rev), weights_fingerprint(net), tokenizer_match)


# ---------------------------------------------------------------------------------------------- targets
def row_generator(seed: int, row: int) -> torch.Generator:
    """A CPU generator for one corpus row, seeded from (seed, global row index): a rerun, another batch size
    or another shard split draws the same uniforms for that row, on any device."""
    digest = hashlib.blake2b(f"chorus-samples|{seed}|{row}".encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def sample_ids(logp: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """(L, V) fp32 log-probs → (L, M) int64 ids drawn with replacement (random-sampling KD,
    Anshumann et al., ACL 2025: the counts are an unbiased sparse estimate of the distribution).

    Inverse-CDF sampling: uniforms from the row's CPU generator, located in the fp32 cumulative sum
    of the probabilities on the device (tokens below ~1e-7 probability, under the cumsum's rounding,
    are the only ones misrepresented)."""
    length, vocab = logp.shape
    u = torch.rand((length, num_samples), generator=generator, dtype=torch.float32).to(logp.device)
    cdf = torch.cumsum(torch.exp(logp), dim=-1)
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return draws.clamp_(max=vocab - 1)


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
        e = torch.mul(y, root).exp_()
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
                    tail_betas: Sequence[float]) -> dict[str, torch.Tensor]:
    """(L, V) fp32 log-probs of one row, its (L, k) top-k ids and log-probs and (L,) next-token ids → exact
    per-position statistics on the device: ``log_tail``, ``entropy``, ``gold_logprob`` (L,), ``tail_logz`` (L, G).

    ``next_ids[t]`` is the row's token t + 1 (any id at the last position, whose gold log-prob is 0).
    log τ is a log-sum-exp over the tail ids, not log(1 − Σ_k p): that difference cancels catastrophically
    when the top-k hold nearly all the mass. Sums over the tail are taken relative to its largest log-prob m,
    so no exp under- or overflows: Σ_tail p^β = e^{β·m}·Σ exp(β·y), y = logp − m. The entropy (0·log 0 = 0) is
    the top-k's −Σ p log p plus the tail's −e^m·(m·Σ e^y + Σ e^y·y). Overwrites ``logp``; memory stays at two
    (L, V) fp32 tensors."""
    gold = logp.gather(-1, next_ids[:, None])[:, 0]
    gold[-1] = 0.0
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


def sparse_targets(logits: torch.Tensor, input_ids: torch.Tensor, *, top_k: int, num_samples: int, seed: int,
                   row_start: int, tail_betas: Sequence[float] = ()) -> dict[str, torch.Tensor]:
    """(B, L, V) logits of rows ``row_start ..`` and their (B, L) ``input_ids`` → on the logits' device:

    - ``topk_ids`` (B, L, k) int64, ordered by descending log-prob,
    - ``topk_logprobs`` (B, L, k) float32, log-softmax over the full vocabulary (so 1 − Σ exp is the tail),
    - ``draws`` (B, L, M) int64 when ``num_samples`` > 0,
    - when ``tail_betas`` is non-empty (format v2), :func:`tail_statistics` of every row: ``log_tail``,
      ``entropy``, ``gold_logprob`` (B, L) and ``tail_logz`` (B, L, G) float32.

    One row at a time, so one (L, V) fp32 log-softmax (and one temporary) is the largest memory, not (B, L, V)."""
    out: dict[str, list[torch.Tensor]] = {}
    next_ids = torch.roll(input_ids, -1, dims=1)  # the last position's wraps around; its gold log-prob is set to 0
    for r in range(logits.shape[0]):
        logp = torch.log_softmax(logits[r].float(), dim=-1)
        v, i = torch.topk(logp, top_k, dim=-1, sorted=True)
        row = {"topk_ids": i, "topk_logprobs": v}
        if num_samples:
            row["draws"] = sample_ids(logp, num_samples, row_generator(seed, row_start + r))
        if tail_betas:
            row.update(tail_statistics(logp, i, v, next_ids[r], tail_betas))  # last: it overwrites logp
        for k, t in row.items():
            out.setdefault(k, []).append(t)
    return {k: torch.stack(v) for k, v in out.items()}


def first_bad_position(topk_logprobs: np.ndarray) -> tuple[int, int] | None:
    """(rows, L, k) → (row, position) of the first position whose logits held NaN or inf, else None.

    Any NaN or +inf logit makes the whole log-softmax NaN at that position (logsumexp is NaN or inf),
    and all −inf makes it NaN too, so the top-1 value tells."""
    bad = ~np.isfinite(topk_logprobs[..., 0]) | np.isnan(topk_logprobs).any(axis=-1)
    if not bad.any():
        return None
    row, pos = np.argwhere(bad)[0]
    return int(row), int(pos)
