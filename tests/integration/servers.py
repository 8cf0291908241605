"""Real parts for the acceptance tests: commands, a test CA, nginx, the LXD and Incus clients.

Everything here runs real programs (openssl-free: the CA is made with `cryptography`); nothing
is mocked. Failures raise with the command's output so a broken run explains itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
HOST_SETUP = REPO / "tests" / "host-setup.sh"
NGINX = Path("/usr/sbin/nginx")

#: Where the test CA goes in the system store; anything matching CA_STORE_GLOB is ours.
CA_STORE_DIR = Path("/usr/local/share/ca-certificates")
CA_STORE_FILE = CA_STORE_DIR / "lxd-image-server-test.crt"
CA_STORE_GLOB = "lxd-image-server-test*.crt"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class CommandError(AssertionError):
    """A command exited non-zero; the message carries its output."""


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 120,
    input: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise CommandError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
        )
    return proc


# ---------------------------------------------------------------------------------------------
# LXD and Incus: the same steps through each one's client


@dataclass(frozen=True)
class Remote:
    """A client's remote, as `remote list` shows it."""

    addrs: tuple[str, ...]
    protocol: str


class Client(ABC):
    """The command-line client of one daemon: `lxc` for LXD, `incus` for Incus. Both take the
    same commands for everything the tests do. Where the command runs is the subclass's job:
    HostClient on this machine, tests/integration/incus_guest.py's GuestClient in a booted
    Debian 13 container."""

    #: the program: lxc or incus
    command: str
    #: the daemon, for messages: "LXD", "Incus 7.0.2 (Debian 13 container)"
    daemon: str

    @property
    @abstractmethod
    def name(self) -> str:
        """Short and unique among the clients: the test id, and part of instance names."""

    @property
    @abstractmethod
    def cache_dir(self) -> Path:
        """The daemon's cache (its copies of remotes' catalogs), as a path on this machine."""

    @abstractmethod
    def run(
        self, args: Sequence[str], *, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`<command> ARGS`; with `check`, a non-zero exit raises CommandError."""

    def __str__(self) -> str:
        return self.name

    def __call__(self, *args: str, timeout: float = 180) -> str:
        # --quiet: no progress bars, so a failure's message is the error itself
        return self.run(["--quiet", *args], timeout=timeout).stdout

    def json(self, *args: str, timeout: float = 180) -> Any:
        return json.loads(self(*args, "--format", "json", timeout=timeout))

    def exec(
        self, instance: str, *argv: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`<client> exec INSTANCE -- ARGV`."""
        return self.run(["exec", instance, "--", *argv], timeout=timeout, check=check)

    def is_up(self) -> bool:
        return self.run(["info"], timeout=30, check=False).returncode == 0

    def local_images(self) -> dict[str, dict[str, Any]]:
        """Fingerprint -> image, for the images in the daemon's local image store."""
        return {img["fingerprint"]: img for img in self.json("image", "list")}

    def instance_names(self) -> set[str]:
        return {inst["name"] for inst in self.json("list")}

    def delete_instance(self, name: str) -> None:
        if name in self.instance_names():
            self("delete", "--force", name)

    def delete_images(self, fingerprints: set[str]) -> None:
        for fp in sorted(fingerprints & set(self.local_images())):
            self("image", "delete", fp)

    def remotes(self) -> dict[str, Remote]:
        """Name -> remote. `remote list --format json` gives one Addr (LXD, Incus 6) or a
        list, Addrs (Incus 7)."""
        listed: dict[str, dict[str, Any]] = self.json("remote", "list")
        return {
            name: Remote(tuple(r["Addrs"]) if "Addrs" in r else (r["Addr"],), r["Protocol"])
            for name, r in listed.items()
        }

    def remove_remote(self, name: str) -> None:
        if name in self.remotes():
            self("remote", "remove", name)


@dataclass(frozen=True)
class HostClient(Client):
    """A client and daemon of this machine, started by tests/host-setup.sh."""

    command: str
    daemon: str
    #: the daemon's name in tests/host-setup.sh (--restart-NAME) and in its log's name
    setup_name: str

    @property
    def name(self) -> str:
        return self.command

    @property
    def cache_dir(self) -> Path:
        return Path("/var/cache") / self.setup_name

    @property
    def log(self) -> str:
        return f"/var/log/{self.setup_name}-test.log"

    def run(
        self, args: Sequence[str], *, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([self.command, *args], timeout=timeout, check=check)

    def restart(self) -> None:
        """Stop the daemon and start it again, detached (see tests/host-setup.sh).

        The daemon loads the system CA store once, when it starts: a CA installed later is
        not trusted for image downloads until the daemon restarts."""
        run(["bash", HOST_SETUP, f"--restart-{self.setup_name}"], timeout=240)
        if not self.is_up():
            raise AssertionError(f"{self.daemon} does not answer after the restart; see {self.log}")


#: LXD 5.0.2 of Debian 12 runs on this machine; Incus runs in Debian 13 containers
#: (tests/integration/incus_guest.py)
LXC = HostClient("lxc", "LXD", "lxd")


# The LXD client's steps as functions, for the tests that only use LXD.


def lxc(*args: str, timeout: float = 180) -> str:
    return LXC(*args, timeout=timeout)


def lxc_json(*args: str, timeout: float = 180) -> Any:
    return LXC.json(*args, timeout=timeout)


def lxd_is_up() -> bool:
    return LXC.is_up()


def restart_lxd() -> None:
    LXC.restart()


def local_images() -> dict[str, dict[str, Any]]:
    return LXC.local_images()


def instance_names() -> set[str]:
    return LXC.instance_names()


def delete_instance(name: str) -> None:
    LXC.delete_instance(name)


def delete_images(fingerprints: set[str]) -> None:
    LXC.delete_images(fingerprints)


# ---------------------------------------------------------------------------------------------
# TLS


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(workdir: Path, label: str, ip: str = "127.0.0.1") -> Pki:
    """A CA and a server certificate for `ip` (as an IP SAN) signed by it."""
    workdir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"lxd-image-server test CA {label}")]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = Pki(
        ca_cert=workdir / "ca.crt",
        server_cert=workdir / "server.crt",
        server_key=workdir / "server.key",
    )
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pki.server_key)
    # the CA key is not kept: nothing else is ever signed with it
    return pki


def remove_test_cas() -> None:
    """Removes every test CA (this run's and stale ones) from the system store."""
    for stale in CA_STORE_DIR.glob(CA_STORE_GLOB):
        stale.unlink()
    run(["update-ca-certificates"], timeout=120)


def install_ca(ca_cert: Path) -> None:
    """Puts the CA in the system store (first removing test CAs of earlier runs)."""
    for stale in CA_STORE_DIR.glob(CA_STORE_GLOB):
        stale.unlink()
    CA_STORE_DIR.mkdir(parents=True, exist_ok=True)
    CA_STORE_FILE.write_bytes(ca_cert.read_bytes())
    CA_STORE_FILE.chmod(0o644)
    run(["update-ca-certificates"], timeout=120)
    pem = ca_cert.read_text().strip()
    if pem not in SYSTEM_BUNDLE.read_text():
        raise AssertionError(f"update-ca-certificates did not add the test CA to {SYSTEM_BUNDLE}")


# ---------------------------------------------------------------------------------------------
# nginx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {work}/nginx.pid;
error_log {work}/error.log info;

events {{
    worker_connections 128;
}}

http {{
    log_format plain '$request_method $status $uri';
    access_log {work}/access.log plain;
    client_body_temp_path {work}/tmp/client_body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;

    types {{
        application/json json;
        text/html html;
    }}
    default_type application/octet-stream;
    sendfile on;

    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;

        root {root};
        gzip_static on;

        # the catalog page at /, as in nginx/locations.conf.in
        location = / {{
            try_files /streams/index.html =404;
        }}

        location / {{
            try_files $uri =404;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx as a child process serving `root` over HTTPS on 127.0.0.1:`port`."""

    def __init__(self, root: Path, pki: Pki, workdir: Path, port: int) -> None:
        self.root = root
        self.pki = pki
        self.work = workdir
        self.port = port
        self.conf = workdir / "nginx.conf"
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, deadline: float = 30) -> None:
        if not NGINX.exists():
            raise AssertionError(f"{NGINX} is missing: run tests/host-setup.sh")
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            NGINX_CONF.format(
                work=self.work,
                port=self.port,
                cert=self.pki.server_cert,
                key=self.pki.server_key,
                root=self.root,
            )
        )
        base: list[str | os.PathLike[str]] = [NGINX, "-p", self.work, "-c", self.conf]
        base += ["-e", self.error_log]
        run([*base, "-t"], timeout=30)
        with open(self.work / "stdout.log", "wb") as out:
            self.proc = subprocess.Popen(
                [os.fspath(c) for c in base], stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"nginx exited with {self.proc.returncode}:\n{self.error_log.read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"nginx did not listen on port {self.port} within {deadline} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def requests(self) -> list[tuple[str, int, str]]:
        """(method, status, decoded path) of every request served so far."""
        out = []
        for line in self.access_log.read_text().splitlines():
            method, status, uri = line.split(" ", 2)
            out.append((method, int(status), unquote(uri)))
        return out


def own_like_tree(tree_root: Path, top: Path) -> None:
    """What a test wrote below `top` as root, given to the owner of the tree `tree_root` (`run`
    started as root runs the upload server and the watcher as that user, as sftp uploads
    would be: they add to, and delete, what lies there)."""
    subprocess.run(["chown", "-R", "--reference", str(tree_root), str(top)], check=True)
