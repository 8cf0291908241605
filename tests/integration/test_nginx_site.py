"""The nginx site as `lxd-image-server run` renders it, attacked over real HTTPS (issue 9).

One `run` (real nginx, gunicorn, watcher) serves a tree into which an uploader's links and
files are planted. Its own test CA is trusted by the clients here only (no system store, no
LXD), so this module needs no lock.

Findings covered: 1 (symlinks are never followed), 11 (per-client upload limit, timeouts),
16 (--private with --allow-anonymous-uploads), the security headers and downloads, and `run`
refusing root nginx workers.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lxd_image_server.service import nginx

from .cdp import Cdp, CdpError, Chromium, Tab
from .servers import Pki, free_port, make_pki

BIN = Path(sys.executable).parent / "lxd-image-server"
PASSWORD = "site-password-1"
DEADLINE = 60.0
SECRET = "root:x:0:0:planted-secret"
VERSION = "images/busybox/1.35/amd64/default/20240101_1200"
STRICT_CSP = "default-src 'none'"


@dataclass
class Site:
    base: Path
    root: Path
    state: Path
    htpasswd: Path
    port: int
    pki: Pki
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_cert))

    def request(
        self, method: str, path: str, body: bytes | None = None, auth: bool = False
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context())
        headers = {"Authorization": basic_auth()} if auth else {}
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.headers, r.read()
        finally:
            conn.close()


def basic_auth() -> str:
    return "Basic " + base64.b64encode(f"upload:{PASSWORD}".encode()).decode()


def start_run(base: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = base / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("ALLOW_OVERWRITES", "ALLOW_DELETES")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                BIN,
                "--state-dir",
                base / "state",
                "run",
                "--root-dir",
                base / "root",
                "--listen",
                f"127.0.0.1:{port}",
                "--ssl-dir",
                base / "ssl",
                "--htpasswd",
                base / "htpasswd",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc, port, log


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert rc == 0, f"run exited {rc} on SIGTERM:\n{log.read_text()}"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    # www-data must reach the tree: pytest's own tmp (0700) would not do
    base = Path(tempfile.mkdtemp(prefix="lis-site-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        pki = make_pki(base / "pki", "site")
        ssl_dir = base / "ssl"
        ssl_dir.mkdir()
        (ssl_dir / "nginx.crt").write_bytes(pki.server_cert.read_bytes())
        (ssl_dir / "nginx.key").write_bytes(pki.server_key.read_bytes())
        r = subprocess.run(
            [BIN, "passwd", "upload", "--htpasswd", base / "htpasswd"],
            input=PASSWORD + "\n",
            text=True,
            capture_output=True,
        )
        assert r.returncode == 0, r.stderr
        proc, port, log = start_run(base)
        site = Site(base, base / "root", base / "state", base / "htpasswd", port, pki, proc, log)
        deadline = time.monotonic() + DEADLINE
        while True:
            assert proc.poll() is None, f"run exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"run never served:\n{log.read_text()}"
            try:
                if site.request("GET", "/streams/v1/index.json")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        # the upload app answers through nginx (a bad path: refused before anything is written)
        while site.request("PUT", "/images/x", b"x", auth=True)[0] == 502:
            assert time.monotonic() < deadline, f"upload app never answered:\n{log.read_text()}"
            time.sleep(0.1)
        plant(site)
        try:
            yield site
        finally:
            stop(proc, log)
    finally:
        shutil.rmtree(base)


def plant(site: Site) -> None:
    """What an uploader (sftp `symlink`, or anything that writes the tree) could leave."""
    outside = site.base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    version = site.root / VERSION
    version.mkdir(parents=True)
    (version / "lxd.tar.xz").write_bytes(b"real metadata")
    (version / "rootfs.squashfs").symlink_to(outside / "secret.txt")  # a file outside
    (version / "root.tar.xz").symlink_to(site.htpasswd)  # the credentials
    (version / "disk.qcow2").symlink_to("lxd.tar.xz")  # a file inside, relative
    images = site.root / "images"
    (images / "outside-dir").symlink_to(outside)  # a directory outside
    (images / "inside-dir").symlink_to(version)  # a directory inside
    (images / "etc").symlink_to("/etc")
    (site.root / "streams" / "v1" / "secret.json").symlink_to(outside / "secret.txt")
    (site.root / "secret").symlink_to(outside / "secret.txt")
    html = "<html><head><title>x</title></head><body><script>document.title='pwned'</script>"
    (images / "x.html").write_text(html)
    (site.root / "streams" / "x.html").write_text(html)
    (site.root / "streams" / "v1" / "x.html").write_text(html)
    (site.root / "x.html").write_text(html)


# -- finding 1: symlinks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/{VERSION}/rootfs.squashfs",
        f"/{VERSION}/root.tar.xz",
        f"/{VERSION}/disk.qcow2",
        "/images/outside-dir/secret.txt",
        "/images/inside-dir/lxd.tar.xz",
        "/images/etc/passwd",
        "/images/etc/hostname",
        "/streams/v1/secret.json",
        "/secret",
    ],
)
def test_planted_symlinks_are_not_followed(site: Site, path: str) -> None:
    status, _, body = site.request("GET", path)
    assert status in (403, 404), (status, body[:200])
    assert SECRET.encode() not in body and b"upload:" not in body and b"root:" not in body


def test_the_real_file_next_to_the_links_is_served(site: Site) -> None:
    """Control: the links above are refused for being links, not because nothing is served."""
    status, headers, body = site.request("GET", f"/{VERSION}/lxd.tar.xz")
    assert (status, body) == (200, b"real metadata")
    assert headers["Content-Type"] == "application/x-xz"


# -- security headers and downloads -----------------------------------------------------------


def assert_strict(headers: http.client.HTTPMessage, where: str) -> None:
    # the upload app may send its own as well: every copy must say the same
    assert set(headers.get_all("X-Content-Type-Options") or []) == {"nosniff"}, where
    csp = headers.get_all("Content-Security-Policy") or []
    # several policies all apply; one of them must forbid everything
    assert any(c.startswith(STRICT_CSP) and "frame-ancestors 'none'" in c for c in csp), (
        where,
        csp,
    )


@pytest.mark.parametrize(
    ("method", "path", "auth", "status"),
    [
        ("GET", "/streams/v1/index.json", False, 200),
        ("GET", "/streams/v1/images.json", False, 200),
        ("GET", "/streams/v1/missing.json", False, 404),
        ("GET", f"/{VERSION}/lxd.tar.xz", False, 200),
        ("HEAD", f"/{VERSION}/lxd.tar.xz", False, 200),
        ("GET", "/images/missing", False, 404),
        ("GET", "/images/", False, 403),
        ("GET", "/images", False, 301),
        ("GET", f"/{VERSION}/.partial", False, 403),
        ("GET", "/nothing-here", False, 404),
        ("POST", "/images/", False, 401),
        ("POST", "/images", False, 401),
        ("PUT", f"/{VERSION}/lxd.tar.xz", False, 401),
        ("PUT", "/images/bad-path", True, 400),
        ("DELETE", f"/{VERSION}/lxd.tar.xz", True, 405),
    ],
)
def test_every_location_sends_the_strict_headers(
    site: Site, method: str, path: str, auth: bool, status: int
) -> None:
    got, headers, body = site.request(method, path, b"x" if method == "PUT" else None, auth)
    assert got == status, body[:300]
    assert_strict(headers, f"{method} {path}")
    assert headers.get("Content-Type", "").split(";")[0] != "text/html" or got >= 300


def test_symlink_refusals_send_the_strict_headers(site: Site) -> None:
    status, headers, _ = site.request("GET", "/images/etc/passwd")
    assert status in (403, 404)
    assert_strict(headers, "a refused link")


@pytest.mark.parametrize(
    "path", ["/images/x.html", "/streams/x.html", "/streams/v1/x.html", "/x.html"]
)
def test_uploaded_html_is_never_served_as_html(site: Site, path: str) -> None:
    status, headers, _ = site.request("GET", path)
    assert status == 200
    assert headers["Content-Type"].split(";")[0] in ("application/octet-stream", "application/json")
    assert_strict(headers, path)
    if not path.startswith("/streams/v1/"):
        assert headers["Content-Disposition"] == "attachment"


def test_image_files_are_downloads(site: Site) -> None:
    for name in ("lxd.tar.xz",):
        _, headers, _ = site.request("GET", f"/{VERSION}/{name}")
        assert headers["Content-Disposition"] == "attachment"


def page_csp(headers: http.client.HTTPMessage) -> str:
    csp = headers.get_all("Content-Security-Policy") or []
    assert len(csp) == 1, csp
    return csp[0]


@pytest.mark.parametrize("path", ["/", "/streams/index.html"])
def test_the_page_is_html_with_its_own_policy(site: Site, path: str) -> None:
    status, headers, body = site.request("GET", path)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-cache"
    assert "Content-Disposition" not in headers
    csp = page_csp(headers)
    assert csp == nginx.PAGE_CSP
    # the page narrows scripts and styles to its own hashes in a <meta> policy
    assert b'http-equiv="Content-Security-Policy"' in body


def test_about_text_without_a_page(site: Site) -> None:
    page = site.root / "streams" / "index.html"
    aside = page.with_name("index.html.aside")
    page.rename(aside)
    try:
        status, headers, body = site.request("GET", "/")
    finally:
        aside.rename(page)
    assert status == 200 and body.startswith(b"lxd-image-server: lxc remote add")
    assert_strict(headers, "@about")


def test_headers_over_http2(site: Site) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(site.pki.ca_cert),
            "-o",
            "/dev/null",
            "-D",
            "-",
            f"{site.url}/images/x.html",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.lower()
    assert out.startswith("http/2 200")
    assert "x-content-type-options: nosniff" in out
    assert "content-disposition: attachment" in out
    assert f"content-security-policy: {STRICT_CSP}" in out


# -- the page in a real browser, through the real site ----------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cdp]:
    chromium = Chromium(tmp_path_factory.mktemp("chromium"), ("--ignore-certificate-errors",))
    try:
        yield chromium.start()
    finally:
        chromium.stop()


def test_page_works_under_the_served_policy(site: Site, browser: Cdp) -> None:
    tab = Tab(browser)
    try:
        tab.navigate(f"{site.url}/")
        tab.wait_for("document.querySelectorAll('button.copy:not([hidden])').length > 0")
        assert tab.problems() == []
        # an uploaded page never runs: it is a download, and scripts are forbidden anyway
        with contextlib.suppress(CdpError):
            tab.navigate(f"{site.url}/images/x.html", timeout=15)
        assert tab.evaluate("document.title") != "pwned"
    finally:
        tab.close()


# -- finding 11: stalled uploads cannot take every slot ---------------------------------------


class HeldUpload:
    """A PUT whose headers are sent and whose body is not: nginx holds it open."""

    def __init__(self, site: Site, serial: str, source: str = "127.0.0.1") -> None:
        raw = socket.create_connection(
            ("127.0.0.1", site.port), timeout=30, source_address=(source, 0)
        )
        self.sock = site.context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.body = f"held upload {serial}".encode()
        path = f"/images/held/1.0/amd64/default/{serial}/lxd.tar.xz"
        self.sock.sendall(
            (
                f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {basic_auth()}\r\n"
                f"Content-Length: {len(self.body)}\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        self.buf = b""

    def status(self) -> int:
        """The next status line nginx sends (100 once the body is awaited)."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed; got {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return int(head.split(b" ", 2)[1])

    def finish(self) -> int:
        self.sock.sendall(self.body)
        return self.status()

    def close(self) -> None:
        self.sock.close()


def test_eight_concurrent_uploads_from_one_client_pass(site: Site) -> None:
    """Issue 18: nginx's limit of 4 per address refused a CI job's `xargs -P8 curl` (and every
    team behind one NAT address). The limit is the upload app's, per credential (8 by default;
    the ninth: test_run_ready.py)."""
    held = [HeldUpload(site, f"2024010{i}_1200") for i in range(1, 9)]
    try:
        assert [h.status() for h in held] == [100] * 8
        assert [h.finish() for h in held] == [201] * 8
    finally:
        for h in held:
            h.close()


def test_nginx_accepts_the_run_config_without_warnings(site: Site) -> None:
    conf = site.state / "nginx" / "nginx.conf"
    r = subprocess.run(
        [nginx.nginx_binary(), "-t", "-p", site.state / "run", "-c", conf, "-e", "stderr"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "[warn]" not in r.stderr and "deprecated" not in r.stderr, r.stderr
    text = (site.state / "nginx" / "locations.conf").read_text()
    for directive in (
        "disable_symlinks on;",
        "client_body_timeout 60s;",
        "proxy_set_header X-Real-IP $remote_addr;",
    ):
        assert directive in text
    assert "limit_conn" not in text


# -- run refuses what would be unsafe ---------------------------------------------------------


def test_run_refuses_private_with_anonymous_uploads(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            BIN,
            "--state-dir",
            tmp_path / "state",
            "run",
            "--root-dir",
            tmp_path / "root",
            "--private",
            "--allow-anonymous-uploads",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--private" in r.stderr and "--allow-anonymous-uploads" in r.stderr
    assert not (tmp_path / "root").exists()


def test_run_as_root_refuses_root_workers(tmp_path: Path) -> None:
    """pytest's tmp is 0700 root: www-data cannot reach a tree in it. `run` used to keep
    nginx's workers as root then (so a planted link could serve /etc/shadow)."""
    assert os.geteuid() == 0, "the integration tests run as root (see tests/host-setup.sh)"
    proc, port, log = start_run(tmp_path, "--allow-anonymous-uploads", "--plain-http")
    try:
        rc = proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        stop(proc, log)
        raise AssertionError(f"run started with root workers:\n{log.read_text()}") from None
    text = log.read_text()
    assert rc == 1, text
    assert "www-data cannot reach" in text and str(tmp_path) in text
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
