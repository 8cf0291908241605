"""Session fixtures for the acceptance tests with the real LXD and Incus daemons
(test_lxd_launch.py, test_real_images.py).

Order of one session: a test CA goes into the system store and both daemons restart (each
reads the store once) -> busybox images are built, one of them published and exported by LXD
-> `lxd-image-server update` writes the catalog -> nginx serves the tree over TLS on a fresh
port -> that URL is added as a simplestreams remote of each client. Everything is undone at
teardown. A test that asks for `client` runs once with `lxc` (LXD) and once with `incus`.

Nothing here is autouse: the other integration tests never touch the daemons. The `lxd` marker
the tests carry is registered in setup.cfg.
Prerequisites: root, and `bash tests/host-setup.sh` (packages, running LXD and Incus daemons).
"""

from __future__ import annotations

import contextlib
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
    CLIENTS,
    Client,
    Nginx,
    Pki,
    free_port,
    install_ca,
    make_pki,
    remove_test_cas,
    restart_daemons,
    run,
)
from .verified import assert_verifies

BIN = Path(sys.executable).parent / "lxd-image-server"
TOOLS = (
    "lxc",
    "lxd",
    "incus",
    "mksquashfs",
    "qemu-img",
    "xz",
    "tar",
    "update-ca-certificates",
    "curl",
)


@pytest.fixture(scope="session")
def lxd_host() -> None:
    """Fails (never skips) with what to do when the machine is not prepared."""
    if os.geteuid() != 0:
        pytest.fail("the acceptance tests run as root (they install a CA, drive LXD and Incus)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `bash tests/host-setup.sh` first")
    for c in CLIENTS:
        if not c.is_up():
            pytest.fail(
                f"the {c.daemon} daemon does not answer `{c} info`: run `bash tests/host-setup.sh`"
            )
        if not c.json("storage", "list"):
            pytest.fail(f"{c.daemon} has no storage pool: run `bash tests/host-setup.sh`")
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: install the package into the venv (pip install -e .)")


@pytest.fixture(scope="session")
def label() -> str:
    """Tags this session's LXD objects (instances, aliases) so none collide or linger."""
    return secrets.token_hex(3)


@pytest.fixture(scope="session")
def pki(lxd_host: None, tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Pki]:
    """The test CA in the system store, a server cert for 127.0.0.1, both daemons restarted to
    see it."""
    pki = make_pki(tmp_path_factory.mktemp("pki"), label)
    install_ca(pki.ca_cert)
    try:
        restart_daemons()
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
    assert_verifies(t.root)
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


@pytest.fixture(scope="module", params=CLIENTS, ids=str)
def client(request: pytest.FixtureRequest, pki: Pki) -> Client:
    """`lxc` (LXD) or `incus` (Incus): the test runs once with each. Module-scoped, so that a
    module runs all its tests with one client, then with the other, keeping its own
    module-scoped fixtures (servers, uploads) for both."""
    c: Client = request.param
    return c


@contextlib.contextmanager
def added_remote(client: Client, name: str, url: str) -> Iterator[str]:
    """`<client> remote add NAME URL --protocol simplestreams`, removed afterwards."""
    client.remove_remote(name)  # left over by a crashed run on the same port
    client("remote", "add", name, url, "--protocol", "simplestreams")
    try:
        yield name
    finally:
        client.remove_remote(name)


@pytest.fixture(scope="module")
def remote(client: Client, nginx: Nginx) -> Iterator[str]:
    """The nginx of this session as the remote t<port> of `client`."""
    with added_remote(client, f"t{nginx.port}", nginx.url) as name:
        yield name


class Scratch:
    """Names the instances a test creates and removes them, and any local copy of this
    session's images, afterwards: the next lookup must hit the remote again."""

    def __init__(self, client: Client, label: str, fingerprints: set[str]) -> None:
        self.client = client
        self.label = label
        self.fingerprints = fingerprints
        self.instances: list[str] = []

    def instance(self, short: str) -> str:
        name = f"lis-{self.label}-{short}"
        self.instances.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.instances:
            self.client.delete_instance(name)
        self.client.delete_images(self.fingerprints)


@pytest.fixture
def scratch(client: Client, tree: Tree, label: str) -> Iterator[Scratch]:
    fingerprints = {tree.fp_squashfs, tree.fp_vm, tree.fp_rootxz, tree.fp_unified}
    s = Scratch(client, label, fingerprints)
    s.cleanup()  # a test never starts with this session's images cached locally
    try:
        yield s
    finally:
        s.cleanup()
