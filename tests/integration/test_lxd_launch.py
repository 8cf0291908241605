"""Acceptance: a tree published by `lxd-image-server update`, served by nginx over TLS, is a
simplestreams remote that the real LXD and the real Incus list and launch containers from, in
every image form (squashfs, root.tar.xz, unified tarball) and by every alias users type (the
layout's and one from metadata.json). The VM is listed as a virtual machine (nothing here can
boot one). Every test that takes `client` runs with `lxc` (the host's LXD 5.0.2), `incus6` and
`incus7` (Incus 6.0.4 and 7 in Debian 13 containers; see conftest.py).

Needs root and `bash tests/host-setup.sh`; see conftest.py for the session's set-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import Scratch
from .images import OVERRIDE_ALIAS, Tree, sha256_file
from .servers import Client, Nginx, Remote

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(600)]

META_FTYPES = ("lxd.tar.xz", "incus.tar.xz")


def product(catalog: dict[str, Any], variant: str) -> dict[str, Any]:
    """The one busybox 1.35 amd64 product of this variant (product keys are free strings)."""
    found = [
        p
        for p in catalog["products"].values()
        if (p["os"], p["release"], p["arch"], p["variant"]) == ("busybox", "1.35", "amd64", variant)
    ]
    assert len(found) == 1, f"expected one {variant} product, found {len(found)}"
    chosen: dict[str, Any] = found[0]
    return chosen


def items(catalog: dict[str, Any], tree: Tree, variant: str) -> dict[str, Any]:
    versions = product(catalog, variant)["versions"]
    assert list(versions) == [tree.serial]
    result: dict[str, Any] = versions[tree.serial]["items"]
    return result


def catalog_fingerprints(catalog: dict[str, Any], tree: Tree) -> dict[str, str]:
    """Image kind -> the fingerprint images.json announces for it."""
    default = items(catalog, tree, "default")["lxd.tar.xz"]
    rootxz = items(catalog, tree, "rootxz")["lxd.tar.xz"]
    assert rootxz["combined_sha256"] == rootxz["combined_rootxz_sha256"]
    return {
        "squashfs": default["combined_squashfs_sha256"],
        "vm": default["combined_disk-kvm-img_sha256"],
        "rootxz": rootxz["combined_rootxz_sha256"],
        "unified": items(catalog, tree, "unified")["lxd_combined.tar.gz"]["sha256"],
    }


def recomputed_fingerprints(tree: Tree) -> dict[str, str]:
    """The same, computed here from the files: sha256(meta + root), sha256(unified)."""
    return {
        "squashfs": sha256_file(tree.meta, tree.squashfs),
        "vm": sha256_file(tree.meta, tree.qcow2),
        "rootxz": sha256_file(tree.rootxz_meta, tree.root_tar_xz),
        "unified": sha256_file(tree.unified),
    }


def test_update_published_every_form(tree: Tree, catalog: dict[str, Any]) -> None:
    files = {
        "default": {tree.meta, tree.squashfs, tree.qcow2},
        "rootxz": {tree.rootxz_meta, tree.root_tar_xz},
        "unified": {tree.unified},
    }
    for variant, expected in files.items():
        its = items(catalog, tree, variant)
        assert {tree.root / i["path"] for i in its.values()} == expected, variant
        for key, item in its.items():
            path = tree.root / item["path"]
            assert item["size"] == path.stat().st_size, (variant, key)
            assert item["sha256"] == sha256_file(path), (variant, key)
    assert {i["ftype"] for i in items(catalog, tree, "default").values()} == {
        *META_FTYPES,
        "squashfs",
        "disk-kvm.img",
    }
    assert catalog_fingerprints(catalog, tree) == recomputed_fingerprints(tree)


def test_remote_is_added(client: Client, remote: str, nginx: Nginx) -> None:
    assert client.remotes()[remote] == Remote((nginx.url,), "simplestreams")


def test_image_list_shows_every_image(
    client: Client, remote: str, tree: Tree, catalog: dict[str, Any]
) -> None:
    listed = {img["fingerprint"]: img for img in client.json("image", "list", f"{remote}:")}
    fps = recomputed_fingerprints(tree)
    assert catalog_fingerprints(catalog, tree) == fps
    expected = {
        fps["squashfs"]: ("container", "busybox/1.35"),
        fps["vm"]: ("virtual-machine", "busybox/1.35"),
        fps["rootxz"]: ("container", "busybox/1.35/rootxz"),
        fps["unified"]: ("container", "busybox/1.35/unified"),
    }
    assert set(listed) == set(expected), "the remote lists other images than the tree has"
    for fp, (kind, alias) in expected.items():
        img = listed[fp]
        assert img["type"] == kind, (alias, img)
        assert img["architecture"] == "x86_64", (alias, img)
        assert alias in {a["name"] for a in img["aliases"]}, (alias, img["aliases"])
    assert OVERRIDE_ALIAS in {a["name"] for a in listed[fps["rootxz"]]["aliases"]}
    # what `image info` says of the VM, by its fingerprint
    info = client("image", "info", f"{remote}:{fps['vm']}")
    assert "Type: virtual-machine" in info, info


LAUNCHES = [
    pytest.param("busybox/1.35", "squashfs", id="short-alias"),
    pytest.param("busybox/1.35/amd64/default", "squashfs", id="seeds-alias"),
    pytest.param("busybox/1.35/rootxz", "rootxz", id="root.tar.xz"),
    pytest.param(OVERRIDE_ALIAS, "rootxz", id="metadata.json-alias"),
    pytest.param("busybox/1.35/unified", "unified", id="unified"),
]


@pytest.mark.parametrize(("alias", "form"), LAUNCHES)
def test_launch(
    client: Client,
    remote: str,
    nginx: Nginx,
    tree: Tree,
    scratch: Scratch,
    alias: str,
    form: str,
) -> None:
    fingerprint = recomputed_fingerprints(tree)[form]
    downloads: dict[str, set[Path]] = {
        "squashfs": {tree.meta, tree.squashfs},
        "rootxz": {tree.rootxz_meta, tree.root_tar_xz},
        "unified": {tree.unified},
    }
    assert fingerprint not in client.local_images(), "the image must come from the remote"
    served_before = len(nginx.requests())

    name = scratch.instance(client.name)
    client("launch", f"{remote}:{alias}", name, timeout=300)

    assert client("config", "get", name, "volatile.base_image").strip() == fingerprint
    assert client("exec", name, "--", "/bin/busybox", "echo", "ok", timeout=60) == "ok\n"
    served = {path for method, status, path in nginx.requests()[served_before:] if status == 200}
    for f in downloads[form]:
        assert f"/{tree.relpath(f)}" in served, f"{client.daemon} did not download {f.name}"
