"""Structured pruning of a Llama-family decoder into a genuinely smaller one.

Width: KV groups (a KV head with the query heads that share it; plain heads when there is no GQA), MLP
channels and hidden (embedding) channels; depth: whole layers. The same number of units is kept in every
layer (a HF Llama config has one width), each layer keeping its own most important ones (importance.py).
The result is a new model of the same class with an updated config: it saves with ``save_pretrained`` and
loads with ``AutoModelForCausalLM.from_pretrained``.

Dropping a head, an MLP channel or a layer computes exactly what the original computes with that unit's
output zeroed (its ``o_proj`` / ``down_proj`` columns, or the whole residual branch); dropping hidden
channels is not such a masking: the RMSNorms then average over fewer channels (Minitron does the same and
lets distillation recover it).

A dependency-graph pruner (torch-pruning 1.6, installable here) was considered: for HF Llama it needs the
head groups and the config updates spelled out by hand anyway, which is most of what this module is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from chorus.errors import ChorusError
from chorus.prune.importance import Importance, decoder_layers

WIDTH_AXES = ("heads", "mlp", "hidden")
AXES = (*WIDTH_AXES, "layers")


@dataclass
class Plan:
    """What survives: layers (original indices, ascending); per kept layer its KV groups and MLP channels
    (original indices, ascending); hidden channels (ascending)."""

    layers: list[int]
    kv_groups: list[list[int]]
    channels: list[list[int]]
    hidden: list[int]


def shape(config) -> dict:
    """The prunable sizes of a Llama-family config."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    return {"layers": config.num_hidden_layers, "kv": kv, "group": heads // kv, "intermediate": config.intermediate_size,
            "hidden": config.hidden_size, "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def param_count(config, *, layers: int | None = None, kv: int | None = None, intermediate: int | None = None,
                hidden: int | None = None) -> int:
    """Parameters of a Llama-family model with these sizes (default: the config's own), no biases."""
    s = shape(config)
    nl, kv, inter, h = layers or s["layers"], kv or s["kv"], intermediate or s["intermediate"], hidden or s["hidden"]
    d, q = s["head_dim"], (kv or s["kv"]) * s["group"]
    block = h * q * d * 2 + h * kv * d * 2 + 3 * h * inter + 2 * h
    vocab = config.vocab_size
    return vocab * h * (1 if config.tie_word_embeddings else 2) + nl * block + h


def _top(scores: Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores.double(), k).indices.tolist())


def make_plan(model: nn.Module, imp: Importance, *, layers: int | None = None, kv: int | None = None,
              intermediate: int | None = None, hidden: int | None = None) -> Plan:
    """Keep the ``layers`` most influential layers and, in each, its ``kv`` most important KV groups and
    ``intermediate`` MLP channels, and the ``hidden`` most important hidden channels (None: keep all)."""
    s = shape(model.config)
    layers, kv = layers or s["layers"], kv or s["kv"]
    intermediate, hidden = intermediate or s["intermediate"], hidden or s["hidden"]
    for name, want, have in (("layers", layers, s["layers"]), ("kv groups", kv, s["kv"]),
                             ("MLP channels", intermediate, s["intermediate"]), ("hidden channels", hidden, s["hidden"])):
        if not 1 <= want <= have:
            raise ChorusError(f"cannot keep {want} {name}: the model has {have} (keep between 1 and {have})")
    if hidden % (kv * s["group"]):
        raise ChorusError(f"cannot keep {hidden} hidden channels with {kv * s['group']} attention heads: HF Llama "
                          "configs need the hidden size to be a multiple of the head count")
    kept = _top(imp.layers, layers)
    group = imp.heads.reshape(imp.heads.shape[0], s["kv"], s["group"]).sum(-1)  # a KV group = its query heads
    return Plan(layers=kept, kv_groups=[_top(group[i], kv) for i in kept],
                channels=[_top(imp.mlp[i], intermediate) for i in kept], hidden=_top(imp.hidden, hidden))


def _rows(head_ids: list[int], head_dim: int) -> Tensor:
    return torch.tensor([h * head_dim + j for h in head_ids for j in range(head_dim)], dtype=torch.long)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """A new, smaller model of the same class holding the kept units' weights (``model`` is untouched)."""
    layers = decoder_layers(model)
    s = shape(model.config)
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(plan.layers)
    cfg.num_key_value_heads = len(plan.kv_groups[0])
    cfg.num_attention_heads = cfg.num_key_value_heads * s["group"]
    cfg.intermediate_size = len(plan.channels[0])
    cfg.hidden_size = len(plan.hidden)
    cfg.head_dim = s["head_dim"]  # kept: a head is pruned whole, never narrowed
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in plan.layers]
    hid = torch.tensor(plan.hidden, dtype=torch.long)
    old = model.state_dict()
    new: dict[str, Tensor] = {}
    for key, value in old.items():
        if ".layers." in key:
            continue
        if value.ndim == 2 and value.shape[1] == s["hidden"] and ("embed" in key or "lm_head" in key):
            new[key] = value[:, hid].clone()
        elif value.ndim == 1 and value.shape[0] == s["hidden"]:  # the final norm
            new[key] = value[hid].clone()
        else:
            new[key] = value.clone()
    for j, i in enumerate(plan.layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        groups = plan.kv_groups[j]
        q_heads = [g * s["group"] + h for g in groups for h in range(s["group"])]
        q_rows, kv_rows = _rows(q_heads, s["head_dim"]), _rows(groups, s["head_dim"])
        ch = torch.tensor(plan.channels[j], dtype=torch.long)
        pick = {"self_attn.q_proj": (q_rows, hid), "self_attn.k_proj": (kv_rows, hid), "self_attn.v_proj": (kv_rows, hid),
                "self_attn.o_proj": (hid, q_rows), "mlp.gate_proj": (ch, hid), "mlp.up_proj": (ch, hid),
                "mlp.down_proj": (hid, ch)}
        for key, value in old.items():
            if not key.startswith(src):
                continue
            name = key[len(src):]
            mod, _, kind = name.rpartition(".")
            if mod in pick:
                out_idx, in_idx = pick[mod]
                new[dst + name] = value[out_idx][:, in_idx].clone() if kind == "weight" else value[out_idx].clone()
            elif value.ndim == 1 and value.shape[0] == s["hidden"]:  # the block's RMSNorms
                new[dst + name] = value[hid].clone()
            else:
                raise ChorusError(f"structured pruning does not know how to prune '{key}' of {type(model).__name__}")
    del layers
    small = type(model)(cfg).to(dtype=next(model.parameters()).dtype)
    missing, unexpected = small.load_state_dict(new, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ChorusError(f"pruned state does not match the smaller model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return small.to(next(model.parameters()).device)


def sizes_for(config, fraction: float, axes: tuple[str, ...] = WIDTH_AXES, of_params: int | None = None) -> dict:
    """Sizes (layers, kv, intermediate, hidden) that shrink ``config`` to about ``fraction`` of ``of_params``
    (default: its own parameter count) by one common factor on every axis in ``axes`` (bisection on the
    factor; counts are rounded, at least 1). Raises when no size on these axes is that small."""
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ChorusError(f"unknown pruning axes {unknown or axes}; expected some of: {', '.join(AXES)}")
    s = shape(config)
    target = fraction * (of_params or param_count(config))

    def at(f: float) -> dict:
        sc = lambda n, a: max(1, round(n * f)) if a in axes else n  # noqa: E731
        kv = sc(s["kv"], "heads")
        if "hidden" not in axes:  # HF Llama configs require hidden_size % num_attention_heads == 0: the largest
            kv = max(k for k in range(1, kv + 1) if s["hidden"] % (k * s["group"]) == 0)  # count it allows
        q = kv * s["group"]
        hidden = max(q, round(s["hidden"] * f / q) * q) if "hidden" in axes else s["hidden"]
        return {"layers": sc(s["layers"], "layers"), "kv": kv, "intermediate": sc(s["intermediate"], "mlp"),
                "hidden": hidden}

    if param_count(config, **at(0.0)) > target:
        raise ChorusError(f"pruning {', '.join(axes)} cannot reach {fraction:.0%} of the parameters "
                          f"(the smallest is {param_count(config, **at(0.0)) / (of_params or param_count(config)):.0%}); "
                          "add axes (hidden shrinks the embeddings) or aim higher")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if param_count(config, **at(mid)) <= target else (lo, mid)
    best = min((at(lo), at(hi)), key=lambda z: abs(param_count(config, **z) - target))
    return best


def prune(model: nn.Module, imp: Importance, **sizes: int) -> nn.Module:
    """``apply_plan(model, make_plan(model, imp, **sizes))``: the smaller model."""
    return apply_plan(model, make_plan(model, imp, **sizes))


def plan_masks(model: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """{decoder-block parameter name: (same shape) bool keep-mask}: False on every entry that
    ``apply_plan(model, plan)`` drops, so the masked model computes what the smaller one computes. A dropped KV
    group loses its query heads' ``q_proj`` rows, its ``k_proj``/``v_proj`` rows (biases too) and those heads'
    ``o_proj`` columns; a dropped MLP channel its ``gate_proj``/``up_proj`` rows and ``down_proj`` column; a
    dropped layer every parameter of its block (both residual branches then add zero: the block is the
    identity). Hidden channels cannot be mimicked by masking (the RMSNorms would still average over them), so
    ``plan.hidden`` must keep them all."""
    s = shape(model.config)
    if plan.hidden != list(range(s["hidden"])):
        raise ChorusError("hidden channels cannot be masked (the RMSNorms would still count them); prune them "
                          "physically with structured.prune instead")
    everything = slice(None)
    out: dict[str, Tensor] = {}
    for key, value in model.named_parameters():
        if not key.startswith("model.layers."):
            continue
        i, name = key.split(".", 3)[2:]
        keep = torch.zeros(value.shape, dtype=torch.bool)
        out[key] = keep
        if int(i) not in plan.layers:
            continue
        j = plan.layers.index(int(i))
        groups = plan.kv_groups[j]
        q_rows = _rows([g * s["group"] + h for g in groups for h in range(s["group"])], s["head_dim"])
        kv_rows = _rows(groups, s["head_dim"])
        ch = torch.tensor(plan.channels[j], dtype=torch.long)
        pick = {"self_attn.q_proj": (q_rows, everything), "self_attn.k_proj": (kv_rows, everything),
                "self_attn.v_proj": (kv_rows, everything), "self_attn.o_proj": (everything, q_rows),
                "mlp.gate_proj": (ch, everything), "mlp.up_proj": (ch, everything), "mlp.down_proj": (everything, ch)}
        mod, _, kind = name.rpartition(".")
        if mod in pick:
            rows, cols = pick[mod]
            keep[(rows, cols) if kind == "weight" else rows] = True  # a bias follows its output rows
        elif value.ndim == 1 and value.shape[0] == s["hidden"]:  # the block's RMSNorms stay whole
            keep[:] = True
        else:
            raise ChorusError(f"structured pruning does not know how to mask '{key}' of {type(model).__name__}")
    return out
