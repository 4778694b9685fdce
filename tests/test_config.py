"""Every file in configs/ loads and validates; errors name the key, the value and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from chorus.commands import COMMANDS
from chorus.config import PrepareConfig, TrainConfig, load_config
from chorus.errors import ChorusError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def _command_of(path: Path) -> str | None:
    return path.relative_to(path.parents[1]).parts[0] if path.parent.name in COMMANDS else None


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name in COMMANDS], ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_file_loads(path):
    cfg = load_config(COMMANDS[path.parent.name].config, str(path))
    assert cfg is not None


def test_configs_exist_for_every_command():
    have = {p.parent.name for p in CONFIGS}
    missing = [c for c in COMMANDS if c not in have]
    assert not missing, f"configs/ lacks an example for: {missing}"


def test_precedence_file_then_flags_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: a\ntokenizer: t\nout: o\nseq_len: 64\nvalid_fraction: 0.1\n")
    cfg = load_config(PrepareConfig, str(f), ["seq_len=256"], seq_len="128", text_field="body")
    assert (cfg.seq_len, cfg.text_field, cfg.valid_fraction, cfg.dataset) == (256, "body", 0.1, "a")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["seq_len=abc"], "prepare key 'seq_len': expected an integer, got 'abc'"),
        (["overwrite=maybe"], "prepare key 'overwrite': expected true or false, got 'maybe'"),
        (["colour=red"], "unknown prepare config key 'colour'"),
        (["seq_len"], "override 'seq_len': expected key=value"),
    ],
)
def test_errors_name_key_value_and_expectation(overrides, message):
    with pytest.raises(ChorusError, match=message):
        load_config(PrepareConfig, None, overrides, dataset="a", tokenizer="t", out="o")


def test_required_key_and_choices():
    with pytest.raises(ChorusError, match="'tokenizer' is required"):
        load_config(PrepareConfig, None, [], dataset="a", out="o")
    with pytest.raises(ChorusError, match="train key 'loss': expected one of forward_kl, reverse_kl, jsd, skew_kl, got 'l2'"):
        load_config(TrainConfig, None, ["loss=l2"], store="s", student="x", out="o")


def test_lists_and_mappings_from_strings():
    cfg = load_config(TrainConfig, None, ["teachers=a,b,c", "teacher_weights={a: 2.0}"], store="s", student="x", out="o")
    assert cfg.teachers == ["a", "b", "c"] and cfg.teacher_weights == {"a": 2.0}
