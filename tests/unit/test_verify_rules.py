"""catalog/rules.py: the clients' rules held against the documents alone. Each test plants one
violation in a good catalog and the checker names it in exactly one line."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from lxd_image_server.catalog.model import catalog_from_json, index_from_json
from lxd_image_server.catalog.rules import (
    Problem,
    check_catalog,
    check_index,
    check_unified_types,
)

from .helpers import blob, sha

OLD, NEW = "20240101_12:00", "20240102_12:00"
PRODUCT = "busybox:1.35:amd64:default"
UNIFIED = "busybox:1.35:amd64:unified"
VDIR = "images/busybox/1.35/amd64/default"
UDIR = "images/busybox/1.35/amd64/unified"


def _file(path: str, seed: int, ftype: str) -> dict[str, Any]:
    data = blob(100 + seed, seed)
    return {"ftype": ftype, "path": path, "size": len(data), "sha256": sha(data)}


def _version(serial: str, seed: int) -> dict[str, Any]:
    d = f"{VDIR}/{serial}"
    items: dict[str, Any] = {}
    for ftype in ("lxd.tar.xz", "incus.tar.xz"):
        meta = _file(f"{d}/lxd.tar.xz", seed, ftype)
        meta["combined_squashfs_sha256"] = sha(b"squashfs", bytes([seed]))
        meta["combined_disk-kvm-img_sha256"] = sha(b"vm", bytes([seed]))
        items[ftype] = meta
    items["squashfs"] = _file(f"{d}/rootfs.squashfs", seed + 1, "squashfs")
    items["disk-kvm.img"] = _file(f"{d}/disk.qcow2", seed + 2, "disk-kvm.img")
    return {"items": items}


def good_catalog() -> dict[str, Any]:
    """Two versions of a product (the newer with a delta of each root type from the older),
    requirements on both names, and a unified product."""
    new = _version(NEW, 10)
    token = OLD.replace(":", "")
    new["items"][f"squashfs.vcdiff-{OLD}"] = {
        **_file(f"{VDIR}/{NEW}/rootfs.{token}.vcdiff", 20, "squashfs.vcdiff"),
        "delta_base": OLD,
    }
    new["items"][f"disk-kvm.img.vcdiff-{OLD}"] = {
        **_file(f"{VDIR}/{NEW}/disk.{token}.vcdiff", 21, "disk-kvm.img.vcdiff"),
        "delta_base": OLD,
    }
    unified = {
        ftype: {**_file(f"{UDIR}/{OLD}/0123.tar.gz", 30, ftype), "combined_type": "container"}
        for ftype in ("lxd_combined.tar.gz", "incus_combined.tar.gz")
    }
    common = {"os": "busybox", "release": "1.35", "release_title": "1.35", "arch": "amd64"}
    return {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "updated": "Mon, 01 Jan 2024 12:00:00 +0000",
        "products": {
            PRODUCT: {
                **common,
                "variant": "default",
                "aliases": "busybox/1.35",
                "requirements": {"secureboot": "false"},
                "lxd_requirements": {"secureboot": "false"},
                "versions": {OLD: _version(OLD, 1), NEW: new},
            },
            UNIFIED: {
                **common,
                "variant": "unified",
                "aliases": "busybox/1.35/unified",
                "versions": {OLD: {"items": unified}},
            },
        },
    }


def good_index() -> dict[str, Any]:
    return {
        "format": "index:1.0",
        "updated": "Mon, 01 Jan 2024 12:00:00 +0000",
        "index": {
            "images": {
                "datatype": "image-downloads",
                "format": "products:1.0",
                "path": "streams/v1/images.json",
                "products": [PRODUCT, UNIFIED],
                "updated": "Mon, 01 Jan 2024 12:00:00 +0000",
            }
        },
    }


def problems(doc: dict[str, Any], index: dict[str, Any] | None = None) -> list[Problem]:
    cat = catalog_from_json(doc)
    return check_catalog(cat) + check_index(index_from_json(index or good_index()), cat)


def items(doc: dict[str, Any], serial: str = NEW) -> dict[str, Any]:
    found: dict[str, Any] = doc["products"][PRODUCT]["versions"][serial]["items"]
    return found


def test_the_good_catalog_keeps_every_rule() -> None:
    assert problems(good_catalog()) == []


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def plant(doc: dict[str, Any]) -> None:
        target = items(doc)
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return plant


def _product(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def plant(doc: dict[str, Any]) -> None:
        if value is None:
            del doc["products"][PRODUCT][key]
        else:
            doc["products"][PRODUCT][key] = value

    return plant


def _drop_base_fingerprint(doc: dict[str, Any]) -> None:
    del items(doc, OLD)["incus.tar.xz"]["combined_disk-kvm-img_sha256"]


def _no_base(doc: dict[str, Any]) -> None:
    del items(doc)[f"squashfs.vcdiff-{OLD}"]["delta_base"]


def _rootxz_fields_differ(doc: dict[str, Any]) -> None:
    items(doc)["root.tar.xz"] = _file(f"{VDIR}/{NEW}/root.tar.xz", 40, "root.tar.xz")
    items(doc)["lxd.tar.xz"]["combined_rootxz_sha256"] = "0" * 64
    items(doc)["lxd.tar.xz"]["combined_sha256"] = "1" * 64


def _no_products(doc: dict[str, Any]) -> None:
    doc["products"] = {}


def _unified_type(value: str) -> Callable[[dict[str, Any]], None]:
    def plant(doc: dict[str, Any]) -> None:
        doc["products"][UNIFIED]["versions"][OLD]["items"]["incus_combined.tar.gz"][
            "combined_type"
        ] = value

    return plant


DELTA = f"squashfs.vcdiff-{OLD}"
VM_DELTA = f"disk-kvm.img.vcdiff-{OLD}"

#: (id, the violation planted, the kind named, a phrase of the one line)
PLANTED: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("sha256-uppercase", _set(("squashfs", "sha256"), "A" * 64), "hash", "items.squashfs.sha256"),
    ("sha256-short", _set(("squashfs", "sha256"), "ab" * 20), "hash", "64 lowercase hex"),
    ("delta-sha256", _set((DELTA, "sha256"), "sha256:" + "a" * 64), "hash", f"{DELTA}.sha256"),
    (
        "fingerprint-uppercase",
        _set(("lxd.tar.xz", "combined_squashfs_sha256"), "F" * 64),
        "hash",
        "combined_squashfs_sha256",
    ),
    (
        "rootxz-fields-differ",
        _rootxz_fields_differ,
        "hash",
        "combined_sha256 and combined_rootxz_sha256 differ",
    ),
    (
        "fingerprint-without-root",
        _set(("incus.tar.xz", "combined_rootxz_sha256"), "0" * 64),
        "fingerprint",
        "items.incus.tar.xz.combined_rootxz_sha256 names no root file",
    ),
    ("absolute-path", _set(("squashfs", "path"), "/srv/x.squashfs"), "path", "absolute"),
    ("dotdot-path", _set((VM_DELTA, "path"), "images/../../x"), "path", "'..'"),
    (
        "requirements-differ",
        _product("lxd_requirements", {"secureboot": "true"}),
        "requirements",
        "differ",
    ),
    ("requirements-only", _product("lxd_requirements", None), "requirements", "LXD 5.0.2"),
    ("delta-base-gone", _set((DELTA, "delta_base"), "20231231_12:00"), "delta", "not another"),
    ("delta-base-self", _set((DELTA, "delta_base"), NEW), "delta", "not another version"),
    (
        "delta-base-without-fingerprint",
        _drop_base_fingerprint,
        "delta",
        "carries no combined_disk-kvm-img_sha256",
    ),
    ("delta-without-base", _no_base, "delta", "without delta_base"),
    ("delta-of-no-root", _set((DELTA, "ftype"), "lxd.tar.xz.vcdiff"), "delta", "no root type"),
    ("combined-type-bogus", _unified_type("vm"), "type", "expected 'container'"),
    (
        "combined-type-on-root",
        _set(("squashfs", "combined_type"), "container"),
        "type",
        "combined_type on a squashfs item",
    ),
]


@pytest.mark.parametrize(
    ("plant", "kind", "phrase"), [p[1:] for p in PLANTED], ids=[p[0] for p in PLANTED]
)
def test_each_violation_is_named_in_one_line(
    plant: Callable[[dict[str, Any]], None], kind: str, phrase: str
) -> None:
    doc = copy.deepcopy(good_catalog())
    plant(doc)
    (problem,) = problems(doc)
    assert problem.kind == kind
    line = str(problem)
    assert "\n" not in line and phrase in line, line


def test_an_empty_catalog() -> None:
    doc = good_catalog()
    _no_products(doc)
    index = good_index()
    index["index"]["images"]["products"] = []
    found = problems(doc, index)
    assert [(p.kind, p.where) for p in found] == [
        ("empty", "streams/v1/images.json"),
        ("empty", "streams/v1/index.json"),
    ]
    assert "lists no product" in str(found[1])


def test_an_index_without_image_downloads() -> None:
    index = good_index()
    index["index"]["images"]["datatype"] = "content-download"
    (problem,) = problems(good_catalog(), index)
    assert problem.kind == "empty" and "no image-downloads entry" in str(problem)


def test_an_index_out_of_step_with_the_catalog() -> None:
    index = good_index()
    index["index"]["images"]["products"] = [PRODUCT, "other:1:amd64:default"]
    (problem,) = problems(good_catalog(), index)
    assert problem.kind == "index"
    assert "other:1:amd64:default" in str(problem) and UNIFIED in str(problem)


def test_an_absolute_index_path() -> None:
    index = good_index()
    index["index"]["images"]["path"] = "/streams/v1/images.json"
    (problem,) = problems(good_catalog(), index)
    assert problem.kind == "path" and "index.images.path" in str(problem)


def test_unified_types_against_what_the_tarball_holds() -> None:
    cat = catalog_from_json(good_catalog())
    path = f"{UDIR}/{OLD}/0123.tar.gz"
    assert check_unified_types(cat, {path: "container"}) == []
    found = check_unified_types(cat, {path: "virtual-machine"})
    # listed once per client, each listing named
    assert sorted(str(p).split(": ")[1] for p in found) == [
        "items.incus_combined.tar.gz",
        "items.lxd_combined.tar.gz",
    ]
    assert "holds a virtual-machine image" in str(found[0])
