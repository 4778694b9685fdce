"""The examples in examples/ run as written, on a tiny model and the test store, and their loss falls."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import build_tiny_llama

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def student(tmp_path_factory, vocab_size) -> str:
    return build_tiny_llama(str(tmp_path_factory.mktemp("student")), vocab_size, seed=9)


def test_plain_loop(teacher_store, student):
    losses = _load("plain_loop").main(["--store", teacher_store, "--student", student, "--teachers", "a,b",
                                       "--steps", "30", "--batch-size", "4"])
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])


def test_hf_trainer(teacher_store, student, tmp_path):
    metrics = _load("hf_trainer").main(["--store", teacher_store, "--student", student, "--teachers", "a,b",
                                        "--out", str(tmp_path), "--steps", "10"])
    assert metrics["train_loss"] > 0 and (tmp_path / "config.json").is_file()


def test_trl_sft(teacher_store, student, tokenizer_dir, tmp_path):
    pytest.importorskip("trl")
    metrics = _load("trl_sft").main(["--store", teacher_store, "--student", student, "--tokenizer", tokenizer_dir,
                                     "--teachers", "a", "--out", str(tmp_path), "--steps", "10"])
    assert metrics["train_loss"] > 0 and (tmp_path / "config.json").is_file()
