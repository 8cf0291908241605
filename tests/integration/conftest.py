"""Session fixtures for the real-LXD acceptance tests (test_lxd_launch.py).

Order of one session: a test CA goes into the system store and the LXD daemon restarts (it
reads the store once) -> busybox images are built, one of them published and exported by LXD
-> `lxd-image-server update` writes the catalog -> nginx serves the tree over TLS on a fresh
port -> that URL is added as a simplestreams remote. Everything is undone at teardown.

Nothing here is autouse: the other integration tests never touch LXD. The `lxd` marker
the tests carry is registered in setup.cfg.
Prerequisites: root, and `bash tests/host-setup.sh` (packages and a running LXD daemon).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .images import Tree, build_tree
from .servers import (
    Nginx,
    Pki,
    delete_images,
    delete_instance,
    free_port,
    install_ca,
    lxc,
    lxc_json,
    lxd_is_up,
    make_pki,
    remove_test_cas,
    restart_lxd,
    run,
)

BIN = Path(sys.executable).parent / "lxd-image-server"
TOOLS = ("lxc", "lxd", "mksquashfs", "qemu-img", "xz", "tar", "update-ca-certificates", "curl")


@pytest.fixture(scope="session")
def lxd_host() -> None:
    """Fails (never skips) with what to do when the machine is not prepared."""
    if os.geteuid() != 0:
        pytest.fail("the LXD acceptance tests run as root (they install a CA, drive LXD)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `bash tests/host-setup.sh` first")
    if not lxd_is_up():
        pytest.fail("the LXD daemon does not answer `lxc info`: run `bash tests/host-setup.sh`")
    if not lxc_json("storage", "list"):
        pytest.fail("LXD has no storage pool: run `bash tests/host-setup.sh`")
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: install the package into the venv (pip install -e .)")


@pytest.fixture(scope="session")
def label() -> str:
    """Tags this session's LXD objects (instances, aliases) so none collide or linger."""
    return secrets.token_hex(3)


@pytest.fixture(scope="session")
def pki(lxd_host: None, tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Pki]:
    """The test CA in the system store, a server cert for 127.0.0.1, LXD restarted to see it."""
    pki = make_pki(tmp_path_factory.mktemp("pki"), label)
    install_ca(pki.ca_cert)
    try:
        restart_lxd()
        yield pki
    finally:
        remove_test_cas()


@pytest.fixture(scope="session")
def tree(pki: Pki, tmp_path_factory: pytest.TempPathFactory, label: str) -> Tree:
    """The image tree with its catalog. Needs `pki` first: the daemon restart must not come
    after anything was started in it."""
    workdir = tmp_path_factory.mktemp("tree")
    t = build_tree(workdir, label)
    proc = run(
        [BIN, "--state-dir", workdir / "state", "update", "--root-dir", t.root],
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (
        f"`lxd-image-server update` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return t


@pytest.fixture(scope="session")
def catalog(tree: Tree) -> dict[str, Any]:
    """images.json as published."""
    doc: dict[str, Any] = json.loads((tree.root / "streams" / "v1" / "images.json").read_text())
    return doc


@pytest.fixture(scope="session")
def nginx(tree: Tree, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx serving the tree on a port of its own: clients and the daemon cache the catalog
    per URL, so a fresh port guarantees they read this session's."""
    server = Nginx(tree.root, pki, tmp_path_factory.mktemp("nginx"), free_port())
    server.start()
    try:
        # the chain must verify against the system store alone, over TLS 1.3 (what LXD needs)
        run(
            [
                "curl",
                "-sS",
                "--fail",
                "--tlsv1.3",
                "-o",
                "/dev/null",
                f"{server.url}/streams/v1/index.json",
            ]
        )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def remote(nginx: Nginx) -> Iterator[str]:
    """`lxc remote add t<port> https://127.0.0.1:<port> --protocol simplestreams`."""
    name = f"t{nginx.port}"
    if name in lxc_json("remote", "list"):  # left over by a crashed run on the same port
        lxc("remote", "remove", name)
    lxc("remote", "add", name, nginx.url, "--protocol", "simplestreams")
    try:
        yield name
    finally:
        lxc("remote", "remove", name)


class Scratch:
    """Names the instances a test creates and removes them, and any local copy of this
    session's images, afterwards: the next lookup must hit the remote again."""

    def __init__(self, label: str, fingerprints: set[str]) -> None:
        self.label = label
        self.fingerprints = fingerprints
        self.instances: list[str] = []

    def instance(self, short: str) -> str:
        name = f"lis-{self.label}-{short}"
        self.instances.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.instances:
            delete_instance(name)
        delete_images(self.fingerprints)


@pytest.fixture
def scratch(tree: Tree, label: str) -> Iterator[Scratch]:
    fingerprints = {tree.fp_squashfs, tree.fp_vm, tree.fp_rootxz, tree.fp_unified}
    s = Scratch(label, fingerprints)
    s.cleanup()  # a test never starts with this session's images cached locally
    try:
        yield s
    finally:
        s.cleanup()
