"""Issue 12, sections 2 and 3, against a real `lxd-image-server run` (nginx, gunicorn, watcher).

- The plain-HTTP listener (`run --http-listen`) serves image files and nothing else: the
  catalog, the page, other paths, hidden names and every upload (POST, PUT, DELETE) are refused
  there, with the same strict headers as the HTTPS site; without it, nothing listens.
- Cache headers: image files, the catalog and the page no-cache, never `immutable` (an sftp
  upload rewrites a file in place whatever ALLOW_OVERWRITES says, issue 19); all with
  validators, so a conditional request gets 304 (the .gz catalog too), and a file rewritten in
  place answers the old ETag with its new bytes.

Its own test CA is trusted by the clients here only: no lock needed.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lxd_image_server.service import nginx

from .servers import Pki, free_port, make_pki, own_like_tree
from .verified import assert_verifies

BIN = Path(sys.executable).parent / "lxd-image-server"
DEADLINE = 60.0
VERSION = "images/cached/1.0/amd64/default/20240101_1200"
META = f"/{VERSION}/lxd.tar.xz"
ROOT_FILE = f"/{VERSION}/rootfs.squashfs"
STRICT_CSP = "default-src 'none'"
IMAGE_CACHE = "no-cache"

Response = tuple[int, http.client.HTTPMessage, bytes]


@dataclass
class Served:
    base: Path
    root: Path
    state: Path
    port: int
    http_port: int | None
    pki: Pki
    proc: subprocess.Popen[bytes]
    log: Path

    def https(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Response:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        return _request(conn, method, path, body, headers)

    def http(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Response:
        assert self.http_port is not None
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        return _request(conn, method, path, body, headers)

    def nginx_ports(self) -> set[int]:
        """The TCP ports nginx's master process listens on (`ss`)."""
        master = (self.state / "run" / "nginx.pid").read_text().strip()
        out = subprocess.run(
            ["ss", "-Hltnp"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        return {
            int(line.split()[3].rsplit(":", 1)[1])
            for line in out.splitlines()
            if f"pid={master}," in line
        }


def _request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> Response:
    # keyword arguments cannot hold dashes: If_None_Match -> If-None-Match
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    try:
        conn.request(method, path, body=body, headers=sent)
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def start(
    base: Path,
    pki: Pki,
    port: int,
    http_port: int | None,
    config: Path | None = None,
    **env_flags: str,
) -> Served:
    ssl_dir = base / "ssl"
    ssl_dir.mkdir(parents=True, exist_ok=True)
    (ssl_dir / "nginx.crt").write_bytes(pki.server_cert.read_bytes())
    (ssl_dir / "nginx.key").write_bytes(pki.server_key.read_bytes())
    env = {k: v for k, v in os.environ.items() if k not in ("ALLOW_OVERWRITES", "ALLOW_DELETES")}
    env.update(env_flags)
    extra = ["--http-listen", f"127.0.0.1:{http_port}"] if http_port else []
    log = base / f"run-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                BIN,
                *(["--config", str(config)] if config else []),
                "--state-dir",
                base / "state",
                "run",
                "--root-dir",
                base / "root",
                "--listen",
                f"127.0.0.1:{port}",
                "--ssl-dir",
                ssl_dir,
                "--allow-anonymous-uploads",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    s = Served(base, base / "root", base / "state", port, http_port, pki, proc, log)
    deadline = time.monotonic() + DEADLINE
    while True:
        assert proc.poll() is None, f"run exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"run never served:\n{log.read_text()}"
        with contextlib.suppress(OSError):
            if s.https("GET", "/streams/v1/index.json")[0] == 200:
                break
        time.sleep(0.1)
    # the upload app answers through nginx (a bad path: refused before anything is written)
    while s.https("PUT", "/images/x", b"x")[0] == 502:
        assert time.monotonic() < deadline, f"upload app never answered:\n{log.read_text()}"
        time.sleep(0.1)
    return s


def stop(s: Served) -> None:
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGTERM)
        try:
            rc = s.proc.wait(30)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            raise
        assert rc == 0, f"run exited {rc} on SIGTERM:\n{s.log.read_text()}"


def publish_version(s: Served) -> None:
    """Files dropped into the tree (as sftp would), published by the watcher."""
    version = s.root / VERSION
    version.mkdir(parents=True, exist_ok=True)
    (version / "lxd.tar.xz").write_bytes(b"metadata " * 100)
    (version / "rootfs.squashfs").write_bytes(b"rootfs " * 5000)
    own_like_tree(s.root, s.root / "images")
    deadline = time.monotonic() + DEADLINE
    # index.json is written last (after images.json): once it names the product, both do
    while b"cached:1.0:amd64:default" not in s.https("GET", "/streams/v1/index.json")[2]:
        assert time.monotonic() < deadline, f"never published:\n{s.log.read_text()}"
        time.sleep(0.1)
    assert_verifies(s.root)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    # www-data must reach the tree: pytest's own tmp (0700) would not do
    path = Path(tempfile.mkdtemp(prefix="lis-cache-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def pki(base: Path) -> Pki:
    return make_pki(base / "pki", "cache")


@pytest.fixture(scope="module")
def served(base: Path, pki: Pki) -> Iterator[Served]:
    s = start(base / "one", pki, free_port(), free_port())
    try:
        publish_version(s)
        yield s
    finally:
        stop(s)


def assert_strict(headers: http.client.HTTPMessage, where: str) -> None:
    assert set(headers.get_all("X-Content-Type-Options") or []) == {"nosniff"}, where
    csp = headers.get_all("Content-Security-Policy") or []
    assert any(c.startswith(STRICT_CSP) and "frame-ancestors 'none'" in c for c in csp), where


# -- section 2: the plain-HTTP listener -------------------------------------------------------


def test_image_files_over_plain_http(served: Served) -> None:
    status, headers, body = served.http("GET", META)
    assert (status, body) == (200, (served.root / VERSION / "lxd.tar.xz").read_bytes())
    assert headers["Content-Type"] == "application/x-xz"
    assert headers["Content-Disposition"] == "attachment"
    assert_strict(headers, "GET over http")
    status, headers, body = served.http("HEAD", ROOT_FILE)
    assert (status, body) == (200, b"")
    size = (served.root / VERSION / "rootfs.squashfs").stat().st_size
    assert int(headers["Content-Length"]) == size


def test_what_plain_http_serves_is_what_the_catalog_lists(served: Served) -> None:
    """A client reads the catalog over HTTPS and fetches each item's path over HTTP."""
    doc = json.loads(served.https("GET", "/streams/v1/images.json")[2])
    version = doc["products"]["cached:1.0:amd64:default"]["versions"]["20240101_1200"]
    for item in version["items"].values():
        status, _, body = served.http("GET", "/" + item["path"])
        assert status == 200 and len(body) == item["size"], item


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/streams/v1/index.json", 404),
        ("/streams/v1/images.json", 404),
        ("/streams/v1/images.json.gz", 404),
        ("/", 404),
        ("/streams/index.html", 404),
        ("/x.html", 404),
        ("/images", 404),
        ("/images/", 403),
        (f"/{VERSION}/", 403),
        (f"/{VERSION}/.hidden", 403),
        ("/images/missing", 404),
    ],
)
def test_plain_http_refuses_everything_else(served: Served, path: str, status: int) -> None:
    (served.root / VERSION / ".hidden").write_bytes(b"in progress")
    (served.root / "x.html").write_bytes(b"<script>alert(1)</script>")
    assert served.https("GET", path)[0] != 404 or path == "/images/missing"  # exists over https
    got, headers, body = served.http("GET", path)
    assert got == status, body[:200]
    assert b"products" not in body and b"<script" not in body
    assert_strict(headers, f"GET {path} over http")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/images/", 405),
        ("PUT", f"/{VERSION}/new.tar.xz", 405),
        ("PUT", "/images/cached/1.0/amd64/default/20240202_1200/lxd.tar.xz", 405),
        ("DELETE", META, 405),
        ("POST", "/images", 404),
        ("PUT", "/streams/v1/images.json", 404),
        ("OPTIONS", META, 405),
    ],
)
def test_no_upload_over_plain_http(served: Served, method: str, path: str, status: int) -> None:
    before = sorted(p for p in served.root.rglob("*"))
    body = (
        b"--b\r\nContent-Disposition: form-data; name=upload; "
        b'filename="cached/1.0/amd64/default/20240303_1200/lxd.tar.xz"\r\n\r\nx\r\n--b--\r\n'
    )
    headers = {"Content_Type": "multipart/form-data; boundary=b"} if method == "POST" else {}
    got, resp_headers, _ = served.http(method, path, body, **headers)
    assert got == status
    assert_strict(resp_headers, f"{method} {path} over http")
    assert sorted(p for p in served.root.rglob("*")) == before
    assert served.http("GET", META)[0] == 200  # DELETE removed nothing


def test_the_same_upload_over_https_is_accepted(served: Served) -> None:
    """Control for the test above: anonymous uploads are on, so only the listener refuses."""
    path = "/images/cached/1.0/amd64/default/20240404_1200/lxd.tar.xz"
    assert served.http("PUT", path, b"x")[0] == 405
    assert not (served.root / path.lstrip("/")).exists()
    assert served.https("PUT", path, b"x")[0] == 201
    assert (served.root / path.lstrip("/")).read_bytes() == b"x"


def test_plain_http_never_follows_a_link(served: Served) -> None:
    secret = served.base / "secret.txt"
    secret.write_text("root:x:0:0:secret")
    link = served.root / VERSION / "root.tar.xz"
    link.symlink_to(secret)
    try:
        status, headers, body = served.http("GET", f"/{VERSION}/root.tar.xz")
    finally:
        link.unlink()
    assert status in (403, 404) and b"secret" not in body
    assert_strict(headers, "a link over http")


def test_listener_off_nothing_listens(served: Served, base: Path, pki: Pki) -> None:
    """The same server started again without --http-listen: that port refuses connections and
    nginx listens on the HTTPS port only. With it, nginx listens on both."""
    port, http_port = free_port(), free_port()
    on = start(base / "two", pki, port, http_port)
    try:
        assert on.nginx_ports() == {port, http_port}
        assert on.http("GET", "/images/missing")[0] == 404
    finally:
        stop(on)
    off = start(base / "two", pki, port, None)
    try:
        assert off.nginx_ports() == {port}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", http_port), timeout=10).close()
        assert not (off.state / "nginx" / "http-locations.conf").exists()
    finally:
        stop(off)


def test_run_refuses_http_listen_on_the_https_port(base: Path) -> None:
    port = free_port()
    r = subprocess.run(
        [
            BIN,
            "--state-dir",
            base / "three" / "state",
            "run",
            "--root-dir",
            base / "three" / "root",
            "--listen",
            f"127.0.0.1:{port}",
            "--http-listen",
            str(port),
            "--plain-http",
            "--allow-anonymous-uploads",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "port of its own" in r.stdout + r.stderr


def test_run_refuses_private_with_http_listen(base: Path) -> None:
    r = subprocess.run(
        [
            *(BIN, "--state-dir", base / "four", "run", "--root-dir", base / "four" / "root"),
            *("--private", "--http-listen", "8080"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "clear text" in r.stderr, r.stdout + r.stderr
    assert not (base / "four" / "root").exists()


# -- section 3: cache headers and validators --------------------------------------------------


def assert_revalidates(
    fetch: Callable[..., Response], path: str, cache_control: str, **headers: str
) -> http.client.HTTPMessage:
    """200 with ETag and Last-Modified, then 304 for either validator sent back."""
    get = fetch  # Served.https or Served.http
    status, first, body = get("GET", path, **headers)
    assert status == 200 and body, (path, status)
    assert first["Cache-Control"] == cache_control, path
    etag, modified = first["ETag"], first["Last-Modified"]
    assert etag and modified, (path, dict(first))
    status, again, body = get("GET", path, If_None_Match=etag, **headers)
    assert (status, body) == (304, b""), path
    assert again["ETag"] == etag and again["Cache-Control"] == cache_control, path
    status, _, body = get("GET", path, If_Modified_Since=modified, **headers)
    assert (status, body) == (304, b""), path
    # another ETag: the whole answer again
    assert get("GET", path, If_None_Match='"other"', **headers)[0] == 200
    return first


@pytest.mark.parametrize("path", [META, ROOT_FILE])
def test_image_files_revalidate_with_validators(served: Served, path: str) -> None:
    headers = assert_revalidates(served.https, path, IMAGE_CACHE)
    assert_strict(headers, path)
    assert headers["Content-Disposition"] == "attachment"


def test_image_files_over_plain_http_cache_the_same(served: Served) -> None:
    assert_revalidates(served.http, ROOT_FILE, IMAGE_CACHE)


def test_a_missing_image_file_is_never_cached(served: Served) -> None:
    """A 404 cached for a year would hide a file uploaded a minute later."""
    for fetch in (served.https, served.http):
        status, headers, _ = fetch("GET", f"/{VERSION}/disk.qcow2")
        assert status == 404 and "Cache-Control" not in headers


@pytest.mark.parametrize(
    "path", ["/streams/v1/index.json", "/streams/v1/images.json", "/", "/streams/index.html"]
)
def test_the_catalog_and_page_revalidate(served: Served, path: str) -> None:
    assert_revalidates(served.https, path, "no-cache")


@pytest.mark.parametrize("name", ["index.json", "images.json"])
def test_the_precompressed_catalog_keeps_its_etag(served: Served, name: str) -> None:
    path = f"/streams/v1/{name}"
    plain = assert_revalidates(served.https, path, "no-cache")
    packed = assert_revalidates(served.https, path, "no-cache", Accept_Encoding="gzip")
    assert packed["Content-Encoding"] == "gzip"
    assert packed["ETag"] != plain["ETag"]
    assert "Accept-Encoding" in packed["Vary"] and "Accept-Encoding" in plain["Vary"]
    _, _, body = served.https("GET", path, Accept_Encoding="gzip")
    assert gzip.decompress(body) == served.https("GET", path)[2]


def test_a_new_catalog_answers_200_to_the_old_etag(served: Served) -> None:
    path = "/streams/v1/images.json"
    old = served.https("GET", path)[1]["ETag"]
    version = served.root / "images/cached/1.0/amd64/default/20240505_1200"
    version.mkdir(parents=True)
    (version / "lxd.tar.xz").write_bytes(b"metadata 2")
    (version / "rootfs.squashfs").write_bytes(b"rootfs 2")
    own_like_tree(served.root, served.root / "images")
    deadline = time.monotonic() + DEADLINE
    while True:
        status, headers, body = served.https("GET", path, If_None_Match=old)
        if status == 200:
            break
        assert status == 304 and time.monotonic() < deadline, status
        time.sleep(0.1)
    assert b"20240505_1200" in body and headers["ETag"] != old


def test_a_file_rewritten_in_place_is_not_served_stale(served: Served) -> None:
    """What an sftp uploader can do without ALLOW_OVERWRITES (internal-sftp opens an existing
    file for writing): rewrite a published file in place. Neither listener told a cache to
    keep the old bytes: the old ETag gets the new file (200), on HTTPS and plain HTTP alike."""
    rel = "images/cached/1.0/amd64/default/20240303_1200/rootfs.squashfs"
    path = served.root / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(b"first bytes " * 100)
    old = {fetch: fetch("GET", "/" + rel)[1] for fetch in (served.https, served.http)}
    for headers in old.values():
        assert headers["Cache-Control"] == IMAGE_CACHE and "immutable" not in str(headers)
    with open(path, "r+b") as f:  # in place: same inode, as sftp's open(O_WRONLY|O_TRUNC)
        f.truncate(0)
        f.write(b"rewritten " * 130)
    for fetch, headers in old.items():
        status, _, body = fetch("GET", "/" + rel, If_None_Match=headers["ETag"])
        assert (status, body) == (200, b"rewritten " * 130)


def test_with_overwrites_image_files_revalidate_the_same(base: Path, pki: Pki) -> None:
    s = start(base / "five", pki, free_port(), free_port(), ALLOW_OVERWRITES="1")
    try:
        publish_version(s)
        for fetch in (s.https, s.http):
            assert_revalidates(fetch, ROOT_FILE, IMAGE_CACHE)
        text = (s.state / "nginx" / "locations.conf").read_text()
        assert f'Cache-Control "{nginx.IMAGE_CACHE}";' in text and "immutable" not in text
        # an overwrite answers the old ETag with the new file
        old = s.https("GET", ROOT_FILE)[1]["ETag"]
        assert s.https("PUT", ROOT_FILE, b"a new root")[0] in (200, 201)
        status, _, body = s.https("GET", ROOT_FILE, If_None_Match=old)
        assert (status, body) == (200, b"a new root")
    finally:
        stop(s)
