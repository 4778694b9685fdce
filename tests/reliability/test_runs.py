"""Runs that keep their work: set-up is validated before step 1, the model is saved before the final eval,
a `chorus train` output is a complete HF model directory, resume is exact with workers and dropout,
multi-GPU reductions run on the training device, and stale checkpoint temp files are cleaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chorus.cli import main
from chorus.commands import train
from chorus.config import TrainConfig
from chorus.errors import ChorusError
from chorus.student import checkpoint as ckpt
from chorus.student import evaluate, training
from chorus.student import parallel as _parallel
from tests.trainer.conftest import student_yaml


def _cfg(store: str, out: Path, student: str, **kw) -> TrainConfig:
    base = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0, eval_rows=8, save_every=0, log_every=1)
    return TrainConfig(store=store, student=student, out=str(out), **{**base, **kw})


def _train_args(store: str, student: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--store", store, "--student", student, "--out", str(out), "--steps", "2", "--batch-size", "4",
            "warmup_steps=1", "eval_rows=8", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return student_yaml(tmp_path_factory.mktemp("student") / "student.yaml", hidden=16, layers=1)


@pytest.fixture(scope="module")
def no_valid_store(tmp_path_factory, corpus_file, tokenizer_dir) -> str:
    from chorus.commands import prepare
    from chorus.config import PrepareConfig

    out = str(tmp_path_factory.mktemp("novalid") / "store.zarr")
    prepare.run(PrepareConfig(dataset=corpus_file, tokenizer=tokenizer_dir, out=out, seq_len=32, max_docs=24,
                              domain_field="domain", valid_fraction=0.0, rows_per_shard=16))
    return out


@pytest.fixture(scope="module")
def trained(prepared_store, student, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train.run(_cfg(prepared_store, out, student))
    return out


# ---------------------------------------------------------------------------------------------- set-up
def test_store_without_held_out_rows_trains_and_saves_with_a_warning(no_valid_store, student, tmp_path, capsys):
    assert main(_train_args(no_valid_store, student, tmp_path / "run")) == 0
    assert "no held-out rows" in capsys.readouterr().err
    info = json.loads((tmp_path / "run" / "model" / "chorus.json").read_text())
    assert info["eval"] == {}
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("flag", [["--lr", "nan"], ["--lr", "-1"], ["--lr", "0"], ["log_every=0"], ["--temperature", "0"],
                                  ["--temperature", "inf"], ["eval_every=-1"], ["save_every=-2"], ["warmup_steps=-1"],
                                  ["min_lr_ratio=2"], ["weight_decay=nan"], ["clip=-1"], ["eval_rows=-1"],
                                  ["num_workers=-1"], ["shuffle_buffer=0"], ["train_rows=0"]])
def test_bad_settings_fail_before_the_run_dir_exists(prepared_store, student, tmp_path, capsys, flag):
    run = tmp_path / "run"
    assert main(_train_args(prepared_store, student, run, *flag)) == 2
    _one_line_error(capsys)
    assert not run.exists()


def test_corrected_rerun_after_a_bad_temperature_is_not_blocked(prepared_store, student, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(prepared_store, student, run, "--temperature", "0")) == 2
    assert main(_train_args(prepared_store, student, run, "--temperature", "2")) == 0


def test_student_yaml_with_an_unknown_key_is_refused_naming_it(prepared_store, tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text(Path(student_yaml(tmp_path / "ok.yaml", hidden=16, layers=1)).read_text()
                   .replace("num_hidden_layers", "num_hiden_layers"))
    assert main(_train_args(prepared_store, str(bad), tmp_path / "run")) == 2
    line = _one_line_error(capsys)
    assert "num_hiden_layers" in line and "num_hidden_layers" in line
    assert not (tmp_path / "run").exists()


def test_student_with_another_tokenizer_is_refused_by_train_and_eval(prepared_store, trained, student, tmp_path, capsys):
    other = tmp_path / "other"
    import shutil

    shutil.copytree(trained / "model", other)
    info = json.loads((other / "chorus.json").read_text())
    info["tokenizer"]["fingerprint"] = "0" * 16
    (other / "chorus.json").write_text(json.dumps(info))
    assert main(_train_args(prepared_store, str(other), tmp_path / "run")) == 2
    assert "tokenizer" in _one_line_error(capsys)
    assert main(["eval", "--store", prepared_store, "--model", str(other)]) == 2
    assert "tokenizer" in _one_line_error(capsys)
    # the run's own model is accepted by both
    assert main(["eval", "--store", prepared_store, "--model", str(trained), "--max-rows", "4"]) == 0


def test_a_plain_checkpoint_with_another_vocabulary_is_refused_before_step_one(prepared_store, trained, tmp_path,
                                                                               capsys, documents):
    """A plain Hugging Face directory (no ``chorus.json``, so no fingerprint to compare) whose tokenizer maps tokens to
    other ids — the same size, trained on other text — is refused by train, eval and compress with one line naming
    a token and its two ids, before a step runs or a run directory exists; its own tokenizer back in place, the
    same weights are accepted."""
    import shutil

    from tests.conftest import build_tokenizer

    plain = tmp_path / "plain"
    shutil.copytree(trained / "model", plain)
    (plain / "chorus.json").unlink()
    build_tokenizer(str(tmp_path / "tok"), [d["text"][::-1] for d in documents])  # same size, other merges and ids
    shutil.copy(tmp_path / "tok" / "tokenizer.json", plain / "tokenizer.json")
    for args in (_train_args(prepared_store, str(plain), tmp_path / "run"),
                 ["eval", "--store", prepared_store, "--model", str(plain)],
                 ["compress", "--store", prepared_store, "--model", str(plain), "--out", str(tmp_path / "c"),
                  "--target-params", "0.5", "--steps", "1"]):
        assert main(args) == 2
        err = _one_line_error(capsys)
        assert "has another tokenizer than the store's (token" in err and "in the student's" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()
    shutil.copy(trained / "model" / "tokenizer.json", plain / "tokenizer.json")
    assert main(["eval", "--store", prepared_store, "--model", str(plain), "--max-rows", "4"]) == 0


def test_model_is_saved_before_the_final_eval_and_resume_finishes_it(prepared_store, student, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def crash(*a, **k):
        raise RuntimeError("eval died")

    monkeypatch.setattr(training, "evaluate_model", crash)
    with pytest.raises(RuntimeError):
        train.run(_cfg(prepared_store, run, student, steps=2))
    assert (run / "model" / "model.safetensors").is_file()
    assert not (run / "model" / "chorus.json").exists()  # written last: the run is not marked finished
    monkeypatch.undo()
    with pytest.raises(ChorusError, match="--resume"):
        train.run(_cfg(prepared_store, run, student, steps=2))
    res = train.run(_cfg(prepared_store, run, student, steps=2, resume=True))
    assert res["eval"]["mean"] > 0
    assert json.loads((run / "model" / "chorus.json").read_text())["eval"]["mean"] == res["eval"]["mean"]
    with open(run / "metrics.csv") as f:
        last = f.read().strip().splitlines()[-1].split(",")
    assert last[0] == "2" and last[2] != ""  # the final row holds the step's training loss and its eval


# ---------------------------------------------------------------------------------------------- model directory
def test_trained_model_directory_is_complete(trained, no_valid_store, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = trained / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    out = model.generate(**tok("the a of", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 0
    info = json.loads((model_dir / "chorus.json").read_text())
    assert info["tokenizer_source"].endswith("store.zarr/tokenizer")  # the store's own copy (store/tokenizer_files.py)
    # it caches as a teacher as is: no --tokenizer
    from tests.trainer.conftest import copy_store

    store = copy_store(no_valid_store, tmp_path / "store.zarr")  # same tokenizer, fewer rows
    assert main(["cache", "--store", store, "--teacher", str(model_dir), "--name", "student", "--top-k", "4",
                 "--batch-size", "32"]) == 0


def test_unloadable_tokenizer_warns_once_and_still_saves_the_model(prepared_store, student, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(training, "store_tokenizer", lambda store, m: (None, None))
    train.run(_cfg(prepared_store, tmp_path / "run", student, steps=1))
    err = capsys.readouterr().err
    assert err.count("tokenizer") >= 1 and err.count("not saved") == 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [1])
def test_resume_with_workers_and_dropout_is_bit_identical(prepared_store, tmp_path, monkeypatch, workers):
    drop = tmp_path / "drop.yaml"
    drop.write_text(Path(student_yaml(tmp_path / "s.yaml", hidden=16, layers=1)).read_text() + "attention_dropout: 0.3\n")
    kw = dict(steps=4, save_every=2, num_workers=workers)
    train.run(_cfg(prepared_store, tmp_path / "full", str(drop), **kw))
    real_save = training._save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(_cfg(prepared_store, tmp_path / "cut", str(drop), **kw))
    monkeypatch.setattr(training, "_save_checkpoint", real_save)
    train.run(_cfg(prepared_store, tmp_path / "cut", str(drop), resume=True, **kw))
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- multi-GPU, eval
def test_distributed_sum_reduces_a_tensor_on_the_training_device(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def fake_all_reduce(t, *a, **k):
        seen.append(t.device)
        raise Stop

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    d = _parallel.Dist("cpu")
    d.world, d.device = 2, torch.device("meta")  # where NCCL would need it: the training device, not the CPU
    with pytest.raises(Stop):
        d.sum([1.0, 2.0])
    assert seen == [torch.device("meta")]


def test_process_group_backend_follows_the_device(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append((a, k)))
    _parallel.Dist("cpu")
    assert calls == [(("gloo",), {})]
    assert "cuda:nccl" in _parallel.backend(cuda=True) and "cpu:gloo" in _parallel.backend(cuda=True)


def test_eval_survives_a_batch_with_no_predictable_position(prepared_store, trained, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained / "model")
    ref = evaluate.evaluate_model(model, prepared_store, batch_size=2, max_rows=6, teachers=[])
    real, calls = evaluate.positions, []

    def first_batch_all_padding(batch, device="cpu"):
        calls.append(1)
        if len(calls) == 1:
            batch = {**batch, "segment_ids": torch.zeros_like(batch["segment_ids"])}
        return real(batch, device)

    monkeypatch.setattr(evaluate, "positions", first_batch_all_padding)
    res = evaluate.evaluate_model(model, prepared_store, batch_size=2, max_rows=6, teachers=[])
    assert res["rows"] == ref["rows"]
    assert sum(res["tokens"].values()) < sum(ref["tokens"].values())


# ---------------------------------------------------------------------------------------------- checkpoint temps
def test_stale_checkpoint_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / f".step-00000002.pt.tmp-{dead_pid}"
    stale.write_bytes(b"half")
    live = folder / f".step-00000002.pt.tmp-{os.getppid()}"  # a live process (our parent) may still be writing
    live.write_bytes(b"busy")
    ckpt.save(tmp_path, 4, {"step": 4})
    assert not stale.exists() and live.exists()
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-00000004.pt"]
