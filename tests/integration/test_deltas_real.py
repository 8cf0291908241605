"""Delta updates with the real LXD and Incus daemons and a real Debian image (issue 12), with
every client of conftest.py (`lxc`, `incus6`, `incus7`).

For each client, in a product of its own on one `lxd-image-server run` server (access log on):
1. version 1 (test_real_images' Debian image) is uploaded with the seeds' curl commands and
   copied to the daemon by alias with --auto-update;
2. version 2 (version 1 plus a few MiB of new files) is uploaded the same way; the watcher
   publishes it at once, then makes the delta from version 1 in the background and lists it;
3. the daemon's cached catalog of this server is dropped (it keeps it an hour) and
   `image refresh` runs: nginx's access log shows the delta fetched and version 2's root never
   asked for, the daemon now holds version 2's fingerprint, and a container launched from it
   boots systemd.
The bytes the refresh downloaded over the full download's are printed (bench/bench_delta.py
measures the same without the daemons).
"""

from __future__ import annotations

import datetime
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..system.container import CACHE_DIR, SUITE, ensure_base
from .conftest import Scratch, added_remote
from .servers import Client, Pki, run
from .test_real_images import (
    Image,
    assert_systemd_is_pid_1,
    debian_image,
    seed_upload,
    wait_booted,
)
from .test_run import Server, start_server, wait_listed
from .verified import assert_verifies

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(1800)]

_NOW = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
SERIAL_1 = (_NOW - datetime.timedelta(days=1)).strftime("%Y%m%d_%H:%M")
SERIAL_2 = _NOW.strftime("%Y%m%d_%H:%M")
#: MiB of new files in version 2
CHANGE_MIB = 4
#: seconds for the watcher to make and list the delta of a Debian image
DELTA_DEADLINE = 900.0
#: an access log line of nginx's combined format: request, status, body bytes
_LOG_RE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+)'
)


def debian_image_v2(v1: Image) -> Image:
    """Version 1's tree plus CHANGE_MIB MiB of new files in /opt, made once per tree."""
    base = ensure_base()
    made_from = (base / ".complete").read_text() + f"+{CHANGE_MIB}"
    out = CACHE_DIR / f"image-{SUITE}-v2"
    image = Image(v1.meta, out / "rootfs.squashfs")
    stamp = out / ".complete"
    if stamp.is_file() and stamp.read_text() == made_from:
        return image
    work = Path(tempfile.mkdtemp(prefix="lis-v2-", dir="/var/tmp"))
    try:
        tree = work / "tree"
        # hard links: nothing of the cached tree is written, only new files are added
        run(["cp", "-al", base, tree], timeout=600)
        extra = tree / "opt" / "lis-delta"
        extra.mkdir(parents=True)
        rng = random.Random(12)
        for i in range(CHANGE_MIB * 4):
            (extra / f"blob-{i:03d}.bin").write_bytes(rng.randbytes(256 << 10))
        (tree / "etc" / "lis-delta-version").write_text("2\n")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        run(
            ["mksquashfs", tree, out / "rootfs.squashfs", "-noappend", "-quiet", "-e", ".complete"],
            timeout=900,
        )
        stamp.write_text(made_from)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image


@pytest.fixture(scope="module")
def images() -> tuple[Image, Image]:
    v1 = debian_image()
    return v1, debian_image_v2(v1)


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Server]:
    """With --verbose, nginx writes its access log to run.log."""
    base = Path(tempfile.mkdtemp(prefix="lis-delta-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield from start_server(base, pki, {}, global_args=["--verbose"])
    finally:
        shutil.rmtree(base)


def image_requests(server: Server, since: int) -> list[tuple[str, int, int]]:
    """(path, status, bytes) of every request for an image file logged after byte `since`."""
    text = server.log.read_bytes()[since:].decode("utf-8", "replace")
    return [
        (m["path"], int(m["status"]), int(m["bytes"]))
        for m in _LOG_RE.finditer(text)
        if m["path"].startswith("/images/") and m["method"] == "GET"
    ]


def forget_catalog(client: Client, product_dir: str) -> None:
    """Drops the daemon's cached catalog of this server (it would keep it for an hour)."""
    cache = client.cache_dir
    dropped = 0
    for d in cache.iterdir():
        catalog = d / "images.json"
        if catalog.is_file() and product_dir in catalog.read_text(errors="replace"):
            shutil.rmtree(d)
            dropped += 1
    assert dropped, f"no cached catalog of {product_dir} under {cache}"


def wait_delta(server: Server, product: str) -> dict[str, Any]:
    end = time.monotonic() + DELTA_DEADLINE
    while True:
        items = server.catalog()["products"].get(product, {}).get("versions", {})
        items = items.get(SERIAL_2, {}).get("items", {})
        deltas = [i for i in items.values() if i["ftype"] == "squashfs.vcdiff"]
        if deltas:
            found: dict[str, Any] = deltas[0]
            return found
        assert time.monotonic() < end, f"no delta listed:\n{server.log.read_text()[-3000:]}"
        time.sleep(1)


def own_metadata(client: Client, work: Path) -> Path:
    """A metadata tarball of this client's own: each client's images get fingerprints of their
    own (one fingerprint in two products is "more than one match" to Incus)."""
    (work / "meta").mkdir()
    (work / "meta" / "metadata.yaml").write_text(
        "architecture: x86_64\n"
        f"creation_date: {int(time.time())}\n"
        "properties:\n"
        "  os: debian\n"
        f"  release: {SUITE}\n"
        "  variant: default\n"
        f"  description: Debian {SUITE} for the delta test of {client}\n"
    )
    run(["tar", "-C", work / "meta", "-cJf", work / "lxd.tar.xz", "metadata.yaml"])
    return work / "lxd.tar.xz"


def test_refresh_downloads_the_delta_and_boots(
    client: Client, server: Server, images: tuple[Image, Image], label: str, tmp_path: Path
) -> None:
    meta = own_metadata(client, tmp_path)
    v1, v2 = (Image(meta, image.root) for image in images)
    os_name = f"debdelta{client}"
    product = f"{os_name}:{SUITE}:amd64:default"
    dir_1 = f"{os_name}/{SUITE}/amd64/default/{SERIAL_1}"
    dir_2 = f"{os_name}/{SUITE}/amd64/default/{SERIAL_2}"
    s = Scratch(client, label, {v1.fingerprint, v2.fingerprint})
    s.cleanup()
    try:
        seed_upload(server, v1, dir_1)
        wait_listed(server, product, SERIAL_1)
        with added_remote(client, f"d{server.port}", server.url) as remote:
            client("image", "copy", f"{remote}:{os_name}/{SUITE}", "local:", "--auto-update",
                   timeout=600)  # fmt: skip
            assert v1.fingerprint in client.local_images()

            seed_upload(server, v2, dir_2)
            wait_listed(server, product, SERIAL_2)
            delta = wait_delta(server, product)
            assert delta["delta_base"] == SERIAL_1
            assert delta["path"] == f"images/{dir_2}/rootfs.{SERIAL_1.replace(':', '')}.vcdiff"
            assert_verifies(server.root)  # the delta's size, sha256 and base included

            forget_catalog(client, dir_1)
            since = server.log.stat().st_size
            out = client("image", "refresh", v1.fingerprint, timeout=600)
            fetched = image_requests(server, since)
        local = client.local_images()
        assert v2.fingerprint in local, f"{out}\n{fetched}"

        ok = {path: size for path, status, size in fetched if status == 200}
        assert f"/{delta['path']}" in ok, fetched
        assert not [p for p, _, _ in fetched if p == f"/images/{dir_2}/rootfs.squashfs"], fetched
        root_size = v2.root.stat().st_size
        got = sum(ok.values())
        print(f"{client}: image requests during the refresh: {fetched}")
        print(
            f"{client}: refresh downloaded {got} bytes (delta {delta['size']}) for a root of "
            f"{root_size}: {got / root_size:.3f} of the full root "
            f"(metadata + root: {got / (root_size + v2.meta.stat().st_size):.3f})"
        )
        assert delta["size"] < 0.2 * root_size

        name = s.instance(f"{client}-delta")
        client("launch", v2.fingerprint, name, timeout=600)
        wait_booted(client, name)
        assert_systemd_is_pid_1(client, name)
        assert client.exec(name, "cat", "/etc/lis-delta-version").stdout == "2\n"
    finally:
        s.cleanup()
