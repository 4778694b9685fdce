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
from chorus.store import Store
from tests.trainer.conftest import STUDENT_YAML, student_yaml, write_teacher


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_store, tokenizer_dir, corpus_file, teacher_dir) -> dict:
    """A store with one complete synthetic teacher 't', its export, student YAMLs and an existing file."""
    root = tmp_path_factory.mktemp("bad")
    store = str(root / "store.zarr")
    shutil.copytree(small_store, store)
    v = Store.open(store, "r").manifest.tokenizer.vocab_size
    write_teacher(store, "t", lambda ids: np.log(np.full((*ids.shape, v), 1.0 / v)), top_k=4)
    write_teacher(store, "t2", lambda ids: np.log(np.full((*ids.shape, v), 1.0 / v)), top_k=4)  # blend needs two
    assert main(["export", "--store", store, "--teacher", "t", "--out", str(root / "export")]) == 0
    student_yaml(root / "student.yaml", hidden=16, layers=1)
    (root / "typo.yaml").write_text((root / "student.yaml").read_text().replace("num_hidden_layers", "num_hiden_layers"))
    (root / "odd.yaml").write_text(STUDENT_YAML.format(hidden=63, inter=64, layers=1).replace("heads: 2", "heads: 4"))
    (root / "file.txt").write_text("precious")
    (root / "list.yaml").write_text("- a\n- b\n")
    return {"store": store, "tok": tokenizer_dir, "corpus": corpus_file, "root": str(root), "teacher": teacher_dir,
            "export": str(root / "export"), "student": str(root / "student.yaml")}


def _prep(*extra: str) -> list[str]:
    return ["prepare", "--dataset", "{corpus}", "--tokenizer", "{tok}", "--out", "{tmp}/new.zarr", "--seq-len", "32",
            *extra]


def _cache(*extra: str) -> list[str]:  # a real teacher: each case has exactly one thing wrong
    return ["cache", "--store", "{store}", "--teacher", "{teacher}", "--name", "fresh", *extra]


def _train(*extra: str) -> list[str]:
    return ["train", "--store", "{store}", "--student", "{student}", "--out", "{tmp}/run", "--steps", "2", *extra]


def _compress(*extra: str) -> list[str]:
    return ["compress", "--store", "{store}", "--model", "{student}", "--out", "{tmp}/run", "--steps", "2", *extra]


def _eval(*extra: str) -> list[str]:
    return ["eval", "--store", "{store}", "--model", "teacher:t", *extra]


def _broken_export(tmp: Path, env: dict, how: str) -> None:
    dst = tmp / "exp"
    shutil.copytree(env["export"], dst)
    if how == "missing-parquet":
        os.remove(sorted(dst.glob("*.parquet"))[0])
    elif how == "truncated-json":
        path = dst / "chorus.json"
        path.write_text(path.read_text()[: len(path.read_text()) // 2])


# case → (argv, a fragment of the one-line error that names what is wrong in it)
CASES = {
    # prepare
    "prepare-rows-per-shard-0": (_prep("--rows-per-shard", "0"), "--rows-per-shard"),
    "prepare-rows-per-shard-neg": (_prep("--rows-per-shard", "-4"), "--rows-per-shard"),
    "prepare-batch-size-0": (_prep("--batch-size", "0"), "--batch-size"),
    "prepare-seq-len-1": (_prep("--seq-len", "1"), "--seq-len"),
    "prepare-seq-len-text": (_prep("--seq-len", "abc"), "'seq_len'"),
    "prepare-valid-fraction-1.5": (_prep("--valid-fraction", "1.5"), "--valid-fraction"),
    "prepare-max-docs-neg": (_prep("--max-docs", "-1"), "--max-docs"),
    "prepare-missing-dataset": (["prepare", "--dataset", "{tmp}/none.jsonl", "--tokenizer", "{tok}", "--out",
                                 "{tmp}/n"], "none.jsonl"),
    "prepare-missing-tokenizer": (["prepare", "--dataset", "{corpus}", "--tokenizer", "{tmp}/no-tok", "--out",
                                   "{tmp}/n"], "no-tok"),
    "prepare-offline-hub-tokenizer": (["prepare", "--dataset", "{corpus}", "--tokenizer", "chorus-nobody/no-such-tok",
                                       "--out", "{tmp}/n"], "chorus-nobody/no-such-tok"),
    "prepare-out-is-a-file": (["prepare", "--dataset", "{corpus}", "--tokenizer", "{tok}", "--out", "{root}/file.txt",
                               "--overwrite"], "file.txt"),
    "prepare-unknown-key": (_prep("seq_lenn=8"), "seq_lenn"),
    "prepare-unknown-text-field": (_prep("--text-field", "body"), "body"),
    # cache
    "cache-missing-teacher": (["cache", "--store", "{store}", "--teacher", "{tmp}/no-teacher"], "no-teacher"),
    "cache-offline-hub-teacher": (["cache", "--store", "{store}", "--teacher", "chorus-nobody/no-such-model"],
                                  "chorus-nobody/no-such-model"),
    "cache-top-k-0": (_cache("--top-k", "0"), "--top-k"),
    "cache-batch-size-0": (_cache("--batch-size", "0"), "--batch-size"),
    "cache-samples-neg": (_cache("--samples", "-1"), "samples"),
    "cache-shard-out-of-range": (_cache("--shard", "3/2"), "3/2"),
    "cache-shard-not-a-fraction": (_cache("--shard", "half"), "half"),
    "cache-name-with-slash": (_cache("--name", "sub/dir"), "sub/dir"),
    "cache-name-dotdot": (_cache("--name", ".."), "'..'"),
    "cache-no-store": (["cache", "--store", "{tmp}/no.zarr", "--teacher", "{teacher}"], "no.zarr"),
    "cache-dtype-fp8": (_cache("--dtype", "fp8"), "fp8"),
    "cache-device-tpu": (_cache("--device", "tpu"), "tpu"),
    "cache-value-codec-zip": (_cache("value_codec=zip"), "zip"),
    "cache-top-k-text": (_cache("--top-k", "many"), "'top_k'"),
    "cache-unknown-key": (_cache("topk=8"), "topk"),
    "cache-name-exists-other-settings": (["cache", "--store", "{store}", "--teacher", "{teacher}", "--name", "t",
                                          "--top-k", "4"], "'t'"),
    "cache-tokenizer-missing": (_cache("--tokenizer", "{tmp}/no-tok"), "no-tok"),
    # calibrate, blend
    "calibrate-unknown-teacher": (["calibrate", "--store", "{store}", "--teacher", "nobody"], "nobody"),
    "calibrate-no-store": (["calibrate", "--store", "{tmp}/no.zarr", "--teacher", "t"], "no.zarr"),
    "calibrate-max-rows-0": (["calibrate", "--store", "{store}", "--teacher", "t", "--max-rows", "0"], "--max-rows"),
    "calibrate-split-test": (["calibrate", "--store", "{store}", "--teacher", "t", "--split", "test"], "test"),
    "calibrate-unknown-key": (["calibrate", "--store", "{store}", "--teacher", "t", "teachr=t"], "teachr"),
    "blend-unknown-teacher": (["blend", "--store", "{store}", "--teachers", "t,t2,nobody"], "nobody"),
    "blend-split-test": (["blend", "--store", "{store}", "--teachers", "t,t2", "--split", "test"], "test"),
    "blend-no-store": (["blend", "--store", "{tmp}/no.zarr", "--teachers", "t,t2"], "no.zarr"),
    "blend-max-rows-0": (["blend", "--store", "{store}", "--teachers", "t,t2", "--max-rows", "0"], "--max-rows"),
    "blend-unknown-key": (["blend", "--store", "{store}", "teachrs=t"], "teachrs"),
    # train
    "train-lr-nan": (_train("--lr", "nan"), "lr"),
    "train-lr-neg": (_train("--lr", "-1"), "lr"),
    "train-log-every-0": (_train("log_every=0"), "log_every"),
    "train-batch-size-0": (_train("--batch-size", "0"), "batch_size"),
    "train-temperature-0": (_train("--temperature", "0"), "temperature"),
    "train-unknown-key": (_train("lrr=0.1"), "lrr"),
    "train-unknown-teacher": (_train("--teachers", "nobody"), "nobody"),
    "train-student-typo": (["train", "--store", "{store}", "--student", "{root}/typo.yaml", "--out", "{tmp}/run"],
                           "num_hiden_layers"),
    "train-student-hidden-63": (["train", "--store", "{store}", "--student", "{root}/odd.yaml", "--out", "{tmp}/run"],
                                "hidden_size 63"),
    "train-student-missing": (["train", "--store", "{store}", "--student", "{tmp}/none.yaml", "--out", "{tmp}/run"],
                              "none.yaml"),
    "train-config-not-a-mapping": (_train("--config", "{root}/list.yaml"), "list.yaml"),
    "train-config-missing": (_train("--config", "{tmp}/none.yaml"), "none.yaml"),
    "train-kd-weight-2": (_train("--kd-weight", "2"), "kd_weight"),
    "train-steps-0": (_train("--steps", "0"), "steps"),
    "train-loss-unknown": (_train("--teachers", "t", "--loss", "hellinger"), "hellinger"),
    "train-aggregate-unknown": (_train("--teachers", "t", "--aggregate", "median"), "median"),
    "train-weighting-unknown": (_train("--teachers", "t", "--weighting", "vote"), "vote"),
    "train-target-unknown": (_train("--teachers", "t", "--target", "dense"), "dense"),
    "train-samples-without-samples": (_train("--teachers", "t", "--target", "samples"), "samples"),
    "train-no-store": (["train", "--store", "{tmp}/no.zarr", "--student", "{student}", "--out", "{tmp}/run"],
                       "no.zarr"),
    "train-out-is-a-file": (["train", "--store", "{store}", "--student", "{student}", "--out", "{root}/file.txt"],
                            "file.txt"),
    "train-device-tpu": (_train("--device", "tpu"), "tpu"),
    "train-warmup-neg": (_train("warmup_steps=-1"), "warmup_steps"),
    # compress
    "compress-stages-0": (_compress("--stages", "0"), "stages"),
    "compress-steps-below-stages": (_compress("--stages", "3"), "steps"),
    "compress-target-params-1": (_compress("--target-params", "1.0"), "target_params"),
    "compress-sparsity-0": (_compress("--method", "magnitude", "--sparsity", "0"), "sparsity"),
    "compress-axes-unknown": (_compress("axes=[rows]"), "axes"),
    "compress-train-owns-steps": (_compress("train={{steps: 3}}"), "steps"),
    "compress-calibration-rows-0": (_compress("calibration_rows=0"), "calibration_rows"),
    "compress-method-unknown": (_compress("--method", "lottery"), "lottery"),
    "compress-model-missing": (["compress", "--store", "{store}", "--model", "{tmp}/no-model", "--out", "{tmp}/run"],
                               "no-model"),
    "compress-unknown-key": (_compress("stagez=2"), "stagez"),
    "compress-out-is-a-file": (["compress", "--store", "{store}", "--model", "{student}", "--out", "{root}/file.txt",
                                "--steps", "2"], "file.txt"),
    # eval
    "eval-missing-model": (["eval", "--store", "{store}", "--model", "{tmp}/no-model"], "no-model"),
    "eval-split-test": (_eval("--split", "test"), "test"),
    "eval-unknown-teacher-cache": (["eval", "--store", "{store}", "--model", "teacher:nobody"], "nobody"),
    "eval-batch-size-0": (_eval("--batch-size", "0"), "batch_size"),
    "eval-no-store": (["eval", "--store", "{tmp}/no.zarr", "--model", "teacher:t"], "no.zarr"),
    "eval-unknown-key": (_eval("splitt=valid"), "splitt"),
    # export
    "export-unknown-teacher": (["export", "--store", "{store}", "--teacher", "nobody", "--out", "{tmp}/e"], "nobody"),
    "export-to-a-file": (["export", "--store", "{store}", "--teacher", "t", "--out", "{root}/file.txt"], "file.txt"),
    "export-format-csv": (["export", "--store", "{store}", "--teacher", "t", "--out", "{tmp}/e", "--format", "csv"],
                          "csv"),
    # import
    "import-missing-src": (["import", "--store", "{store}", "--src", "{tmp}/none"], "none"),
    "import-missing-parquet": (["import", "--store", "{store}", "--src", "{tmp}/exp", "--name", "u"], "parquet"),
    "import-truncated-sidecar": (["import", "--store", "{store}", "--src", "{tmp}/exp", "--name", "u"], "chorus.json"),
    "import-name-with-slash": (["import", "--store", "{store}", "--src", "{export}", "--name", "sub/dir"], "sub/dir"),
    "import-name-dotdot": (["import", "--store", "{store}", "--src", "{export}", "--name", "../x"], "../x"),
    # inspect, verify
    "inspect-no-store": (["inspect", "{tmp}/no.zarr"], "no.zarr"),
    "inspect-bad-storage-options": (["inspect", "{store}", "--storage-options", "{{not json"], "storage"),
    "verify-no-store": (["verify", "{tmp}/no.zarr"], "no.zarr"),
    "verify-storage-options-list": (["verify", "{store}", "--storage-options", "[1]"], "storage"),
    # demo
    "demo-threads-0": (["demo", "--out", "{tmp}/demo", "--threads", "0"], "threads"),
    "demo-workers-0": (["demo", "--out", "{tmp}/demo", "--workers", "0"], "workers"),
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
    args, fragment = CASES[case]
    argv = [a.format(tmp=tmp_path, **env) for a in args]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1 and "Traceback" not in err[0] and err[0].startswith(f"chorus {argv[0]}: error: "), err
    assert fragment.format(tmp=tmp_path, **env) in err[0], (fragment, err[0])  # the check that fired names it
    assert _state(env["store"]) == before  # no teacher appeared or changed status
    for left in ("new.zarr", "n", "no.zarr"):  # no store was marked prepared
        assert not Store.exists(str(tmp_path / left)) or "chorus" not in Store.open(str(tmp_path / left), "r").group.attrs
    assert not (tmp_path / "run" / "model" / "chorus.json").exists()
    assert Path(env["root"], "file.txt").read_text() == "precious"
    if case.startswith("export"):
        assert not (tmp_path / "e" / "chorus.json").exists()
    json.dumps(argv)  # the case is plain data
