"""What a mirror push may send: the catalog's paths checked, the listed files checked and held
open, the staging tree and the NUL-separated list rsync reads (mirror/sendlist.py). The pin is
checked with the real rsync, locally: a version directory swapped for a link after the check
is not followed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lxd_image_server.mirror import sendlist
from lxd_image_server.mirror.sendlist import (
    Batch,
    CatalogError,
    Listing,
    check_path,
    held_batches,
    image_prefix,
    list_catalog,
)

IMG = ("images",)
V = "images/busybox/1.35/amd64/default/20240101_12:00"


@pytest.mark.parametrize(
    ("path", "why"),
    [
        (f"{V}/lxd.tar.xz", None),
        ("images/a/b.tar.gz", None),
        (None, "not a string"),
        (17, "not a string"),
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("/images/x", "absolute"),
        ("images", "not below images/"),
        ("images/", "has an empty part"),
        ("streams/v1/images.json", "not below images/"),
        ("imagesX/a", "not below images/"),
        ("images/../etc/passwd", "has a '..' part"),
        ("images/a/../../etc", "has a '..' part"),
        ("images/./a", "has a '.' part"),
        ("images//a", "has an empty part"),
        ("images/a/", "has an empty part"),
        ("images/.hidden/a", "has a hidden part"),
        ("images/a/.part-upload", "has a hidden part"),
        ("images/a\nb", "not printable ASCII"),
        ("images/a\0b", "not printable ASCII"),
        ("images/a\x7fb", "not printable ASCII"),
        ("images/\u0661\u0662", "not printable ASCII"),
        ("images/" + "a" * 256, "has a part longer than 255 characters"),
        ("images/" + "a/" * 3000 + "a", "too long"),
    ],
)
def test_check_path(path: object, why: str | None) -> None:
    assert check_path(path, IMG) == why


def test_image_prefix() -> None:
    assert image_prefix("/srv/root", "/srv/root/images") == ("images",)
    assert image_prefix("/srv/root", "/srv/root/a/images") == ("a", "images")
    assert check_path("a/images/x", ("a", "images")) is None
    assert check_path("images/x", ("a", "images")) == "not below a/images/"
    for bad in ("/srv/root", "/srv/elsewhere"):
        with pytest.raises(CatalogError):
            image_prefix("/srv/root", bad)


def catalog(*paths: object) -> bytes:
    items = {
        f"i{n}": {"path": p, "ftype": "squashfs", "size": 1, "sha256": "0" * 64}
        for n, p in enumerate(paths)
    }
    doc = {"products": {"p": {"versions": {"20240101_1200": {"items": items}}}}}
    return json.dumps(doc).encode()


def test_list_catalog_keeps_checked_paths_and_says_why_it_refuses_others() -> None:
    listing = list_catalog(
        catalog(f"{V}/lxd.tar.xz", f"{V}/lxd.tar.xz", "/etc/shadow", f"{V}/rootfs.squashfs"),
        IMG,
    )
    assert listing.paths == (f"{V}/lxd.tar.xz", f"{V}/rootfs.squashfs")
    assert dict(listing.refused) == {"'/etc/shadow'": "absolute"}
    nested = list_catalog(catalog("images/a", "images/a/b", "images/c"), IMG)
    assert nested.paths == ("images/a", "images/c")
    assert dict(nested.refused) == {"'images/a/b'": "below another listed file"}
    assert list_catalog(b'{"products": {}}', IMG) == Listing(())


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (
            json.dumps(
                {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}
            ).encode(),
            "nested deeper",
        ),
        (b"[]", "images.json: expected an object"),
        (b'{"products": []}', r"images\.json\.products: expected an object"),
        (b'{"products": {"p": 1}}', r"products\.p: expected an object"),
        (b'{"products": {"p": {"versions": {"v": {"items": []}}}}}', r"v\.items: expected an obj"),
        # one item that is not an item: the copy is not the writer's catalog, nothing is sent
        (catalog(f"{V}/lxd.tar.xz", 5), r"items\.i1\.path: expected a string"),
    ],
)
def test_list_catalog_refuses_what_is_not_a_catalog(data: bytes, why: str) -> None:
    with pytest.raises(CatalogError, match=why):
        list_catalog(data, IMG)


def test_list_catalog_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendlist, "MAX_CATALOG_BYTES", 100)
    with pytest.raises(CatalogError, match="larger than 100 bytes"):
        list_catalog(catalog(*(f"images/{n}" for n in range(20))), IMG)


# -- held directories --------------------------------------------------------------------------


def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A root with images/, and a directory outside it with a secret named like image files."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("lxd.tar.xz", "rootfs.squashfs", "id_ed25519"):
        (outside / name).write_text("SECRET")
    return root, outside


def rel(root: Path, p: Path) -> str:
    return str(p.relative_to(root))


def collect(
    root: Path, paths: list[str]
) -> tuple[list[tuple[list[str], int]], list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    seen = []
    with held_batches(paths, str(root / "images"), IMG, skipped) as batches:
        for batch in batches:
            seen.append((list(batch.files), len(batch.fds)))
    return seen, skipped


def test_only_regular_files_reached_without_links_are_held(tmp_path: Path) -> None:
    root, outside = tree(tmp_path)
    v = root / V
    v.mkdir(parents=True)
    (v / "lxd.tar.xz").write_text("meta")
    (v / "rootfs.squashfs").symlink_to(outside / "rootfs.squashfs")
    os.mkfifo(v / "disk.qcow2")
    (v / "dir.img").mkdir()
    linked = root / "images/linked/1.0/amd64/default/20240101_1200"
    linked.parent.mkdir(parents=True)
    linked.symlink_to(outside, target_is_directory=True)
    (root / "images/up").symlink_to(outside, target_is_directory=True)
    paths = [
        f"{V}/lxd.tar.xz",
        f"{V}/rootfs.squashfs",
        f"{V}/disk.qcow2",
        f"{V}/dir.img",
        f"{V}/missing",
        rel(root, linked / "lxd.tar.xz"),
        "images/up/1.0/amd64/default/20240101_1200/rootfs.squashfs",
        "images/gone/x/lxd.tar.xz",
    ]
    seen, skipped = collect(root, paths)
    assert seen == [([f"{V}/lxd.tar.xz"], 1)]
    why = dict(skipped)
    assert why[f"{V}/rootfs.squashfs"] == "a symbolic link"
    assert why[f"{V}/disk.qcow2"] == "not a regular file"
    assert why[f"{V}/dir.img"] == "not a regular file"
    assert why[f"{V}/missing"] == "No such file or directory"
    link_reason = "a directory on its way is a link or not a directory"
    assert why[rel(root, linked / "lxd.tar.xz")] == link_reason
    assert why["images/up/1.0/amd64/default/20240101_1200/rootfs.squashfs"] == link_reason
    assert why["images/gone/x/lxd.tar.xz"] == "No such file or directory"


def test_batches_hold_at_most_so_many_directories_and_none_inside_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sendlist, "PINS_PER_RUN", 2)
    root, _ = tree(tmp_path)
    paths = []
    for n in range(5):
        f = root / f"images/p/{n}/lxd.tar.xz"
        f.parent.mkdir(parents=True)
        f.write_text(str(n))
        paths.append(rel(root, f))
    (root / "images/p/0/inner").mkdir()
    (root / "images/p/0/inner/x").write_text("x")
    paths.append("images/p/0/inner/x")
    before = set(os.listdir("/proc/self/fd"))
    seen, skipped = collect(root, sorted(paths))
    assert not skipped
    assert [n for _, n in seen] == [2, 2, 2]
    assert sorted(f for files, _ in seen for f in files) == sorted(paths)
    # images/p/0 and images/p/0/inner never in the same run
    for files, _ in seen:
        assert not ("images/p/0/lxd.tar.xz" in files and "images/p/0/inner/x" in files)
    assert set(os.listdir("/proc/self/fd")) == before, "a descriptor was left open"


def test_staging_tree_and_list(tmp_path: Path) -> None:
    batch = Batch(dirs={V: 7, "images/x": 9}, files=[f"{V}/lxd.tar.xz", "images/x/a b:c"])
    stage, files = tmp_path / "stage", tmp_path / "files"
    batch.stage(str(stage), str(files))
    assert os.readlink(stage / V) == "/proc/self/fd/7"
    assert os.readlink(stage / "images/x") == "/proc/self/fd/9"
    assert not (stage / "images").is_symlink()
    assert files.read_bytes() == f"{V}/lxd.tar.xz\0images/x/a b:c\0".encode()
    assert batch.fds == (7, 9)
    batch.dirs.clear()  # not ours to close
