"""Session fixtures for the acceptance tests with the real LXD and Incus daemons
(test_lxd_launch.py, test_real_images.py, test_deltas_real.py).

Order of one session: a test CA goes into the system store and the host's LXD restarts (it
reads the store once) -> busybox images are built, one of them published and exported by LXD
-> `lxd-image-server update` writes the catalog -> nginx serves the tree over TLS on a fresh
port -> that URL is added as a simplestreams remote of each client. Everything is undone at
teardown. A test that asks for `client` runs with each client: `lxc` (the host's LXD 5.0.2),
then `incus6` and `incus7`, Debian 13's Incus 6.0.4 and trixie-backports' Incus 7, each in a
booted Debian 13 container of its own (incus_guest.py), booted when first asked for, with the
test CA installed before its daemon starts.

Nothing here that touches the daemons is autouse: the other integration tests never do. The
one autouse fixture, `run_user`, makes the unprivileged user every `lxd-image-server run` the
tests start (as root) hands the upload server and the watcher to. The `lxd` marker the tests
carry is registered in setup.cfg.
Prerequisites: root, and `bash tests/host-setup.sh` (packages, a running LXD daemon,
debootstrap and systemd-nspawn).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.service.run_user import USER_ENV as RUN_USER_ENV

from .images import Tree, build_tree
from .incus_guest import INCUS_BUILDS, Guests
from .servers import (
    LXC,
    Client,
    Nginx,
    Pki,
    free_port,
    install_ca,
    make_pki,
    remove_test_cas,
    run,
)
from .verified import assert_verifies

BIN = Path(sys.executable).parent / "lxd-image-server"
TOOLS = (
    "lxc",
    "lxd",
    "debootstrap",
    "systemd-nspawn",
    "nsenter",
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
    if not LXC.is_up():
        pytest.fail("the LXD daemon does not answer `lxc info`: run `bash tests/host-setup.sh`")
    if not LXC.json("storage", "list"):
        pytest.fail("LXD has no storage pool: run `bash tests/host-setup.sh`")
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: install the package into the venv (pip install -e .)")


@pytest.fixture(scope="session")
def label() -> str:
    """Tags this session's LXD objects (instances, aliases) so none collide or linger."""
    return secrets.token_hex(3)


@pytest.fixture(scope="session", autouse=True)
def run_user(label: str) -> Iterator[str | None]:
    """`run` started as root runs the upload server and the watcher as an unprivileged user
    (issue 18): this session's own, named to every `run` by LXD_IMAGE_SERVER_RUN_USER."""
    if os.geteuid() != 0:
        yield None
        return
    name = f"lisrun{label}"
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    previous = os.environ.get(RUN_USER_ENV)
    os.environ[RUN_USER_ENV] = name
    try:
        yield name
    finally:
        if previous is None:
            os.environ.pop(RUN_USER_ENV, None)
        else:
            os.environ[RUN_USER_ENV] = previous
        gone = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60)
        assert gone.returncode == 0, gone.stderr


@pytest.fixture(scope="session")
def pki(lxd_host: None, tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Pki]:
    """The test CA in the system store, a server cert for 127.0.0.1, the host's LXD restarted
    to see it (the Incus containers get the CA before their daemons start)."""
    pki = make_pki(tmp_path_factory.mktemp("pki"), label)
    install_ca(pki.ca_cert)
    try:
        LXC.restart()
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


@pytest.fixture(scope="session")
def incus_guests(pki: Pki, label: str) -> Iterator[Guests]:
    """The Debian 13 containers running Incus, booted on first use, removed at the end."""
    guests = Guests(pki.ca_cert, label)
    try:
        yield guests
    finally:
        guests.close()


CLIENT_NAMES = (LXC.name, *(b.key for b in INCUS_BUILDS))


@pytest.fixture(scope="module", params=CLIENT_NAMES)
def client(request: pytest.FixtureRequest, pki: Pki) -> Client:
    """`lxc` (the host's LXD), `incus6` or `incus7` (Incus in a Debian 13 container): the test
    runs once with each. Module-scoped, so that a module runs all its tests with one client,
    then with the next, keeping its own module-scoped fixtures (servers, uploads) for all."""
    if request.param == LXC.name:
        return LXC
    guests: Guests = request.getfixturevalue("incus_guests")
    return guests.client(request.param)


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
