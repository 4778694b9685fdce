"""The teacher: loading it, checking it against a store, and running its target pass.

``load_teacher`` resolves device and dtype and fingerprints the weights; ``check_tokenizer`` tells whether the
teacher shares the store's tokenizer, its vocabulary, or neither (then ``cross.py`` maps it).
``Teacher.targets`` runs the model to its final hidden states and
``chunked_targets`` applies the LM head over chunks of positions, turning each chunk into top-k log-probs
(normalized over the full vocabulary, fp32 math), optional sampled ids (``sampler.py``) and the exact
per-position statistics of format v2 (log tail mass, entropy, gold log-prob, tail log-partitions), so no
(B, L, V) logits exist. The per-position math is ``position.py``'s: ``position_targets`` on a CPU (bit for bit
the reference's), ``logit_targets`` compiled on a GPU and with ``--compile`` on a CPU (its statistics' exps as one
exp and powers there).
``sparse_targets`` is the reference: the same numbers from full logits, one row at a time.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from chorus.errors import ChorusError
from chorus.store import TokenizerInfo
from chorus.store.tokenizer import tokenizer_info
from chorus.teacher.position import (
    chain_statistics,
    compiled_targets,
    logit_statistics,
    logit_targets,
    position_targets,
)
from chorus.teacher.sampler import block_stats, check_sampler, position_uniforms, row_keys, row_uniforms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FINGERPRINT_SAMPLES = 4096  # elements hashed per weight tensor (evenly spaced, always including the first and last)
# default LM-head chunk: one (positions, V) fp32 buffer of this size (the step holds ~4); large on a GPU, where big
# GEMMs and few launches win. On a CPU the cross-tokenizer pass, which works on whole chunks, keeps them small
# (memory-bound passes); the same-tokenizer pass runs the head GEMM over CPU_HEAD_CHUNK positions (about as fast as
# one GEMM over all positions; smaller ones are slower) and the math in cache-sized slabs (docs/measurements.md).
CHUNK_BYTES = {"cpu": 1 << 21, "cuda": 1 << 30}
CPU_HEAD_CHUNK = 256
SLAB_BYTES = {"cpu": 3 << 19, "cuda": 1 << 31}  # the per-position math's working set (see slab_positions); on a GPU a
# whole chunk at once
CHUNK_ALIGN = 64  # chunk sizes are rounded up to a multiple: chunks then start where the full head's GEMM tiles do
HEAD_CHECK_POSITIONS = 32
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
    tokenizer_match: str  # "tokenizer" (same fingerprint), "vocabulary" (same id table only) or "cross" (its own)
    chunk_size: int | None = None  # positions per LM-head chunk (chunk_positions); None: CPU_HEAD_CHUNK or CHUNK_BYTES
    head_checked: bool = False  # the chunked head was compared with the model's own logits once
    # the per-position math through torch.compile (compiled_targets); None: on a GPU (logit_statistics), not on a CPU
    compiled: bool | None = None
    from_logits: bool | None = None  # logit_targets on the chunk's logits (None: when compiled; else position_targets)
    chain: bool | None = None  # logit_targets' statistics as a CPU's (chain_statistics; None: on a CPU)
    # the head's outputs kept across chunks and calls on a CPU (kept_buffer): chunked_targets', cross_targets'
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids → (B, L, V) logits in the model's dtype (a view: padded columns are dropped).

        Plain causal attention over the whole packed row, no attention mask: position j sees tokens
        0..j of its row, which is exactly what the student sees when it trains on the same row.
        The reference path (and the head check): :meth:`targets` never builds these."""
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits[..., : self.vocab_size]

    def hidden_states(self, input_ids: torch.Tensor, **forward) -> torch.Tensor:
        """(B, L) token ids → (B, L, H) final hidden states, the LM head's input.

        The model's own forward runs (so whatever it does before the head — final norm, embedding scale — is
        kept), with a pre-hook that records the head's input and hands the head zero positions instead.
        ``forward``: more arguments of that forward (a cache, position ids, a 4D attention mask)."""
        head = self.model.get_output_embeddings()
        seen: list[torch.Tensor] = []

        def capture(_module, args):
            seen.append(args[0])
            return (args[0][..., :0, :], *args[1:])

        handle = head.register_forward_pre_hook(capture)
        try:
            self.model(input_ids=input_ids, **{"use_cache": False, **forward})
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ChorusError(f"teacher '{self.model_id}' called its LM head {len(seen)} times in one forward; "
                              "chorus computes the head itself and supports models that call it once")
        return seen[0]

    def targets(self, input_ids: torch.Tensor, *, top_k: int, num_samples: int, seed: int, row_start: int,
                tail_betas: Sequence[float] = ()) -> dict[str, torch.Tensor]:
        """(B, L) token ids → :func:`chunked_targets` of the rows ``row_start ..``, never holding (B, L, V) logits."""
        weight, bias, ops = self.head(input_ids)
        # a teacher placed across devices (device_map) hands its hidden states over on the head's device
        hidden = self.hidden_states(input_ids).to(weight.device)
        gpu = weight.device.type != "cpu"
        compiled = gpu if self.compiled is None else self.compiled
        fused = (gpu or compiled) if self.from_logits is None else self.from_logits
        if fused:
            statistics = chain_statistics if (not gpu if self.chain is None else self.chain) else logit_statistics
            per_position = functools.partial(
                logit_targets, statistics=compiled_targets(statistics) if compiled else statistics,
                blocks=compiled_targets(block_stats) if compiled else None)
        else:
            per_position = compiled_targets() if compiled else position_targets
        return chunked_targets(hidden, weight, bias, input_ids.to(weight.device),
                               top_k=top_k, num_samples=num_samples, seed=seed, row_start=row_start,
                               tail_betas=tail_betas, chunk_size=self.chunk_size, ops=ops, from_logits=fused,
                               per_position=per_position, scratch=self.scratch)

    def head(self, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[tuple[str, float], ...]]:
        """The LM head's weight (V, H) and bias over the vocabulary, and the logit ops after it; checked once
        against the model's own logits on the first row of ``probe`` (token ids)."""
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ChorusError(f"teacher '{self.model_id}' has an LM head of type {type(head).__name__}, not a linear "
                              "layer; chorus computes the head in chunks and supports plain linear heads only")
        ops = logit_ops(self.model.config)
        if not self.head_checked:
            self._check_head(probe[:1, :HEAD_CHECK_POSITIONS], head, ops)
        bias = head.bias[: self.vocab_size] if head.bias is not None else None
        return head.weight[: self.vocab_size], bias, ops

    def _check_head(self, ids: torch.Tensor, head: torch.nn.Linear, ops: tuple[tuple[str, float], ...]) -> None:
        """Once per run: the chunked head over the hidden states must give the model's own logits (else the
        architecture does something between body and head that chorus does not know: refuse, do not guess)."""
        want = self.logits(ids).float()
        bias = head.bias[: self.vocab_size] if head.bias is not None else None
        hidden = self.hidden_states(ids).to(head.weight.device)
        got = _apply_ops(F.linear(hidden, head.weight[: self.vocab_size], bias), ops).float()
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item())):
            raise ChorusError(
                f"teacher '{self.model_id}': its logits are not a linear head over the final hidden states "
                f"(max difference {(got - want).abs().max().item():.3g}); this architecture is not supported")
        self.head_checked = True


# ---------------------------------------------------------------------------------------------- dtype
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
                    trust_remote_code: bool) -> tuple[str, object, TokenizerInfo]:
    """Load the teacher's tokenizer (``tokenizer`` or the model's own) and compare it with the store's.

    Returns (match, tokenizer, its info). Same fingerprint → "tokenizer"; a different tokenizer with the identical
    id ↔ token table (e.g. another normalizer or chat template) → "vocabulary"; anything else → "cross": the teacher
    reads the text in its own tokens and its distributions are mapped onto the store's (teacher/cross.py)."""
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
        return "tokenizer", tok, info
    if info.vocab_fingerprint == expected.vocab_fingerprint:
        return "vocabulary", tok, info
    return "cross", tok, info


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A deterministic digest of the weights as loaded (in the compute dtype).

    Covers every state-dict entry: its name, dtype and shape, and FINGERPRINT_SAMPLES evenly spaced
    elements (first and last included) converted to float64 on the host, so it is the same on any device.
    It does not read every element (too slow for a large model): two checkpoints that differ only
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
                 trust_remote_code: bool, tokenizer_match: str, device_map: str | None = None) -> Teacher:
    """An ``AutoModelForCausalLM`` in eval mode on ``device``, checked to score every token of the vocabulary.

    ``device_map`` (e.g. "auto") places a teacher larger than one device across every visible one with
    accelerate's big-model placement; the targets are then computed on the device of its LM head."""
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(model)
    _check_local(model, "teacher")
    kwargs: dict = {"revision": revision} if revision else {}
    if device_map is not None:
        try:
            import accelerate  # noqa: F401  (transformers places the layers with it)
        except ImportError:
            raise ChorusError("--device-map needs the accelerate package: pip install accelerate") from None
        kwargs["device_map"] = device_map
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        hint = "; pass --trust-remote-code if you trust its code" if "trust_remote_code" in str(e) else ""
        raise ChorusError(f"teacher '{model}' could not be loaded ({_first_line(e)}){hint}") from None
    rows = net.get_output_embeddings().weight.shape[0] if net.get_output_embeddings() is not None else net.config.vocab_size
    if rows < vocab_size:
        whose = ("its own tokenizer (another vocabulary than the store's)" if tokenizer_match == "cross"
                 else "the store's tokenizer")
        raise ChorusError(
            f"teacher '{model}' scores {rows} tokens but {whose} has {vocab_size}; "
            "it cannot give a distribution over that vocabulary: pass --tokenizer with the teacher's own tokenizer"
        )
    if device_map is None:
        net.to(device)
    else:  # inputs go to the embedding's device by accelerate's hooks; targets are made where the head lives
        device = net.get_output_embeddings().weight.device
    net.eval().requires_grad_(False)
    rev = getattr(net.config, "_commit_hash", None) or revision or ("local" if os.path.isdir(path) else "main")
    return Teacher(net, device, dtype, vocab_size, _model_id(model), str(rev), weights_fingerprint(net), tokenizer_match)


# ---------------------------------------------------------------------------------------------- targets
def sparse_targets(logits: torch.Tensor, input_ids: torch.Tensor, *, top_k: int, num_samples: int, seed: int,
                   row_start: int, tail_betas: Sequence[float] = ()) -> dict[str, torch.Tensor]:
    """The reference: (B, L, V) logits of rows ``row_start ..`` and their (B, L) ``input_ids`` → on the logits' device:

    - ``topk_ids`` (B, L, k) int64, ordered by descending log-prob,
    - ``topk_logprobs`` (B, L, k) float32, log-softmax over the full vocabulary (so 1 − Σ exp is the tail),
    - ``draws`` (B, L, M) int64 when ``num_samples`` > 0,
    - when ``tail_betas`` is non-empty (format v2), :func:`tail_statistics` of every row: ``log_tail``,
      ``entropy``, ``gold_logprob`` (B, L) and ``tail_logz`` (B, L, G) float32.

    One row at a time from full logits; :func:`chunked_targets` gives the same numbers without them."""
    b, length = input_ids.shape
    next_ids = torch.roll(input_ids, -1, dims=1)  # the last position's wraps around; its gold log-prob is set to 0
    last = torch.arange(length, device=logits.device) == length - 1
    out: dict[str, list[torch.Tensor]] = {}
    for r in range(b):
        u = row_uniforms(seed, row_start + r, 1, length, num_samples, logits.device) if num_samples else None
        row = position_targets(torch.log_softmax(logits[r].float(), dim=-1), next_ids[r], last, u, top_k=top_k,
                               tail_betas=tail_betas)
        for k, t in row.items():
            out.setdefault(k, []).append(t)
    return {k: torch.stack(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- chunked head
def logit_ops(config) -> tuple[tuple[str, float], ...]:
    """What a causal LM does to its head's output, read from its config, in the order HF applies it:
    Cohere's ``logit_scale`` (×), Granite's ``logits_scaling`` (÷), Gemma 2/3's ``final_logit_softcapping``
    (cap·tanh(z/cap)). Anything else is caught by :meth:`Teacher._check_head`."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    ops = []
    if getattr(cfg, "logit_scale", None) is not None:
        ops.append(("mul", float(cfg.logit_scale)))
    if getattr(cfg, "logits_scaling", None) is not None:
        ops.append(("div", float(cfg.logits_scaling)))
    if getattr(cfg, "final_logit_softcapping", None):
        ops.append(("softcap", float(cfg.final_logit_softcapping)))
    return tuple(ops)


def _apply_ops(logits: torch.Tensor, ops: Sequence[tuple[str, float]]) -> torch.Tensor:
    for op, c in ops:
        if op == "mul":
            logits = logits * c
        elif op == "div":
            logits = logits / c
        else:
            logits = torch.tanh(logits / c) * c
    return logits


def kept_buffer(buffers: dict, name: str, shape: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous (shape) tensor, uninitialized, over storage kept in ``buffers[name]`` across chunks and calls
    (grown, never shrunk): on a CPU a fresh (chunk, V) tensor is new pages from the kernel every chunk, which is
    slower than the work written into it (docs/measurements.md). The storage is an inference tensor: only for use
    inside inference mode."""
    n = shape[0] * shape[1]
    have = buffers.get(name)
    if have is None or have.numel() < n or have.dtype != dtype or have.device != torch.device(device):
        have = buffers[name] = torch.empty(n, dtype=dtype, device=device)
    return have[:n].view(shape)


def _head_chunk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scratch: dict | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on a CPU into a :func:`kept_buffer` of ``scratch``. The same kernel (mm /
    addmm), so the same bits."""
    if scratch is None or x.device.type != "cpu" or not torch.is_inference_mode_enabled():
        return F.linear(x, weight, bias)  # the buffer is an inference tensor: only inside inference mode (as cached)
    out = kept_buffer(scratch, "head", (x.shape[0], weight.shape[0]), weight.dtype, x.device)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def chunk_positions(vocab_size: int, chunk_size: int | None = None, budget_bytes: int = CHUNK_BYTES["cuda"]) -> int:
    """Positions per head chunk: ``chunk_size``, or one (positions, V) fp32 buffer within ``budget_bytes``,
    rounded up to a multiple of CHUNK_ALIGN. Why aligned: BLAS computes a GEMM in row tiles and an edge tile
    may round differently (seen on CPU: 1 ulp for chunks of 1, 2 or 7 rows); chunks that start on tile
    boundaries give the same bits as the head over all positions at once."""
    n = chunk_size or budget_bytes // (4 * vocab_size)
    return max(CHUNK_ALIGN, -(-n // CHUNK_ALIGN) * CHUNK_ALIGN)


def slab_positions(vocab_size: int, device: torch.device) -> int:
    """Positions per pass of the per-position math: one (positions, V) fp32 slab within SLAB_BYTES. Every op of
    :func:`position_targets` is row-wise, so slabs change no bit; on a CPU a slab that stays in cache makes its ~15
    passes over V faster (docs/measurements.md)."""
    return max(1, SLAB_BYTES.get(device.type, SLAB_BYTES["cuda"]) // (4 * vocab_size))


def chunked_targets(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, input_ids: torch.Tensor, *,
                    top_k: int, num_samples: int, seed: int, row_start: int, tail_betas: Sequence[float] = (),
                    chunk_size: int | None = None, ops: Sequence[tuple[str, float]] = (),
                    per_position=None, from_logits: bool = False, scratch: dict | None = None) -> dict[str, torch.Tensor]:
    """(B, L, H) final hidden states, the (V, H) head ``weight`` (padded rows already dropped) and (V,) ``bias`` →
    the targets of :func:`sparse_targets` without (B, L, V) logits.

    The B·L positions are cut into chunks of ``chunk_size`` (rounded by :func:`chunk_positions`); each chunk's logits
    (model dtype, then ``ops``, then fp32 — as the model computes them) go through :func:`position_targets` in
    slabs of positions (:func:`slab_positions`) batched over whatever rows they span, so the step's peak memory is
    a (chunk, V) buffer of logits and a few (slab, V) fp32 ones, independent of B·L. ``from_logits``: the math is
    :func:`logit_targets` on the logits themselves (``per_position`` then takes logits, not log-probs). Uniforms are
    generated per slab on the device (:func:`position_uniforms`). Ids and draws are written to int32 buffers on the
    device (half the bytes to copy to the host). ``scratch``: a dict that keeps the CPU head output between calls.
    """
    b, length, h = hidden.shape
    n, vocab = b * length, weight.shape[0]
    device = hidden.device
    flat = hidden.reshape(n, h)
    next_ids = torch.roll(input_ids, -1, dims=1).reshape(n)
    index = torch.arange(n, device=device)
    last = (index % length) == length - 1
    keys = None
    if num_samples:
        check_sampler(length, num_samples)
        keys = row_keys(seed, row_start, b).to(device)
    ids_dtype = torch.int32 if vocab < 2**31 else torch.int64
    out = {"topk_ids": torch.empty((n, top_k), dtype=ids_dtype, device=device),
           "topk_logprobs": torch.empty((n, top_k), dtype=torch.float32, device=device)}
    if num_samples:
        out["draws"] = torch.empty((n, num_samples), dtype=ids_dtype, device=device)
    if tail_betas:
        out |= {f: torch.empty(n, dtype=torch.float32, device=device) for f in ("log_tail", "entropy", "gold_logprob")}
        out["tail_logz"] = torch.empty((n, len(tail_betas)), dtype=torch.float32, device=device)
    step = chunk_positions(vocab, chunk_size or (CPU_HEAD_CHUNK if device.type == "cpu" else None),
                           CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]))
    slab = slab_positions(vocab, device)
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = _apply_ops(_head_chunk(flat[s:e], weight, bias, scratch), ops)
        u = None if keys is None else position_uniforms(keys[index[s:e] // length], index[s:e] % length, num_samples)
        for a in range(s, e, slab):
            z = min(e, a + slab)
            x = logits[a - s: z - s]
            if not from_logits:
                x = torch.log_softmax(x.float(), dim=-1)
            part = (per_position or (logit_targets if from_logits else position_targets))(
                x, next_ids[a:z], last[a:z], None if u is None else u[a - s: z - s], top_k=top_k, tail_betas=tail_betas)
            for k, t in part.items():
                out[k][a:z] = t
        del logits
    return {k: t.reshape(b, length, *t.shape[1:]) for k, t in out.items()}


def first_bad_position(topk_logprobs: np.ndarray) -> tuple[int, int] | None:
    """(rows, L, k) → (row, position) of the first position whose logits held NaN or inf, else None.

    Any NaN or +inf logit makes the whole log-softmax NaN at that position (logsumexp is NaN or inf),
    and all −inf makes it NaN too, so the top-1 value tells."""
    bad = ~np.isfinite(topk_logprobs[..., 0]) | np.isnan(topk_logprobs).any(axis=-1)
    if not bad.any():
        return None
    row, pos = np.argwhere(bad)[0]
    return int(row), int(pos)
