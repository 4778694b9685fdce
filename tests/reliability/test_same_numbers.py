"""The same config gives the same numbers in any process: recipes run twice in one process, with other work between
them (a compiled teacher pass, another run's evaluation cache, other seeds drawn), give identical results."""

from __future__ import annotations

import csv
import json
import random
import shutil

import numpy as np
import torch

from chorus.commands import blend, cache, calibrate, train
from chorus.commands import eval as evaluate
from chorus.config import BlendConfig, CacheConfig, CalibrateConfig, EvalConfig, TrainConfig
from tests.conftest import build_tiny_llama


def _pipeline(prepared_store: str, teacher_dir: str, root) -> dict:
    url = str(root / "store.zarr")
    shutil.copytree(prepared_store, url)
    for name, seed in (("t1", 1), ("t2", 2)):
        cache.run(CacheConfig(store=url, teacher=teacher_dir, name=name, top_k=8, samples=4, seed=seed, batch_size=4,
                              device="cpu", dtype="fp32"))
    temps = [calibrate.run(CalibrateConfig(store=url, teacher=t))["temperature"] for t in ("t1", "t2")]
    fitted = blend.run(BlendConfig(store=url, teachers=["t1", "t2"]))
    vocab = json.loads((root.parent / "vocab").read_text())
    student = build_tiny_llama(str(root / "student"), vocab, seed=3)
    run = train.run(TrainConfig(store=url, student=student, out=str(root / "run"), teachers=["t1", "t2"], steps=6,
                                batch_size=4, warmup_steps=2, eval_every=3, eval_rows=16, log_every=1))
    ev = {k: v for k, v in evaluate.run(EvalConfig(store=url, model=str(root / "run"), max_rows=16)).items()
          if k != "model"}  # its path
    with open(root / "run" / "metrics.csv", newline="") as f:
        metrics = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader(f)]
    return {"temps": temps, "blend": fitted["domain_weights"], "train": run["eval"], "eval": ev, "metrics": metrics}


def test_a_pipeline_run_twice_in_one_process_gives_the_same_numbers(prepared_store, teacher_dir, tmp_path):
    from chorus.store import Store

    (tmp_path / "vocab").write_text(json.dumps(Store.open(prepared_store, "r").manifest.tokenizer.vocab_size))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _pipeline(prepared_store, teacher_dir, tmp_path / "a")
    random.random(), np.random.rand(), torch.rand(3)  # other work draws from every global generator
    torch.set_num_threads(max(1, torch.get_num_threads()))
    second = _pipeline(prepared_store, teacher_dir, tmp_path / "b")
    for key in first:
        assert json.dumps(first[key], sort_keys=True, default=str) == json.dumps(second[key], sort_keys=True,
                                                                                 default=str), key
