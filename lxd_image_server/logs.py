"""Logging setup for the commands: one target, one format."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections import OrderedDict
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup(target: str = "STDERR", verbose: bool = False) -> None:
    """`target` is STDOUT, STDERR or a file path. Under systemd (journald adds its own
    timestamps) the stream format leaves the time out."""
    handler: logging.Handler
    upper = target.upper()
    if upper in ("STDOUT", "STDERR", "-"):
        stream = sys.stdout if upper == "STDOUT" else sys.stderr
        handler = logging.StreamHandler(stream)
        fmt = JOURNAL_FORMAT if _under_journal() else FORMAT
    else:
        handler = logging.FileHandler(target, encoding="utf-8")
        fmt = FORMAT
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _under_journal() -> bool:
    return "JOURNAL_STREAM" in os.environ


def truthy(value: str | None) -> bool:
    """Environment flags: 1, true, yes, on (any case) are true."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def configure(table: dict[str, Any]) -> None:
    """A [logging] table from the configuration (logging.config.dictConfig), as the original
    tool had. Existing loggers keep working."""
    import logging.config

    logging.config.dictConfig({"disable_existing_loggers": False, **table})


class Once(logging.Filter):
    """Lets each distinct message below ERROR through once per `ttl` seconds: a long-running
    process that rescans the same bad files (the watcher) says so once, not at every scan.

    Memory stays bounded whatever the messages: at most `size` 16-byte digests are kept, the
    oldest forgotten first (a forgotten message may be logged again).
    """

    def __init__(self, ttl: float = 3600.0, size: int = 4096) -> None:
        super().__init__()
        self.ttl = ttl
        self.size = size
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it would
            return True
        key = hashlib.blake2b(
            f"{record.name}\0{text}".encode(errors="surrogateescape"), digest_size=16
        ).digest()
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last < self.ttl:
            return False
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True
