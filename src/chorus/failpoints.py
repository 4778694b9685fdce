"""Named points where a test kills this process with SIGKILL, so that every kill lands inside the work it tests.

``CHORUS_KILL_AT=NAME:K`` kills the process the K-th time any of its threads reaches point NAME, after appending
``NAME:K`` to the file ``CHORUS_KILL_LOG`` (fsynced), which tells the test where the kill landed. Unset (every
real run), :func:`hit` returns at once. The points: ``chunk`` (a chunk's bytes written, not yet renamed into place),
``shard-written`` (a shard's chunks written, no commit record yet), ``commit`` (a commit record created),
``lease-renew`` (a lease renewed), ``checkpoint`` (a checkpoint written, not yet renamed into place), ``step`` (an
optimizer step taken), ``stage`` (a compress stage recorded, the next not begun), ``record`` (a calibrate or blend
result about to be written to the store) and ``recorded`` (just written).
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("CHORUS_KILL_AT", "")
_POINT, _, _AT = _SPEC.partition(":")
_LOCK = threading.Lock()
_SEEN = 0


def hit(name: str) -> None:
    """Reached point ``name``: killed here if ``CHORUS_KILL_AT`` says so."""
    global _SEEN
    if name != _POINT:
        return
    with _LOCK:
        _SEEN += 1
        if _SEEN != int(_AT or 1):
            return
        log = os.environ.get("CHORUS_KILL_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{name}:{_SEEN}\n")
                f.flush()
                os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
