"""Training checkpoints: one file per save, written to a temporary name and renamed into place, so a
run killed mid-save leaves the previous checkpoint intact and never a half-written one.

A checkpoint holds only tensors and plain Python values (numpy's RNG state is stored as a tensor), so it
loads with ``torch.load(weights_only=True)``: a planted pickle cannot run code on ``--resume``."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import fsspec
import numpy as np
import torch

from chorus import failpoints
from chorus.errors import ChorusError
from chorus.store.fs import clean_stale_tmp

_LOCAL = fsspec.filesystem("file")

PATTERN = re.compile(r"^step-(\d{8})\.pt$")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str | Path, step: int, state: dict, keep: int = 1) -> Path:
    """Write ``state`` as ``run_dir/checkpoints/step-<step>.pt`` atomically; keep the newest ``keep``."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    clean_stale_tmp(_LOCAL, [str(p) for p in folder.glob(".step-*.pt.tmp-*")])  # left by killed runs
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
    failpoints.hit("checkpoint")
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def checkpoints(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if PATTERN.match(p.name))


def latest(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def load(path: Path) -> dict:
    try:
        # weights_only: tensors and plain containers only; anything else (a pickled callable) is refused
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ChorusError(f"checkpoint '{path}' holds objects other than tensors and plain values, which chorus "
                          f"never writes ({str(e).splitlines()[0][:120]}); refusing to load it: delete it or pass "
                          "--overwrite") from None
    except Exception as e:
        raise ChorusError(f"checkpoint '{path}' is unreadable ({str(e).splitlines()[0]}); delete it to resume "
                          "from the one before, or pass --overwrite to start over") from None
