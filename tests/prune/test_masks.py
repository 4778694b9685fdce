"""Sparsity masks: the patterns they promise, and exact zeros through optimizer steps, save and load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from chorus.prune import importance
from chorus.prune import masks as M
from chorus.prune.masks import Masks
from tests.prune.test_structured import batches, tiny


def test_magnitude_prunes_the_smallest_share_of_every_block_matrix():
    model = tiny()
    masks = M.compute(model, 0.5, score="magnitude")
    assert set(masks.masks) == set(M.prunable(model)) and "lm_head.weight" not in masks.masks
    for name, w in M.prunable(model).items():
        keep = masks.masks[name]
        assert (~keep).sum() == round(0.5 * w.numel())
        assert w.detach().abs()[keep].min() >= w.detach().abs()[~keep].max()


def test_two_four_pattern_and_its_ramp():
    model = tiny()
    inputs = importance.measure(model, batches()).inputs
    half = M.compute(model, 0.25, score="wanda", pattern="2:4", inputs=inputs)
    full = M.compute(model, 0.5, score="wanda", pattern="2:4", inputs=inputs, previous=half)
    for name in full.masks:
        groups = (~full.masks[name]).reshape(full.masks[name].shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()  # exactly two of every four
        assert (full.masks[name] <= half.masks[name]).all()  # masks only grow
        assert ((~half.masks[name]).reshape(half.masks[name].shape[0], -1, 4).sum(-1) <= 2).all()


def test_wanda_weighs_magnitudes_by_input_norms():
    model = tiny()
    inputs = {k: torch.ones_like(v) for k, v in importance.measure(model, batches()).inputs.items()}
    name = "model.layers.0.mlp.down_proj.weight"
    inputs[name.removesuffix(".weight")][0] = 1e6  # channel 0 carries huge activations: Wanda keeps it
    masks = M.compute(model, 0.9, score="wanda", inputs=inputs)
    assert masks.masks[name][:, 0].all()
    assert not M.compute(model, 0.9, score="magnitude").masks[name][:, 0].all()


def test_masks_survive_optimizer_steps_and_save_load(tmp_path):
    model = tiny()
    masks = M.compute(model, 0.6, score="magnitude").bind(model)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for b in batches(3):
        loss = model(input_ids=b["input_ids"], labels=b["input_ids"]).loss
        loss.backward()
        opt.step()
        masks.apply()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for name, keep in masks.masks.items():
        assert (params[name].detach()[~keep] == 0).all()
        assert not torch.equal(params[name].detach()[keep], before[name][keep])  # the rest trained
    model.save_pretrained(tmp_path)
    masks.save(tmp_path)
    loaded, back = AutoModelForCausalLM.from_pretrained(tmp_path), Masks.load(tmp_path)
    assert back.zeros_held(loaded) and back.sparsity() == pytest.approx(0.6, abs=0.01)
    assert all(torch.equal(back.masks[k], masks.masks[k].cpu()) for k in masks.masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse tensors need CUDA")
def test_two_four_masks_convert_to_semi_structured_tensors():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).cuda().half().eval()
    masks = M.compute(model, 0.5, score="magnitude", pattern="2:4").bind(model)
    ids = torch.randint(0, 128, (4, 32), device="cuda")
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
        masks.unbind()
        assert M.to_semi_structured(model, masks) == 7
        sparse = model(input_ids=ids).logits.float()
    torch.testing.assert_close(sparse, dense, atol=2e-2, rtol=2e-2)
