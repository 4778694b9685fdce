"""The one device rule every command uses: ``auto`` is CUDA when there is one, else CPU."""

from __future__ import annotations

import torch

from chorus.errors import ChorusError


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ChorusError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
        index = (local_rank or 0) % torch.cuda.device_count()
        return torch.device("cuda", index)
    if device == "cpu":
        return torch.device("cpu")
    raise ChorusError(f"--device: expected one of auto, cpu, cuda, got {device!r}")
