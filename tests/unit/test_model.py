"""The typed catalog (catalog/model.py): its reader on real and hostile documents, and the
images a client sees in a version."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import model
from lxd_image_server.catalog.model import (
    Client,
    Image,
    Item,
    Version,
    catalog_from_json,
    index_from_json,
    read_catalog,
    read_index,
)

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> Any:
    return json.loads((GOLDEN / name).read_bytes())


def test_the_golden_catalog_round_trips() -> None:
    catalog = read_catalog(str(GOLDEN / "images.json"))
    assert catalog.to_json() == golden("images.json")
    assert catalog.format == "products:1.0" and catalog.products
    index = read_index(str(GOLDEN / "index.json"))
    assert index.to_json() == golden("index.json")
    assert index.index["images"].products == tuple(sorted(catalog.products))


def test_the_model_is_frozen_and_slotted() -> None:
    item = Item("squashfs", "images/a", 1, "0" * 64)
    with pytest.raises(AttributeError):
        item.size = 2  # type: ignore[misc]
    assert not hasattr(item, "__dict__")


def test_both_clients_see_an_image_per_root_in_every_golden_version() -> None:
    """(Fingerprints may differ: a version may carry both lxd.tar.xz and incus.tar.xz.)"""
    catalog = read_catalog(str(GOLDEN / "images.json"))
    seen = 0
    for product in catalog.products.values():
        for serial in product.serials():
            version = product.versions[serial]
            lxd, incus = version.images(Client.LXD), version.images(Client.INCUS)
            assert [(i.type, i.root) for i in lxd] == [(i.type, i.root) for i in incus]
            assert all(i.files[0].ftype in Client.LXD.value for i in lxd)
            seen += len(lxd)
    assert seen > 0


META = "a" * 64
FP_SQ = "b" * 64
FP_VM = "c" * 64


def version_doc() -> dict[str, Any]:
    return {
        "items": {
            "lxd.tar.xz": {
                "ftype": "lxd.tar.xz",
                "path": "images/v/lxd.tar.xz",
                "size": 10,
                "sha256": META,
                "combined_squashfs_sha256": FP_SQ,
                "combined_disk-kvm-img_sha256": FP_VM,
                "some_future_field": [1, 2],
            },
            "squashfs": {"ftype": "squashfs", "path": "images/v/r", "size": 5, "sha256": "d"},
            "disk-kvm.img": {
                "ftype": "disk-kvm.img",
                "path": "images/v/d",
                "size": 7,
                "sha256": "e",
            },
            "root.tar.xz": {"ftype": "root.tar.xz", "path": "images/v/t", "size": 3, "sha256": "f"},
            "squashfs.vcdiff-20240101_1200": {
                "ftype": "squashfs.vcdiff",
                "path": "images/v/rootfs.20240101_1200.vcdiff",
                "size": 2,
                "sha256": "g",
                "delta_base": "20240101_1200",
            },
            "squashfs.vcdiff-20231231_2300": {
                "ftype": "squashfs.vcdiff",
                "path": "images/v/rootfs.20231231_2300.vcdiff",
                "size": 4,
                "sha256": "h",
                "delta_base": "20231231_2300",
            },
        }
    }


def catalog_doc() -> dict[str, Any]:
    return {
        "format": "products:1.0",
        "unknown_top": True,
        "products": {
            "p": {
                "os": "debian",
                "arch": "amd64",
                "aliases": "a,b",
                "versions": {"20240102_1200": version_doc()},
            }
        },
    }


def test_images_of_a_version_per_client() -> None:
    version = catalog_from_json(catalog_doc()).products["p"].versions["20240102_1200"]
    lxd = version.images(Client.LXD)
    # a root without a combined fingerprint (root.tar.xz here) is no image
    assert [(i.type, i.root, i.fingerprint, i.size) for i in lxd] == [
        ("container", "squashfs", FP_SQ, 15),
        ("virtual-machine", "disk-kvm.img", FP_VM, 17),
    ]
    # Incus reads only incus.tar.xz: none here
    assert version.images(Client.INCUS) == ()
    assert version.client_images() == lxd
    assert [d.delta_base for d in version.deltas("squashfs")] == ["20231231_2300", "20240101_1200"]
    assert version.deltas("disk-kvm.img") == ()


def test_a_unified_tarball_stands_alone_for_its_own_client() -> None:
    unified = Item("incus_combined.tar.gz", "images/u", 9, "u")
    version = Version("20240101_1200", {"x": unified})
    assert version.images(Client.LXD) == ()
    (image,) = version.images(Client.INCUS)
    assert image == Image("container", "unified", "u", (unified,))


def test_unknown_fields_are_ignored_and_round_trip_drops_them() -> None:
    catalog = catalog_from_json(catalog_doc())
    product = catalog.products["p"]
    assert product.aliases == ("a", "b") and product.release == ""
    item = product.versions["20240102_1200"].items["lxd.tar.xz"]
    assert "some_future_field" not in item.to_json()
    again = catalog_from_json(catalog.to_json())
    assert again == catalog


def broken(path: tuple[str, ...], value: object) -> dict[str, Any]:
    doc = copy.deepcopy(catalog_doc())
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


ITEM = ("products", "p", "versions", "20240102_1200", "items", "lxd.tar.xz")


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ([], "images.json: expected an object"),
        ({"format": "index:1.0", "products": {}}, "format 'index:1.0'"),
        ({"products": []}, "images.json.products: expected an object"),
        (broken(("products", "p"), 1), "products.p: expected an object"),
        (broken(("products", "p", "versions"), None), "products.p.versions: expected"),
        (broken(("products", "p", "aliases"), ["a"]), "products.p.aliases: expected a string"),
        (broken((*ITEM[:-1],), []), "items: expected an object"),
        (broken((*ITEM, "size"), -1), "size: expected a count of bytes"),
        (broken((*ITEM, "size"), True), "size: expected a count of bytes"),
        (broken((*ITEM, "size"), "10"), "size: expected a count of bytes"),
        (broken((*ITEM, "path"), 5), r"lxd\.tar\.xz\.path: expected a string"),
        (broken((*ITEM, "combined_sha256"), {}), "combined_sha256: expected a string"),
        (broken(("products", "p", "requirements"), {"a": 1}), "expected string values"),
    ],
)
def test_a_document_that_is_not_a_catalog_is_one_value_error(doc: object, why: str) -> None:
    with pytest.raises(ValueError, match=why) as e:
        catalog_from_json(doc)
    assert "\n" not in str(e.value)


def test_a_bad_index_is_one_value_error() -> None:
    with pytest.raises(ValueError, match=r"index\.images\.products"):
        index_from_json({"format": "index:1.0", "index": {"images": {"path": "x", "products": 1}}})
    with pytest.raises(ValueError, match=r"index\.json\.index"):
        index_from_json({"format": "index:1.0"})


def test_the_reader_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "images.json"
    path.write_text('{"products": ' + "[" * 100_000)
    with pytest.raises(ValueError, match="nested deeper"):
        read_catalog(str(path))
    path.write_bytes(json.dumps(catalog_doc()).encode())
    monkeypatch.setattr(model, "MAX_CATALOG_BYTES", 100)
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        read_catalog(str(path))
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(OSError):
        read_catalog(str(path))
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(OSError):
        read_catalog(str(path))
    with pytest.raises(FileNotFoundError):
        read_catalog(str(tmp_path / "missing.json"))
