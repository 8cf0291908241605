"""`verify`: every published file read again and compared with images.json."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.model import catalog_from_json
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import Paths
from lxd_image_server.ops.verify import read_index_problems, verify
from lxd_image_server.progress import Progress

from .helpers import blob, sha, version_dir, write

DEFAULT = "images/busybox/1.35/amd64/default/20240101_12:00"


def unified_tarball(vm: bool = False, filler: int = 20_000) -> bytes:
    """A unified image as `lxc image export` writes it: metadata.yaml, templates/, then the
    root: rootfs/ (a container) or rootfs.img (a VM)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:

        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

        add("metadata.yaml", b"architecture: x86_64\ncreation_date: 1704110400\n")
        add("templates", None)
        if vm:
            add("rootfs.img", blob(filler, 7))
        else:
            add("rootfs", None)
            add("rootfs/bin", None)
            add("rootfs/bin/busybox", blob(filler, 6))
    return out.getvalue()


UNIFIED = unified_tarball()


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
    write(u / "0123abcd.tar.gz", UNIFIED)
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
    assert report.bytes == 1000 + 50_000 + 30_000 + 900 + 40_000 + len(UNIFIED)
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
    assert f"{len(UNIFIED) - 1}" in str(report.problems[1])


def test_a_wrong_fingerprint_in_the_catalog(tree: Paths) -> None:
    doc = catalog(tree)
    items = doc["products"]["busybox:1.35:amd64:rootxz"]["versions"]["20240101_12:00"]["items"]
    items["lxd.tar.xz"]["combined_squashfs_sha256"] = "0" * 64
    doc["products"]["busybox:1.35:amd64:default"]["versions"]["20240101_12:00"]["items"][
        "incus.tar.xz"
    ]["combined_disk-kvm-img_sha256"] = "1" * 64
    report = verify(tree.root_dir, catalog_from_json(doc))
    assert [str(p).split(":")[0] for p in report.problems] == ["FINGERPRINT  busybox"] * 2
    text = "\n".join(map(str, report.problems))
    assert "combined_squashfs_sha256 names no root file" in text
    assert f"combined_disk-kvm-img_sha256 is {'1' * 64}" in text


def test_paths_leaving_the_root_are_reported_not_read(tree: Paths) -> None:
    doc = catalog(tree)
    items = doc["products"]["busybox:1.35:amd64:unified"]["versions"]["20240101_12:00"]["items"]
    for item in items.values():
        item["path"] = "../../etc/passwd"
    report = verify(tree.root_dir, catalog_from_json(doc))
    assert kinds(report) == [("path", "../../etc/passwd")] * 2
    assert "'..'" in str(report.problems[0])


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


def _add_delta(tree: Paths, doc: dict[str, Any], data: bytes, size: int, digest: str) -> str:
    """A delta from DEFAULT's version, planted in a newer copy of it (file and item)."""
    product = doc["products"]["busybox:1.35:amd64:default"]
    new = json.loads(json.dumps(product["versions"]["20240101_12:00"]))
    rel = "images/busybox/1.35/amd64/default/20240101_12:00/rootfs.20231231_1200.vcdiff"
    write(Path(tree.root_dir, rel), data)
    new["items"]["squashfs.vcdiff-20240101_12:00"] = {
        "ftype": "squashfs.vcdiff",
        "path": rel,
        "size": size,
        "sha256": digest,
        "delta_base": "20240101_12:00",
    }
    product["versions"]["20240102_12:00"] = new
    return rel


def test_a_delta_is_held_to_its_size_and_sha256(tree: Paths) -> None:
    data = blob(3000, 9)
    doc = catalog(tree)
    _add_delta(tree, doc, data, len(data), sha(data))
    assert verify(tree.root_dir, catalog_from_json(doc)).ok

    doc = catalog(tree)
    rel = _add_delta(tree, doc, data, len(data) + 1, sha(data))
    report = verify(tree.root_dir, catalog_from_json(doc))
    assert kinds(report) == [("size", rel)]
    assert "3001 bytes, the file has 3000" in str(report.problems[0])

    doc = catalog(tree)
    rel = _add_delta(tree, doc, data, len(data), sha(b"other"))
    assert kinds(verify(tree.root_dir, catalog_from_json(doc))) == [("sha256", rel)]


UNIFIED_VERSION = "busybox:1.35:amd64:unified 20240101_12:00"


def test_a_unified_vm_tarball_must_say_so(tree: Paths) -> None:
    """Incus 7.0.1+ types a unified image by combined_type alone: a VM published without it
    is launched as a container."""
    u = Path(tree.root_dir, "images/busybox/1.35/amd64/unified/20240101_12:00/0123abcd.tar.gz")
    vm = unified_tarball(vm=True)
    u.write_bytes(vm)
    doc = catalog(tree)
    items = doc["products"]["busybox:1.35:amd64:unified"]["versions"]["20240101_12:00"]["items"]
    for item in items.values():
        item["size"], item["sha256"] = len(vm), sha(vm)
    report = verify(tree.root_dir, catalog_from_json(doc))
    assert kinds(report) == [("type", UNIFIED_VERSION)] * 2
    assert "holds a virtual-machine image" in str(report.problems[0])

    for item in items.values():
        item["combined_type"] = "virtual-machine"
    assert verify(tree.root_dir, catalog_from_json(doc)).ok


def test_a_container_tarball_said_to_be_a_vm(tree: Paths) -> None:
    doc = catalog(tree)
    items = doc["products"]["busybox:1.35:amd64:unified"]["versions"]["20240101_12:00"]["items"]
    items["incus_combined.tar.gz"]["combined_type"] = "virtual-machine"
    report = verify(tree.root_dir, catalog_from_json(doc))
    assert kinds(report) == [("type", UNIFIED_VERSION)]
    assert "holds a container image" in str(report.problems[0])


def test_a_unified_item_that_is_no_tarball(tree: Paths) -> None:
    u = Path(tree.root_dir, "images/busybox/1.35/amd64/unified/20240101_12:00/0123abcd.tar.gz")
    u.write_bytes(blob(len(UNIFIED), 1))
    report = verify(tree.root_dir, catalog_from_json(catalog(tree)), full=False)
    assert kinds(report) == [("type", str(u.relative_to(tree.root_dir)))]
    assert "cannot read it as a tarball" in str(report.problems[0])


def test_the_quick_mode_reads_sizes_not_bytes(tree: Paths) -> None:
    flip(Path(tree.root_dir, DEFAULT, "rootfs.squashfs"), 12_345)
    doc = catalog(tree)
    report = verify(tree.root_dir, catalog_from_json(doc), full=False)
    assert report.ok and report.files == 6 and report.fingerprints == 0
    assert "not read (--quick)" in report.summary()
    Path(tree.root_dir, DEFAULT, "disk.qcow2").write_bytes(b"short")
    report = verify(tree.root_dir, catalog_from_json(doc), full=False)
    assert kinds(report) == [("size", f"{DEFAULT}/disk.qcow2")]


def test_index_json_missing_empty_or_out_of_step(tree: Paths) -> None:
    cat = catalog_from_json(catalog(tree))
    index = Path(tree.streams_dir, "index.json")
    assert read_index_problems(tree.streams_dir, cat) == []
    doc = json.loads(index.read_bytes())
    doc["index"]["images"]["products"] = []
    index.write_text(json.dumps(doc))
    (problem,) = read_index_problems(tree.streams_dir, cat)
    assert problem.kind == "empty" and "lists no product" in problem.detail
    index.write_bytes(b"")
    (problem,) = read_index_problems(tree.streams_dir, cat)
    assert (problem.kind, problem.where) == ("empty", "streams/v1/index.json")
    index.unlink()
    (problem,) = read_index_problems(tree.streams_dir, cat)
    assert problem.kind == "missing"


def republish(paths: Paths) -> None:
    cache = HashCache(None)
    try:
        Pipeline(paths, cache).update_all()
    finally:
        cache.close()


def test_the_writer_types_a_unified_vm_tarball(tree: Paths) -> None:
    """Issue 19: the catalog writer reads a unified tarball's first entries and lists a VM's
    with combined_type: virtual-machine, so Incus 7.0.1+ launches it as one; verify agrees."""
    u = Path(tree.root_dir, "images/busybox/1.35/amd64/unified/20240101_12:00/0123abcd.tar.gz")
    u.write_bytes(unified_tarball(vm=True))
    republish(tree)
    items = catalog(tree)["products"]["busybox:1.35:amd64:unified"]["versions"]
    for item in items["20240101_12:00"]["items"].values():
        assert item["combined_type"] == "virtual-machine"
    assert verify(tree.root_dir, catalog_from_json(catalog(tree))).ok


def test_a_unified_container_tarball_has_no_combined_type(tree: Paths) -> None:
    items = catalog(tree)["products"]["busybox:1.35:amd64:unified"]["versions"]
    assert all("combined_type" not in i for i in items["20240101_12:00"]["items"].values())


def test_a_tarball_the_writer_cannot_read_is_listed_as_a_container(
    tree: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    """An uploader's garbage, or a root entry past the writer's bound: one warning, published
    as before (the client's own checks refuse what is not an image)."""
    u = Path(tree.root_dir, "images/busybox/1.35/amd64/unified/20240101_12:00/0123abcd.tar.gz")
    u.write_bytes(blob(5000, 9))
    republish(tree)
    items = catalog(tree)["products"]["busybox:1.35:amd64:unified"]["versions"]
    assert all("combined_type" not in i for i in items["20240101_12:00"]["items"].values())
    assert "cannot tell a container from a VM" in caplog.text
