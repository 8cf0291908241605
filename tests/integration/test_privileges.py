"""Operator commands run as root on the package's tree act as its catalog writer (issue 18):
`import` and `update` started as root leave nothing of root's in streams/ or the state
directory (privileges.py). Needs root (real owners, a real switch of user)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..unit.helpers import blob, version_dir, write
from ..unit.test_importer import split_export

NOBODY = 65534
SERIAL = "20240101_12:00"


@pytest.fixture
def tree() -> Iterator[Path]:
    """A tree whose streams/ and state are nobody's (the package's writer), images/ readable,
    under /var/tmp (nobody cannot traverse pytest's 0700 tmp_path)."""
    if os.geteuid() != 0:
        pytest.fail("these tests switch users: run them as root")
    with tempfile.TemporaryDirectory(prefix="lis-priv-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        (base / "root" / "images").mkdir(parents=True, mode=0o755)
        (base / "root").chmod(0o755)
        (base / "root" / "streams" / "v1").mkdir(parents=True)
        (base / "state").mkdir()
        for path in (base / "root" / "streams", base / "root" / "streams" / "v1", base / "state"):
            os.chown(path, NOBODY, NOBODY)
        yield base


def cli(base: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "lxd-image-server"
    return subprocess.run(
        [command, "--state-dir", base / "state", "--log-file", "STDERR", *args],
        env={**os.environ, "HOME": str(base / "state")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def roots_files(base: Path) -> list[str]:
    found = []
    for top in (base / "root" / "streams", base / "state"):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                if os.lstat(name).st_uid != NOBODY:
                    found.append(name)
    return found


def test_update_as_root_writes_as_the_owner_of_streams(tree: Path) -> None:
    d = version_dir(tree / "root" / "images")
    write(d / "lxd.tar.xz", blob(300, 1))
    write(d / "rootfs.squashfs", blob(5000, 2))
    for path in (d, *d.parents):
        if path == tree / "root" / "images":
            break
        path.chmod(0o755)
    proc = cli(tree, "update", "--root-dir", tree / "root")
    assert proc.returncode == 0, proc.stderr
    assert (tree / "root" / "streams" / "v1" / "images.json").is_file()
    assert roots_files(tree) == []


def test_import_as_root_reads_roots_files_and_publishes_as_the_writer(tree: Path) -> None:
    """The export is in a directory only root reads; the catalog is written by its owner."""
    private = tree / "private"
    private.mkdir(mode=0o700)
    meta, root = split_export(private)
    proc = cli(tree, "import", meta, root, "--root-dir", tree / "root", "--serial", SERIAL)
    assert proc.returncode == 0, proc.stderr
    assert "published" in proc.stdout, proc.stdout
    assert roots_files(tree) == []


def test_import_as_root_with_its_early_copy_leaves_nothing_of_roots(tree: Path) -> None:
    """A root large enough to be copied as the command starts (ops/import_early.py): the copy
    is made as root before the command becomes the writer, and nothing of it is left."""
    from ..unit.test_import_early import split

    private = tree / "private"
    private.mkdir(mode=0o700)
    meta, root = split(private)
    proc = cli(tree, "-v", "import", meta, root, "--root-dir", tree / "root")
    assert proc.returncode == 0, proc.stderr
    assert "its copy started with the command is used" in proc.stderr
    assert roots_files(tree) == []
    assert list((tree / "root" / "images").rglob(".import*")) == []


def test_a_tree_of_roots_own_stays_roots(tmp_path: Path) -> None:
    d = version_dir(tmp_path / "root" / "images")
    write(d / "lxd.tar.xz", blob(300, 1))
    write(d / "rootfs.squashfs", blob(5000, 2))
    proc = cli(tmp_path, "update", "--root-dir", tmp_path / "root")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "root" / "streams" / "v1" / "images.json").stat().st_uid == 0
