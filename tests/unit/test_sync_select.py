"""`sync`'s pure parts: the URL, item paths, filters, serials, and which files of which
versions an upstream catalog becomes (ops/sync_fetch.py, ops/sync_select.py)."""

from __future__ import annotations

from typing import Any

import pytest

from lxd_image_server.ops.sync_fetch import SyncError, check_item_path, parse_upstream
from lxd_image_server.ops.sync_select import (
    FilterError,
    local_serial,
    names,
    parse_filters,
    select,
)

H = "a" * 64


def test_upstream_url() -> None:
    u = parse_upstream("https://mirror:s%40cret@images.example:8443/sub/")
    assert (u.host, u.port, u.base) == ("images.example", 8443, "/sub")
    assert u.auth is not None and u.auth.startswith("Basic ")
    assert "cret" not in u.url
    assert u.path("images/a b") == "/sub/images/a%20b"
    assert parse_upstream("https://images.example").url == "https://images.example"


@pytest.mark.parametrize(
    "url",
    ["http://images.example/", "ftp://x/", "https:///x", "https://x/?a=b", "https://x:99999/"],
)
def test_bad_upstream_urls(url: str) -> None:
    with pytest.raises(SyncError):
        parse_upstream(url)


def test_http_refusal_hides_the_password() -> None:
    with pytest.raises(SyncError) as e:
        parse_upstream("http://u:hunter2@x/")
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../x",
        "images/../../x",
        "images/./x",
        "images//x",
        "images/x\n",
        "images/x\x00",
        "images\\x",
        "images/x?y",
        "images/x#y",
        "images/é",
        "a" * 1025,
    ],
)
def test_item_paths_refused(path: str) -> None:
    with pytest.raises(ValueError):
        check_item_path(path)


@pytest.mark.parametrize(
    "path", ["images/a/b/20240101_05:24/rootfs.squashfs", "images/x.incus.tar.xz", "a/b+c~d"]
)
def test_item_paths_accepted(path: str) -> None:
    assert check_item_path(path) == path


def test_filters() -> None:
    f = parse_filters(["os=Debian", "variant=default", "variant=cloud", "type=vm"])
    assert f.match({"os": "debian", "release": "12", "arch": "amd64", "variant": "cloud"})
    assert not f.match({"os": "debian", "release": "12", "arch": "amd64", "variant": "x"})
    assert f.types() == {"virtual-machine"}
    assert parse_filters(["release=1*"]).match({"release": "12"})
    assert parse_filters([]).types() == {"container", "virtual-machine"}


@pytest.mark.parametrize("text", ["os", "os=", "colour=red", "type=lxc", "=x"])
def test_bad_filters(text: str) -> None:
    with pytest.raises(FilterError):
        parse_filters([text])


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [
        ("20240101_05:24", "20240101_05:24"),
        ("202401010524", "202401010524"),
        ("20240101_0524", "20240101_0524"),
        ("20240101", "20240101_0000"),
        ("20240101-05:24:07", "20240101_0524"),
        ("20240101-5", "20240101_0000"),
        ("2024010105241234", "20240101_0524"),
        ("latest", None),
        ("20241301", None),
        ("2024", None),
    ],
)
def test_local_serial(upstream: str, ours: str | None) -> None:
    assert local_serial(upstream) == ours


def item(path: str, ftype: str, **extra: Any) -> dict[str, Any]:
    return {"ftype": ftype, "path": path, "size": 10, "sha256": H, **extra}


def lxc_version(serial: str, **spoil: Any) -> dict[str, Any]:
    d = f"images/debian/bookworm/amd64/default/{serial}"
    fps = {
        "combined_squashfs_sha256": "b" * 64,
        "combined_disk-kvm-img_sha256": "c" * 64,
        "combined_rootxz_sha256": "d" * 64,
    }
    items = {
        "lxd.tar.xz": item(f"{d}/lxd.tar.xz", "lxd.tar.xz", **fps),
        "incus.tar.xz": item(f"{d}/incus.tar.xz", "incus.tar.xz", **fps),
        "root.squashfs": item(f"{d}/rootfs.squashfs", "squashfs"),
        "root.tar.xz": item(f"{d}/rootfs.tar.xz", "root.tar.xz"),
        "disk.qcow2": item(f"{d}/disk.qcow2", "disk-kvm.img"),
        "delta-x": item(f"{d}/x.vcdiff", "squashfs.vcdiff", delta_base="20240101_05:24"),
    }
    for key, fields in spoil.items():
        items[key.replace("_", ".")].update(fields)
    return {"items": items}


def catalog(**versions: dict[str, Any]) -> dict[str, Any]:
    return {
        "products": {
            "debian:bookworm:amd64:default": {
                "os": "Debian",
                "release": "bookworm",
                "arch": "amd64",
                "variant": "default",
                "aliases": "debian/bookworm,debian/12",
                "release_title": "12",
                "versions": {
                    k.replace("v", "").replace("_", ":", 0): v for k, v in versions.items()
                },
            }
        }
    }


def doc(*serials: str, spoil: dict[str, Any] | None = None) -> dict[str, Any]:
    versions = {s: lxc_version(s, **(spoil or {}).get(s, {})) for s in serials}
    c = catalog()
    c["products"]["debian:bookworm:amd64:default"]["versions"] = versions
    return c


def test_lxc_layout_version_becomes_our_files() -> None:
    sel = select(doc("20240101_05:24", "20240102_05:24"), parse_filters([]), 1)
    assert not sel.refused
    [plan] = sel.plans
    assert plan.key.relpath == "Debian/bookworm/amd64/default/20240102_05:24"
    # one metadata file (the same bytes for both clients), the squashfs and not root.tar.xz,
    # the VM disk, no delta
    assert list(names(plan)) == ["lxd.tar.xz", "rootfs.squashfs", "disk.qcow2", "metadata.json"]
    assert plan.combined == {
        "rootfs.squashfs": ("lxd.tar.xz", "b" * 64),
        "disk.qcow2": ("lxd.tar.xz", "c" * 64),
    }
    assert b'"aliases": "debian/bookworm,debian/12"' in plan.overrides
    assert sel.kept == {"Debian:bookworm:amd64:default": ["20240102_05:24"]}


def test_type_filter_takes_only_that_root() -> None:
    [plan] = select(doc("20240101_05:24"), parse_filters(["type=container"]), 1).plans
    assert [w.name for w in plan.files] == ["rootfs.squashfs"]
    [plan] = select(doc("20240101_05:24"), parse_filters(["type=vm"]), 1).plans
    assert [w.name for w in plan.files] == ["disk.qcow2"]


def test_keep_takes_the_newest() -> None:
    sel = select(doc("20240101_05:24", "20240103_05:24", "20240102_05:24"), parse_filters([]), 2)
    assert [p.key.serial for p in sel.plans] == ["20240102_05:24", "20240103_05:24"]


@pytest.mark.parametrize(
    "spoil",
    [
        {"root_squashfs": {"path": "../../etc/shadow"}},
        {"root_squashfs": {"path": "/etc/shadow"}},
        {"root_squashfs": {"sha256": "A" * 64}},
        {"root_squashfs": {"size": -1}},
        {"root_squashfs": {"size": "10"}},
        {"lxd_tar_xz": {"combined_squashfs_sha256": "not hex"}},
    ],
)
def test_a_bad_item_refuses_its_version_only(spoil: dict[str, Any]) -> None:
    d = doc("20240101_05:24", "20240102_05:24", spoil={"20240102_05:24": spoil})
    sel = select(d, parse_filters([]), 1)
    assert len(sel.refused) == 1 and "20240102_05:24" in sel.refused[0]
    assert "\n" not in sel.refused[0]
    # the next older version stands in for it
    assert [p.key.serial for p in sel.plans] == ["20240101_05:24"]


def test_a_root_without_a_fingerprint_is_not_taken() -> None:
    d = doc("20240101_05:24")
    meta = d["products"]["debian:bookworm:amd64:default"]["versions"]["20240101_05:24"]["items"]
    for k in ("lxd.tar.xz", "incus.tar.xz"):
        del meta[k]["combined_disk-kvm-img_sha256"]
    [plan] = select(d, parse_filters([]), 1).plans
    assert [w.name for w in plan.files] == ["rootfs.squashfs"]


def test_incus_simplestreams_layout() -> None:
    """Only incus.tar.xz, paths by fingerprint, product key in another order."""
    fp = "e" * 64
    d = {
        "products": {
            "busybox:1.35:default:amd64": {
                "os": "busybox",
                "release": "1.35",
                "arch": "amd64",
                "variant": "default",
                "versions": {
                    "202311142213": {
                        "items": {
                            "incus.tar.xz": item(
                                f"images/{fp}.incus.tar.xz",
                                "incus.tar.xz",
                                combined_squashfs_sha256="b" * 64,
                            ),
                            "squashfs": item(f"images/{fp}.squashfs", "squashfs"),
                        }
                    }
                },
            }
        }
    }
    [plan] = select(d, parse_filters(["os=busybox"]), 1).plans
    assert plan.key.relpath == "busybox/1.35/amd64/default/202311142213"
    assert list(names(plan)) == ["incus.tar.xz", "rootfs.squashfs"]


def test_unified_only_without_a_split_container() -> None:
    d = doc("20240101_05:24")
    items = d["products"]["debian:bookworm:amd64:default"]["versions"]["20240101_05:24"]["items"]
    items["lxd_combined.tar.gz"] = item("images/u.tar.gz", "lxd_combined.tar.gz")
    [plan] = select(d, parse_filters([]), 1).plans
    assert f"{H}.tar.gz" not in names(plan)
    for k in ("root.squashfs", "root.tar.xz"):
        del items[k]
    [plan] = select(d, parse_filters([]), 1).plans
    assert f"{H}.tar.gz" in names(plan)


def test_products_that_do_not_fit_the_layout() -> None:
    d = doc("20240101_05:24")
    d["products"]["debian:bookworm:amd64:default"]["arch"] = "pdp11"
    d["products"]["x"] = "not an object"
    sel = select(d, parse_filters([]), 1)
    assert not sel.plans and len(sel.refused) == 2
