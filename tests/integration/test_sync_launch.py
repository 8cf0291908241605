"""Acceptance: images synced from an upstream in images.linuxcontainers.org's layout, served by
this project's nginx, launch in the real LXD and the real Incus, with upstream's fingerprint
(the split squashfs image, by an alias upstream gave it, and the unified tarball).

Needs root and `bash tests/host-setup.sh`; run under `flock /tmp/lxd-heavy.lock`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import added_remote
from .servers import Client, Nginx, Pki, free_port
from .sync_upstreams import SERIALS, LxcUpstream, build_files, lxc_upstream
from .test_sync import sync

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def synced(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Nginx, LxcUpstream]]:
    """An lxc-layout upstream (nginx), synced into a tree served by another nginx."""
    work = tmp_path_factory.mktemp("synclaunch")
    files = build_files(work / "files", 2)
    up = lxc_upstream(work / "up", files, work / "files")
    upstream = Nginx(up.root, pki, work / "nginx-up", free_port())
    upstream.start()
    try:
        target = work / "target"
        proc = sync(target, upstream.url, pki, "--keep", "1")
        assert proc.returncode == 0, proc.stderr
    finally:
        upstream.stop()
    server = Nginx(target, pki, work / "nginx", free_port())
    server.start()
    try:
        yield server, up
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("alias", "form"), [("bb-lxc", "container"), ("busybox/1.35/unified", "unified")]
)
def test_launch_synced(
    client: Client,
    synced: tuple[Nginx, LxcUpstream],
    label: str,
    alias: str,
    form: str,
) -> None:
    server, up = synced
    fingerprint = up.unified_fp if form == "unified" else up.fingerprints[SERIALS[1]]["container"]
    name = f"lis-{label}-sync-{form}"
    client.delete_instance(name)
    client.delete_images({fingerprint})
    try:
        with added_remote(client, f"s{server.port}", server.url) as remote:
            client("launch", f"{remote}:{alias}", name, timeout=300)
            assert client("config", "get", name, "volatile.base_image").strip() == fingerprint
            out = client("exec", name, "--", "/bin/busybox", "echo", "ok", timeout=60)
            assert out == "ok\n"
    finally:
        client.delete_instance(name)
        client.delete_images({fingerprint})
