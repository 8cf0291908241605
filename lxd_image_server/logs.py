"""Logging setup for the commands: one target, one format."""

from __future__ import annotations

import logging
import os
import sys
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
