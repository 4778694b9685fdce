"""The `chorus` command: parses arguments into a typed config and calls a recipe. Nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing

from chorus import __version__
from chorus.config import COMMANDS, _base_type, load_config
from chorus.errors import ChorusError

RECIPES = {
    "prepare": "chorus.pipeline.prepare:run",
    "cache": "chorus.pipeline.cache:run",
    "train": "chorus.trainer.train:run",
    "eval": "chorus.trainer.evaluate:run",
    "calibrate": "chorus.trainer.calibrate:run",
    "blend": "chorus.trainer.blend:run",
    "export": "chorus.pipeline.export:run_export",
    "import": "chorus.pipeline.export:run_import",
    "demo": "chorus.demo:run",
    "compress": "chorus.compress.stages:run",
}

SUMMARIES = {
    "prepare": "tokenize and pack a corpus into a store",
    "cache": "run a teacher once over the corpus and cache its sparse distribution",
    "train": "train a student from cached teachers (or plain CE with none)",
    "eval": "per-domain loss, worst domain, calibration and teacher agreement on held-out rows",
    "calibrate": "fit a teacher's temperature on held-out rows and record it in its manifest",
    "blend": "fit per-domain teacher weights and per-token sharpness on held-out rows; record them in the store",
    "export": "write a teacher cache as parquet/arrow files for `datasets`",
    "import": "read exported files back into a store, checked against its corpus",
    "demo": "the whole pipeline end to end on text shipped with Python",
    "compress": "prune a model toward a size or sparsity in stages, each distilled from the cached teachers",
}


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", help="YAML file with any of the keys below")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default not in (None, "", False):
            help_text += f" (default: {f.default})"
        if f.metadata.get("choices"):
            help_text += f" [{'|'.join(f.metadata['choices'])}]"
        if base is bool:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        else:
            metavar = f.name.upper() if base is not dict else "JSON"
            parser.add_argument(flag, default=None, metavar=metavar, help=help_text)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="Distill one student from many teachers' cached distributions.")
    parser.add_argument("--version", action="version", version=f"chorus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls in COMMANDS.items():
        _add_config_flags(sub.add_parser(name, help=SUMMARIES[name], description=SUMMARIES[name]), cls)
    for name, text in (("inspect", "show a store: manifest, rows, domains, teachers, bytes per token"),
                       ("verify", "recompute every committed shard's checksum; non-zero exit if any is bad")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("store")
        p.add_argument("--storage-options", default=None, metavar="JSON")
        if name == "inspect":
            p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _call(spec: str, cfg: object) -> object:
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)(cfg)


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ChorusError(f"--storage-options: expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise ChorusError(f"--storage-options: expected a JSON object, got {text!r}")
    return value


def _quiet_libraries() -> None:
    """chorus shows its own progress, one line per stage; a library's progress bars (Hugging Face's "Loading weights",
    once per model) would interleave with it on stderr, where an error must be the one line."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (a Python caller): its switch was read at import
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("inspect", "verify"):
            from chorus.storage import report

            opts = _storage_options(args.storage_options)
            if args.command == "inspect":
                return report.inspect_command(args.store, as_json=args.json, storage_options=opts)
            return report.verify_command(args.store, storage_options=opts)
        cls = COMMANDS[args.command]
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        cfg = load_config(cls, args.config, args.overrides, **values)
        _call(RECIPES[args.command], cfg)
        return 0
    except ChorusError as e:
        print(f"chorus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nchorus {args.command}: interrupted; committed shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"chorus {args.command}: error: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only output, permissions, a file that vanished
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"chorus {args.command}: error: {e.strerror or e}{where}; check the path, its permissions and free "
              "space", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, and the traceback on request
        if os.environ.get("CHORUS_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"chorus {args.command}: internal error: {type(e).__name__}: {first} "
              "(run with CHORUS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    raise SystemExit(main())
