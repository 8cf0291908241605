"""One version number: the package's, setup.py's and the Debian changelog's agree."""

import re
import subprocess
import sys
from pathlib import Path

from lxd_image_server import __version__

REPO = Path(__file__).resolve().parents[2]


def test_the_debian_changelog_names_the_package_version() -> None:
    first = (REPO / "debian" / "changelog").read_text(encoding="utf-8").splitlines()[0]
    m = re.match(r"lxd-image-server \(([^)-]+)(?:-[^)]*)?\)", first)
    assert m, first
    assert m[1] == __version__


def test_setup_py_takes_the_package_version() -> None:
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[-1] == __version__
