"""Issue 12, section 4: `[retention] keep = 2` applied by the real watcher of `run` (and by
`update`). When a third version is published, the first leaves the catalog in that same
publish; a client holding the old catalog still downloads it; its files go once the grace
period is over, deleted by the watcher itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.retention import load

from .servers import Pki, free_port, make_pki
from .test_http_cache import Served, start, stop
from .verified import assert_verifies

BIN = Path(sys.executable).parent / "lxd-image-server"
#: long enough for the checks made within it on a slow machine; the test waits it out once
GRACE = 20
DEADLINE = 60.0
PRODUCT = "kept:1.0:amd64:default"
SERIALS = ("20240101_1200", "20240102_1200", "20240103_1200")


def add_version(root: Path, serial: str) -> Path:
    """A version put in place as the tree's owner would (the watcher of `run` started as root
    runs as that user, and deletes what it prunes)."""
    d = root / "images" / "kept" / "1.0" / "amd64" / "default" / serial
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(f"metadata {serial}".encode() * 50)
    (d / "rootfs.squashfs").write_bytes(f"rootfs {serial}".encode() * 500)
    owner = root.stat()
    for p in [d / "lxd.tar.xz", d / "rootfs.squashfs", d, *d.parents]:
        if p == root:
            break
        os.chown(p, owner.st_uid, owner.st_gid)
    return d


def versions(doc: dict[str, Any]) -> list[str]:
    return sorted(doc["products"].get(PRODUCT, {}).get("versions", {}))


def catalog(s: Served) -> dict[str, Any]:
    status, _, body = s.https("GET", "/streams/v1/images.json")
    assert status == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


def wait_for(s: Served, wanted: list[str], seen: list[list[str]]) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while True:
        doc = catalog(s)
        seen.append(versions(doc))
        if versions(doc) == wanted:
            return doc
        assert time.monotonic() < deadline, (
            f"catalog {seen[-1]}, not {wanted}:\n{s.log.read_text()}"
        )
        time.sleep(0.05)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import shutil
    import tempfile

    # www-data must reach the tree: pytest's own tmp (0700) would not do
    path = Path(tempfile.mkdtemp(prefix="lis-retention-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def pki(base: Path) -> Pki:
    return make_pki(base / "pki", "retention")


def test_keep_2_with_the_real_watcher(base: Path, pki: Pki) -> None:
    config = base / "config.toml"
    config.write_text(f"[retention]\nkeep = 2\n[prune]\ngrace_period = {GRACE}\n")
    s = start(base / "run", pki, free_port(), None, config=config)
    try:
        root = s.root
        first = add_version(root, SERIALS[0])
        add_version(root, SERIALS[1])
        seen: list[list[str]] = []
        old = wait_for(s, list(SERIALS[:2]), seen)
        old_items = old["products"][PRODUCT]["versions"][SERIALS[0]]["items"]

        add_version(root, SERIALS[2])
        wait_for(s, list(SERIALS[1:]), seen)
        # never three at once: the first left in the publish that added the third
        assert all(len(v) <= 2 for v in seen), seen
        (entry,) = load(str(s.state))
        assert (entry.path, entry.serial) == (str(first), SERIALS[0])
        assert entry.expires - entry.pruned == GRACE

        # a client holding the old catalog downloads the first version meanwhile
        for item in old_items.values():
            status, _, body = s.https("GET", "/" + item["path"])
            assert status == 200 and len(body) == item["size"], item
        assert time.time() < entry.expires, "the downloads above were not within the grace"
        assert first.is_dir()

        # its files go once the grace period is over: the watcher deletes them itself
        deadline = time.monotonic() + GRACE + DEADLINE
        while first.exists():
            assert time.monotonic() < deadline, s.log.read_text()
            time.sleep(0.2)
        assert time.time() >= entry.expires
        for item in old_items.values():
            assert s.https("GET", "/" + item["path"])[0] == 404
        assert load(str(s.state)) == []
        assert versions(catalog(s)) == list(SERIALS[1:])
        text = s.log.read_text()
        assert f"retention: {PRODUCT} {SERIALS[0]} leaves the catalog (keep 2)" in text
    finally:
        stop(s)


def test_update_applies_the_policy(tmp_path: Path) -> None:
    import subprocess

    root = tmp_path / "root"
    for serial in SERIALS:
        add_version(root, serial)
    config = tmp_path / "config.toml"
    config.write_text(
        "[retention]\nkeep = 5\n[[retention.rule]]\nmatch = 'kept/*'\nkeep = 1\n"
        "[prune]\ngrace_period = 0\n"
    )
    r = subprocess.run(
        [BIN, "--config", config, "--state-dir", tmp_path / "state", "update", "--root-dir", root],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((root / "streams/v1/images.json").read_bytes())
    assert versions(doc) == [SERIALS[2]]
    assert_verifies(root)
    # no grace period: the files went in the same run
    assert sorted(p.name for p in (root / "images/kept/1.0/amd64/default").iterdir()) == [
        SERIALS[2]
    ]
