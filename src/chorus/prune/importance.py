"""Importance of a Llama-family model's prunable units, from its activations on store rows.

One no-grad pass over a few calibration rows (the Minitron recipe: Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation", §2.2; importance from activations, not gradients)
records, over real tokens only (padding excluded):

- attention heads: the L2 norm of each head's output (the input of ``o_proj``, split per head), summed;
- MLP channels: the L2 norm over tokens of each channel of act(gate(x))·up(x) (the input of ``down_proj``);
- hidden (embedding) channels: Σ |x| of every RMSNorm output in the blocks, per channel;
- layers: block influence 1 − cos(x_in, x_out) averaged over tokens (ShortGPT, Men et al. 2024);
- every block Linear's input feature norms ‖X_j‖₂ (what Wanda, Sun et al. 2024, scales |W| by).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from chorus.errors import ChorusError


@dataclass
class Importance:
    """heads (n_layers, n_heads); mlp (n_layers, intermediate); hidden (hidden,); layers (n_layers,);
    inputs {linear name: (in_features,) ‖X_j‖₂}; tokens: how many real tokens were seen."""

    heads: Tensor
    mlp: Tensor
    hidden: Tensor
    layers: Tensor
    inputs: dict
    tokens: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ChorusError(f"{type(model).__name__} is not a Llama-family causal LM (no model.layers); structured "
                          "pruning supports llama, mistral and qwen2-style decoders")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        if layers[0].get_submodule(name) is None:
            raise ChorusError(f"decoder block of {type(model).__name__} has no {name}")
    return layers


@torch.no_grad()
def measure(model: nn.Module, batches: list[dict]) -> Importance:
    """Importance of every head, MLP channel, hidden channel, layer and block-Linear input of ``model``."""
    layers = decoder_layers(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    dev = next(model.parameters()).device
    heads = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    mlp = torch.zeros(len(layers), cfg.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    influence = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict = {}
    real: list[Tensor] = []  # (B, L, 1) 1.0 on real tokens, set per batch

    def tokens(x: Tensor) -> Tensor:  # (B, L, F) → (n_real, F) fp64
        return x.reshape(-1, x.shape[-1])[real[0].reshape(-1) > 0].double()

    hooks = []
    for i, layer in enumerate(layers):
        def on_o(mod, args, i=i):
            x = tokens(args[0])
            heads[i] += x.reshape(len(x), n_heads, head_dim).norm(dim=-1).sum(0).cpu()

        def on_down(mod, args, i=i):
            mlp[i] += tokens(args[0]).pow(2).sum(0).cpu()

        def on_norm(mod, args, out):
            hidden.add_(tokens(out).abs().sum(0).cpu())

        def on_layer(mod, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            influence[i] += (1 - torch.cosine_similarity(tokens(x), tokens(y), dim=-1)).sum().cpu()

        hooks += [layer.self_attn.o_proj.register_forward_pre_hook(on_o),
                  layer.mlp.down_proj.register_forward_pre_hook(on_down),
                  layer.input_layernorm.register_forward_hook(on_norm),
                  layer.post_attention_layernorm.register_forward_hook(on_norm),
                  layer.register_forward_hook(on_layer, with_kwargs=True)]
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                key = f"model.layers.{i}.{name}"
                inputs[key] = torch.zeros(mod.in_features, dtype=torch.float64)

                def on_linear(mod, args, key=key):
                    inputs[key] += tokens(args[0]).pow(2).sum(0).cpu()
                hooks.append(mod.register_forward_pre_hook(on_linear))
    was_training = model.training
    model.eval()
    n = 0
    try:
        for b in batches:
            mask = b["attention_mask"].to(dev)
            real[:] = [mask[..., None].float()]
            model(input_ids=b["input_ids"].to(dev), attention_mask=mask)
            n += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ChorusError("the calibration rows hold no real tokens; pass more calibration rows")
    return Importance(heads=heads / n, mlp=(mlp / n).sqrt(), hidden=hidden / n, layers=influence / n,
                      inputs={k: (v / n).sqrt() for k, v in inputs.items()}, tokens=n)
