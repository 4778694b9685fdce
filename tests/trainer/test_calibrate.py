"""`chorus calibrate`: a known over-confidence is recovered and written into the teacher's manifest."""

from __future__ import annotations

import numpy as np
import pytest

from chorus.cli import main as cli_main
from chorus.commands import calibrate
from chorus.config import CalibrateConfig
from chorus.errors import ChorusError
from chorus.store import Store
from tests.trainer.conftest import bigram_teacher, copy_store, write_teacher

T_STAR = 2.0


def overconfident(vocab: int, t_star: float, seed: int = 0, head: int = 16):
    """Cached log-probs of q ∝ p^{t_star}, where the corpus's next token is a draw from p.

    p = ½ softmax over a random head of ``head`` ids + ½ uniform: the ids outside any top-k share one
    value, so the even-tail convention is exact here and only the temperature is to be found. The gold
    token is made a sample of p by swapping the drawn id's value with the gold id's (p is exchangeable
    across ids, so the pair (p, gold) has the right joint law)."""
    rng = np.random.default_rng(seed)

    def fn(ids: np.ndarray) -> np.ndarray:
        n, length = ids.shape
        p = np.full((n, length, vocab), 0.5 / vocab)
        h = rng.permuted(np.tile(np.arange(vocab), (n, length, 1)), axis=-1)[..., :head]
        z = rng.normal(0, 1.5, (n, length, head))
        np.put_along_axis(p, h, 0.5 / vocab + 0.5 * np.exp(z) / np.exp(z).sum(-1, keepdims=True), -1)
        drawn = (rng.random((n, length, 1)) > p.cumsum(-1)).sum(-1, keepdims=True).clip(max=vocab - 1)
        gold = np.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)[..., None]
        pd, pg = np.take_along_axis(p, drawn, -1), np.take_along_axis(p, gold, -1)
        np.put_along_axis(p, drawn, pg, -1)
        np.put_along_axis(p, gold, pd, -1)
        s = t_star * np.log(p)
        return s - np.log(np.exp(s).sum(-1, keepdims=True))

    return fn


def test_recovers_a_known_temperature_and_writes_it(tmp_path, prepared_store, vocab_size, capsys):
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    write_teacher(url, "bold", overconfident(vocab_size, T_STAR), top_k=32)
    res = calibrate.run(CalibrateConfig(store=url, teacher="bold"))
    assert res["temperature"] == pytest.approx(T_STAR, rel=0.05)
    assert res["nll_after"] < res["nll_before"] and res["ece_after"] < res["ece_before"]
    m = Store.open(url, "r").teacher_manifest("bold")
    assert m.temperature == res["temperature"]
    assert set(m.calibration) >= {"nll_before", "nll_after", "ece_before", "ece_after", "rows"}
    assert m.calibration["rows"] == Store.open(url, "r").manifest.split_rows["valid"]
    out = capsys.readouterr().out
    assert "before" in out and "after" in out
    # refitting starts from the cached values, not from the recorded temperature: the same answer
    assert calibrate.run(CalibrateConfig(store=url, teacher="bold"))["temperature"] == res["temperature"]


def test_a_calibrated_teacher_stays_near_one(tmp_path, prepared_store, vocab_size):
    """A teacher whose gold tokens are draws from its own distribution (T* = 1) is left near 1."""
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    write_teacher(url, "fair", overconfident(vocab_size, 1.0, seed=3), top_k=32)
    assert calibrate.run(CalibrateConfig(store=url, teacher="fair"))["temperature"] == pytest.approx(1.0, rel=0.05)


def test_cli_refuses_an_incomplete_teacher(tmp_path, prepared_store, vocab_size, capsys):
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    write_teacher(url, "half", bigram_teacher(vocab_size, 1), top_k=4, status="incomplete", shards=[0])
    assert cli_main(["calibrate", "--store", url, "--teacher", "half"]) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher 'half' is not complete" in err and len(err.splitlines()) == 1
    with pytest.raises(ChorusError, match="no teacher 'nope'"):
        calibrate.run(CalibrateConfig(store=url, teacher="nope"))
