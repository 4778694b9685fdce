"""Sparsity masks that training respects: pruned weights are exactly zero after every optimizer step and
in every saved model.

A mask set maps parameter names to bool tensors (True = kept) and travels with the model as
``masks.safetensors`` in its directory; ``chorus train`` finds it there (train.py), zeroes the masked
gradients (so clipping and AdamW's moments see the sparse model) and re-applies the masks after each
optimizer step (so nothing, not even weight decay or a resumed optimizer state, revives a pruned weight).

Scores: magnitude |W|, and Wanda |W_ij|·‖X_j‖₂ compared within each output row (Sun et al. 2024, "A Simple
and Effective Pruning Approach for Large Language Models"). Patterns: unstructured (a fraction of each
matrix, per matrix for magnitude, per row for Wanda) and N:M (2:4: two of every four consecutive input
weights, the pattern sparse tensor cores accelerate; :func:`to_semi_structured` converts on CUDA).
Masks only grow: a weight pruned at one stage stays pruned at the next.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from chorus.errors import ChorusError

FILE = "masks.safetensors"
PATTERNS = ("unstructured", "2:4")


class Masks:
    """{parameter name: (same shape) bool keep-mask}. :meth:`bind` attaches them to a model."""

    def __init__(self, masks: dict[str, Tensor]) -> None:
        self.masks = {k: v.bool() for k, v in masks.items()}
        self._params: dict[str, nn.Parameter] = {}
        self._hooks: list = []

    def __bool__(self) -> bool:
        return bool(self.masks)

    # ------------------------------------------------------------------ binding
    def bind(self, model: nn.Module) -> Masks:
        """Check the masks against ``model``, move them to its device, zero the masked weights now and
        every masked gradient from now on."""
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            p = params.get(name)
            if p is None or p.shape != m.shape:
                got = "no such parameter" if p is None else f"shape {tuple(p.shape)}"
                raise ChorusError(f"sparsity mask '{name}' {tuple(m.shape)} does not fit the model ({got}); "
                                  f"was {FILE} written for another model?")
            self.masks[name] = m.to(p.device)
            self._params[name] = p
            self._hooks.append(p.register_hook(lambda g, m=self.masks[name]: g.masked_fill(~m, 0)))
        self.apply()
        return self

    def unbind(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._params = [], {}

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight (call after each optimizer step)."""
        for name, p in self._params.items():
            p.masked_fill_(~self.masks[name], 0.0)

    # ------------------------------------------------------------------ facts
    def sparsity(self) -> float:
        """Share of masked weights among the weights that carry a mask."""
        total = sum(m.numel() for m in self.masks.values())
        return float(sum(int((~m).sum()) for m in self.masks.values()) / max(total, 1))

    def zeros_held(self, model: nn.Module) -> bool:
        """Whether every masked weight of ``model`` is exactly zero."""
        params = dict(model.named_parameters())
        return all(bool((params[k].detach()[~m.to(params[k].device)] == 0).all()) for k, m in self.masks.items())

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in self.masks.items()}, str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Masks | None:
        """The masks saved in a model directory, or None when it has none."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return cls(load_file(str(path)))
        except Exception as e:  # a truncated or foreign file
            raise ChorusError(f"sparsity masks '{path}' are unreadable ({str(e).splitlines()[0][:120]})") from None


# ---------------------------------------------------------------------------------------------- scoring
def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights that sparsity applies to: every Linear inside the decoder blocks (not the embeddings,
    the LM head or the norms, as in Wanda and SparseGPT)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}.":
            out[f"{name}.weight"] = mod.weight
    return out


def nm_keep(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """(out, in) bool: in every group of ``m`` consecutive input weights of a row, the ``n`` highest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise ChorusError(f"{n}:{m} sparsity needs input sizes divisible by {m}, got {cols}")
    g = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(g, n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def _lowest(scores: Tensor, count: int, dim: int | None) -> Tensor:
    """bool: the ``count`` lowest scores (per row when dim = 1, of the whole matrix when None)."""
    drop = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return drop
    if dim is None:
        drop.view(-1)[torch.topk(scores.reshape(-1), count, largest=False).indices] = True
    else:
        drop.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, True)
    return drop


@torch.no_grad()
def compute(model: nn.Module, sparsity: float, *, score: str = "magnitude", pattern: str = "unstructured",
            inputs: dict | None = None, previous: Masks | None = None) -> Masks:
    """Masks pruning ``sparsity`` of every prunable matrix of ``model``.

    score: ``magnitude`` |W| (per matrix) or ``wanda`` |W|·‖X_j‖₂ (per output row; ``inputs`` from
    importance.measure). pattern ``2:4``: the final pattern is two of every four; ``sparsity`` ≤ 0.5 prunes
    the lowest-scored of the weights that pattern drops, so stages ramp toward exact 2:4. Weights masked in
    ``previous`` stay masked (they score lowest)."""
    if score not in ("magnitude", "wanda"):
        raise ChorusError(f"unknown pruning score '{score}'; expected magnitude or wanda")
    if pattern not in PATTERNS:
        raise ChorusError(f"unknown sparsity pattern '{pattern}'; expected one of: {', '.join(PATTERNS)}")
    limit = 0.5 if pattern == "2:4" else 1.0
    if not 0.0 <= sparsity <= limit:
        raise ChorusError(f"sparsity must be in [0, {limit}] for the {pattern} pattern, got {sparsity}")
    if score == "wanda" and not inputs:
        raise ChorusError("Wanda scores need calibration activations (importance.measure(...).inputs)")
    out = {}
    for name, w in prunable(model).items():
        s = w.detach().abs().double()
        if score == "wanda":
            s = s * inputs[name.removesuffix(".weight")].to(s.device)[None, :]
        if previous is not None and name in previous.masks:
            s = torch.where(previous.masks[name].to(s.device), s, -1.0)
        per_row = score == "wanda" or pattern == "2:4"
        if pattern == "2:4":
            candidates = ~nm_keep(s, 2, 4)  # what exact 2:4 would drop; prune the lowest of those
            count = round(sparsity * s.shape[1])
            s_c = torch.where(candidates, s, float("inf"))
            drop = _lowest(s_c, count, dim=1) & candidates
        else:
            count = round(sparsity * (s.shape[1] if per_row else s.numel()))
            drop = _lowest(s, count, 1 if per_row else None)
        out[name] = ~drop.cpu()
    return Masks(out)


def to_semi_structured(model: nn.Module, masks: Masks) -> int:
    """Swap every 2:4-masked Linear weight of a CUDA fp16/bf16 model for torch's semi-structured sparse
    tensor (sparse tensor cores; inference). Returns how many were converted."""
    from torch.sparse import to_sparse_semi_structured

    params = prunable(model)
    done = 0
    for name, m in masks.masks.items():
        w = params[name]
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            raise ChorusError("semi-structured sparse tensors need a CUDA model in fp16 or bf16")
        mod = model.get_submodule(name.removesuffix(".weight"))
        mod.weight = nn.Parameter(to_sparse_semi_structured(w.detach() * m.to(w.device)), requires_grad=False)
        done += 1
    return done
