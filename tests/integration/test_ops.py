"""The operator commands against real parts: what `lxc image export` writes goes in with
`import` (or `push` to `lxd-image-server run`), nginx serves it, the LXD daemon launches it;
`verify` finds damage; `prune` keeps old files downloadable for clients holding the old
catalog until the grace period is over and `update` deletes them.

Needs root and `bash tests/host-setup.sh`; reuses conftest.py's CA (pki) and servers.py's nginx.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .images import build_rootfs, export_unified, make_squashfs, sha256_file, write_metadata_tarball
from .servers import (
    Nginx,
    Pki,
    delete_images,
    delete_instance,
    free_port,
    lxc,
    lxc_json,
    run,
)
from .test_run import PASSWORD, reachable, start_server
from .verified import assert_verifies

__all__ = ["reachable"]  # a fixture, used by name

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent / "lxd-image-server"
PRODUCT = "busybox:1.35:amd64:default"
DEADLINE = 60.0


@dataclass(frozen=True)
class Exports:
    """What `lxc image export` wrote, and one more metadata tarball for an older version."""

    unified: Path
    #: [meta-<fp>.tar.xz, <fp>.squashfs]
    split: list[Path]
    squashfs: Path
    old_meta: Path

    @property
    def fp_unified(self) -> str:
        return self.unified.name.removesuffix(".tar.gz")

    @property
    def fp_split(self) -> str:
        return sha256_file(*self.split)

    @property
    def fp_old(self) -> str:
        return sha256_file(self.old_meta, self.squashfs)

    @property
    def fingerprints(self) -> set[str]:
        return {self.fp_unified, self.fp_split, self.fp_old}


@pytest.fixture(scope="module")
def exports(pki: Pki, tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Exports]:
    work = tmp_path_factory.mktemp("ops-exports")
    rootfs = build_rootfs(work / "rootfs")
    meta = write_metadata_tarball(work / "meta", work / "meta.tar.xz", f"ops {label}")
    squashfs = make_squashfs(rootfs, work / "rootfs.squashfs")
    # unified: a container launched from (meta, squashfs), `lxc publish`ed, `lxc image export`ed
    unified = export_unified(meta, squashfs, work / "unified", label)
    # split: an image imported from two files and exported again gives two files
    alias = f"lis-{label}-split"
    try:
        lxc("image", "import", str(meta), str(squashfs), "--alias", alias)
        (work / "split").mkdir()
        lxc("image", "export", alias, f"{work / 'split'}/")
    finally:
        delete_images({sha256_file(meta, squashfs)})
    split = sorted((work / "split").iterdir(), key=lambda p: not p.name.startswith("meta-"))
    names = [p.name for p in split]
    assert len(split) == 2 and names[0].startswith("meta-") and names[1].endswith(".squashfs"), (
        f"`lxc image export` of a split image gave {names}"
    )
    old_meta = write_metadata_tarball(work / "meta-old", work / "old.tar.xz", f"ops old {label}")
    ex = Exports(unified=unified, split=split, squashfs=squashfs, old_meta=old_meta)
    try:
        yield ex
    finally:
        delete_images(ex.fingerprints)


def ops(state: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([BIN, "--state-dir", state, *args], timeout=300, check=check)


def catalog(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / "streams/v1/images.json").read_bytes())
    return doc


def versions(root: Path, product: str = PRODUCT) -> list[str]:
    return sorted(catalog(root)["products"].get(product, {}).get("versions", {}))


@contextmanager
def serving(
    root: Path, pki: Pki, work: Path, published: bool = True
) -> Iterator[tuple[Nginx, str]]:
    """nginx on a fresh port (LXD caches catalogs per URL) and a remote for it; what it serves
    passes `verify` first, unless it is not a published tree (`published=False`)."""
    if published:
        assert_verifies(root)
    server = Nginx(root, pki, work, free_port())
    server.start()
    name = f"ops{server.port}"
    try:
        lxc("remote", "add", name, server.url, "--protocol", "simplestreams")
        try:
            yield server, name
        finally:
            lxc("remote", "remove", name)
    finally:
        server.stop()


@contextmanager
def instances(label: str, fingerprints: set[str]) -> Iterator[list[str]]:
    """Names of instances to delete afterwards, with any local copy of the images: every
    launch must download from the remote."""
    names: list[str] = []
    delete_images(fingerprints)
    try:
        yield names
    finally:
        for name in names:
            delete_instance(name)
        delete_images(fingerprints)


def launch(remote: str, image: str, name: str) -> str:
    """Launches, checks the container runs, returns the fingerprint it was made from."""
    lxc("launch", f"{remote}:{image}", name, timeout=300)
    assert lxc("exec", name, "--", "/bin/busybox", "echo", "ok", timeout=60) == "ok\n"
    return lxc("config", "get", name, "volatile.base_image").strip()


def test_import_real_exports_then_launch(
    exports: Exports, pki: Pki, tmp_path: Path, label: str
) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    r = ops(state, "import", "--root-dir", root, *exports.split)
    assert "imported busybox:1.35:amd64:default" in r.stdout
    r = ops(state, "import", "--root-dir", root, "--variant", "unified", exports.unified)
    assert exports.fp_unified in r.stdout
    serial = versions(root)[0]
    vdir = root / "images/busybox/1.35/amd64/default" / serial
    assert sorted(os.listdir(vdir)) == ["lxd.tar.xz", "rootfs.squashfs"]
    udir = root / "images/busybox/1.35/amd64/unified" / serial
    assert os.listdir(udir) == [exports.unified.name]
    assert all(p.exists() for p in [*exports.split, exports.unified])  # copied, not moved

    listed = json.loads(ops(state, "list", "--root-dir", root, "--format", "json").stdout)
    assert {r["fingerprint"] for r in listed} == {exports.fp_split, exports.fp_unified}

    with (
        serving(root, pki, tmp_path / "nginx") as (_, remote),
        instances(label, exports.fingerprints) as names,
    ):
        images = {i["fingerprint"] for i in lxc_json("image", "list", f"{remote}:")}
        assert images == {exports.fp_split, exports.fp_unified}
        names.append(f"lis-{label}-imp-split")
        assert launch(remote, "busybox/1.35", names[-1]) == exports.fp_split
        names.append(f"lis-{label}-imp-unified")
        assert launch(remote, "busybox/1.35/unified", names[-1]) == exports.fp_unified


def test_push_to_run_then_launch(exports: Exports, pki: Pki, reachable: Path, label: str) -> None:
    # a directory www-data can traverse: `run` as root never starts nginx's workers as root
    server_gen = start_server(reachable, pki, {})
    server = next(server_gen)
    try:
        env = {**os.environ, "LXD_IMAGE_SERVER_PASSWORD": PASSWORD}
        r = subprocess.run(
            [BIN, "push", *map(str, exports.split), "--remote", server.url, "--variant", "pushed"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count("sent: images/busybox/1.35/amd64/pushed/") == 2
        product = "busybox:1.35:amd64:pushed"
        deadline = time.monotonic() + DEADLINE
        while not versions(server.root, product):
            assert time.monotonic() < deadline, "the watcher never published the pushed image"
            time.sleep(0.05)

        # pushing again: the server has identical files, nothing is sent
        r = subprocess.run(
            [BIN, "push", *map(str, exports.split), "--remote", server.url, "--variant", "pushed"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0 and r.stdout.count("already there") == 2, r.stdout + r.stderr

        # a wrong password: a clear error, exit 1
        r = subprocess.run(
            [BIN, "push", *map(str, exports.split), "--remote", server.url, "--serial",
             "20200101_0000"],
            capture_output=True,
            text=True,
            env={**os.environ, "LXD_IMAGE_SERVER_PASSWORD": "wrong"},
            timeout=300,
        )  # fmt: skip
        assert r.returncode == 1 and "refused the credentials" in r.stderr, r.stderr

        remote = f"ops{server.port}"
        lxc("remote", "add", remote, server.url, "--protocol", "simplestreams")
        try:
            with instances(label, exports.fingerprints) as names:
                names.append(f"lis-{label}-pushed")
                assert launch(remote, "busybox/1.35/pushed", names[-1]) == exports.fp_split
        finally:
            lxc("remote", "remove", remote)
    finally:
        server_gen.close()


def test_verify_finds_a_flipped_byte_and_a_missing_file(exports: Exports, tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    ops(state, "import", "--root-dir", root, *exports.split)
    ops(state, "import", "--root-dir", root, "--variant", "unified", exports.unified)
    r = ops(state, "verify", "--root-dir", root)
    assert r.stdout.startswith("ok: 3 files")

    vdir = root / "images/busybox/1.35/amd64/default" / versions(root)[0]
    squashfs = vdir / "rootfs.squashfs"
    data = bytearray(squashfs.read_bytes())
    data[len(data) // 2] ^= 0x10
    squashfs.write_bytes(bytes(data))
    unified = next((root / "images/busybox/1.35/amd64/unified").glob("*/*.tar.gz"))
    unified.unlink()
    r = ops(state, "verify", "--root-dir", root, check=False)
    assert r.returncode == 1, r.stdout
    lines = r.stdout.splitlines()
    assert any(line.startswith("SHA256") and "rootfs.squashfs" in line for line in lines)
    assert any(line.startswith("FINGERPRINT") and PRODUCT in line for line in lines)
    assert any(line.startswith("MISSING") and unified.name in line for line in lines)


def test_prune_keeps_old_files_for_the_grace_period(
    exports: Exports, pki: Pki, tmp_path: Path, label: str
) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    old, new = "20240101_00:00", "20240102_00:00"
    ops(state, "import", "--root-dir", root, "--serial", old, exports.old_meta, exports.squashfs)
    ops(state, "import", "--root-dir", root, "--serial", new, *exports.split)
    assert versions(root) == [old, new]

    # a client that read the catalog before the prune: its copy, served with the live files
    held = tmp_path / "held"
    shutil.copytree(root / "streams", held / "streams")
    (held / "images").symlink_to(root / "images")

    r = ops(state, "prune", "--root-dir", root, "--keep", "1")
    assert f"removed {PRODUCT} {old} from the catalog" in r.stdout
    assert versions(root) == [new]
    assert_verifies(root)
    old_dir = root / "images/busybox/1.35/amd64/default" / old

    # (held is a client's stale view through a link, not a published tree)
    with (
        serving(held, pki, tmp_path / "nginx", published=False) as (nginx, remote),
        instances(label, exports.fingerprints) as names,
    ):
        # during the grace period the old version still downloads and launches
        names.append(f"lis-{label}-held")
        assert launch(remote, exports.fp_old, names[-1]) == exports.fp_old
        served = {p for m, s, p in nginx.requests() if s == 200}
        assert f"/images/busybox/1.35/amd64/default/{old}/rootfs.squashfs" in served

        # an `update` inside the grace period deletes nothing
        ops(state, "update", "--root-dir", root)
        assert old_dir.is_dir() and versions(root) == [new]

        # the grace period is over (as if an hour had passed): the next update deletes
        pruned = state / "pruned.json"
        doc = json.loads(pruned.read_text())
        assert [e["serial"] for e in doc["pending"]] == [old]
        doc["pending"][0]["expires"] = int(time.time()) - 1
        pruned.write_text(json.dumps(doc))
        ops(state, "update", "--root-dir", root)
        assert not old_dir.exists()
        assert json.loads(pruned.read_text())["pending"] == []
        code = run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
             f"{nginx.url}/images/busybox/1.35/amd64/default/{old}/rootfs.squashfs"],
        ).stdout  # fmt: skip
        assert code == "404"
        assert versions(root) == [new]
        assert_verifies(root)  # the deletion left nothing the catalog lists missing


def test_the_watcher_leaves_pruned_versions_out(exports: Exports, tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    old, new = "20240101_00:00", "20240102_00:00"
    ops(state, "import", "--root-dir", root, "--serial", old, exports.old_meta, exports.squashfs)
    ops(state, "import", "--root-dir", root, "--serial", new, *exports.split)
    log = tmp_path / "watch.log"
    with open(log, "wb") as out:
        watcher = subprocess.Popen(
            [BIN, "--state-dir", state, "watch", "--root-dir", root],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + DEADLINE
        while "watching" not in log.read_text():
            assert watcher.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        ops(state, "prune", "--root-dir", root, "--keep", "1")
        assert versions(root) == [new]
        # something else changes: the watcher republishes, still without the pruned version
        ops(state, "import", "--root-dir", root, "--variant", "other", *exports.split)
        deadline = time.monotonic() + DEADLINE
        shutil.copytree(
            root / "images/busybox/1.35/amd64/other",
            root / "images/busybox/1.35/amd64/.staging",
        )
        os.rename(
            root / "images/busybox/1.35/amd64/.staging",
            root / "images/busybox/1.35/amd64/third",
        )
        while not versions(root, "busybox:1.35:amd64:third"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert versions(root) == [new]
    finally:
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(30) == 0, log.read_text()
