"""The bad-input table: every command refuses bad input with exit 2 and one line on stderr (no traceback),
and nothing half-written reads as valid afterwards (no new store, no new complete teacher, no finished run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from chorus.cli import main
from chorus.storage import Store
from tests.trainer.conftest import STUDENT_YAML, student_yaml, write_teacher


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_store, tokenizer_dir, corpus_file) -> dict:
    """A store with one complete synthetic teacher 't', its export, student YAMLs and an existing file."""
    root = tmp_path_factory.mktemp("bad")
    store = str(root / "store.zarr")
    shutil.copytree(small_store, store)
    v = Store.open(store, "r").manifest.tokenizer.vocab_size
    write_teacher(store, "t", lambda ids: np.log(np.full((*ids.shape, v), 1.0 / v)), top_k=4)
    assert main(["export", "--store", store, "--teacher", "t", "--out", str(root / "export")]) == 0
    student_yaml(root / "student.yaml", hidden=16, layers=1)
    (root / "typo.yaml").write_text((root / "student.yaml").read_text().replace("num_hidden_layers", "num_hiden_layers"))
    (root / "odd.yaml").write_text(STUDENT_YAML.format(hidden=63, inter=64, layers=1).replace("heads: 2", "heads: 4"))
    (root / "file.txt").write_text("precious")
    (root / "list.yaml").write_text("- a\n- b\n")
    return {"store": store, "tok": tokenizer_dir, "corpus": corpus_file, "root": str(root),
            "export": str(root / "export"), "student": str(root / "student.yaml")}


def _prep(*extra: str) -> list[str]:
    return ["prepare", "--dataset", "{corpus}", "--tokenizer", "{tok}", "--out", "{tmp}/new.zarr", "--seq-len", "32",
            *extra]


def _cache(*extra: str) -> list[str]:
    return ["cache", "--store", "{store}", "--teacher", "{tmp}/no-teacher", *extra]


def _train(*extra: str) -> list[str]:
    return ["train", "--store", "{store}", "--student", "{student}", "--out", "{tmp}/run", "--steps", "2", *extra]


def _broken_export(tmp: Path, env: dict, how: str) -> None:
    dst = tmp / "exp"
    shutil.copytree(env["export"], dst)
    if how == "missing-parquet":
        os.remove(sorted(dst.glob("*.parquet"))[0])
    elif how == "truncated-json":
        path = dst / "chorus.json"
        path.write_text(path.read_text()[: len(path.read_text()) // 2])


CASES = {
    # prepare
    "prepare-rows-per-shard-0": _prep("--rows-per-shard", "0"),
    "prepare-rows-per-shard-neg": _prep("--rows-per-shard", "-4"),
    "prepare-batch-size-0": _prep("--batch-size", "0"),
    "prepare-seq-len-1": _prep("--seq-len", "1"),
    "prepare-seq-len-text": _prep("--seq-len", "abc"),
    "prepare-valid-fraction-1.5": _prep("--valid-fraction", "1.5"),
    "prepare-max-docs-neg": _prep("--max-docs", "-1"),
    "prepare-missing-dataset": ["prepare", "--dataset", "{tmp}/none.jsonl", "--tokenizer", "{tok}", "--out", "{tmp}/n"],
    "prepare-missing-tokenizer": ["prepare", "--dataset", "{corpus}", "--tokenizer", "{tmp}/no-tok", "--out", "{tmp}/n"],
    "prepare-offline-hub-tokenizer": ["prepare", "--dataset", "{corpus}", "--tokenizer", "chorus-nobody/no-such-tok",
                                      "--out", "{tmp}/n"],
    "prepare-out-is-a-file": ["prepare", "--dataset", "{corpus}", "--tokenizer", "{tok}", "--out", "{root}/file.txt",
                              "--overwrite"],
    # cache
    "cache-missing-teacher": _cache(),
    "cache-offline-hub-teacher": ["cache", "--store", "{store}", "--teacher", "chorus-nobody/no-such-model"],
    "cache-top-k-0": _cache("--top-k", "0"),
    "cache-batch-size-0": _cache("--batch-size", "0"),
    "cache-samples-neg": _cache("--samples", "-1"),
    "cache-shard-out-of-range": _cache("--shard", "3/2"),
    "cache-name-with-slash": _cache("--name", "sub/dir"),
    "cache-name-dotdot": _cache("--name", ".."),
    "cache-no-store": ["cache", "--store", "{tmp}/no.zarr", "--teacher", "{tmp}/no-teacher"],
    # calibrate, blend
    "calibrate-unknown-teacher": ["calibrate", "--store", "{store}", "--teacher", "nobody"],
    "calibrate-no-store": ["calibrate", "--store", "{tmp}/no.zarr", "--teacher", "t"],
    "calibrate-max-rows-0": ["calibrate", "--store", "{store}", "--teacher", "t", "--max-rows", "0"],
    "blend-unknown-teacher": ["blend", "--store", "{store}", "--teachers", "t,nobody"],
    "blend-split-test": ["blend", "--store", "{store}", "--teachers", "t", "--split", "test"],
    # train
    "train-lr-nan": _train("--lr", "nan"),
    "train-lr-neg": _train("--lr", "-1"),
    "train-log-every-0": _train("log_every=0"),
    "train-batch-size-0": _train("--batch-size", "0"),
    "train-temperature-0": _train("--temperature", "0"),
    "train-unknown-key": _train("lrr=0.1"),
    "train-unknown-teacher": _train("--teachers", "nobody"),
    "train-student-typo": ["train", "--store", "{store}", "--student", "{root}/typo.yaml", "--out", "{tmp}/run"],
    "train-student-hidden-63": ["train", "--store", "{store}", "--student", "{root}/odd.yaml", "--out", "{tmp}/run"],
    "train-student-missing": ["train", "--store", "{store}", "--student", "{tmp}/none.yaml", "--out", "{tmp}/run"],
    "train-config-not-a-mapping": _train("--config", "{root}/list.yaml"),
    "train-config-missing": _train("--config", "{tmp}/none.yaml"),
    # eval
    "eval-missing-model": ["eval", "--store", "{store}", "--model", "{tmp}/no-model"],
    "eval-split-test": ["eval", "--store", "{store}", "--model", "teacher:t", "--split", "test"],
    "eval-unknown-teacher-cache": ["eval", "--store", "{store}", "--model", "teacher:nobody"],
    "eval-batch-size-0": ["eval", "--store", "{store}", "--model", "teacher:t", "--batch-size", "0"],
    # export
    "export-unknown-teacher": ["export", "--store", "{store}", "--teacher", "nobody", "--out", "{tmp}/e"],
    "export-to-a-file": ["export", "--store", "{store}", "--teacher", "t", "--out", "{root}/file.txt"],
    "export-format-csv": ["export", "--store", "{store}", "--teacher", "t", "--out", "{tmp}/e", "--format", "csv"],
    # import
    "import-missing-src": ["import", "--store", "{store}", "--src", "{tmp}/none"],
    "import-missing-parquet": ["import", "--store", "{store}", "--src", "{tmp}/exp", "--name", "u"],
    "import-truncated-sidecar": ["import", "--store", "{store}", "--src", "{tmp}/exp", "--name", "u"],
    "import-name-with-slash": ["import", "--store", "{store}", "--src", "{export}", "--name", "sub/dir"],
    "import-name-dotdot": ["import", "--store", "{store}", "--src", "{export}", "--name", "../x"],
    # inspect, verify
    "inspect-no-store": ["inspect", "{tmp}/no.zarr"],
    "inspect-bad-storage-options": ["inspect", "{store}", "--storage-options", "{{not json"],
    "verify-no-store": ["verify", "{tmp}/no.zarr"],
    "verify-storage-options-list": ["verify", "{store}", "--storage-options", "[1]"],
    # demo
    "demo-threads-0": ["demo", "--out", "{tmp}/demo", "--threads", "0"],
    "demo-workers-0": ["demo", "--out", "{tmp}/demo", "--workers", "0"],
}
BROKEN = {"import-missing-parquet": "missing-parquet", "import-truncated-sidecar": "truncated-json"}


def _state(store: str) -> tuple:
    st = Store.open(store, "r")
    return st.manifest.fingerprint, sorted((n, st.teacher_manifest(n).status) for n in st.teacher_names())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(env, tmp_path, capsys, case):
    if case in BROKEN:
        _broken_export(tmp_path, env, BROKEN[case])
    before = _state(env["store"])
    argv = [a.format(tmp=tmp_path, **env) for a in CASES[case]]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1 and "Traceback" not in err[0] and err[0].startswith(f"chorus {argv[0]}: error: "), err
    assert _state(env["store"]) == before  # no teacher appeared or changed status
    for left in ("new.zarr", "n", "no.zarr"):  # no store was marked prepared
        assert not Store.exists(str(tmp_path / left)) or "chorus" not in Store.open(str(tmp_path / left), "r").group.attrs
    assert not (tmp_path / "run" / "model" / "chorus.json").exists()
    assert Path(env["root"], "file.txt").read_text() == "precious"
    if case.startswith("export"):
        assert not (tmp_path / "e" / "chorus.json").exists()
    json.dumps(argv)  # the case is plain data
