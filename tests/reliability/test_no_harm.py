"""Commands never destroy what is not theirs and never run code from a file they read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chorus.cli import main
from chorus.config import TrainConfig
from chorus.errors import ChorusError
from chorus.storage import Store
from chorus.trainer import _checkpoint as ckpt
from chorus.trainer import train
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
