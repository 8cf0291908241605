"""Small versions are read whole, each file once through one descriptor of its version
directory (hashread.read_whole): the same digests as the chunked path, and the same refusals
(a link, FIFO or directory swapped in after the scan, a version directory swapped for a link,
a file changed before or while it is read)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lxd_image_server.catalog import hashread
from lxd_image_server.catalog.hashing import WHOLE
from lxd_image_server.catalog.hashread import FileChanged, read_whole
from lxd_image_server.fsutil import open_dir_below
from lxd_image_server.tree.scan import FileStat, ScannedVersion, Scanner

from .helpers import blob, digest_once, sha, version_dir, write

META = blob(3000, 1)
SMALL_ROOT = blob(40_000, 2)
BIG_ROOT = blob(WHOLE + 1, 3)


def scan(root: Path) -> list[ScannedVersion]:
    return Scanner(root / "images").scan()


def add(root: Path, serial: str, data: bytes, os_: str = "busybox") -> Path:
    d = version_dir(root / "images", os_=os_, serial=serial)
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", data)
    return d


@pytest.fixture
def whole_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files read whole."""
    seen: list[str] = []
    real = hashread.read_whole

    def counting(dir_fd: int, f: FileStat) -> bytes:
        seen.append(f.name)
        return real(dir_fd, f)

    monkeypatch.setattr(hashread, "read_whole", counting)
    return seen


def test_small_and_big_versions_get_the_same_digests_by_either_path(tmp_path, whole_reads):
    dirs = [
        add(tmp_path, "20240101_12:00", SMALL_ROOT),
        add(tmp_path, "20240102_12:00", BIG_ROOT),
        add(tmp_path, "20240101_12:00", SMALL_ROOT + b"x", os_="alpine"),
    ]
    roots = [SMALL_ROOT, BIG_ROOT, SMALL_ROOT + b"x"]
    total: list[int] = []
    read: list[int] = []

    def start(n: int) -> Callable[[int], None]:
        total.append(n)
        return read.append

    digests = digest_once(None, scan(tmp_path), progress_start=start)
    for d, root in zip(dirs, roots, strict=True):
        meta, rootfs = str(d / "lxd.tar.xz"), str(d / "rootfs.squashfs")
        assert digests.files[meta] == sha(META)
        assert digests.files[rootfs] == sha(root)
        assert digests.combined[(meta, rootfs)] == sha(META, root)
    assert not digests.failed
    # the version with the big root went the chunked way; the two small ones were read whole
    assert sorted(whole_reads) == ["lxd.tar.xz"] * 2 + ["rootfs.squashfs"] * 2
    assert total == [3 * len(META) + sum(map(len, roots))] and sum(read) == total[0]


def test_cached_metadata_is_read_again_only_for_a_new_combined(tmp_path, whole_reads):
    d = add(tmp_path, "20240101_12:00", SMALL_ROOT)
    db = str(tmp_path / "hashes.sqlite3")
    digest_once(db, scan(tmp_path))
    whole_reads.clear()
    (d / "rootfs.squashfs").write_bytes(SMALL_ROOT[::-1])
    digests = digest_once(db, scan(tmp_path))
    assert sorted(whole_reads) == ["lxd.tar.xz", "rootfs.squashfs"]
    pair = (str(d / "lxd.tar.xz"), str(d / "rootfs.squashfs"))
    assert digests.combined[pair] == sha(META, SMALL_ROOT[::-1])
    whole_reads.clear()
    digest_once(db, scan(tmp_path))
    assert whole_reads == []


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _link(p: Path) -> None:
    elsewhere = p.parent.parent / "elsewhere"
    elsewhere.write_bytes(p.read_bytes())
    p.unlink()
    p.symlink_to(elsewhere)


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _same_size_rewrite(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    st = p.stat()
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves


@pytest.mark.parametrize("swap", [_fifo, _link, _directory, _same_size_rewrite, Path.unlink])
def test_a_file_swapped_after_the_scan_is_not_published(tmp_path, swap):
    d = add(tmp_path, "20240101_12:00", SMALL_ROOT)
    versions = scan(tmp_path)
    root = d / "rootfs.squashfs"
    swap(root)
    digests = digest_once(None, versions)  # returns: a FIFO is never waited on
    assert digests.failed == {str(root)}
    assert str(root) not in digests.files and not digests.combined
    assert digests.files[str(d / "lxd.tar.xz")] == sha(META)


def test_a_version_directory_swapped_for_a_link_is_not_followed(tmp_path):
    d = add(tmp_path, "20240101_12:00", SMALL_ROOT)
    versions = scan(tmp_path)
    moved = d.parent / "moved"
    d.rename(moved)
    d.symlink_to(moved)
    digests = digest_once(None, versions)
    assert digests.failed == {str(d / "lxd.tar.xz"), str(d / "rootfs.squashfs")}
    assert not digests.files and not digests.combined


def test_a_parent_directory_swapped_for_a_link_is_not_followed(tmp_path):
    d = add(tmp_path, "20240101_12:00", SMALL_ROOT)
    versions = scan(tmp_path)
    variant = d.parent
    variant.rename(variant.parent / "moved")
    variant.symlink_to(variant.parent / "moved")
    digests = digest_once(None, versions)
    assert not digests.files and len(digests.failed) == 2


@pytest.mark.parametrize("change", ["grow", "shrink", "rewrite"])
def test_a_file_changed_while_it_is_read_is_not_published(tmp_path, monkeypatch, change):
    d = add(tmp_path, "20240101_12:00", SMALL_ROOT)
    versions = scan(tmp_path)
    root = d / "rootfs.squashfs"
    real = os.read
    done: list[int] = []

    def change_first(fd: int, n: int) -> bytes:
        if not done and os.readlink(f"/proc/self/fd/{fd}") == str(root):
            done.append(fd)  # after the open and its identity check, before the read
            if change == "grow":
                with open(root, "ab") as f:
                    f.write(b"more")
            elif change == "shrink":
                os.truncate(root, len(SMALL_ROOT) - 1)
            else:
                with open(root, "r+b") as f:
                    f.write(b"X")
        return real(fd, n)

    monkeypatch.setattr(os, "read", change_first)
    digests = digest_once(None, versions)
    assert done, "the root was never read"
    assert str(root) in digests.failed and str(root) not in digests.files


def test_read_whole_checks_the_identity_of_what_it_opened(tmp_path):
    d = add(tmp_path, "20240101_12:00", SMALL_ROOT)
    (v,) = scan(tmp_path)
    f = v.files["rootfs.squashfs"]
    rel = os.path.relpath(d, tmp_path / "images")
    dir_fd = open_dir_below(str(tmp_path / "images"), rel)
    try:
        assert read_whole(dir_fd, f) == SMALL_ROOT
        os.truncate(d / "rootfs.squashfs", 10)
        with pytest.raises(FileChanged):
            read_whole(dir_fd, f)
    finally:
        os.close(dir_fd)


@pytest.mark.parametrize("rel", ["..", "a/../b", "a//b", "/abs", "."])
def test_open_dir_below_takes_plain_relative_paths_only(tmp_path, rel):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(NotADirectoryError):
        open_dir_below(str(tmp_path / "a"), rel)
