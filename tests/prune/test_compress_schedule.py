"""`chorus compress --schedule linear|cubic` (and in_run stages): one train run whose masks follow the schedule;
structured masks removed into a smaller model at the end; resumable through the command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from chorus import cli
from chorus.commands import compress
from chorus.commands import eval as eval_cmd
from chorus.config import CompressConfig, EvalConfig
from chorus.prune.masks import Masks, prunable
from chorus.student import training

TRAIN = {"batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "chunk_size": 256, "log_every": 1}
STEPS = 8


def config(store: str, model: str, out, **kw) -> CompressConfig:
    base = dict(store=store, model=model, out=str(out), teachers=["a"], schedule="cubic", steps=STEPS,
                calibration_rows=8, eval_rows=8, train=dict(TRAIN))
    return CompressConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("kw", [dict(method="wanda", sparsity=0.6, schedule="cubic"),
                                dict(method="2:4", schedule="stages", stages=2, in_run=True)],
                         ids=["cubic-wanda", "in-run-stages-2:4"])
def test_one_run_ends_at_the_schedule_sparsity_with_exact_zeros_saved(teacher_store, start_model, tmp_path, kw):
    res = compress.run(config(teacher_store, start_model, tmp_path / "run", **kw))
    assert res["in_run"] and res["model"] == str(tmp_path / "run" / "train" / "model")
    masks = Masks.load(res["model"])
    model = AutoModelForCausalLM.from_pretrained(res["model"])
    target = kw.get("sparsity", 0.5)
    params = prunable(model)
    assert set(masks.masks) == set(params)
    for name, m in masks.masks.items():  # wanda and 2:4 prune round(s·n) of every row's n weights
        assert (~m).sum(-1).tolist() == [round(target * m.shape[-1])] * m.shape[0], name
    if kw["method"] == "2:4":
        assert all(((~m).reshape(m.shape[0], -1, 4).sum(-1) == 2).all() for m in masks.masks.values())
    assert masks.zeros_held(model)
    assert res["rows"][-1]["sparsity"] == pytest.approx(masks.sparsity()) and res["rows"][-1]["steps"] == STEPS


# ---------------------------------------------------------------------------------------------- structured
@pytest.fixture(scope="module")
def structured_run(teacher_store, start_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("structured") / "run"
    return compress.run(config(teacher_store, start_model, out, method="structured", schedule="linear",
                               target_params=0.6, axes=["heads", "mlp"]))


def test_structured_one_run_removes_the_masked_units_into_a_smaller_equal_model(structured_run, start_model):
    small = AutoModelForCausalLM.from_pretrained(structured_run["model"]).eval()
    masked_dir = structured_run["model"].removesuffix("model") + "train/model"
    masked = AutoModelForCausalLM.from_pretrained(masked_dir).eval()
    assert Masks.load(masked_dir).zeros_held(masked) and Masks.load(structured_run["model"]) is None
    n = sum(p.numel() for p in small.parameters())
    n0 = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(start_model).parameters())
    assert n == structured_run["rows"][-1]["params"] and abs(n / n0 - 0.6) < 0.06
    assert small.config.num_key_value_heads == 1 and small.config.intermediate_size < 64
    ids = torch.randint(0, small.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_structured_one_run_model_is_a_whole_model_directory_that_chorus_eval_reads(structured_run, teacher_store):
    small, masked = Path(structured_run["model"]), Path(structured_run["model"]).parent / "train" / "model"
    assert {p.name for p in small.iterdir()} == {p.name for p in masked.iterdir()} - {"masks.safetensors"}
    assert "tokenizer.json" in {p.name for p in small.iterdir()}
    res = eval_cmd.run(EvalConfig(store=teacher_store, model=structured_run["model"], max_rows=8))
    assert res["mean"] == pytest.approx(structured_run["rows"][-1]["mean"], abs=1e-4)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_mid_schedule_through_compress_is_bit_identical(teacher_store, start_model, tmp_path, monkeypatch,
                                                              capsys):
    kw = dict(method="wanda", sparsity=0.5, schedule="linear", every=2)  # updates after steps 0, 2, 4 (end 6)
    whole = compress.run(config(teacher_store, start_model, tmp_path / "whole", **kw))

    real_save, cut = training._save_checkpoint, 3  # 3: not an update step, so the masks come from the checkpoint

    def save_then_die(out, step, *a, **k):
        real_save(out, step, *a, **k)
        if step == cut:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        compress.run(config(teacher_store, start_model, tmp_path / "cut", **kw))
    monkeypatch.setattr(training, "_save_checkpoint", real_save)
    assert [p.name for p in (tmp_path / "cut" / "train" / "checkpoints").glob("step-*.pt")] == ["step-00000003.pt"]
    assert not (tmp_path / "cut" / "train" / "model").exists()
    capsys.readouterr()
    resumed = compress.run(config(teacher_store, start_model, tmp_path / "cut", **kw))
    assert "resuming from step-00000003.pt (step 3)" in capsys.readouterr().err
    for name in ("model.safetensors", "masks.safetensors"):
        assert (tmp_path / "whole" / "train" / "model" / name).read_bytes() == \
            (tmp_path / "cut" / "train" / "model" / name).read_bytes(), name
    assert resumed["rows"][-1]["mean"] == whole["rows"][-1]["mean"]
    a = load_file(f"{resumed['model']}/masks.safetensors")
    assert 0.4 < sum(int((~v.bool()).sum()) for v in a.values()) / sum(v.numel() for v in a.values()) <= 0.5


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("flags, fired", [
    (["--schedule", "gradual"], "compress key 'schedule': expected one of one-shot, stages, linear, cubic, got 'gradual'"),
    (["--schedule", "linear", "--stages", "4"], "compress key 'stages': 4 stages need schedule=stages"),
    (["--schedule", "one-shot", "--stages", "2"], "compress key 'stages': 2 stages need schedule=stages"),
    (["--schedule", "stages", "--end", "6"], "compress key 'end': begin, end and every shape pruning inside one run"),
    (["--schedule", "cubic", "--end", "9"], "compress key 'end': expected a step after begin=0 and at most steps=8"),
    (["--schedule", "linear", "--axes", "heads,hidden"], "compress key 'axes': expected some of heads, mlp, layers"),
], ids=["unknown", "linear-stages", "one-shot-stages", "stages-end", "end-past-steps", "hidden-in-run"])
def test_bad_schedule_is_refused_with_one_line(flags, fired, teacher_store, start_model, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["compress", "--store", teacher_store, "--model", start_model, "--out", str(out), "--steps",
                   str(STEPS), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and fired in err
    assert not out.exists()
