"""`import` loads what it needs after the copy (and, without a running watcher, what it will
publish with) in a thread while it copies (importing._publisher_loaded): loaded when the
block ends, no thread left behind (the console script exits without the interpreter's
teardown only when no thread runs)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys, threading
from lxd_image_server.config import Paths
from lxd_image_server.ops import importing
root = sys.argv[1]
paths = Paths(root, root + "/images", root + "/streams/v1", root + "/state")
later = importing.AFTER_COPY_MODULES + importing.PUBLISHER_MODULES
assert not any(m in sys.modules for m in later), "loaded before the copy"
with importing._publisher_loaded(paths):
    pass
print(all(m in sys.modules for m in later), threading.active_count())
"""


def test_without_a_watcher_the_publisher_is_loaded_and_no_thread_is_left(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["True", "1"]


def test_a_failed_preload_is_left_to_the_publish(caplog: pytest.LogCaptureFixture) -> None:
    """No exception in the thread: the publish imports the modules again and reports what
    fails; here only a debug line."""
    from lxd_image_server.ops import importing

    with caplog.at_level(logging.DEBUG, logger=importing.__name__):
        assert not importing._load(["lxd_image_server.no_such_module"])
    assert "preloading lxd_image_server.no_such_module failed" in caplog.text
