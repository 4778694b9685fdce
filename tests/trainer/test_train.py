"""`chorus train`: exact resume, torchrun parity, KD from a cache beats CE, no teacher is ever built,
every operator and weighting trains, and one-line refusals."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chorus.cli import main as cli_main
from chorus.commands import train
from chorus.config import TrainConfig, load_config
from chorus.errors import ChorusError
from tests.trainer.conftest import cache_teacher, copy_store, run_until_checkpoint, student_yaml

VENV_BIN = Path(sys.executable).parent


def _cfg(store: str, out: Path, student: str, **kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, eval_rows=16, save_every=4, log_every=1)
    return TrainConfig(store=store, student=student, out=str(out), **{**base, **kw})


def _losses(run: Path) -> list[tuple]:
    """Every logged value except wall-clock throughput."""
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), *(v for k, v in r.items() if k not in ("step", "tokens_per_s")))
                for r in csv.DictReader(f)]


def _column(run: Path, name: str) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r[name]) if name != "step" else int(r[name]) for r in csv.DictReader(f)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return student_yaml(tmp_path_factory.mktemp("student") / "student.yaml")


def test_stop_after_checkpoint_then_resume_is_bit_identical(teacher_store, student, tmp_path, monkeypatch, capsys):
    kw = dict(teachers=["a", "b"], aggregate="geometric", weighting="confidence", num_workers=0, log_every=3)
    train.run(_cfg(teacher_store, tmp_path / "full", student, **kw))

    run_until_checkpoint(monkeypatch, _cfg(teacher_store, tmp_path / "cut", student, **kw), 4)
    assert [s for s, *_ in _losses(tmp_path / "cut")] == [3, 4]  # logged at 3, evaluated at 4
    capsys.readouterr()
    train.run(_cfg(teacher_store, tmp_path / "cut", student, resume=True, **kw))
    assert "resuming from step-00000004.pt (step 4)" in capsys.readouterr().err

    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    assert [s for s, *_ in _losses(tmp_path / "full")] == [3, 4, 6, 8]  # the resumed log interval 4-6 is whole
    _assert_same_weights(tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(teacher_store, student, tmp_path):
    kw = dict(teachers=["c"], steps=40, save_every=5, eval_every=20, num_workers=1)
    train.run(_cfg(teacher_store, tmp_path / "full", student, **kw))
    cut = tmp_path / "cut"
    args = [sys.executable, "-m", "chorus", "train", "--store", teacher_store, "--student", student, "--out", str(cut),
            "--teachers", "c", "--steps", "40", "--save-every", "5", "--eval-every", "20", "--batch-size", "4",
            "--lr", "0.003", "--num-workers", "1", "warmup_steps=2", "eval_rows=16", "log_every=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list((cut / "checkpoints").glob("step-*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-checkpoint, mid-log
    proc.wait()
    assert not (cut / "model").exists(), "the run finished before it could be killed"
    train.run(_cfg(teacher_store, cut, student, resume=True, **kw))
    assert _losses(cut) == _losses(tmp_path / "full")
    _assert_same_weights(tmp_path / "full", cut)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_ranks_matches_one_process(teacher_store, student, tmp_path, parallel):
    common = ["--store", teacher_store, "--student", student, "--teachers", "a", "--steps", "10", "--lr", "0.003",
              "--eval-every", "0", "--save-every", "0", "warmup_steps=2", "log_every=1", "eval_rows=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "chorus", "train",
                          "--out", str(tmp_path / "ddp"), "--batch-size", "4", *common, f"parallel={parallel}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert cli_main(["train", "--out", str(tmp_path / "one"), "--batch-size", "8", *common]) == 0
    assert _column(tmp_path / "one", "step") == _column(tmp_path / "ddp", "step") == list(range(1, 11))
    a = torch.tensor(_column(tmp_path / "one", "loss"))
    b = torch.tensor(_column(tmp_path / "ddp", "loss"))
    assert a[-1] < a[0] - 0.05  # it learns, so the comparison means something
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)  # same global batch: equal up to float summation order
    # both ranks updated the same replica: rank 0 saved it, and it is close to the single-process one
    for k, w in _weights(tmp_path / "one").items():
        torch.testing.assert_close(_weights(tmp_path / "ddp")[k], w, rtol=1e-3, atol=1e-4)


def test_student_distilled_from_cache_beats_ce(prepared_store, tokenizer_dir, tmp_path):
    """A bigger teacher trained by `chorus train` (CE), cached; a small student distilled from the cache
    reaches a lower held-out loss than the same student trained with CE for the same steps."""
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    teacher = _cfg(url, tmp_path / "teacher", student_yaml(tmp_path / "t.yaml", hidden=64), steps=150, batch_size=16,
                   warmup_steps=20, eval_every=0, save_every=0, log_every=50)
    train.run(teacher)
    cache_teacher(url, "big", str(tmp_path / "teacher" / "model"), tokenizer_dir, top_k=32)
    small = student_yaml(tmp_path / "s.yaml", hidden=32)
    kw = dict(steps=100, batch_size=8, warmup_steps=5, eval_every=0, save_every=0, log_every=20, eval_rows=10_000)
    ce = train.run(_cfg(url, tmp_path / "ce", small, **kw))["eval"]
    kd = train.run(_cfg(url, tmp_path / "kd", small, teachers=["big"], **kw))["eval"]
    assert kd["mean"] < ce["mean"] - 0.03, (kd["per_domain"], ce["per_domain"])


def test_training_from_a_cache_constructs_only_the_student(teacher_store, student, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    built = []
    real_init = PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("training loaded a pretrained model")

    monkeypatch.setattr(PreTrainedModel, "__init__", counting_init)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    train.run(_cfg(teacher_store, tmp_path / "run", student, teachers=["a", "b", "c"], steps=3))
    # the student is one LlamaForCausalLM; its body (LlamaModel) is built inside it
    assert built == ["LlamaForCausalLM", "LlamaModel"], built


@pytest.mark.parametrize("operator", ["mixture", "geometric", "power"])
def test_three_teachers_train_with_every_operator_and_weighting(teacher_store, student, tmp_path, operator):
    for weighting in ("none", "confidence", "agreement", "likelihood"):
        out = tmp_path / weighting
        res = train.run(_cfg(teacher_store, out, student, teachers=["a", "b", "c"], aggregate=operator,
                             weighting=weighting, steps=3, eval_every=0, save_every=0,
                             teacher_weights={"a": 2.0}, domain_weights={"code": {"b": 0.5}}))
        assert torch.isfinite(torch.tensor(res["eval"]["mean"]))
        with open(out / "metrics.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
        weights = [float(last[f"weight/code/{t}"]) for t in "abc"]
        assert abs(sum(weights) - 1) < 1e-4 and all(w > 0 for w in weights)
        assert 0 <= float(last["teacher_jsd"]) <= 0.7 and float(last["kd"]) > 0
        if weighting == "none":  # prior weights: a 2, b 0.5, c 1 in the code domain
            assert weights == pytest.approx([2 / 3.5, 0.5 / 3.5, 1 / 3.5], abs=1e-5)


def test_other_targets_and_losses_train(teacher_store, student, tmp_path):
    for loss in ("reverse_kl", "jsd", "skew_kl"):
        res = train.run(_cfg(teacher_store, tmp_path / loss, student, teachers=["b"], target="topk_renorm", loss=loss,
                             steps=2, eval_every=0, save_every=0, kd_weight=0.7, temperature=2.0))
        assert torch.isfinite(torch.tensor(res["eval"]["mean"]))
    res = train.run(_cfg(teacher_store, tmp_path / "samples", student, teachers=["b"], target="samples",
                         steps=2, eval_every=0, save_every=0, kd_weight=0.7, calibrated=False))
    assert torch.isfinite(torch.tensor(res["eval"]["mean"]))


def test_unsound_sampled_targets_are_refused_before_training(teacher_store, student, tmp_path):
    with pytest.raises(ChorusError, match="unbiased only for forward KL"):
        train.run(_cfg(teacher_store, tmp_path / "r", student, teachers=["b"], target="samples", loss="reverse_kl"))
    with pytest.raises(ChorusError, match="unbiased only at T = 1"):
        train.run(_cfg(teacher_store, tmp_path / "t", student, teachers=["b"], target="samples", temperature=2.0))
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()


def test_calibrated_temperature_is_applied_before_pooling(teacher_store, student, tmp_path, monkeypatch):
    from chorus.distill import targets
    from chorus.store import Store

    seen = []
    real = targets.soften
    monkeypatch.setattr(targets, "soften", lambda d, t: seen.append(t) or real(d, t))
    store = Store.open(teacher_store, "a")
    m = store.teacher_manifest("a")
    store.write_teacher_manifest(m.replace(temperature=1.7))
    try:
        train.run(_cfg(teacher_store, tmp_path / "cal", student, teachers=["a", "b"], steps=1, eval_every=0))
        assert seen == [1.7]
        seen.clear()
        train.run(_cfg(teacher_store, tmp_path / "raw", student, teachers=["a", "b"], steps=1, eval_every=0,
                       calibrated=False))
        assert seen == []
    finally:
        store.write_teacher_manifest(m)


def test_output_dir_with_another_run_is_refused(teacher_store, student, tmp_path, capsys):
    train.run(_cfg(teacher_store, tmp_path / "run", student, steps=2, eval_every=0))
    with pytest.raises(ChorusError, match="holds another run .*lr") as err:
        train.run(_cfg(teacher_store, tmp_path / "run", student, steps=2, eval_every=0, lr=1e-4))
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    # the same finished run: nothing to do; --overwrite replaces it
    again = train.run(_cfg(teacher_store, tmp_path / "run", student, steps=2, eval_every=0))
    assert again["steps"] == 2
    train.run(_cfg(teacher_store, tmp_path / "run", student, steps=2, eval_every=0, lr=1e-4, overwrite=True))
    code = cli_main(["train", "--store", teacher_store, "--student", student, "--out", str(tmp_path / "run"),
                     "--steps", "3"])
    assert code == 2 and "holds another run" in capsys.readouterr().err


def test_unknown_names_and_bad_students_are_refused(teacher_store, student, tmp_path, capsys):
    with pytest.raises(ChorusError, match="loss"):
        load_config(TrainConfig, store=teacher_store, student=student, out=str(tmp_path), loss="kl_forward")
    with pytest.raises(ChorusError, match="aggregate"):
        load_config(TrainConfig, store=teacher_store, student=student, out=str(tmp_path), aggregate="median")
    with pytest.raises(ChorusError, match="unknown loss"):  # a config built in code is checked too
        train.run(_cfg(teacher_store, tmp_path / "x", student, loss="kl_forward"))
    with pytest.raises(ChorusError, match="unknown operator"):
        train.run(_cfg(teacher_store, tmp_path / "x", student, teachers=["a", "b"], aggregate="median"))
    assert cli_main(["train", "--store", teacher_store, "--student", student, "--out", str(tmp_path / "y"),
                     "--loss", "kl_forward"]) == 2
    assert "loss" in capsys.readouterr().err
    small = tmp_path / "small.yaml"
    small.write_text(Path(student).read_text() + "vocab_size: 100\n")
    with pytest.raises(ChorusError, match="100 vocabulary rows .* 300 ids"):
        train.run(_cfg(teacher_store, tmp_path / "z", str(small)))
    with pytest.raises(ChorusError, match="teacher_weights names 'q'"):
        train.run(_cfg(teacher_store, tmp_path / "w", student, teachers=["a"], teacher_weights={"q": 1.0}))


def test_padded_student_vocabulary_is_cut_to_the_store(teacher_store, tmp_path):
    wide = tmp_path / "wide.yaml"
    wide.write_text(Path(student_yaml(tmp_path / "s.yaml")).read_text() + "vocab_size: 320\n")
    res = train.run(_cfg(teacher_store, tmp_path / "run", str(wide), teachers=["a"], steps=2, eval_every=0))
    assert torch.isfinite(torch.tensor(res["eval"]["mean"]))


@pytest.mark.parametrize("name", ["example", "multi_teacher"])
def test_shipped_train_configs_run(teacher_store, tmp_path, name):
    root = Path(__file__).parents[2]
    cfg = load_config(TrainConfig, str(root / "configs" / "train" / f"{name}.yaml"),
                      [f"store={teacher_store}", f"out={tmp_path / 'run'}", "teachers=a,b,c", "teacher_weights={}",
                       "domain_weights={}", "steps=2", "eval_every=0", "eval_rows=8", "warmup_steps=1",
                       f"student={root / 'configs' / 'student' / 'tiny-llama.yaml'}"])
    assert torch.isfinite(torch.tensor(train.run(cfg)["eval"]["mean"]))
