"""`run` under load and under parallel uploads (issue 18, findings 3 and 6): real nginx,
gunicorn, watcher and curl.

- 3: nginx takes connections only once the upload server listens and the watcher watches, so
  an upload sent the moment the port answers is stored (201), never a 502.
- 6: the limit on uploads in progress belongs to the credential (8 by default, the upload
  app's count), not to the client address (nginx's 4): a CI job's eight parallel uploads go
  through, a ninth is told to retry (429, Retry-After), another credential is never starved.
"""

from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .servers import Pki, free_port
from .test_run import BIN, DEADLINE, PASSWORD, Server, curl, reachable_dir, start_server

#: how long the busy loops spin at most (they are stopped as soon as the upload is done)
LOAD_SECONDS = 120
BUSY = f"import time\nend = time.monotonic() + {LOAD_SECONDS}\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def reachable() -> Iterator[Path]:
    yield from reachable_dir()


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Server]:
    for base in reachable_dir():
        yield from start_server(base, pki, {})


def test_an_upload_the_moment_the_port_answers_is_stored(
    pki: Pki, reachable: Path, tmp_path: Path
) -> None:
    """Under CPU load (busy loops on every core), the first upload sent when the port first
    accepts a connection gets 201 (it got 502 when nginx started with the others)."""
    ssl_dir = reachable / "ssl"
    ssl_dir.mkdir()
    (ssl_dir / "nginx.crt").write_bytes(pki.server_cert.read_bytes())
    (ssl_dir / "nginx.key").write_bytes(pki.server_key.read_bytes())
    htpasswd = reachable / "htpasswd"
    subprocess.run(
        [BIN, "passwd", "upload", "--htpasswd", htpasswd],
        input=PASSWORD + "\n",
        text=True,
        check=True,
    )
    meta = tmp_path / "lxd.tar.xz"
    meta.write_bytes(b"metadata")
    port = free_port()
    load = [
        subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 * (os.cpu_count() or 1))
    ]
    log = reachable / "run.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    BIN, "--state-dir", reachable / "state", "run",
                    "--root-dir", reachable / "root", "--listen", f"127.0.0.1:{port}",
                    "--ssl-dir", ssl_dir, "--htpasswd", htpasswd,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + LOAD_SECONDS
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    pass
                assert proc.poll() is None, f"run exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"run never listened:\n{log.read_text()}"
                time.sleep(0.005)
            d = "ready/1.0/amd64/default/20240101_1200"
            code, body = curl("-T", meta, f"https://127.0.0.1:{port}/images/{d}/lxd.tar.xz")
            assert code == 201, f"{code} {body}\n{log.read_text()}"
        finally:
            for p in load:
                p.kill()
                p.wait()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()
    finally:
        for p in load:
            if p.poll() is None:
                p.kill()
    assert (reachable / "root/images" / d / "lxd.tar.xz").read_bytes() == b"metadata"


def _auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class StalledUpload:
    """A PUT whose body is half sent: an upload in progress until `finish`."""

    def __init__(self, server: Server, context: ssl.SSLContext, path: str, auth: str) -> None:
        self.body = os.urandom(64 << 10)
        self.conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
        self.conn.putrequest("PUT", path)
        self.conn.putheader("Authorization", auth)
        self.conn.putheader("Content-Length", str(len(self.body)))
        self.conn.endheaders()
        self.conn.send(self.body[: len(self.body) // 2])

    def finish(self) -> int:
        self.conn.send(self.body[len(self.body) // 2 :])
        status = self.conn.getresponse().status
        self.conn.close()
        return status


def test_eight_uploads_of_one_credential_at_once_and_another_credential_not_starved(
    server: Server, pki: Pki, tmp_path: Path
) -> None:
    htpasswd = server.root.parent / "htpasswd"
    subprocess.run(
        [BIN, "passwd", "other", "--htpasswd", htpasswd],
        input="other-pw-1\n",
        text=True,
        check=True,
    )
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    d = "parallel/1.0/amd64/default/20240101_1200"
    mine = _auth("upload", PASSWORD)
    uploads = [StalledUpload(server, context, f"/images/{d}/p{i}.tar.gz", mine) for i in range(8)]
    try:
        # the ninth of the same credential: 429 once the eight hold their slots (a path that
        # is refused anyway, so that nothing lands while they are still being taken)
        deadline = time.monotonic() + DEADLINE
        while True:
            out = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}",
                 "-u", f"upload:{PASSWORD}", "-T", "/dev/null",
                 f"{server.url}/images/parallel/1.0/amd64/default/notaserial/lxd.tar.xz"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if out.stdout.endswith("429"):
                break
            assert out.stdout.endswith("400"), out.stdout
            assert time.monotonic() < deadline, "the ninth upload was never refused"
            time.sleep(0.05)
        assert "retry-after:" in out.stdout.lower()
        # another credential is not starved
        other = tmp_path / "other"
        other.write_bytes(b"other")
        code, body = curl(
            "-u", "other:other-pw-1", "-T", other, f"{server.url}/images/{d}/o.tar.gz"
        )
        assert code == 201, body
    finally:
        statuses = [u.finish() for u in uploads]
    assert statuses == [201] * 8
    for i, u in enumerate(uploads):
        assert (server.root / "images" / d / f"p{i}.tar.gz").read_bytes() == u.body
