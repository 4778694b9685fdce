"""Training checkpoints: one file per save, written to a temporary name and renamed into place, so a
run killed mid-save leaves the previous checkpoint intact and never a half-written one."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from chorus.errors import ChorusError

PATTERN = re.compile(r"^step-(\d{8})\.pt$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str | Path, step: int, state: dict, keep: int = 1) -> Path:
    """Write ``state`` as ``run_dir/checkpoints/step-<step>.pt`` atomically; keep the newest ``keep``."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
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
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ChorusError(f"checkpoint '{path}' is unreadable ({str(e).splitlines()[0]}); delete it to resume "
                          "from the one before, or pass --overwrite to start over") from None
