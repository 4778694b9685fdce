"""`chorus compress`: staged prune → distill through the trainer, resumable at any point."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from chorus.commands import compress as stages
from chorus.config import CompressConfig
from chorus.errors import ChorusError
from chorus.prune.masks import Masks
from chorus.student import training

TRAIN = {"batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "chunk_size": 256, "log_every": 1}


def config(store: str, model: str, out, **kw) -> CompressConfig:
    base = dict(store=store, model=model, out=str(out), teachers=["a"], stages=2, steps=4, calibration_rows=8,
                eval_rows=8, train=dict(TRAIN))
    return CompressConfig(**{**base, **kw})


def test_structured_stages_shrink_the_model_and_record_every_stage(teacher_store, start_model, tmp_path):
    res = stages.run(config(teacher_store, start_model, tmp_path / "run", target_params=0.5))
    rows = res["rows"]
    assert [r["stage"] for r in rows] == [0, 1, 2] and [r["steps"] for r in rows] == [0, 2, 2]
    assert rows[0]["params_fraction"] == 1.0 > rows[1]["params_fraction"] > rows[2]["params_fraction"]
    assert abs(rows[2]["params_fraction"] - 0.5) < 0.06
    final = AutoModelForCausalLM.from_pretrained(res["model"])
    assert sum(p.numel() for p in final.parameters()) == rows[2]["params"]
    assert set(rows[2]["per_domain"]) == {"code", "prose", "names"} and rows[2]["tokens_per_s"] > 0
    assert (tmp_path / "run" / "results.json").is_file() and "tokens/s" in res["table"]


def test_masked_stages_keep_exact_zeros_in_the_saved_model(teacher_store, start_model, tmp_path):
    res = stages.run(config(teacher_store, start_model, tmp_path / "run", method="2:4", steps=4))
    masks = Masks.load(res["model"])
    model = AutoModelForCausalLM.from_pretrained(res["model"])
    assert masks.zeros_held(model) and masks.sparsity() == pytest.approx(0.5)
    assert [round(r["sparsity"], 2) for r in res["rows"]] == [0.0, 0.25, 0.5]


def test_resume_mid_schedule_gives_the_same_final_weights(teacher_store, start_model, tmp_path, monkeypatch):
    cfg = dict(method="magnitude", sparsity=0.6, steps=6, train={**TRAIN, "save_every": 1})
    whole = stages.run(config(teacher_store, start_model, tmp_path / "whole", **cfg))

    real_save, calls = training._save_checkpoint, []

    def interrupted(out, step, *a, **kw):  # dies in stage 2 right after its first checkpoint
        real_save(out, step, *a, **kw)
        calls.append(out)
        if "stage-02" in str(out):
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stages.run(config(teacher_store, start_model, tmp_path / "cut", **cfg))
    monkeypatch.setattr(training, "_save_checkpoint", real_save)
    assert not (tmp_path / "cut" / "stage-02" / "stage.json").exists()
    resumed = stages.run(config(teacher_store, start_model, tmp_path / "cut", **cfg))
    a = load_file(f"{whole['model']}/model.safetensors")
    b = load_file(f"{resumed['model']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "stage-02" / "stage.json").read_text())["mean"] == whole["rows"][2]["mean"]


def test_another_config_in_the_same_directory_is_refused(teacher_store, start_model, tmp_path):
    stages.run(config(teacher_store, start_model, tmp_path / "run", stages=1, steps=1, method="magnitude"))
    with pytest.raises(ChorusError, match="holds another compression .* sparsity"):
        stages.run(config(teacher_store, start_model, tmp_path / "run", stages=1, steps=1, method="magnitude",
                          sparsity=0.7))


def test_schedule_keys_cannot_be_set_through_train(teacher_store, start_model, tmp_path):
    with pytest.raises(ChorusError, match="sets steps"):
        stages.run(config(teacher_store, start_model, tmp_path / "run", train={"steps": 5}))
    with pytest.raises(ChorusError, match="train key 'lr'"):
        stages.run(config(teacher_store, start_model, tmp_path / "run", train={"lr": "fast"}))
