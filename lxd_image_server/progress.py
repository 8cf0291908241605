"""Progress callbacks: the types, the one that does nothing, and a one-line byte counter on a
terminal while files are hashed, imported or pushed."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

#: called with the bytes done since the last call
Progress = Callable[[int], None]
#: called with the total bytes about to be processed; returns the per-chunk callback
ProgressStart = Callable[[int], Progress]


def no_progress(_: int) -> None:
    """The callback when nobody watches."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class TerminalProgress:
    """Call with the total to get the per-chunk callback; redraws at most 10 times a second."""

    def __init__(self, stream: TextIO = sys.stderr, label: str = "hashing") -> None:
        self.stream = stream
        self.label = label
        self.total = 0
        self.done = 0
        self.started = 0.0
        self.drawn = 0.0

    def __call__(self, total: int) -> Progress:
        self.total, self.done = total, 0
        self.started = self.drawn = time.monotonic()
        return self.advance

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.drawn >= 0.1 or self.done >= self.total:
            self.drawn = now
            pct = 100 * self.done / self.total if self.total else 100.0
            rate = self.done / max(now - self.started, 1e-6)
            end = "\n" if self.done >= self.total else ""
            self.stream.write(
                f"\r{self.label} {human(self.done)} of {human(self.total)} "
                f"({pct:.0f}%, {human(rate)}/s)\033[K{end}"
            )
            self.stream.flush()


def for_terminal(stream: TextIO = sys.stderr) -> TerminalProgress | None:
    return TerminalProgress(stream) if stream.isatty() else None
