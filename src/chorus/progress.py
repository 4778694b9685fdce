"""Progress for long work: rows, tokens/s and ETA on stderr (tqdm), quiet when not a terminal unless asked."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


class Progress:
    """``with Progress("cache", total=rows, unit="rows") as p: p.update(rows, tokens=n)``."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "rows") -> None:
        disable = os.environ.get("CHORUS_PROGRESS", "auto") == "off"
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True,
                         mininterval=0.5 if sys.stderr.isatty() else 5.0)
        self.tokens = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1, tokens: int = 0, **postfix: object) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if tokens:
            postfix = {"tok/s": f"{rate:,.0f}", **postfix}
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def say(message: str) -> None:
    """A line for the user (stderr keeps stdout for tables and JSON)."""
    print(message, file=sys.stderr, flush=True)
