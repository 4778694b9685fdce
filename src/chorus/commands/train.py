"""`chorus train`: a student from cached teachers (or CE alone). The loop is a component,
:mod:`chorus.student.training`, because `chorus compress` distills each of its stages with it."""

from __future__ import annotations

from chorus.config import TrainConfig
from chorus.student.training import train


def run(cfg: TrainConfig) -> dict:
    return train(cfg)
