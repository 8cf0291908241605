"""Catalog rules, end to end through scan -> hash -> catalog on real files in a tmp tree."""

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.products import build_products, index_of
from lxd_image_server.tree.layout import serial_sort_key
from lxd_image_server.tree.scan import Scanner

from .helpers import blob, digest_once, sha, version_dir, write

META = blob(3000, 1)
SQUASH = blob(200_000, 2)
ROOTXZ = blob(150_000, 3)
DISK = blob(120_000, 4)
UNIFIED = blob(90_000, 5)


Products = dict[str, Any]


def catalog(root: Path, rehash: bool = False) -> Products:
    """The products, as images.json holds them (the model's JSON view)."""
    img = root / "images"
    versions = Scanner(img).scan()
    digests = digest_once(None, versions, rehash)
    return {k: p.to_json() for k, p in build_products(versions, digests, str(root)).items()}


def only_version(products: Products, key: str = "busybox:1.35:amd64:default") -> Any:
    (version,) = products[key]["versions"].values()
    return version["items"]


def test_squashfs_root_and_both_clients(tmp_path):
    d = version_dir(tmp_path / "images")
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", SQUASH)
    items = only_version(catalog(tmp_path))
    assert set(items) == {"lxd.tar.xz", "incus.tar.xz", "squashfs"}
    for ftype in ("lxd.tar.xz", "incus.tar.xz"):
        meta = items[ftype]
        assert meta["ftype"] == ftype
        assert meta["path"] == "images/busybox/1.35/amd64/default/20240101_12:00/lxd.tar.xz"
        assert meta["sha256"] == sha(META)
        assert meta["size"] == len(META)
        assert meta["combined_squashfs_sha256"] == sha(META, SQUASH)
    assert items["squashfs"] == {
        "ftype": "squashfs",
        "path": "images/busybox/1.35/amd64/default/20240101_12:00/rootfs.squashfs",
        "sha256": sha(SQUASH),
        "size": len(SQUASH),
    }


def test_every_root_kind_in_one_version(tmp_path):
    d = version_dir(tmp_path / "images")
    write(d / "incus.tar.xz", META)
    write(d / "rootfs.squashfs", SQUASH)
    write(d / "root.tar.xz", ROOTXZ)
    write(d / "disk.qcow2", DISK)
    items = only_version(catalog(tmp_path))
    meta = items["lxd.tar.xz"]
    assert meta["path"].endswith("/incus.tar.xz")
    assert meta["combined_squashfs_sha256"] == sha(META, SQUASH)
    assert meta["combined_rootxz_sha256"] == sha(META, ROOTXZ)
    assert meta["combined_sha256"] == sha(META, ROOTXZ)
    assert meta["combined_disk-kvm-img_sha256"] == sha(META, DISK)
    assert items["disk-kvm.img"]["path"].endswith("/disk.qcow2")
    assert items["root.tar.xz"]["sha256"] == sha(ROOTXZ)


def test_separate_lxd_and_incus_metadata(tmp_path):
    d = version_dir(tmp_path / "images")
    other = blob(2000, 9)
    write(d / "lxd.tar.xz", META)
    write(d / "incus.tar.xz", other)
    write(d / "rootfs.squashfs", SQUASH)
    items = only_version(catalog(tmp_path))
    assert items["lxd.tar.xz"]["combined_squashfs_sha256"] == sha(META, SQUASH)
    assert items["incus.tar.xz"]["combined_squashfs_sha256"] == sha(other, SQUASH)


def test_unified_tarball(tmp_path):
    d = version_dir(tmp_path / "images")
    write(d / "abcdef.tar.gz", UNIFIED)
    items = only_version(catalog(tmp_path))
    assert set(items) == {"lxd_combined.tar.gz", "incus_combined.tar.gz"}
    for ftype, item in items.items():
        assert item["ftype"] == ftype
        assert item["sha256"] == sha(UNIFIED)
        assert item["path"].endswith("/abcdef.tar.gz")


@pytest.mark.parametrize(
    ("files", "needs"),
    [
        ({"lxd.tar.xz": META}, "root filesystem"),
        ({"rootfs.squashfs": SQUASH}, "metadata tarball"),
        ({"lxd.tar.xz": META, "rootfs.squashfs.part": SQUASH}, "root filesystem"),
        ({".lxd.tar.xz": META, "rootfs.squashfs": SQUASH}, "metadata tarball"),
        ({"lxd.tar.xz": META, "rootfs.squashfs.tmp": SQUASH}, "root filesystem"),
    ],
)
def test_incomplete_versions_not_published(tmp_path, caplog, files, needs):
    d = version_dir(tmp_path / "images")
    for name, data in files.items():
        write(d / name, data)
    with caplog.at_level(logging.INFO):
        assert catalog(tmp_path) == {}
    assert needs in caplog.text
    assert str(d) in caplog.text


def test_hidden_directories_never_published(tmp_path):
    img = tmp_path / "images"
    d = img / "busybox" / "1.35" / "amd64" / ".staging" / "20240101_1200"
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", SQUASH)
    d2 = version_dir(img, serial=".20240101_1200")
    write(d2 / "lxd.tar.xz", META)
    write(d2 / "rootfs.squashfs", SQUASH)
    assert catalog(tmp_path) == {}


def test_default_aliases_and_fields(tmp_path):
    img = tmp_path / "images"
    for variant in ("default", "cloud"):
        d = version_dir(img, variant=variant)
        write(d / "lxd.tar.xz", META)
        write(d / "rootfs.squashfs", SQUASH)
    products = catalog(tmp_path)
    p = products["busybox:1.35:amd64:default"]
    assert p["aliases"] == "busybox/1.35/default,busybox/1.35,busybox/1.35/amd64/default"
    assert (p["os"], p["release"], p["release_title"], p["arch"], p["variant"]) == (
        "busybox",
        "1.35",
        "1.35",
        "amd64",
        "default",
    )
    cloud = products["busybox:1.35:amd64:cloud"]
    assert cloud["aliases"] == "busybox/1.35/cloud,busybox/1.35/amd64/cloud"
    assert "requirements" not in p


def test_metadata_json_overrides(tmp_path):
    d = version_dir(tmp_path / "images")
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", SQUASH)
    write(
        d / "metadata.json",
        json.dumps(
            {
                "os": "BusyBox",
                "release_title": "1.35 stable",
                "aliases": "bb,tiny/bb",
                "requirements": {"secureboot": "false"},
                "variant": "minimal",
            }
        ).encode(),
    )
    p = catalog(tmp_path)["busybox:1.35:amd64:default"]
    assert p["os"] == "BusyBox"
    assert p["release_title"] == "1.35 stable"
    assert p["variant"] == "minimal"
    assert p["requirements"] == {"secureboot": "false"}
    assert p["aliases"].split(",") == [
        "busybox/1.35/default",
        "busybox/1.35",
        "busybox/1.35/amd64/default",
        "bb",
        "tiny/bb",
    ]


@pytest.mark.parametrize("bad", [b"{broken", b'{"aliases": 42}', b'{"requirements": "x"}'])
def test_broken_metadata_json_publishes_defaults(tmp_path, caplog, bad):
    d = version_dir(tmp_path / "images")
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", SQUASH)
    write(d / "metadata.json", bad)
    with caplog.at_level(logging.WARNING):
        p = catalog(tmp_path)["busybox:1.35:amd64:default"]
    assert p["os"] == "busybox"
    assert p["aliases"] == "busybox/1.35/default,busybox/1.35,busybox/1.35/amd64/default"
    warnings = [r for r in caplog.records if "metadata.json" in r.getMessage()]
    assert len(warnings) == 1
    assert "using defaults" in warnings[0].getMessage()


def test_newest_version_overrides_win(tmp_path):
    img = tmp_path / "images"
    for serial, title in (("20240101_1200", "old"), ("20240301_1200", "new")):
        d = version_dir(img, serial=serial)
        write(d / "lxd.tar.xz", META)
        write(d / "rootfs.squashfs", SQUASH)
        write(d / "metadata.json", json.dumps({"release_title": title}).encode())
    p = catalog(tmp_path)["busybox:1.35:amd64:default"]
    assert p["release_title"] == "new"
    assert sorted(p["versions"]) == ["20240101_1200", "20240301_1200"]


def test_alias_conflicts_same_arch_dropped_from_later_product(tmp_path, caplog):
    img = tmp_path / "images"
    for os_ in ("alpha", "beta"):
        d = version_dir(img, os_=os_)
        write(d / "lxd.tar.xz", META)
        write(d / "rootfs.squashfs", SQUASH)
        write(d / "metadata.json", b'{"aliases": ["shared"]}')
    d = version_dir(img, os_="gamma", arch="arm64")
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", SQUASH)
    write(d / "metadata.json", b'{"aliases": ["shared"]}')
    with caplog.at_level(logging.WARNING):
        products = catalog(tmp_path)
    assert "shared" in products["alpha:1.35:amd64:default"]["aliases"].split(",")
    assert "shared" not in products["beta:1.35:amd64:default"]["aliases"].split(",")
    # another architecture may use the same alias: clients pick by architecture
    assert "shared" in products["gamma:1.35:arm64:default"]["aliases"].split(",")
    assert "already used by alpha:1.35:amd64:default" in caplog.text


def test_container_and_vm_products_may_share_an_alias(tmp_path):
    img = tmp_path / "images"
    d = version_dir(img, variant="default")
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", SQUASH)
    write(d / "metadata.json", b'{"aliases": "box"}')
    d = version_dir(img, variant="vm")
    write(d / "lxd.tar.xz", META)
    write(d / "disk.qcow2", DISK)
    write(d / "metadata.json", b'{"aliases": "box"}')
    products = catalog(tmp_path)
    assert "box" in products["busybox:1.35:amd64:vm"]["aliases"].split(",")


def test_bad_paths_skipped_with_one_line_each(tmp_path, caplog):
    img = tmp_path / "images"
    good = version_dir(img)
    write(good / "lxd.tar.xz", META)
    write(good / "rootfs.squashfs", SQUASH)
    bad = {
        img / "busybox" / "1.35" / "sparc9": "unknown architecture",
        img / "busybox" / "1.35" / "amd64" / "default" / "yesterday": "bad serial",
        img / "busybox" / "1.35" / "amd64" / "default" / "20240101_1200" / "nested": "directories",
    }
    for d in bad:
        if d.name == "sparc9":
            d = d / "default" / "20240101_1200"
        write(d / "lxd.tar.xz", META)
        write(d / "rootfs.squashfs", SQUASH)
    write(img / "busybox" / "README", b"hi")
    with caplog.at_level(logging.WARNING):
        products = catalog(tmp_path)
    assert list(products) == ["busybox:1.35:amd64:default"]
    for d, why in bad.items():
        lines = [r.getMessage() for r in caplog.records if f"{d}:" in r.getMessage()]
        assert len(lines) == 1, lines
        assert why in lines[0]
    assert any(str(img / "busybox" / "README") in r.getMessage() for r in caplog.records)


def test_symlink_out_of_tree_not_published(tmp_path, caplog):
    outside = write(tmp_path / "secret" / "rootfs.squashfs", SQUASH)
    d = version_dir(tmp_path / "images")
    write(d / "lxd.tar.xz", META)
    (d / "rootfs.squashfs").symlink_to(outside)
    with caplog.at_level(logging.WARNING):
        assert catalog(tmp_path) == {}
    assert "a symbolic link" in caplog.text


def test_index_lists_exactly_the_products(tmp_path):
    img = tmp_path / "images"
    for arch in ("amd64", "arm64"):
        d = version_dir(img, arch=arch)
        write(d / "lxd.tar.xz", META)
        write(d / "rootfs.squashfs", SQUASH)
    products = catalog(tmp_path)
    index = index_of(products, "x").to_json()
    assert index["index"]["images"]["products"] == sorted(products)
    assert index["index"]["images"]["path"] == "streams/v1/images.json"


def test_serial_order_mixes_spellings():
    serials = ["20240102_0900", "20240101_23:59", "202401020800"]
    assert sorted(serials, key=serial_sort_key) == [
        "20240101_23:59",
        "202401020800",
        "20240102_0900",
    ]
