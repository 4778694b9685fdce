"""Structured pruning: a genuinely smaller Llama that loads with transformers and, untrained, computes what
the original computes with the pruned units zeroed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from chorus.errors import ChorusError
from chorus.prune import importance, structured

V = 61


def tiny(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def batches(n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (n, 4, 12), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def expected_params(v: int, h: int, layers: int, heads: int, kv: int, d: int, inter: int, tied: bool) -> int:
    attn = h * heads * d + 2 * h * kv * d + heads * d * h
    return v * h * (1 if tied else 2) + layers * (attn + 3 * h * inter + 2 * h) + h


@pytest.mark.parametrize("tied", [False, True])
def test_pruned_llama_loads_with_transformers_and_has_the_expected_size(tmp_path, tied):
    model = tiny(tied)
    imp = importance.measure(model, batches())
    small = structured.prune(model, imp, layers=2, kv=1, intermediate=20, hidden=24)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    want = expected_params(V, 24, 2, 2, 1, 8, 20, tied)  # head_dim 8 is kept; 1 KV group of 2 query heads
    assert sum(p.numel() for p in loaded.parameters()) == want == structured.param_count(loaded.config)
    assert (loaded.config.num_hidden_layers, loaded.config.num_attention_heads, loaded.config.num_key_value_heads,
            loaded.config.intermediate_size, loaded.config.hidden_size) == (2, 2, 1, 20, 24)
    ids = batches()[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, small(input_ids=ids).logits, rtol=0, atol=0)


def test_pruning_heads_channels_and_layers_equals_zeroing_them():
    model = tiny()
    imp = importance.measure(model, batches())
    plan = structured.make_plan(model, imp, layers=2, kv=1, intermediate=30)
    small = structured.apply_plan(model, plan)
    # the reference: the original model with every pruned unit's output zeroed
    masked = tiny()
    d, group = 8, 2
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            if i not in plan.layers:  # a block with both residual branches zeroed is the identity
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                continue
            j = plan.layers.index(i)
            for g in range(2):
                if g not in plan.kv_groups[j]:
                    layer.self_attn.o_proj.weight[:, g * group * d:(g + 1) * group * d] = 0
            drop = [c for c in range(48) if c not in plan.channels[j]]
            layer.mlp.down_proj.weight[:, drop] = 0
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, masked(input_ids=ids).logits)


def test_each_layer_keeps_its_own_most_important_units():
    model = tiny()
    imp = importance.measure(model, batches())
    plan = structured.make_plan(model, imp, kv=1, intermediate=10)
    for j, i in enumerate(plan.layers):
        group = imp.heads[i].reshape(2, 2).sum(-1)
        assert plan.kv_groups[j] == [int(group.argmax())]
        assert set(plan.channels[j]) == set(torch.topk(imp.mlp[i], 10).indices.tolist())


def test_importance_counts_only_real_tokens():
    model = tiny()
    b = batches(1)[0]
    padded = {"input_ids": torch.cat([b["input_ids"], torch.full((4, 5), 3)], 1),
              "attention_mask": torch.cat([b["attention_mask"], torch.zeros(4, 5, dtype=torch.long)], 1)}
    a, p = importance.measure(model, [b]), importance.measure(model, [padded])
    assert a.tokens == p.tokens
    torch.testing.assert_close(a.mlp, p.mlp)  # causal: padding after the text changes nothing before it


def test_sizes_for_reaches_the_target_or_says_why():
    cfg = tiny().config
    p0 = structured.param_count(cfg)
    for frac in (0.5, 0.25):
        sizes = structured.sizes_for(cfg, frac)
        assert abs(structured.param_count(cfg, **sizes) / p0 - frac) < 0.05
    with pytest.raises(ChorusError, match="cannot reach 10%"):
        structured.sizes_for(cfg, 0.1, ("mlp",))
    with pytest.raises(ChorusError, match="cannot keep 3 kv groups"):
        structured.make_plan(tiny(), importance.measure(tiny(), batches(1)), kv=3)


def test_head_counts_the_hidden_size_cannot_split_are_skipped():
    """4 KV groups of one head, hidden 128, pruning heads and MLP only: 3 heads cannot split 128 channels, so the
    sizes step from 4 to 2 (an HF config of 3 heads would be refused), and the plan is made."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4)
    seen = {structured.sizes_for(cfg, f, ("heads", "mlp"))["kv"] for f in (0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4)}
    assert seen <= {1, 2, 4} and len(seen) > 1
    for f in (0.9, 0.75, 0.5):
        sizes = structured.sizes_for(cfg, f, ("heads", "mlp"))
        assert 128 % sizes["kv"] == 0
