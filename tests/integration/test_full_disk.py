"""A full disk, for real: a small tmpfs is mounted (root only) and filled, and the catalog
writer and the upload app each fail cleanly on it, leaving what was there before and no
temporary file behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lxd_image_server.catalog.publish import PublishError

from ..unit.test_publish import PRODUCTS, T1, T2, publish
from ..unit.test_upload import META, ROOTFS, Tree, _snapshot, call, form


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `where`, unmounted afterwards."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root (run the integration tests as root)"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"mount -t tmpfs failed: {done.stderr}"
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


# -- the catalog writer --------------------------------------------------------------------------


def test_full_disk_raises_publish_error_and_keeps_old(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", "256k") as tiny:
        streams = tiny / "v1"
        publish(str(streams), PRODUCTS, T1)
        old = {n: (streams / n).read_bytes() for n in ("images.json", "index.json")}
        filler = tiny / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        big = {f"p{i}:1:amd64:default": PRODUCTS["busybox:1.35:amd64:default"] for i in range(300)}
        with pytest.raises(PublishError, match="disk full"):
            publish(str(streams), big, T2)
        assert {n: (streams / n).read_bytes() for n in old} == old
        assert [p.name for p in streams.iterdir() if p.name.endswith(".tmp")] == []


# -- the upload app ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Tree]:
    mnt = tmp_path / "small"
    with tmpfs(mnt, "1m"):
        images = mnt / "images"
        images.mkdir()
        outside = tmp_path / "outside"
        outside.mkdir()
        t = Tree(tmp_path, images, outside)
        t.before = _snapshot(tmp_path, skip=mnt)
        yield t
        assert _snapshot(tmp_path, skip=mnt) == t.before
        assert [str(p) for p in images.rglob(".*")] == []


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_disk_put(small_disk: Tree) -> None:
    free = _free(small_disk.images)
    r = call(small_disk.app(), "PUT", f"/images/{ROOTFS}", b"r" * (2 << 20))
    assert r.status == 507, r.body
    assert "no space" in r.json["error"]
    assert small_disk.empty()
    assert _free(small_disk.images) == free
    r = call(small_disk.app(), "PUT", f"/images/{ROOTFS}", b"r" * (2 << 20), chunked=True)
    assert r.status == 507
    assert small_disk.empty()


def test_full_disk_post(small_disk: Tree) -> None:
    body, ctype = form(("upload", META, b"m" * 1000), ("upload", ROOTFS, b"r" * (2 << 20)))
    r = call(small_disk.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 507, r.body
    assert [f["path"] for f in r.json["files"]] == [META]
    assert r.json["failed"][0]["path"] == ROOTFS
    assert small_disk.files() == {META: b"m" * 1000}


# -- import --------------------------------------------------------------------------------------


def test_full_disk_import_with_its_early_copy(tmp_path: Path) -> None:
    """The root copied as the command starts (ops/import_early.py) fills the disk: the import
    fails with the one message (on its metadata tarball or on the root, copied again), and
    nothing of either copy is left."""
    import sys

    from ..unit.test_import_early import split

    meta, root = split(tmp_path / "src")
    with tmpfs(tmp_path / "tiny", "2m") as tiny:
        command = Path(sys.executable).parent / "lxd-image-server"
        proc = subprocess.run(
            [command, "--state-dir", tmp_path / "state", "-v", "import", "--root-dir", tiny,
             meta, root],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "no space left" in proc.stderr
        assert [str(p) for p in tiny.rglob(".*")] == []
