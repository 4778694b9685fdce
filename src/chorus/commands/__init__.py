"""The commands: one table of name → config, summary and the function that runs it.

Each command reads its config, wires components (``chorus.store``, ``chorus.teacher``, ``chorus.distill``,
``chorus.student``, ``chorus.prune``) and says where its output went. Only the CLI and the demo import this
package; a command's module is imported when it runs, so ``chorus --help`` loads no model code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chorus.config import (
    BlendConfig,
    CacheConfig,
    CalibrateConfig,
    CompressConfig,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    ImportConfig,
    InspectConfig,
    PrepareConfig,
    TrainConfig,
    VerifyConfig,
)


@dataclass(frozen=True)
class Command:
    config: type
    summary: str
    entry: str  # "module:function", the module under chorus

    @property
    def run(self) -> Callable[[Any], Any]:
        module, fn = self.entry.split(":")
        return getattr(importlib.import_module(f"chorus.{module}"), fn)


COMMANDS: dict[str, Command] = {
    "prepare": Command(PrepareConfig, "tokenize and pack a corpus into a store", "commands.prepare:run"),
    "cache": Command(CacheConfig, "run a teacher once over the corpus and cache its sparse distribution", "commands.cache:run"),
    "train": Command(TrainConfig, "train a student from cached teachers (or plain CE with none)", "commands.train:run"),
    "eval": Command(EvalConfig, "per-domain loss, worst domain, calibration and teacher agreement on held-out rows",
                    "commands.eval:run"),
    "calibrate": Command(CalibrateConfig, "fit a teacher's temperature on held-out rows and record it in its manifest",
                         "commands.calibrate:run"),
    "blend": Command(BlendConfig, "fit per-domain teacher weights and per-token sharpness on held-out rows; record "
                                  "them in the store", "commands.blend:run"),
    "export": Command(ExportConfig, "write a teacher cache as parquet/arrow files for `datasets`", "commands.export:run_export"),
    "import": Command(ImportConfig, "read exported files back into a store, checked against its corpus",
                      "commands.export:run_import"),
    "inspect": Command(InspectConfig, "show a store: manifest, rows, domains, teachers, bytes per token",
                       "commands.report:run_inspect"),
    "verify": Command(VerifyConfig, "recompute every committed shard's checksum; non-zero exit if any is bad",
                      "commands.report:run_verify"),
    "demo": Command(DemoConfig, "the whole pipeline end to end on text shipped with Python", "demo:run"),
    "compress": Command(CompressConfig, "prune a model toward a size or sparsity in stages, each distilled from the "
                                        "cached teachers", "commands.compress:run"),
}

__all__ = ["COMMANDS", "Command"]
