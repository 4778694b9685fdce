"""The CLI: every command has help built from its config, and errors are one line with exit code 2."""

from __future__ import annotations

import dataclasses

import pytest

from chorus.cli import build_parser, main
from chorus.commands import COMMANDS


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_config_key(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(COMMANDS[command].config):
        assert (f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-")) in out


def test_inspect_and_verify(prepared_store, capsys):
    assert main(["inspect", prepared_store]) == 0
    out = capsys.readouterr().out
    assert "domains      code, prose, names" in out and "B/token" in out
    assert main(["verify", prepared_store]) == 0
    assert "0 bad" in capsys.readouterr().out


def test_verify_names_the_bad_shard_and_fails(tmp_path, prepared_store, capsys):
    import shutil

    from chorus.store import Store

    copy = tmp_path / "copy.zarr"
    shutil.copytree(prepared_store, copy)
    store = Store.open(str(copy), "r")
    path = store.chunk_path("corpus", "input_ids", 3)
    raw = bytearray(store.fs.cat_file(path))
    raw[5] ^= 1
    store.fs.pipe_file(path, bytes(raw))
    assert main(["verify", str(copy)]) == 2
    captured = capsys.readouterr()
    assert "BAD  corpus/input_ids shard 3 (rows 24:32)" in captured.out
    assert "is damaged (1 problem" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_inspect_missing_store_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chorus inspect: error: no chorus store") and "\n" not in err


def test_parser_builds():
    assert build_parser().prog == "chorus"
