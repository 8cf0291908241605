"""htpasswd hashes checked by other implementations run as programs: `openssl passwd` computes
the same SHA-crypt and MD5-crypt values, and a real nginx accepts our hashes (and refuses
wrong passwords) through auth_basic. The C library's crypt() is checked in tests/unit."""

from __future__ import annotations

import base64
import shutil
import signal
import socket
import subprocess
import time

import pytest

from lxd_image_server.htpasswd import (
    generate_password,
    hash_password,
    md5_crypt,
    set_password,
    sha_crypt,
    verify_password,
)

from ..unit.test_htpasswd import PASSWORDS, SALTS

pytestmark = pytest.mark.filterwarnings("error")

# OpenSSL 3.0's `passwd` prints "<NULL>" for an empty password: the empty password is checked
# against the C library (tests/unit) and nginx instead.
OPENSSL_PASSWORDS = [p for p in PASSWORDS if p]


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is required for this test (Debian: apt-get install {tool})"
    return path


def openssl_passwd(*args: str) -> str:
    return subprocess.run(
        [need("openssl"), "passwd", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("password", OPENSSL_PASSWORDS)
@pytest.mark.parametrize("salt", SALTS)
def test_matches_openssl_sha512(password, salt):
    assert hash_password(password, salt) == openssl_passwd("-6", "-salt", salt, password)


@pytest.mark.parametrize("password", ["secret", "z" * 70, "pässwörd"])
@pytest.mark.parametrize("rounds", [1000, 4999, 5000, 12345])
def test_matches_openssl_with_rounds(password, rounds):
    expected = openssl_passwd("-6", "-salt", f"rounds={rounds}$NaCl", password)
    assert expected.startswith(f"$6$rounds={rounds}$NaCl$")
    assert sha_crypt(password, f"$6$rounds={rounds}$NaCl") == expected
    assert verify_password(password, expected)


@pytest.mark.parametrize("password", OPENSSL_PASSWORDS)
def test_matches_openssl_sha256(password):
    expected = openssl_passwd("-5", "-salt", "pepper", password)
    assert sha_crypt(password, "$5$pepper") == expected
    assert verify_password(password, expected)


@pytest.mark.parametrize("password", OPENSSL_PASSWORDS)
@pytest.mark.parametrize("scheme", ["-apr1", "-1"])
def test_verifies_md5_crypt_from_openssl(password, scheme):
    expected = openssl_passwd(scheme, "-salt", "Zq1./x9A", password)
    assert md5_crypt(password, expected) == expected
    assert verify_password(password, expected)
    assert not verify_password(password + "x", expected)


# ---- nginx itself ------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen unix:{d}/s.sock;
        root {d}/www;
        location / {{
            auth_basic "images";
            auth_basic_user_file {d}/htpasswd;
        }}
    }}
}}
"""


def http_status(sock_path: str, user: str | None = None, password: str | None = None) -> int:
    request = "GET / HTTP/1.0\r\nHost: localhost\r\n"
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request += f"Authorization: Basic {token}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock_path)
        s.sendall((request + "\r\n").encode())
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest.fixture
def nginx(tmp_path):
    d = tmp_path / "n"
    d.mkdir()
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("in\n")
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d))
    log = d / "error.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [need("nginx"), "-p", str(d), "-e", str(log), "-c", str(d / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    sock = d / "s.sock"
    deadline = time.monotonic() + 30
    try:
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nginx did not start: {log.read_text()}")
            time.sleep(0.05)
        yield d
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_nginx_accepts_our_hashes(nginx):
    htpasswd = str(nginx / "htpasswd")
    sock = str(nginx / "s.sock")
    users = {"admin": generate_password(), "uni": "pässwörd ✓", "long": "L" * 100, "e": ""}
    for user, password in users.items():
        set_password(htpasswd, user, password)
    assert http_status(sock) == 401
    for user, password in users.items():
        assert http_status(sock, user, password) == 200, user
        assert http_status(sock, user, password + "x") == 401, user
    assert http_status(sock, "nobody", "") == 401
    set_password(htpasswd, "admin", "changed")  # nginx reads the file on each request
    assert http_status(sock, "admin", "changed") == 200
    assert http_status(sock, "admin", users["admin"]) == 401
