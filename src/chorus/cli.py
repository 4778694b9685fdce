"""The `chorus` command: parses arguments into a typed config and runs the command. Nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from chorus import __version__
from chorus.commands import COMMANDS
from chorus.config import _base_type, load_config
from chorus.errors import ChorusError


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", help="YAML file with any of the keys below")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=None, help=help_text)
            continue
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
    for name, command in COMMANDS.items():
        _add_config_flags(sub.add_parser(name, help=command.summary, description=command.summary), command.config)
    return parser


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
        command = COMMANDS[args.command]
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(command.config)}
        cfg = load_config(command.config, args.config, args.overrides, **values)
        command.run(cfg)
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
