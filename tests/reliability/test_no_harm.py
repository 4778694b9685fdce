"""Commands never destroy what is not theirs and never run code from a file they read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chorus.cli import main
from chorus.commands import train
from chorus.config import TrainConfig
from chorus.errors import ChorusError
from chorus.store import Store
from chorus.student import checkpoint as ckpt
from tests.trainer.conftest import student_yaml


def _prepare_args(corpus: str, tok: str, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--dataset", corpus, "--tokenizer", tok, "--out", str(out), "--seq-len", "32",
            "--domain-field", "domain", *extra]


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_never_deletes_a_directory_that_is_not_a_store(tmp_path, corpus_file, tokenizer_dir, capsys, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep").write_text("x")
    code = main(_prepare_args(corpus_file, tokenizer_dir, out, *(["--overwrite"] if overwrite else [])))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a chorus store" in err[0]
    assert (out / "keep").read_text() == "x" and sorted(os.listdir(out)) == ["keep"]


def test_prepare_never_replaces_a_regular_file(tmp_path, corpus_file, tokenizer_dir, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("precious")
    assert main(_prepare_args(corpus_file, tokenizer_dir, out, "--overwrite")) == 2
    assert "not a chorus store" in capsys.readouterr().err
    assert out.read_text() == "precious"


def test_prepare_may_replace_its_own_store_and_an_empty_directory(tmp_path, corpus_file, tokenizer_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_prepare_args(corpus_file, tokenizer_dir, empty)) == 0
    assert Store.open(str(empty), "r").manifest.seq_len == 32
    # a killed prepare leaves a group without manifest: marked as chorus's, so a rerun may replace it
    half = tmp_path / "half"
    Store.open(str(half), "w")
    assert main(_prepare_args(corpus_file, tokenizer_dir, half)) == 0
    assert main(_prepare_args(corpus_file, tokenizer_dir, empty, "--overwrite", "--seq-len", "16")) == 0
    assert Store.open(str(empty), "r").manifest.seq_len == 16


def _train_args(store: str, student: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--store", store, "--student", student, "--out", str(out), "--steps", "1", "--batch-size", "4",
            "warmup_steps=1", "eval_rows=8", "eval_every=0", "save_every=0", *extra]


def _compress_args(store: str, model: str, out: Path, *extra: str) -> list[str]:
    return ["compress", "--store", store, "--model", model, "--out", str(out), "--target-params", "0.5", "--stages",
            "1", "--steps", "1", *extra]


def _users_directory(tmp_path: Path, kind: str) -> Path:
    """A directory holding a user's work: a file at the top and one in a subfolder, as ``config.yaml`` and
    ``model/`` would look to a naive check."""
    out = tmp_path / kind
    (out / "model").mkdir(parents=True)
    (out / "thesis.tex").write_text("precious")
    (out / "model" / "notes.txt").write_text("mine")
    return out


def _untouched(out: Path) -> None:
    assert (out / "thesis.tex").read_text() == "precious" and (out / "model" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["model", "thesis.tex"] and os.listdir(out / "model") == ["notes.txt"]


@pytest.mark.parametrize("command", ["train", "compress"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_train_and_compress_never_touch_a_directory_chorus_did_not_create(tmp_path, prepared_store, capsys, command,
                                                                         overwrite):
    """``--overwrite`` used to ``rmtree`` whatever ``--out`` named; without it a run wrote into a user's folder (so a
    later ``--overwrite`` would delete it): both are refused with one line naming the path, and nothing changes."""
    student = student_yaml(tmp_path / "student.yaml", hidden=16, layers=1)
    out = _users_directory(tmp_path, command)
    extra = ["--overwrite"] if overwrite else []
    args = _train_args(prepared_store, student, out, *extra) if command == "train" else \
        _compress_args(prepared_store, student, out, *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0], err
    assert ("not created by chorus" if overwrite else "chorus did not create") in err[0], err
    _untouched(out)


def test_overwrite_replaces_only_what_chorus_created(tmp_path, prepared_store):
    """A run directory chorus made is replaced whole under ``--overwrite``; a file is never replaced."""
    from chorus import rundir

    student = student_yaml(tmp_path / "student.yaml", hidden=16, layers=1)
    out = tmp_path / "run"
    assert main(_train_args(prepared_store, student, out)) == 0
    assert rundir.owned(out) and (out / "model").is_dir()
    (out / "stale.txt").write_text("from the old run")
    assert main(_train_args(prepared_store, student, out, "--overwrite", "--steps", "2")) == 0
    assert not (out / "stale.txt").exists() and (out / "model").is_dir() and rundir.owned(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_train_args(prepared_store, student, empty, "--overwrite")) == 0 and rundir.owned(empty)
    note = tmp_path / "note.txt"
    note.write_text("precious")
    with pytest.raises(ChorusError, match="not created by chorus"):
        rundir.replace(note, "train")
    assert note.read_text() == "precious"


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_planted_pickle_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "evil": _Boom()}, folder / "step-00000001.pt")
    with pytest.raises(ChorusError, match="refusing to load it"):
        ckpt.load(folder / "step-00000001.pt")
    assert not (tmp_path / "PWNED").exists()


def test_resume_refuses_a_planted_checkpoint_without_running_it(tmp_path, prepared_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    student = student_yaml(tmp_path / "student.yaml")
    cfg = dict(store=prepared_store, student=student, out=str(tmp_path / "run"), steps=4, batch_size=4,
               eval_every=0, eval_rows=8, save_every=2, log_every=1)
    train.run(TrainConfig(**cfg))
    state = ckpt.load(ckpt.latest(tmp_path / "run"))  # a real checkpoint loads under weights_only
    assert state["step"] == 4
    state["evil"] = _Boom()
    torch.save(state, tmp_path / "run" / "checkpoints" / "step-00000005.pt")
    with pytest.raises(ChorusError, match="refusing to load it"):
        train.run(TrainConfig(**cfg, resume=True))
    assert not (tmp_path / "PWNED").exists()
