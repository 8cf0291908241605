"""Who `reload` signals: the watcher the pid file names, and no other process (watch_pid.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lxd_image_server.catalog.watch_pid import read_pid_file, signal_watcher

#: a process that only waits to be killed; `argv` is its command line after the interpreter's
_WAIT = "import sys, time; time.sleep(60)"


def waiting(*argv: str) -> subprocess.Popen[bytes]:
    """The process, once its command line shows (a vfork parent may read it before)."""
    proc = subprocess.Popen([sys.executable, "-c", _WAIT, *argv])
    for _ in range(1000):
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[-2:-1] == [argv[-1].encode()]:
                return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"{argv} never showed in /proc/{proc.pid}/cmdline")


@pytest.mark.parametrize("content", [b"", b"x\n", b"0\n", b"-1\n", b"99999999999999999999" * 4])
def test_a_pid_file_naming_no_process_is_refused(tmp_path: Path, content: bytes) -> None:
    pid_file = tmp_path / "watch.pid"
    pid_file.write_bytes(content)
    with pytest.raises(ProcessLookupError):
        read_pid_file(str(pid_file))


def test_a_recycled_pid_whose_command_line_only_contains_watch_is_not_signalled(
    tmp_path: Path,
) -> None:
    """The watcher died and its pid went to another program ('watchdog' in its arguments):
    no SIGHUP for it (a shell dies of one)."""
    proc = waiting("watchdog", "--stopwatch")
    try:
        pid_file = tmp_path / "watch.pid"
        pid_file.write_text(f"{proc.pid}\n")
        with pytest.raises(ProcessLookupError, match="not a watcher"):
            signal_watcher(str(pid_file))
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_the_watcher_is_signalled(tmp_path: Path) -> None:
    proc = waiting("--state-dir", str(tmp_path), "watch")
    try:
        pid_file = tmp_path / "watch.pid"
        pid_file.write_text(f"{proc.pid}\n")
        assert signal_watcher(str(pid_file), signal.SIGTERM) == proc.pid
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
