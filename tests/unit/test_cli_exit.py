"""The console script's quick exit (cli/root.py console_main): the command's exit status and
all of its output, through a pipe (block-buffered) and into a log file, as the ordinary exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "lxd_image_server", "--state-dir", str(tmp_path / "s"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_output_through_a_pipe_is_complete(tmp_path: Path) -> None:
    """What the ordinary exit writes, byte for byte (stdout is a pipe: block-buffered)."""
    proc = run(tmp_path, "--help")
    ordinary = subprocess.run(
        [sys.executable, "-c", "from lxd_image_server.cli.root import main; main()", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.returncode == 0
    assert "Usage:" in proc.stdout
    assert proc.stdout.split("\n", 1)[1] == ordinary.stdout.split("\n", 1)[1]


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("list", "--root-dir", "{tmp}/nothing"), 1),  # no catalog there: failed
        (("list", "--format", "nonsense"), 2),  # used wrongly
        (("no-such-command",), 2),
    ],
)
def test_exit_status_is_the_commands(tmp_path: Path, args: tuple[str, ...], status: int) -> None:
    proc = run(tmp_path, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.strip()


def test_log_file_is_flushed(tmp_path: Path) -> None:
    log = tmp_path / "log"
    root = tmp_path / "root"
    proc = run(tmp_path, "--log-file", str(log), "update", "--root-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "published" in log.read_text()
