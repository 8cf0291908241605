"""`verify`: every published file read again and compared with images.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.model import catalog_from_json
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import Paths
from lxd_image_server.ops.verify import verify
from lxd_image_server.progress import Progress

from .helpers import blob, version_dir, write

DEFAULT = "images/busybox/1.35/amd64/default/20240101_12:00"


@pytest.fixture
def tree(tmp_path: Path) -> Paths:
    """A squashfs + VM version sharing a metadata tarball, a root.tar.xz and a unified one."""
    paths = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    img = Path(paths.img_dir)
    d = version_dir(img)
    write(d / "lxd.tar.xz", blob(1000, 1))
    write(d / "rootfs.squashfs", blob(50_000, 2))
    write(d / "disk.qcow2", blob(30_000, 3))
    x = version_dir(img, variant="rootxz")
    write(x / "lxd.tar.xz", blob(900, 4))
    write(x / "root.tar.xz", blob(40_000, 5))
    u = version_dir(img, variant="unified")
    write(u / "0123abcd.tar.gz", blob(20_000, 6))
    cache = HashCache(None)
    try:
        Pipeline(paths, cache).update_all()
    finally:
        cache.close()
    return paths


def catalog(paths: Paths) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    return doc


def kinds(report: Any) -> list[tuple[str, str]]:
    return sorted((p.kind, p.where) for p in report.problems)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_good_tree_verifies(tree: Paths) -> None:
    report = verify(tree.root_dir, catalog_from_json(catalog(tree)))
    assert report.ok, report.problems
    assert report.files == 6
    assert report.bytes == 1000 + 50_000 + 30_000 + 900 + 40_000 + 20_000
    # squashfs and disk combined (+ rootxz's two fields), each on the metadata item
    assert report.fingerprints == 4


def test_a_flipped_byte_is_found(tree: Paths) -> None:
    flip(Path(tree.root_dir, DEFAULT, "rootfs.squashfs"), 12_345)
    report = verify(tree.root_dir, catalog_from_json(catalog(tree)))
    assert kinds(report) == [
        ("fingerprint", "busybox:1.35:amd64:default 20240101_12:00"),
        ("sha256", f"{DEFAULT}/rootfs.squashfs"),
    ]


def test_a_flipped_byte_in_shared_metadata_breaks_every_fingerprint(tree: Paths) -> None:
    flip(Path(tree.root_dir, DEFAULT, "lxd.tar.xz"), 10)
    report = verify(tree.root_dir, catalog_from_json(catalog(tree)))
    assert kinds(report) == [
        ("fingerprint", "busybox:1.35:amd64:default 20240101_12:00"),
        ("fingerprint", "busybox:1.35:amd64:default 20240101_12:00"),
        ("sha256", f"{DEFAULT}/lxd.tar.xz"),
    ]
    text = "\n".join(str(p) for p in report.problems)
    assert "combined_squashfs_sha256" in text and "combined_disk-kvm-img_sha256" in text


def test_missing_and_truncated_files(tree: Paths) -> None:
    Path(tree.root_dir, DEFAULT, "disk.qcow2").unlink()
    unified = Path(
        tree.root_dir, "images/busybox/1.35/amd64/unified/20240101_12:00/0123abcd.tar.gz"
    )
    unified.write_bytes(unified.read_bytes()[:-1])
    report = verify(tree.root_dir, catalog_from_json(catalog(tree)))
    assert kinds(report) == [
        ("missing", f"{DEFAULT}/disk.qcow2"),
        ("size", str(unified.relative_to(tree.root_dir))),
    ]
    assert "19999" in str(report.problems[1]) or "19999" in str(report.problems[0])


def test_a_wrong_fingerprint_in_the_catalog(tree: Paths) -> None:
    doc = catalog(tree)
    items = doc["products"]["busybox:1.35:amd64:rootxz"]["versions"]["20240101_12:00"]["items"]
    items["lxd.tar.xz"]["combined_sha256"] = "0" * 64
    report = verify(tree.root_dir, catalog_from_json(doc))
    assert kinds(report) == [("fingerprint", "busybox:1.35:amd64:rootxz 20240101_12:00")]
    assert "combined_sha256" in str(report.problems[0])


def test_paths_leaving_the_root_are_reported_not_read(tree: Paths) -> None:
    doc = catalog(tree)
    items = doc["products"]["busybox:1.35:amd64:unified"]["versions"]["20240101_12:00"]["items"]
    for item in items.values():
        item["path"] = "../../etc/passwd"
    report = verify(tree.root_dir, catalog_from_json(doc))
    assert kinds(report) == [("outside", "../../etc/passwd")]


def test_progress_counts_every_byte(tree: Paths) -> None:
    seen: list[int] = []
    totals: list[int] = []

    def start(total: int) -> Progress:
        totals.append(total)
        return seen.append

    report = verify(tree.root_dir, catalog_from_json(catalog(tree)), progress_start=start)
    assert totals == [report.bytes] and sum(seen) == report.bytes


def test_a_version_swapped_for_a_symlink_is_not_read_through(tree: Paths, tmp_path: Path) -> None:
    """An uploader replaces a published version directory by a symlink to a copy elsewhere:
    nginx (disable_symlinks) would not serve it, so verify reports it rather than reading the
    outside copy and calling it good."""
    real = Path(tree.root_dir) / DEFAULT
    copy = tmp_path / "outside-copy"
    real.rename(copy)
    real.symlink_to(copy)
    report = verify(tree.root_dir, catalog_from_json(catalog(tree)))
    assert ("unreadable", f"{DEFAULT}/rootfs.squashfs") in kinds(report)
    assert not report.ok


def test_a_fifo_in_place_of_a_file_is_reported(tree: Paths) -> None:
    target = Path(tree.root_dir) / DEFAULT / "disk.qcow2"
    target.unlink()
    os.mkfifo(target)
    report = verify(tree.root_dir, catalog_from_json(catalog(tree)))
    assert ("unreadable", f"{DEFAULT}/disk.qcow2") in kinds(report)
