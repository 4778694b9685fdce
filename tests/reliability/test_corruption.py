"""Each kind of store damage is named by `chorus verify` (exit 2, one line: the problem and the fix) and refused
by `chorus train` before step 1 and by `chorus eval` (of a cached teacher and of a model) with one line, never a raw
FileNotFoundError/JSONDecodeError traceback."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from chorus import cli
from chorus.commands import cache
from chorus.config import CacheConfig
from tests.pipeline.conftest import CACHE_ARGS
from tests.trainer.conftest import student_yaml


@pytest.fixture(scope="module")
def cached_small(tmp_path_factory, small_store, teacher_dir) -> str:
    out = str(tmp_path_factory.mktemp("corrupt") / "store.zarr")
    shutil.copytree(small_store, out)
    cache.run(CacheConfig(store=out, teacher=teacher_dir, **CACHE_ARGS))
    return out


def _json_edit(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _truncate(path: str) -> None:
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) // 2)


def _chunk(root: str, unit: str, name: str, shard: int) -> str:
    ndim = len(json.load(open(os.path.join(root, unit, name, "zarr.json")))["shape"])
    return os.path.join(root, unit, name, "c", str(shard), *["0"] * (ndim - 1))


T = "teachers/tiny"
KINDS = {
    # name: (damage(root), words verify and train must name)
    "deleted teacher commit": (lambda r: os.remove(f"{r}/{T}/_commits/000002.json"), "shard 2"),
    "truncated teacher zarr.json": (lambda r: _truncate(f"{r}/{T}/zarr.json"), "not valid JSON"),
    "edited data_type": (lambda r: _json_edit(f"{r}/{T}/topk_ids/zarr.json",
                                              lambda d: d.update(data_type="int32")), "data_type"),
    "deleted chunk": (lambda r: os.remove(_chunk(r, T, "topk_logprobs", 1)), "shard 1"),
    "flipped bytes": (lambda r: [_flip(p) for p in glob.glob(f"{r}/{T}/topk_ids/c/*/0/0")],
                      "shard 0"),
    "truncated commit record": (lambda r: _truncate(f"{r}/{T}/_commits/000001.json"), "unreadable"),
    "wrong row range": (lambda r: _json_edit(f"{r}/{T}/_commits/000001.json", lambda d: d.update(row_start=0)),
                        "shard 1"),
    "foreign fingerprint": (lambda r: _json_edit(f"{r}/{T}/_commits/000004.json",
                                                 lambda d: d.update(fingerprint="0" * 32)), "another cache"),
    "edited array shape": (lambda r: _json_edit(f"{r}/{T}/stats/zarr.json",
                                                lambda d: d["shape"].__setitem__(0, 7)), "shape"),
    "name with ../": (lambda r: _json_edit(f"{r}/{T}/zarr.json",
                                           lambda d: d["attributes"]["chorus"].update(name="../tiny")), "name"),
    "manifest field of wrong type": (lambda r: _json_edit(f"{r}/{T}/zarr.json",
                                                          lambda d: d["attributes"]["chorus"].update(top_k="8")),
                                     "top_k"),
    "deleted array metadata": (lambda r: os.remove(f"{r}/{T}/tail_logz/zarr.json"), "tail_logz"),
    "deleted corpus commit": (lambda r: os.remove(f"{r}/corpus/_commits/000000.json"), "shard 0"),
    "deleted corpus chunk": (lambda r: os.remove(_chunk(r, "corpus", "input_ids", 2)), "shard 2"),
    "stray commit past the corpus": (lambda r: _stray(r), "shard 99"),
    "flipped tokenizer copy": (lambda r: _flip(f"{r}/tokenizer/tokenizer.json"), "tokenizer.json"),
}


def _stray(root: str) -> None:
    shutil.copy(f"{root}/{T}/_commits/000000.json", f"{root}/{T}/_commits/000099.json")
    _json_edit(f"{root}/{T}/_commits/000099.json", lambda d: d.update(shard=99))


def _flip(path: str) -> None:
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_damage_is_named_by_verify_and_refused_by_train(kind, cached_small, tmp_path, capsys):
    damage, needle = KINDS[kind]
    root = str(tmp_path / "store.zarr")
    shutil.copytree(cached_small, root)
    assert cli.main(["verify", root]) == 0
    capsys.readouterr()
    damage(root)
    assert cli.main(["verify", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err
    assert "chorus cache" in err or "chorus prepare" in err or "--overwrite" in err or "re-export" in err, err
    student = student_yaml(tmp_path / "student.yaml")
    rc = cli.main(["train", "--store", root, "--teachers", "tiny", "--student", student, "--out",
                   str(tmp_path / "run"), "--steps", "1", "--batch-size", "4", "eval_every=0"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err  # progress lines may precede it
    assert not (tmp_path / "run" / "model").exists()
    for model in ("teacher:tiny", student):  # eval of the cached teacher, and of a model compared with it
        rc = cli.main(["eval", "--store", root, "--model", model, "--teachers", "tiny", "--out", str(tmp_path / "m.json")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in err, (model, err)
        assert not (tmp_path / "m.json").exists()
