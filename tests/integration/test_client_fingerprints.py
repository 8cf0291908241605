"""The clients the tests run check what the catalog says against the bytes (issue 19).

LXD 5.0.2-5+deb12u4 and later, Incus 6.0.4-2+deb13u5 and later and Incus 7 recompute
sha256(metadata + root) after a download and refuse an image whose catalog fingerprint differs
(the bookworm-backports Incus build the tests ran before had no such check). So a server that
published a wrong combined fingerprint would serve nothing to these clients; this shows that
each client of conftest.py (`lxc`, `incus6`, `incus7`) really has the check:

- `fpgood`: the catalog as `lxd-image-server update` wrote it: `image copy` works (the control:
  the remote, the CA and the image are fine);
- `fpwrong`: the same kind of image with its combined_squashfs_sha256 replaced by another
  64-hex-digit value: `image copy` fails ("Image fingerprint doesn't match"), and neither
  fingerprint lands in the image store;
- `fpupper`: the true fingerprint in capitals: refused too (by Incus before any download).

Each product has metadata of its own (one fingerprint in two products is "more than one match"
to Incus). The catalog is edited after `update` (and its .gz removed, nginx would serve it),
the way a broken or hostile server would publish it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import BIN, added_remote
from .images import build_rootfs, make_squashfs, sha256_file, write_metadata_tarball
from .servers import Client, Nginx, Pki, free_port, run
from .verified import assert_verifies

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(600)]

SERIAL = "20260101_00:00"
PRODUCTS = ("fpgood", "fpwrong", "fpupper")


@dataclass(frozen=True)
class Served:
    nginx: Nginx
    #: product os -> the true combined fingerprint of its image
    fingerprints: dict[str, str]
    #: the false fingerprint fpwrong's catalog carries
    false_fingerprint: str


def tamper(images_json: Path, os_name: str, fingerprint: str) -> None:
    """Sets combined_squashfs_sha256 on every metadata item of `os_name`'s product."""
    doc = json.loads(images_json.read_text())
    changed = 0
    for product in doc["products"].values():
        if product["os"] != os_name:
            continue
        for version in product["versions"].values():
            for item in version["items"].values():
                if "combined_squashfs_sha256" in item:
                    item["combined_squashfs_sha256"] = fingerprint
                    changed += 1
    assert changed, f"no metadata item of {os_name} in {images_json}"
    images_json.write_text(json.dumps(doc))
    images_json.with_name(images_json.name + ".gz").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def served(pki: Pki, tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("fingerprints")
    root = work / "root"
    squashfs = make_squashfs(build_rootfs(work / "rootfs"), work / "rootfs.squashfs")
    fingerprints = {}
    for os_name in PRODUCTS:
        version = root / "images" / os_name / "1.35" / "amd64" / "default" / SERIAL
        version.mkdir(parents=True)
        meta = write_metadata_tarball(
            work / f"meta-{os_name}", version / "lxd.tar.xz", f"{os_name} {label}"
        )
        (version / "rootfs.squashfs").write_bytes(squashfs.read_bytes())
        fingerprints[os_name] = sha256_file(meta, squashfs)
    run([BIN, "--state-dir", work / "state", "update", "--root-dir", root], timeout=300)
    false_fingerprint = hashlib.sha256(f"not the bytes {label}".encode()).hexdigest()
    assert_verifies(root)  # what the writer published passes verify; the rest is tampered with
    tamper(root / "streams" / "v1" / "images.json", "fpwrong", false_fingerprint)
    tamper(root / "streams" / "v1" / "images.json", "fpupper", fingerprints["fpupper"].upper())
    nginx = Nginx(root, pki, work / "nginx", free_port())
    (work / "nginx").mkdir()
    nginx.start()
    try:
        yield Served(nginx, fingerprints, false_fingerprint)
    finally:
        nginx.stop()


@pytest.fixture
def remote(client: Client, served: Served) -> Iterator[str]:
    known = {*served.fingerprints.values(), served.false_fingerprint}
    known.add(served.fingerprints["fpupper"].upper())
    client.delete_images(known)
    try:
        with added_remote(client, f"fp{served.nginx.port}", served.nginx.url) as name:
            yield name
    finally:
        client.delete_images(known)


def test_the_true_fingerprint_is_accepted(client: Client, remote: str, served: Served) -> None:
    client("image", "copy", f"{remote}:fpgood/1.35", "local:", timeout=300)
    assert served.fingerprints["fpgood"] in client.local_images()


def test_a_wrong_fingerprint_is_refused(client: Client, remote: str, served: Served) -> None:
    listed = {img["fingerprint"] for img in client.json("image", "list", f"{remote}:")}
    assert served.false_fingerprint in listed, "the client must see the false fingerprint"
    proc = client.run(["image", "copy", f"{remote}:fpwrong/1.35", "local:"], check=False)
    print(f"{client}: `image copy` of a wrong fingerprint: exit {proc.returncode}: {proc.stderr}")
    assert proc.returncode != 0, f"{client.daemon} accepted an image whose fingerprint is wrong"
    assert "fingerprint doesn't match" in proc.stderr, proc.stderr
    local = client.local_images()
    assert served.false_fingerprint not in local
    assert served.fingerprints["fpwrong"] not in local


def test_an_uppercase_fingerprint_is_refused(client: Client, remote: str, served: Served) -> None:
    """The true fingerprint in capitals. Incus (trixie's 6.0.4-2+deb13u9 and later, and the
    7.0.2 of trixie-backports) refuses it before downloading anything; Debian 12's LXD 5.0.2
    downloads both files, then finds the fingerprint does not match."""
    before = len(served.nginx.requests())
    proc = client.run(["image", "copy", f"{remote}:fpupper/1.35", "local:"], check=False)
    fetched = [p for _, _, p in served.nginx.requests()[before:] if p.startswith("/images/")]
    print(f"{client}: `image copy` of an uppercase fingerprint: exit {proc.returncode}: "
          f"{proc.stderr.strip()}; image files requested: {len(fetched)}")  # fmt: skip
    assert proc.returncode != 0, f"{client.daemon} accepted an uppercase fingerprint"
    if client.command == "incus":
        assert "Invalid image fingerprint" in proc.stderr, proc.stderr
        assert fetched == [], f"{client.daemon} downloaded before checking: {fetched}"
    else:
        assert "fingerprint doesn't match" in proc.stderr, proc.stderr
    assert served.fingerprints["fpupper"] not in client.local_images()
