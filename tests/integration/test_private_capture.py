"""What crosses loopback in clear text when LXD or Incus download an image from a `--private`
server through a `https://USER:PASSWORD@HOST[:PORT]` remote (issue 19), captured with tcpdump
during a real `image copy` by each client (README, Security: "Private feeds").

- The remote on a port of its own (8443 and the like, the usual case): before each image file
  the client sends `GET http://HOST:PORT/<file>` in clear text, with `Authorization: Basic`
  carrying the password, to the TLS port; nginx answers 400 at once ("The plain HTTP request
  was sent to HTTPS port"), the client retries over HTTPS. The catalog never crosses in clear.
- The remote on 443 (`https://USER:PASSWORD@HOST`) with nothing on port 80: the plain-HTTP try
  goes to port 80, meets a reset (no wait), and no request, hence no credential, is sent in
  clear.
- Either way the password is kept as the image's source and printed by `image info`.

Ports 80 and 443 of 127.0.0.1 must be free (the system tests use 80: run this under the heavy
lock, like every test driving the daemons). Prerequisites: `bash tests/host-setup.sh` (tcpdump).
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import added_remote
from .images import build_rootfs, make_squashfs, sha256_file, write_metadata_tarball
from .servers import Client, Pki, run
from .test_run import BIN, Server, curl, start_server, wait_listed

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(600)]

#: the client host's own user (README: one per client), new each session: the daemons cache a
#: remote's catalog per URL for an hour, and the port-443 URL is otherwise the same every run
USER = f"host{secrets.token_hex(3)}"
CLIENT_PASSWORD = "client-password-1"
PRODUCT, SERIAL = "busycap:1.35:amd64:default", "20240101_1200"
VERSION_DIR = f"busycap/1.35/amd64/default/{SERIAL}"
BASIC = "Authorization: Basic " + base64.b64encode(f"{USER}:{CLIENT_PASSWORD}".encode()).decode()
NGINX_400 = "The plain HTTP request was sent to HTTPS port"


@dataclass(frozen=True)
class Image:
    meta: Path
    root: Path

    @property
    def fingerprint(self) -> str:
        return sha256_file(self.meta, self.root)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, label: str) -> Image:
    work = tmp_path_factory.mktemp("capture")
    meta = write_metadata_tarball(work / "meta", work / "meta.tar.xz", f"capture {label}")
    return Image(meta, make_squashfs(build_rootfs(work / "rootfs"), work / "rootfs.squashfs"))


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextlib.contextmanager
def private_server(pki: Pki, image: Image, port: int | None = None) -> Iterator[Server]:
    """A `run --private` server on 127.0.0.1:`port` (a free one by default), the image
    uploaded and listed."""
    base = Path(tempfile.mkdtemp(prefix="lis-capture-", dir="/var/tmp"))
    base.chmod(0o755)  # nginx's workers (www-data) must reach the tree
    servers = start_server(base, pki, {}, run_args=["--private"], port=port)
    try:
        server = next(servers)
        run([BIN, "passwd", USER, "--htpasswd", base / "htpasswd"], input=CLIENT_PASSWORD + "\n")
        for src, name in ((image.meta, "lxd.tar.xz"), (image.root, "rootfs.squashfs")):
            code, body = curl(
                f"-Fupload=@{src};filename={VERSION_DIR}/{name}", f"{server.url}/images/"
            )
            assert code == 201, body
        wait_listed(server, PRODUCT, SERIAL)
        yield server
    finally:
        servers.close()
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def own_port(pki: Pki, image: Image) -> Iterator[Server]:
    with private_server(pki, image) as server:
        yield server


@pytest.fixture(scope="module")
def on_443(pki: Pki, image: Image) -> Iterator[Server]:
    for port in (80, 443):
        if not port_free(port):
            pytest.fail(f"127.0.0.1:{port} is in use: this test needs 443 for the server and "
                        "nothing on 80 (run it under /tmp/lxd-heavy.lock)")  # fmt: skip
    with private_server(pki, image, port=443) as server:
        yield server


@dataclass(frozen=True)
class Capture:
    """A capture's packets as `tcpdump -nn -A` prints them (headers and payload as text)."""

    text: str

    def clear_requests(self) -> list[str]:
        """The HTTP request lines seen in clear text."""
        return re.findall(r"(?m)(?:GET|HEAD) /\S* HTTP/1\.[01]", self.text)

    def resets_from(self, port: int) -> int:
        return len(re.findall(rf"127\.0\.0\.1\.{port} > 127\.0\.0\.1\.\d+: Flags \[R", self.text))


@contextlib.contextmanager
def captured(work: Path, ports: tuple[int, ...]) -> Iterator[list[Capture]]:
    """tcpdump on lo for `ports` while the block runs; the capture is appended on exit."""
    pcap, err = work / "lo.pcap", work / "tcpdump.err"
    expr = " or ".join(f"tcp port {p}" for p in ports)
    with open(err, "wb") as errors:
        proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-nn", "-U", "-s", "0", "-Z", "root", "-w", pcap, expr],
            stderr=errors,
        )
    try:
        for _ in range(200):
            if "listening on" in err.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"tcpdump did not start: {err.read_text()}"
        out: list[Capture] = []
        yield out
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    shown = subprocess.run(
        ["tcpdump", "-nn", "-A", "-r", pcap], capture_output=True, text=True, check=True
    )
    out.append(Capture(shown.stdout))


def download(client: Client, remote: str, image: Image) -> str:
    """`image copy REMOTE:busycap/1.35 local: --auto-update` (the daemon downloads); returns
    `image info` of the copy, then deletes it."""
    client.delete_images({image.fingerprint})
    client("image", "copy", f"{remote}:busycap/1.35", "local:", "--auto-update", timeout=300)
    try:
        return client("image", "info", image.fingerprint)
    finally:
        client.delete_images({image.fingerprint})


def test_on_its_own_port_the_password_crosses_in_clear_text(
    client: Client, own_port: Server, image: Image, tmp_path: Path
) -> None:
    url = f"https://{USER}:{CLIENT_PASSWORD}@127.0.0.1:{own_port.port}"
    name = f"cap{own_port.port}"
    with added_remote(client, name, url) as remote, captured(tmp_path, (own_port.port,)) as result:
        info = download(client, remote, image)
    (capture,) = result
    requests = capture.clear_requests()
    # every image file tried over plain HTTP first, on the TLS port, with the password
    for name in ("lxd.tar.xz", "rootfs.squashfs"):
        assert f"GET /images/{VERSION_DIR}/{name} HTTP/1.1" in requests, requests
    assert capture.text.count(BASIC) >= 2, requests
    assert NGINX_400 in capture.text  # answered at once, then HTTPS
    # the catalog only ever over TLS
    assert not [r for r in requests if "/streams/" in r], requests
    # the full URL, password included, is the image's source
    assert url in info, info
    source = [line.strip() for line in info.splitlines() if url in line]
    print(
        f"{client} on port {own_port.port}: {len(requests)} plain-HTTP requests in clear "
        f"({', '.join(sorted(set(requests)))}), {capture.text.count(BASIC)} with the password, "
        f"{capture.text.count('HTTP/1.1 400 Bad Request')} answered 400; image info: {source}"
    )


def test_on_443_with_nothing_on_80_no_credential_crosses_in_clear(
    client: Client, on_443: Server, image: Image, tmp_path: Path
) -> None:
    url = f"https://{USER}:{CLIENT_PASSWORD}@127.0.0.1"
    with added_remote(client, "cap443", url) as remote, captured(tmp_path, (80, 443)) as result:
        download(client, remote, image)
    (capture,) = result
    assert capture.clear_requests() == []
    assert BASIC not in capture.text and CLIENT_PASSWORD not in capture.text
    # the plain-HTTP try of each file met a reset on port 80 (no timeout), then HTTPS on 443
    assert capture.resets_from(80) >= 2, capture.text[-3000:]
    assert "127.0.0.1.443: Flags [S]" in capture.text
    print(
        f"{client} on 443: no request in clear, {capture.resets_from(80)} resets from port 80, "
        f"{capture.text.count('127.0.0.1.443: Flags [S]')} HTTPS connections"
    )
