"""kill -9 where it hurts: each kill is an event of the run being killed (chorus.failpoints), the test asserts where it
landed, and every command resumes to the bytes of the run that was never killed.

22 kill points (KILL_POINTS): cache 11 (after a commit, inside a chunk write, between a shard's chunks and its commit
record, during a lease renewal), train 5 (after an optimizer step, inside a checkpoint write), calibrate 2 and blend 2
(just before and just after the result is written to the store), compress 2 (between stages, inside a stage's
checkpoint)."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chorus.commands import blend, cache, calibrate, train
from chorus.config import BlendConfig, CacheConfig, CalibrateConfig, TrainConfig
from chorus.store import BLEND_KEY, Store
from chorus.store.check import problems
from chorus.student.checkpoint import checkpoints
from tests.conftest import build_tiny_llama
from tests.pipeline.conftest import CACHE_ARGS, assert_same_cache, chorus_env, cli_args, read_cache
from tests.trainer.conftest import bigram_teacher, copy_store, write_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory, prepared_store) -> str:
    """Two synthetic bigram teachers, a and c."""
    url = copy_store(prepared_store, tmp_path_factory.mktemp("teachers") / "store.zarr")
    vocab = Store.open(url, "r").manifest.tokenizer.vocab_size
    for i, name in enumerate("ac"):
        write_teacher(url, name, bigram_teacher(vocab, seed=i + 1), top_k=16, seed=i)
    return url


def _kill(argv: list[str], point: str, k: int, log: Path, **env: str) -> None:
    """Run `chorus ARGV` until it is killed at the k-th ``point``; assert that it was, there."""
    run = subprocess.run([sys.executable, "-m", "chorus", *argv], capture_output=True, text=True, timeout=300,
                         env=chorus_env(CHORUS_KILL_AT=f"{point}:{k}", CHORUS_KILL_LOG=str(log), **env))
    assert run.returncode == -signal.SIGKILL, f"not killed at {point}:{k} (exit {run.returncode}): {run.stderr[-2000:]}"
    assert log.read_text().splitlines()[-1] == f"{point}:{k}"


# ---------------------------------------------------------------------------------------------- cache
CACHE_KILLS = [("commit", 1), ("chunk", 2), ("shard-written", 1), ("lease-renew", 1), ("commit", 3), ("chunk", 7),
               ("shard-written", 4), ("commit", 2), ("chunk", 1), ("shard-written", 2), ("lease-renew", 3)]


def test_cache_killed_anywhere_resumes_to_the_same_bytes(prepared_store, teacher_dir, tmp_path):
    ref = str(tmp_path / "ref.zarr")
    shutil.copytree(prepared_store, ref)
    cache.run(CacheConfig(store=ref, teacher=teacher_dir, **CACHE_ARGS))
    url = str(tmp_path / "store.zarr")
    shutil.copytree(prepared_store, url)
    log = tmp_path / "kills.log"
    done = []
    for point, k in CACHE_KILLS:
        _kill(cli_args(url, teacher_dir), point, k, log, CHORUS_LEASE_HEARTBEAT_S="0.02")
        store = Store.open(url, "r")
        assert store.teacher_manifest("tiny").status == "incomplete"
        assert store.verify("teachers/tiny") == []  # what is committed is whole: the kill lost only its shard
        done.append(len(store.committed("teachers/tiny")))
    assert done == sorted(done) and done[-1] < store.manifest.num_shards  # progress, and work left for the resume
    cache.run(CacheConfig(store=url, teacher=teacher_dir, **CACHE_ARGS))
    assert Store.open(url, "r").teacher_manifest("tiny").status == "complete"
    assert_same_cache(read_cache(url, "tiny"), read_cache(ref, "tiny"))
    assert list(problems(Store.open(url, "r"))) == []


# ---------------------------------------------------------------------------------------------- train
TRAIN_KILLS = [("checkpoint", 2), ("step", 2), ("checkpoint", 1), ("checkpoint", 2), ("step", 4)]
def _train_args(store: str, student: str, out: Path) -> list[str]:
    return ["train", "--store", store, "--student", student, "--out", str(out), "--teachers", "a", "--steps", "12",
            "--save-every", "3", "--batch-size", "4", "--lr", "0.003", "warmup_steps=2", "eval_every=0",
            "eval_rows=16", "log_every=1", "resume=true"]


def _log(run: Path) -> list[dict]:
    """Every logged value but wall-clock throughput."""
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader(f)]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def test_train_killed_anywhere_resumes_to_the_same_run(teacher_store, tmp_path):
    student = build_tiny_llama(str(tmp_path / "student"), Store.open(teacher_store, "r").manifest.tokenizer.vocab_size,
                               seed=5)
    full, cut, log = tmp_path / "full", tmp_path / "cut", tmp_path / "kills.log"
    train.run(TrainConfig(store=teacher_store, student=student, out=str(full), teachers=["a"], steps=12, save_every=3,
                          batch_size=4, lr=0.003, warmup_steps=2, eval_every=0, eval_rows=16, log_every=1))
    # each run resumes from the last checkpoint: inside the write of 6 (3 kept), after step 5 (3), inside the
    # write of 6 again (3), inside the write of 9 (6 kept), after step 10 (9 kept)
    saved = []
    for point, k in TRAIN_KILLS:
        _kill(_train_args(teacher_store, student, cut), point, k, log)
        assert not (cut / "model").exists()
        saved.append([int(p.name[5:13]) for p in checkpoints(cut)])
    assert saved == [[3], [3], [3], [6], [9]]
    train.run(TrainConfig(store=teacher_store, student=student, out=str(cut), teachers=["a"], steps=12, save_every=3,
                          batch_size=4, lr=0.003, warmup_steps=2, eval_every=0, eval_rows=16, log_every=1, resume=True))
    assert _log(cut) == _log(full)
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- calibrate, blend
RECORD_POINTS = ["record", "recorded"]  # each kills calibrate, then blend
@pytest.mark.parametrize("point", RECORD_POINTS)
def test_calibrate_and_blend_killed_at_their_write_give_the_same_record(teacher_store, tmp_path, point):
    ref = str(tmp_path / "ref.zarr")
    shutil.copytree(teacher_store, ref)
    calibrate.run(CalibrateConfig(store=ref, teacher="a"))
    blend.run(BlendConfig(store=ref, teachers=["a", "c"]))
    url = str(tmp_path / "store.zarr")
    shutil.copytree(teacher_store, url)
    log = tmp_path / "kills.log"
    _kill(["calibrate", "--store", url, "--teacher", "a"], point, 1, log)
    _kill(["blend", "--store", url, "--teachers", "a,c"], point, 1, log)  # it reads what calibrate left
    store = Store.open(url, "r")
    assert list(problems(store)) == [] and store.teacher_manifest("a").status == "complete"
    calibrate.run(CalibrateConfig(store=url, teacher="a"))
    blend.run(BlendConfig(store=url, teachers=["a", "c"]))
    a, b = Store.open(ref, "r"), Store.open(url, "r")
    assert a.teacher_manifest("a").temperature == b.teacher_manifest("a").temperature
    assert a.teacher_manifest("a").calibration == b.teacher_manifest("a").calibration
    assert json.dumps(a.group.attrs[BLEND_KEY], sort_keys=True) == json.dumps(b.group.attrs[BLEND_KEY],
                                                                                  sort_keys=True)


# ---------------------------------------------------------------------------------------------- compress
COMPRESS_KILLS = [("stage", 1), ("checkpoint", 1)]  # after stage 1's record; inside stage 2's first checkpoint


def test_compress_killed_between_and_inside_stages_resumes_to_the_same_model(teacher_store, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from chorus.commands import compress
    from chorus.config import CompressConfig

    torch.manual_seed(0)
    start = tmp_path / "start"
    LlamaForCausalLM(LlamaConfig(vocab_size=Store.open(teacher_store, "r").manifest.tokenizer.vocab_size,
                                 hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(start)
    train_keys = {"batch_size": 4, "lr": 0.01, "warmup_steps": 1, "log_every": 1, "save_every": 2}
    full, cut, log = tmp_path / "full", tmp_path / "cut", tmp_path / "kills.log"

    def cfg(out: Path) -> CompressConfig:
        return CompressConfig(store=teacher_store, model=str(start), out=str(out), teachers=["a"], stages=2, steps=8,
                              calibration_rows=8, eval_rows=8, train=dict(train_keys))

    compress.run(cfg(full))
    argv = ["compress", "--store", teacher_store, "--model", str(start), "--out", str(cut), "--teachers", "a",
            "--stages", "2", "--steps", "8", "--calibration-rows", "8", "--eval-rows", "8",
            "--train", json.dumps(train_keys)]
    for point, k in COMPRESS_KILLS:
        _kill(argv, point, k, log)
    assert (cut / "stage-01" / "stage.json").is_file() and not (cut / "stage-02" / "stage.json").exists()
    compress.run(cfg(cut))
    a = _weights(full / "stage-02" / "train")
    b = _weights(cut / "stage-02" / "train")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KILL_POINTS = [*CACHE_KILLS, *TRAIN_KILLS, *(p for p in RECORD_POINTS for _ in ("calibrate", "blend")),
               *COMPRESS_KILLS]
