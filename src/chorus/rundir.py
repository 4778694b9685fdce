"""A run directory that chorus owns: the one place that decides whether ``--out`` may be written or replaced.

Every command that writes a directory of its own (``train``, ``compress``) claims it first with a marker file, so
``--overwrite`` can tell chorus's output from a user's: it deletes a directory only when the marker says chorus
created it, and never writes into a non-empty directory that it did not create (else a later ``--overwrite``
would delete the user's files with it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chorus.errors import ChorusError

__all__ = ["MARKER", "claim", "owned", "replace"]

MARKER = ".chorus-run"


def owned(out: Path) -> bool:
    """Whether ``out`` holds chorus's marker (chorus created it)."""
    return (Path(out) / MARKER).is_file()


def _foreign(out: Path) -> bool:
    """A path chorus must not touch: a file, or a non-empty directory without the marker."""
    return out.exists() and (not out.is_dir() or (not owned(out) and any(out.iterdir())))


def claim(out: Path | str, command: str) -> Path:
    """Create ``out`` (or adopt it when empty) and write the marker before anything else; refuse a path that holds
    something chorus did not write."""
    out = Path(out)
    if _foreign(out):
        what = "a file" if not out.is_dir() else "a directory chorus did not create"
        raise ChorusError(f"--out '{out}' is {what} (no {MARKER} marker); choose an empty or new directory for "
                          f"`chorus {command}`")
    out.mkdir(parents=True, exist_ok=True)
    if not owned(out):
        (out / MARKER).write_text(json.dumps({"command": command}) + "\n")
    return out


def replace(out: Path | str, command: str) -> Path:
    """``--overwrite``: delete ``out`` if chorus created it, then claim it afresh; anything else is refused with
    one line naming the path, and nothing is deleted."""
    out = Path(out)
    if _foreign(out):
        raise ChorusError(f"--overwrite refused: '{out}' was not created by chorus (no {MARKER} marker), so nothing "
                          "was deleted; choose another --out, or remove it yourself")
    if out.exists():
        shutil.rmtree(out)
    return claim(out, command)
