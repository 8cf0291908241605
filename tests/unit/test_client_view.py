"""What LXD and Incus clients would make of our images.json.

The package's one definition of that is `Version.images(client)` (catalog/model.py), read from
the published file by the one reader. Each image it gives is "downloaded" from the tree and
checked the way the clients (and the LXD daemon) check them. `go_client_images` restates the
clients' own code (shared/simplestreams/products.go in canonical/lxd and lxc/incus) on the raw
JSON, independently of the model, and the two must agree.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.model import Client, read_catalog
from lxd_image_server.catalog.model import Image as ModelImage
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import Paths

from .helpers import blob, version_dir, write

ROOT_FTYPES = ("disk1.img", "disk-kvm.img", "uefi1.img", "root.tar.xz", "squashfs")
FINGERPRINT_FIELD = {
    "squashfs": "combined_squashfs_sha256",
    "root.tar.xz": "combined_rootxz_sha256",
    "disk-kvm.img": "combined_disk-kvm-img_sha256",
}
KNOWN_ARCHES = {"amd64", "x86_64", "arm64", "aarch64"}


def go_client_images(images_json: dict[str, Any], client: str) -> list[dict[str, Any]]:
    meta_ftype = f"{client}.tar.xz"
    unified_ftype = f"{client}_combined.tar.gz"
    out: list[dict[str, Any]] = []
    for product in images_json["products"].values():
        if product["arch"] not in KNOWN_ARCHES:
            continue
        for serial, version in product["versions"].items():
            if len(serial) < 8 or not serial[:8].isdigit():
                continue
            items = version["items"].values()
            for item in items:
                if item["ftype"] == unified_ftype:
                    out.append(
                        {
                            "fingerprint": item["sha256"],
                            "files": [item],
                            "type": "container",
                            "aliases": product["aliases"].split(","),
                        }
                    )
                if item["ftype"] == meta_ftype:
                    for root in items:
                        if root["ftype"] in ROOT_FTYPES:
                            fp = item.get(FINGERPRINT_FIELD[root["ftype"]], "")
                            assert fp, f"{client}: no fingerprint for {root['ftype']}"
                            vm = root["ftype"] in ("disk1.img", "disk-kvm.img", "uefi1.img")
                            out.append(
                                {
                                    "fingerprint": fp,
                                    "files": [item, root],
                                    "type": "virtual-machine" if vm else "container",
                                    "aliases": product["aliases"].split(","),
                                }
                            )
    return out


def client_images(root: Path, client: Client) -> list[ModelImage]:
    catalog = read_catalog(str(root / "streams/v1/images.json"))
    return [
        image
        for product in catalog.products.values()
        for serial in product.serials()
        for image in product.versions[serial].images(client)
    ]


def download_and_verify_model(root: Path, image: ModelImage) -> None:
    combined = hashlib.sha256()
    for item in image.files:
        data = (root / item.path).read_bytes()
        assert len(data) == item.size
        assert hashlib.sha256(data).hexdigest() == item.sha256
        combined.update(data)
    assert combined.hexdigest() == image.fingerprint


def download_and_verify(root: Path, image: dict[str, Any]) -> None:
    combined = hashlib.sha256()
    for item in image["files"]:
        data = (root / item["path"]).read_bytes()
        assert len(data) == item["size"]
        assert hashlib.sha256(data).hexdigest() == item["sha256"]
        combined.update(data)
    assert combined.hexdigest() == image["fingerprint"]


@pytest.fixture
def published(tmp_path):
    img = tmp_path / "images"
    d = version_dir(img)
    write(d / "lxd.tar.xz", blob(4000, 1))
    write(d / "rootfs.squashfs", blob(300_000, 2))
    write(d / "disk.qcow2", blob(200_000, 3))
    d = version_dir(img, variant="rootxz")
    write(d / "incus.tar.xz", blob(4100, 4))
    write(d / "root.tar.xz", blob(250_000, 5))
    d = version_dir(img, variant="unified")
    write(d / "0f0f0f.tar.gz", blob(220_000, 6))
    paths = Paths.resolve(root_dir=str(tmp_path), state_dir=str(tmp_path / "state"))
    cache = HashCache(None)
    try:
        Pipeline(paths, cache).update_all()
    finally:
        cache.close()
    return tmp_path, json.loads((tmp_path / "streams/v1/images.json").read_bytes())


@pytest.mark.parametrize("client", list(Client))
def test_every_image_visible_and_verifiable(published, client):
    root, _ = published
    images = client_images(root, client)
    kinds = sorted((img.type, img.files[-1].ftype) for img in images)
    assert kinds == [
        ("container", client.unified_ftype),
        ("container", "root.tar.xz"),
        ("container", "squashfs"),
        ("virtual-machine", "disk-kvm.img"),
    ]
    for image in images:
        download_and_verify_model(root, image)


@pytest.mark.parametrize("client", list(Client))
def test_the_model_sees_what_the_clients_code_sees(published, client):
    root, doc = published
    theirs = go_client_images(doc, client.name.lower())
    mine = client_images(root, client)
    assert sorted((i["fingerprint"], tuple(f["path"] for f in i["files"])) for i in theirs) == (
        sorted((i.fingerprint, tuple(f.path for f in i.files)) for i in mine)
    )
    for image in theirs:
        download_and_verify(root, image)


def test_both_clients_see_the_same_fingerprints(published):
    root, _ = published
    lxd = sorted(i.fingerprint for i in client_images(root, Client.LXD))
    incus = sorted(i.fingerprint for i in client_images(root, Client.INCUS))
    assert lxd == incus
    assert len(set(lxd)) == 4


#: The items each client reads a version's metadata (or unified tarball) from, by client.
TWIN_FTYPES = [
    {"lxd": "lxd.tar.xz", "incus": "incus.tar.xz"},
    {"lxd": "lxd_combined.tar.gz", "incus": "incus_combined.tar.gz"},
]


def test_each_client_gets_its_own_identical_copy_of_every_metadata_item(published):
    """Each client reads only the items of its own ftypes, so every metadata and unified item
    is listed once per client: the same file, size, hashes and combined fingerprints."""
    _, doc = published
    twins = 0
    for product in doc["products"].values():
        for version in product["versions"].values():
            items = list(version["items"].values())
            for ftypes in TWIN_FTYPES:
                mine = {c: [i for i in items if i["ftype"] == f] for c, f in ftypes.items()}
                assert len(mine["lxd"]) == len(mine["incus"]) <= 1, mine
                for lxd, incus in zip(mine["lxd"], mine["incus"], strict=True):
                    assert {**lxd, "ftype": None} == {**incus, "ftype": None}
                    twins += 1
    assert twins == 3  # one per version of the fixture
