"""Fixtures for `chorus cache` / export tests: a teacher that ships its tokenizer, a cached reference store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

# One set of cache arguments for every test that compares stores bit for bit (reference, resumed, sharded).
CACHE_ARGS = {"top_k": 8, "samples": 16, "batch_size": 4, "name": "tiny", "seed": 3}


def cli_args(store: str, teacher: str, **overrides) -> list[str]:
    args = {**CACHE_ARGS, **overrides}
    out = ["cache", "--store", store, "--teacher", teacher]
    for k, v in args.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def chorus_env(**extra: str) -> dict:
    # one thread per process: on a busy 2-core machine OpenMP's spinning makes tiny models 4x slower
    env = {**os.environ, "CHORUS_PROGRESS": "off", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_chorus(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chorus", *args], env=chorus_env(), capture_output=True, text=True,
                          timeout=300, **kw)


def read_cache(url: str, name: str, storage_options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of a teacher cache (stitched from committed shards) and its commit records."""
    from chorus.store import Store

    store = Store.open(url, "r", storage_options)
    unit = f"teachers/{name}"
    commits = store.commits(unit)
    m = store.manifest
    names = store.array_names(unit)
    parts = {n: [] for n in names}
    for shard in range(m.num_shards):
        data = store.read_shard(unit, shard, names, commit=commits.get(shard))
        for n in names:
            parts[n].append(data[n])
    return {n: np.concatenate(p) for n, p in parts.items()}, {s: c.to_dict() for s, c in commits.items()}


def assert_same_cache(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    arrays_a, commits_a = a
    arrays_b, commits_b = b
    assert sorted(arrays_a) == sorted(arrays_b)
    for n in arrays_a:
        assert arrays_a[n].dtype == arrays_b[n].dtype, n
        np.testing.assert_array_equal(arrays_a[n], arrays_b[n], err_msg=n)
    assert commits_a == commits_b


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads and lose much when the cores are shared (pytest -n 2)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory, tokenizer_dir, teacher_dir) -> str:
    """The session's tiny random Llama (``teacher_dir``) saved together with its tokenizer."""
    from transformers import AutoTokenizer

    out = str(tmp_path_factory.mktemp("teacher_tok") / "tiny-llama")
    shutil.copytree(teacher_dir, out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def cached_store(tmp_path_factory, prepared_store, teacher_model) -> str:
    """A copy of ``prepared_store`` cached in-process with CACHE_ARGS: the reference run."""
    from chorus.commands import cache
    from chorus.config import CacheConfig

    out = str(tmp_path_factory.mktemp("cached") / "store.zarr")
    shutil.copytree(prepared_store, out)
    cache.run(CacheConfig(store=out, teacher=teacher_model, **CACHE_ARGS))
    return out


@pytest.fixture
def store_copy(tmp_path, prepared_store) -> str:
    out = str(tmp_path / "store.zarr")
    shutil.copytree(prepared_store, out)
    return out
