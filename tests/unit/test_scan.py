"""The scanner and hasher against a hostile uploader (issue 9): symlinks, FIFOs, sparse giants,
setuid bits and names with control characters. Real files in tmp_path. The race of a directory
swapped between check and use, which needs a second process hammering the tree for seconds, is
tests/integration/test_scan_race.py."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.hashing import Digests, HashCache, HashEngine
from lxd_image_server.catalog.products import build_products
from lxd_image_server.catalog.retention import select_prunable
from lxd_image_server.tree.scan import Scanner

from .helpers import blob, model_products, version_dir, write

META = blob(3000, 1)
ROOT = blob(50_000, 2)
EVIL_META = blob(3000, 66)
EVIL_ROOT = blob(50_000, 67)
PRODUCT = "busybox:1.35:amd64:default"


def complete(d: Path, meta: bytes = META, root: bytes = ROOT) -> Path:
    write(d / "lxd.tar.xz", meta)
    write(d / "rootfs.squashfs", root)
    return d


Products = dict[str, Any]


def catalog(root: Path) -> Products:
    """The products, as images.json holds them (the model's JSON view)."""
    versions = Scanner(root / "images").scan()
    digests = HashEngine(HashCache(None)).digest(versions)
    return {k: p.to_json() for k, p in build_products(versions, digests, str(root)).items()}


def lines_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- only regular files travel ------------------------------------------------------------------


def test_symlink_inside_the_tree_is_not_published(tmp_path, caplog):
    d = complete(version_dir(tmp_path / "images"))
    other = complete(version_dir(tmp_path / "images", serial="20240102_12:00"))
    (other / "rootfs.squashfs").unlink()
    (other / "rootfs.squashfs").symlink_to(d / "rootfs.squashfs")
    with caplog.at_level(logging.WARNING):
        products = catalog(tmp_path)
    assert list(products[PRODUCT]["versions"]) == ["20240101_12:00"]
    assert len(lines_about(caplog, str(other / "rootfs.squashfs"))) == 1


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_symlinked_directory_at_any_level_is_skipped(tmp_path, caplog, level):
    outside = complete(version_dir(tmp_path / "outside"))
    img = tmp_path / "images"
    img.mkdir()
    parts = ["busybox", "1.35", "amd64", "default", "20240101_12:00"]
    real = img.joinpath(*parts[: level - 1])
    real.mkdir(parents=True, exist_ok=True)
    (real / parts[level - 1]).symlink_to(tmp_path / "outside" / Path(*parts[:level]))
    with caplog.at_level(logging.WARNING):
        assert catalog(tmp_path) == {}
        # the watcher rescans the directory that changed: the same answer
        assert Scanner(img).scan("/".join(parts[:level])) == []
        assert Scanner(img).scan("/".join(parts)) == []
    assert outside.exists()
    assert lines_about(caplog, "symbolic link")


def test_fifo_swapped_in_after_the_scan_does_not_block(tmp_path, caplog):
    d = complete(version_dir(tmp_path / "images"))
    versions = Scanner(tmp_path / "images").scan()
    fifo = d / "rootfs.squashfs"
    fifo.unlink()
    os.mkfifo(fifo)
    result: dict[str, Digests] = {}
    worker = threading.Thread(
        target=lambda: result.update(d=HashEngine(HashCache(None)).digest(versions)), daemon=True
    )
    worker.start()
    worker.join(60)  # a hang guard, not a timing assertion: hashing 3 KB takes milliseconds
    blocked = worker.is_alive()
    if blocked:  # release the reader stuck in open(2) so the test process can end
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join()
    assert not blocked, "hashing blocked on a FIFO"
    digests = result["d"]
    assert str(fifo) in digests.failed
    assert build_products(versions, digests, str(tmp_path)) == {}


def test_fifo_device_and_socket_are_skipped_by_the_scan(tmp_path, caplog):
    d = complete(version_dir(tmp_path / "images"))
    (d / "rootfs.squashfs").unlink()
    os.mkfifo(d / "rootfs.squashfs")
    with caplog.at_level(logging.WARNING):
        assert catalog(tmp_path) == {}
    assert len(lines_about(caplog, "not a regular file")) == 1


def test_sparse_giant_is_not_hashed(tmp_path, caplog):
    d = complete(version_dir(tmp_path / "images"))
    with open(d / "disk.qcow2", "wb") as f:
        f.write(b"QFI\xfb")
        f.truncate(256 << 20)
    with caplog.at_level(logging.WARNING):
        products = catalog(tmp_path)
    items = products[PRODUCT]["versions"]["20240101_12:00"]["items"]
    assert "disk-kvm.img" not in items and "squashfs" in items
    assert len(lines_about(caplog, "sparse")) == 1


def test_small_sparse_file_is_still_published(tmp_path):
    d = complete(version_dir(tmp_path / "images"), root=b"")
    with open(d / "rootfs.squashfs", "wb") as f:
        f.write(b"hsqs")
        f.truncate(1 << 20)
    items = catalog(tmp_path)[PRODUCT]["versions"]["20240101_12:00"]["items"]
    assert items["squashfs"]["size"] == 1 << 20


@pytest.mark.parametrize("mode", [0o4644, 0o2644, 0o755, 0o744, 0o1644])
def test_setuid_setgid_and_executable_files_are_not_published(tmp_path, caplog, mode):
    d = complete(version_dir(tmp_path / "images"))
    os.chmod(d / "rootfs.squashfs", mode)
    with caplog.at_level(logging.WARNING):
        assert catalog(tmp_path) == {}
    assert len(lines_about(caplog, str(d / "rootfs.squashfs"))) == 1


def test_group_writable_files_are_published(tmp_path):
    d = complete(version_dir(tmp_path / "images"))
    os.chmod(d / "rootfs.squashfs", 0o664)
    assert PRODUCT in catalog(tmp_path)


# -- names (finding 13) --------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 3])
def test_name_with_a_trailing_newline_is_not_published(tmp_path, caplog, level):
    parts = ["busybox", "1.35", "amd64", "default", "20240101_12:00"]
    parts[level] += "\n"
    complete((tmp_path / "images").joinpath(*parts))
    with caplog.at_level(logging.WARNING):
        assert catalog(tmp_path) == {}
    assert lines_about(caplog, "not a valid name")


def test_full_width_serial_does_not_sort_as_newest(tmp_path, caplog):
    img = tmp_path / "images"
    complete(version_dir(img, serial="20240101_12:00"))
    complete(version_dir(img, serial="20240301_12:00"))
    fake = "\uff12\uff10\uff19\uff19\uff10\uff11\uff10\uff11_\uff11\uff12:\uff10\uff10"
    complete(version_dir(img, serial=fake))
    with caplog.at_level(logging.WARNING):
        products = catalog(tmp_path)
    assert sorted(products[PRODUCT]["versions"]) == ["20240101_12:00", "20240301_12:00"]
    assert select_prunable(model_products(products), keep=1) == [(PRODUCT, "20240101_12:00")]
    assert lines_about(caplog, "bad serial")


BAD_AT_LEVEL = {0: "bad name!", 1: "-1.35", 2: "sparc99", 3: "de fault", 4: "2024"}


@pytest.mark.parametrize("level", sorted(BAD_AT_LEVEL))
def test_every_level_is_checked_once_whichever_way_in(tmp_path, caplog, level):
    """Each name is checked at its own level (issue 13: once, not again per version), and a
    scan below a prefix checks every name of the prefix: a bad one at any level hides what
    lies below it, and only that."""
    img = tmp_path / "images"
    good = ["busybox", "1.35", "amd64", "default", "20240101_12:00"]
    bad = list(good)
    bad[level] = BAD_AT_LEVEL[level]
    complete(img.joinpath(*good))
    complete(img.joinpath(*bad))
    with caplog.at_level(logging.WARNING):
        found = Scanner(img).scan()
    assert [v.key.relpath for v in found] == ["/".join(good)]
    assert lines_about(caplog, BAD_AT_LEVEL[level])
    for depth in range(level + 1, len(bad) + 1):
        assert Scanner(img).scan("/".join(bad[:depth])) == []
    assert [v.key.relpath for v in Scanner(img).scan("/".join(good))] == ["/".join(good)]


# -- issue 18, finding 5: serials far ahead of the clock -----------------------------------------


def test_a_serial_far_ahead_of_the_clock_is_skipped_with_one_warning(tmp_path, caplog):
    img = tmp_path / "images"
    complete(version_dir(img, serial="20240101_12:00"))
    complete(version_dir(img, serial="99991231_2359"))
    with caplog.at_level(logging.WARNING):
        products = catalog(tmp_path)
    assert sorted(products[PRODUCT]["versions"]) == ["20240101_12:00"]
    assert len(lines_about(caplog, "99991231_2359")) == 1
    assert "ahead of this server's clock" in lines_about(caplog, "99991231_2359")[0]
    # scanned by its own path (the watcher's way in): skipped too
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert Scanner(img).scan("busybox/1.35/amd64/default/99991231_2359") == []
    assert len(lines_about(caplog, "99991231_2359")) == 1


def test_a_serial_up_to_a_day_ahead_is_published(tmp_path):
    """A build machine's clock or time zone a little ahead is no attack."""
    img = tmp_path / "images"
    complete(version_dir(img, serial="20240102_1100"))
    noon = 1704110400.0  # 2024-01-01 12:00 UTC
    found = Scanner(img, clock=lambda: noon).scan()
    assert [v.key.serial for v in found] == ["20240102_1100"]
    assert Scanner(img, clock=lambda: noon - 7200).scan() == []
