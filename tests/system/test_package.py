"""System test: the .deb, installed with apt in a booted Debian 12, used the way an admin and
the uploaders use it, then upgraded, removed and purged.

One container for the module (see container.py); the tests run in file order and each builds
on the previous ones, like an admin's session. The container shares the host's network: its
nginx (80, 8443) and sshd (2222, set by this test, not by the package) use host ports, so the
host's ssh, curl and LXD daemon reach it at 127.0.0.1.

Needs root, `make deb` (dist/apt), `tests/host-setup.sh` (LXD, busybox, squashfs-tools) and
`make deb-deps` (debootstrap, systemd-container, lintian): `make system-test` does all three.
On teardown the container's journal is saved in tests/artifacts/system/.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.images import (
    build_rootfs,
    make_root_tar_xz,
    make_squashfs,
    sha256_file,
    write_metadata_tarball,
)
from tests.integration.servers import (
    delete_images,
    delete_instance,
    local_images,
    lxc,
    lxc_json,
    lxd_is_up,
    restart_lxd,
    run,
)

from .container import CACHE_DIR, Bind, Container, ensure_base
from .sftp_raw import RawSftp, SftpError

pytestmark = pytest.mark.timeout(1200)

REPO = Path(__file__).resolve().parents[2]
#: what `make deb` wrote (another directory of the same shape: LXD_IMAGE_SERVER_DIST)
DIST = Path(os.environ.get("LXD_IMAGE_SERVER_DIST", REPO / "dist"))
APT_REPO = DIST / "apt"
ARTIFACTS = REPO / "tests" / "artifacts" / "system"
DIST_IN_CONTAINER = "/srv/lxd-image-server-dist"
SSH_PORT = 2222
HTTPS_PORT = 8443
HOST_PORTS = (80, HTTPS_PORT, SSH_PORT)
URL = f"https://127.0.0.1:{HTTPS_PORT}"
ROOT = "/var/www/simplestreams"
STATE = "/var/lib/lxd-image-server"
#: where the upload app (lxdadm) hands the digests it computed to the writer
DIGESTS = f"{STATE}/upload-digests"
#: the uploader (sftp/scp and the HTTPS upload app) and the catalog writer
UPLOADER = "lxdadm"
WRITER = "lxd-image-server"
PASSWORD_FILE = "/etc/lxd-image-server/initial-password"
#: the previous release (0.1.0, lxdadm wrote the catalog): see fixtures/README.md
PREVIOUS_DEB = Path(__file__).resolve().parent / "fixtures" / "lxd-image-server_0.1.0_all.deb"
#: SSH2_FX_PERMISSION_DENIED: what internal-sftp answers to a refused request
FX_PERMISSION_DENIED = 3
PREFIX = "busybox/1.35/amd64"
#: the CA file this test puts in the host's store (the integration tests use other names)
HOST_CA = Path("/usr/local/share/ca-certificates/lxd-image-server-system-test.crt")
#: the LXD daemon's simplestreams cache: one directory per remote URL, named by its sha256
LXD_CACHE = Path("/var/cache/lxd")
TOOLS = (
    "systemd-nspawn",
    "nsenter",
    "debootstrap",
    "lintian",
    "ssh",
    "scp",
    "sftp",
    "ssh-keygen",
    "curl",
    "lxc",
    "lxd",
    "mksquashfs",
    "update-ca-certificates",
    "xdelta3",
)
#: started (or listening) after installation
RUNNING_UNITS = (
    "lxd-image-server.service",
    "lxd-image-server-upload.socket",
    "lxd-image-server-config.path",
    "lxd-image-server-rebuild.path",
    "lxd-image-server-update.timer",
    "lxd-image-server-sync.timer",
    "nginx.service",
    "ssh.service",
)
OUR_UNITS = (
    "lxd-image-server.service",
    "lxd-image-server-upload.socket",
    "lxd-image-server-upload.service",
    "lxd-image-server-update.service",
    "lxd-image-server-update.timer",
    "lxd-image-server-sync.service",
    "lxd-image-server-sync.timer",
    "lxd-image-server-rebuild.path",
    "lxd-image-server-config.path",
    "lxd-image-server-reload.service",
)
#: what purge removes (the images stay)
PURGED = (
    "/etc/lxd-image-server",
    "/etc/nginx/ssl/nginx.crt",
    "/etc/nginx/ssl/nginx.key",
    "/etc/nginx/sites-enabled/lxd-image-server",
    "/etc/nginx/sites-available/lxd-image-server",
    "/etc/nginx/snippets/lxd-image-server.conf",
    "/etc/ssh/sshd_config.d/lxd-image-server.conf",
    "/var/lib/lxd-image-server",
    f"{ROOT}/streams",
)


def wait_for(what: str, check: Any, deadline: float = 60, interval: float = 0.5) -> Any:
    """Polls check() until it returns something truthy; fails after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"{what}: not the case after {deadline:.0f} s")
        time.sleep(interval)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package `make deb` built; fails (never skips) when the machine is not prepared."""
    if os.geteuid() != 0:
        pytest.fail("the system test runs as root (systemd-nspawn, the LXD daemon)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run `make deb-deps` and `bash tests/host-setup.sh`"
        )
    debs = sorted(DIST.glob("lxd-image-server_*_all.deb"))
    packages = APT_REPO / "Packages"
    if len(debs) != 1 or not packages.is_file() or not (APT_REPO / "Release").is_file():
        pytest.fail(f"no package, or no apt repository in {APT_REPO}: run `make deb` first")
    names = set(re.findall(r"^Package: (\S+)$", packages.read_text(), re.M))
    assert names == {"lxd-image-server", "python3-inotify-simple"}, names
    busy = [p for p in HOST_PORTS if port_in_use(p)]
    if busy:
        listeners = run(["ss", "-ltnp"], check=False).stdout
        pytest.fail(
            f"host port(s) {busy} in use; the container shares the host network and needs "
            f"{HOST_PORTS} (a container left over by an interrupted run?):\n{listeners}"
        )
    return debs[0]


@pytest.fixture(scope="module")
def container(deb: Path) -> Iterator[Container]:
    started = time.monotonic()
    base = ensure_base()
    print(f"base tree ready in {time.monotonic() - started:.1f} s: {base}")
    archives = CACHE_DIR / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    name = f"lis-system-{secrets.token_hex(3)}"
    c = Container(
        base,
        Path("/var/tmp") / name,
        name,
        [Bind(DIST, DIST_IN_CONTAINER, read_only=True), Bind(archives, "/var/cache/apt/archives")],
    )
    c.prepare()
    # the test's own choices, written before boot: sshd on a port the host does not use, and
    # the package's repository next to Debian's
    c.path("/etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    c.path("/etc/ssh/sshd_config.d/00-system-test-port.conf").write_text(f"Port {SSH_PORT}\n")
    # debootstrap writes no /etc/hosts; a real machine has one (the package must not touch it)
    c.path("/etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\tlis-system-test\n::1\tlocalhost ip6-localhost\n"
    )
    c.path("/etc/apt/sources.list.d/lxd-image-server.list").write_text(
        f"deb [trusted=yes] file:{DIST_IN_CONTAINER}/apt ./\n"
    )
    try:
        c.boot()
        print(f"container {name} booted, {time.monotonic() - started:.1f} s")
        yield c
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        if c.leader:
            journal = c.run("journalctl -b --no-pager", check=False, timeout=60).stdout
            (ARTIFACTS / "journal.txt").write_text(journal)
        (ARTIFACTS / "console.txt").write_text(c.console())
        c.remove()


@dataclass(frozen=True)
class Installed:
    output: str
    hosts_before: str
    user: str
    password: str


@pytest.fixture(scope="module")
def installed(container: Container) -> Installed:
    """`apt install lxd-image-server`, with only Debian's archive and dist/apt as sources."""
    hosts_before = container.run("sha256sum /etc/hosts").stdout
    started = time.monotonic()
    container.run("apt-get update -q", timeout=300)
    proc = container.run("apt-get install -y -q lxd-image-server", timeout=900)
    print(f"apt install: {time.monotonic() - started:.1f} s")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "apt-install.txt").write_text(proc.stdout + proc.stderr)
    m = re.search(r"Upload user '(\S+)': its password is in (\S+) ", proc.stdout)
    assert m, f"init named no password file:\n{proc.stdout[-3000:]}"
    assert m[2] == PASSWORD_FILE, m[0]
    password = container.run(f"cat {PASSWORD_FILE}").stdout.strip()
    assert password
    return Installed(proc.stdout + proc.stderr, hosts_before, m[1], password)


@pytest.fixture(scope="module")
def server_cert(installed: Installed, container: Container, tmp_path_factory: Any) -> Path:
    """The certificate init made, copied out of the container."""
    path = Path(tmp_path_factory.mktemp("cert")) / "nginx.crt"
    shutil.copyfile(container.path("/etc/nginx/ssl/nginx.crt"), path)
    return path


@dataclass(frozen=True)
class Image:
    variant: str
    serial: str
    meta: Path
    root: Path

    @property
    def relpath(self) -> str:
        return f"{PREFIX}/{self.variant}/{self.serial}"

    @property
    def fingerprint(self) -> str:
        return sha256_file(self.meta, self.root)

    @property
    def alias(self) -> str:
        return f"busybox/1.35/{self.variant}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: Any) -> dict[str, Image]:
    """Three bootable busybox images in the seeds' layout (metadata + root filesystem), one per
    upload route, under upload/busybox/1.35/amd64/<route>/<serial>/."""
    work = Path(tmp_path_factory.mktemp("images"))
    rootfs = build_rootfs(work / "rootfs")
    serial = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d_%H:%M")
    made = {}
    for variant, root_name in (
        ("sftp", "rootfs.squashfs"),
        ("scp", "root.tar.xz"),
        ("https", "rootfs.squashfs"),
    ):
        d = work / "upload" / PREFIX / variant / serial
        d.mkdir(parents=True)
        meta = write_metadata_tarball(
            work / f"meta-{variant}", d / "lxd.tar.xz", f"system test {variant}"
        )
        if root_name == "rootfs.squashfs":
            root = make_squashfs(rootfs, d / root_name)
        else:
            root = make_root_tar_xz(rootfs, d / root_name)
        made[variant] = Image(variant, serial, meta, root)
    return made


@pytest.fixture(scope="module")
def ssh_key(installed: Installed, container: Container, tmp_path_factory: Any) -> Path:
    """A key pair; its public half in ~lxdadm/.ssh/authorized_keys, where the seeds put it."""
    key = Path(tmp_path_factory.mktemp("ssh")) / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "system-test", "-f", key])
    container.run(
        "cat >> /home/lxdadm/.ssh/authorized_keys", input=key.with_suffix(".pub").read_text()
    )
    return key


def ssh_options(key: Path) -> list[str]:
    return [
        "-F",
        "/dev/null",
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=15",
    ]


def sha256_in_container(container: Container, path: str) -> str:
    return container.run(f"sha256sum '{path}'").stdout.split()[0]


def stat_in_container(container: Container, path: str) -> str:
    """'owner:group mode' of a path in the container."""
    return container.run(f"stat -c '%U:%G %a' '{path}'").stdout.strip()


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["curl", "-sS", "--tlsv1.3", "--max-time", str(int(timeout)), *args], check=False)


# -- on the host -------------------------------------------------------------------------------


def test_lintian_has_no_errors_or_warnings(deb: Path) -> None:
    proc = run(["lintian", "--fail-on", "error,warning", deb], timeout=300, check=False)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert proc.returncode == 0 and not tags, f"lintian:\n{proc.stdout}\n{proc.stderr}"


# -- installation ------------------------------------------------------------------------------


def test_apt_installs_from_debian_and_dist_apt(installed: Installed, container: Container) -> None:
    versions = container.run(
        "dpkg-query -W -f '${Package} ${Status}\\n' lxd-image-server python3-inotify-simple"
    ).stdout
    assert versions.count("install ok installed") == 2, versions
    policy = container.run("apt-cache policy lxd-image-server python3-inotify-simple").stdout
    assert policy.count(f"file:{DIST_IN_CONTAINER}/apt ./ Packages") == 2, policy
    sources = container.run(
        "cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null"
    ).stdout
    for line in sources.splitlines():
        if line.strip() and not line.startswith("#"):
            assert "debian" in line or DIST_IN_CONTAINER in line, f"not Debian's archive: {line}"
    # the program runs from Debian's packages: nothing was pip-installed
    local = container.run("ls /usr/local/lib/python3*/dist-packages 2>/dev/null || true").stdout
    assert local.strip() == "", local
    assert container.run("dpkg -s python3-pip", check=False).returncode != 0


def test_install_leaves_etc_hosts_alone(installed: Installed, container: Container) -> None:
    assert container.run("sha256sum /etc/hosts").stdout == installed.hosts_before


def test_first_password_is_not_in_apts_log(installed: Installed, container: Container) -> None:
    """Issue 9, finding 18: apt keeps the maintainer scripts' output in term.log."""
    term_log = container.run("cat /var/log/apt/term.log").stdout
    assert PASSWORD_FILE in term_log, term_log[-2000:]
    assert installed.password not in term_log
    assert installed.password not in installed.output


def test_units_run(installed: Installed, container: Container) -> None:
    states = container.run(f"systemctl is-active {' '.join(RUNNING_UNITS)}", check=False).stdout
    assert states.split() == ["active"] * len(RUNNING_UNITS), dict(
        zip(RUNNING_UNITS, states.split(), strict=False)
    )
    status = container.run("systemctl status --no-pager lxd-image-server", check=False).stdout
    assert "Active: active (running)" in status, status
    assert "lxd-image-server watch" in status, status
    # socket activation: the upload app starts with the first upload, not before
    upload = container.run("systemctl is-active lxd-image-server-upload.service", check=False)
    assert upload.stdout.strip() == "inactive", upload.stdout
    socket_state = container.run(
        "systemctl show -p Listen lxd-image-server-upload.socket"
    ).stdout.strip()
    assert socket_state == "Listen=/run/lxd-image-server/upload.sock (Stream)", socket_state
    assert stat_in_container(container, "/run/lxd-image-server/upload.sock") == "root:www-data 660"


def test_tree_user_and_credentials(installed: Installed, container: Container) -> None:
    # the sftp chroot: root-owned, writable by root only, up to /
    for path in ("/var", "/var/www", ROOT):
        assert stat_in_container(container, path) == "root:root 755", path
    # the uploader owns images/ (setgid, group-writable); the catalog writer streams/ and the
    # state; nothing the writer reads back as trusted is the uploader's
    assert stat_in_container(container, f"{ROOT}/images") == "lxdadm:lxdadm 2775"
    for path in (f"{ROOT}/streams", f"{ROOT}/streams/v1", STATE):
        assert stat_in_container(container, path) == f"{WRITER}:{WRITER} 755", path
    # except where the upload app hands its digests over (out of the sftp chroot; the writer
    # trusts a record only while the file keeps the identity it names)
    assert stat_in_container(container, DIGESTS) == "lxdadm:lxdadm 2770"
    owners = container.run(
        f"find {ROOT}/streams {STATE} -path {DIGESTS} -prune -o -printf '%u:%g %p\\n'"
        f" | grep -v '^{WRITER}:{WRITER} ' || true"
    ).stdout
    assert owners == "", f"not the writer's:\n{owners}"
    assert container.path(f"{STATE}/hashes.sqlite3").is_file()
    writer = container.run(f"getent passwd {WRITER}").stdout.strip().split(":")
    assert writer[5] == STATE and writer[6] == "/usr/sbin/nologin", writer
    assert UPLOADER in container.run(f"id -nG {WRITER}").stdout.split()
    assert WRITER not in container.run(f"id -nG {UPLOADER}").stdout.split()
    assert (
        stat_in_container(container, "/etc/lxd-image-server/htpasswd")
        == "root:lxd-image-server-auth 640"
    )
    assert container.path("/etc/nginx/ssl/nginx.crt").is_file()
    assert container.path("/etc/nginx/ssl/nginx.key").is_file()
    assert stat_in_container(container, "/home/lxdadm/.ssh") == "lxdadm:lxdadm 700"
    passwd = container.run("getent passwd lxdadm").stdout.strip().split(":")
    assert passwd[5] == "/home/lxdadm", passwd
    assert container.path("/etc/nginx/sites-enabled/lxd-image-server").is_symlink()
    assert stat_in_container(container, PASSWORD_FILE) == "root:root 600"
    assert "lxd-image-server: warning" not in installed.output, installed.output[-3000:]
    assert container.path("/etc/nginx/sites-enabled/default").exists(), "Debian's site is gone"
    listening = container.run("ss -ltn").stdout
    assert re.search(r":80\s", listening) and re.search(rf":{HTTPS_PORT}\s", listening), listening
    # the site fits the nginx of this release (1.22 on Debian 12, 1.26 on 13: `http2 on;`)
    checked = container.run("nginx -t 2>&1")
    assert "[warn]" not in checked.stdout and "deprecated" not in checked.stdout, checked.stdout


def test_units_verify_and_are_hardened(installed: Installed, container: Container) -> None:
    paths = " ".join(f"/lib/systemd/system/{u}" for u in OUR_UNITS)
    proc = container.run(f"systemd-analyze verify {paths}", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
    # at most what 0.1.0 had (the catalog writer's own user hides /home now)
    limits = {
        "lxd-image-server.service": 1.2,
        "lxd-image-server-update.service": 1.2,
        "lxd-image-server-sync.service": 1.2,
        "lxd-image-server-upload.service": 0.3,
    }
    for unit, limit in limits.items():
        out = container.run(f"systemd-analyze security --no-pager {unit}", check=False).stdout
        m = re.search(rf"Overall exposure level for {re.escape(unit)}: ([\d.]+)", out)
        assert m, out
        print(f"{unit}: exposure {m[1]}")
        assert float(m[1]) <= limit, out
    users = {
        "lxd-image-server.service": WRITER,
        "lxd-image-server-update.service": WRITER,
        "lxd-image-server-sync.service": WRITER,
        "lxd-image-server-upload.service": UPLOADER,
    }
    for unit, user in users.items():
        assert unit_property(container, unit, "User") == user, unit
    assert unit_property(container, "lxd-image-server-upload.service", "UMask") == "0002"
    # the watcher really runs as the writer, with group lxdadm (to delete expired versions),
    # even in its user namespace (PrivateUsers=yes)
    pid = unit_property(container, "lxd-image-server.service", "MainPID")
    status = container.run(f"cat /proc/{pid}/status").stdout
    uid = container.run(f"id -u {WRITER}").stdout.strip()
    gid = container.run(f"getent group {UPLOADER} | cut -d: -f3").stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s", status, re.M), status
    groups = re.search(r"^Groups:(.*)$", status, re.M)
    assert groups and gid in groups[1].split(), status


def test_man_page_renders(installed: Installed, container: Container) -> None:
    page = container.run("MANPAGER=cat MANWIDTH=100 man lxd-image-server 2>&1").stdout
    assert "lxd-image-server" in page and "SYNOPSIS" in page, page[:2000]


# -- uploads -----------------------------------------------------------------------------------


def assert_uploaded(container: Container, image: Image) -> None:
    directory = f"{ROOT}/images/{image.relpath}"
    for local in (image.meta, image.root):
        path = f"{directory}/{local.name}"
        assert sha256_in_container(container, path) == sha256_file(local), path
        assert stat_in_container(container, path) == "lxdadm:lxdadm 644", path


def test_sftp_upload(ssh_key: Path, images: dict[str, Image], container: Container) -> None:
    image = images["sftp"]
    parts = image.relpath.split("/")
    batch = [f"-mkdir {'/'.join(parts[:i])}" for i in range(1, len(parts))]
    batch += [
        f"mkdir {image.relpath}",
        f"put {image.meta} {image.relpath}/lxd.tar.xz",
        f"put {image.root} {image.relpath}/{image.root.name}",
    ]
    proc = run(
        ["sftp", *ssh_options(ssh_key), "-P", str(SSH_PORT), "-b", "-", "lxdadm@127.0.0.1"],
        input="\n".join(batch) + "\n",
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc
    assert_uploaded(container, image)


def test_scp_upload(ssh_key: Path, images: dict[str, Image], container: Container) -> None:
    image = images["scp"]
    # scp -r of the variant directory lands it (and the version inside) in busybox/1.35/amd64/,
    # which the sftp upload made; relative remote paths start in images/ (ForceCommand -d)
    proc = run(
        [
            "scp",
            *ssh_options(ssh_key),
            "-P",
            str(SSH_PORT),
            "-r",
            image.meta.parent.parent,
            f"lxdadm@127.0.0.1:{PREFIX}/",
        ],
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc
    assert_uploaded(container, image)


def test_ssh_commands_tty_and_forwarding_are_refused(
    ssh_key: Path, container: Container, installed: Installed
) -> None:
    marker = f"ran-{secrets.token_hex(4)}"
    base = ["ssh", *ssh_options(ssh_key), "-p", str(SSH_PORT)]
    proc = run(
        [*base, "lxdadm@127.0.0.1", f"echo {marker}; touch /images/{marker}"],
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and marker not in proc.stdout, proc
    assert not container.path(f"{ROOT}/images/{marker}").exists()
    tty = run([*base, "-tt", "lxdadm@127.0.0.1"], timeout=60, check=False)
    assert "PTY allocation request failed" in tty.stderr, tty
    forward = run(
        [*base, "-W", f"127.0.0.1:{HTTPS_PORT}", "lxdadm@127.0.0.1"], timeout=60, check=False
    )
    assert forward.returncode != 0 and "forwarding failed" in forward.stderr, forward


def test_https_upload_with_init_credentials(
    installed: Installed, server_cert: Path, images: dict[str, Image], container: Container
) -> None:
    image = images["https"]
    for local in (image.meta, image.root):
        form = f"upload=@{local};filename={image.relpath}/{local.name}"
        cacert = ["--cacert", str(server_cert), "-F", form]
        anonymous = curl(*cacert, "-o", "/dev/null", "-w", "%{http_code}", f"{URL}/images/")
        assert anonymous.stdout == "401", anonymous
        login = f"{installed.user}:{installed.password}"
        proc = curl(*cacert, "-u", login, "-w", "\n%{http_code}", f"{URL}/images/")
        assert proc.returncode == 0 and proc.stdout.endswith("\n201"), proc
    assert_uploaded(container, image)
    active = container.run("systemctl is-active lxd-image-server-upload.service").stdout.strip()
    assert active == "active", "the socket did not start the upload app"


def catalog(server_cert: Path) -> dict[str, Any]:
    proc = curl("--cacert", str(server_cert), "--fail", f"{URL}/streams/v1/images.json")
    assert proc.returncode == 0, proc
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def published_fingerprints(doc: dict[str, Any]) -> set[str]:
    found = set()
    for product in doc["products"].values():
        for version in product["versions"].values():
            for item in version["items"].values():
                found |= {v for k, v in item.items() if k.startswith("combined_")}
    return found


def test_watcher_publishes_every_upload(
    server_cert: Path, images: dict[str, Image], installed: Installed
) -> None:
    expected = {img.fingerprint for img in images.values()}
    wait_for(
        "images.json lists the three uploads",
        lambda: expected <= published_fingerprints(catalog(server_cert)),
        deadline=60,
    )
    index = curl("--cacert", str(server_cert), "--fail", f"{URL}/streams/v1/index.json")
    assert json.loads(index.stdout)["index"]["images"]["path"] == "streams/v1/images.json"

    # the catalog page: written by lxdadm into streams/ (the root is root's, the sftp chroot),
    # served at /
    def page_lists_all() -> bool:
        page = curl("--cacert", str(server_cert), "--fail", f"{URL}/")
        return page.returncode == 0 and all(fp in page.stdout for fp in expected)

    wait_for("the page at / lists the three uploads", page_lists_all, deadline=60)


def test_the_watchers_catalog_passes_verify(
    server_cert: Path, images: dict[str, Image], container: Container
) -> None:
    """What the watcher published (the test above waited for it) keeps every client's rules
    and matches the files (issue 19): `verify` as the writer, with the package's config."""
    proc = container.run(f"runuser -u {WRITER} -- lxd-image-server verify", check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc


# -- an uploader's attacks (issue 9) ---------------------------------------------------------


def raw_sftp(key: Path) -> RawSftp:
    """A session as lxdadm through the package's internal-sftp, sending requests unmasked."""
    return RawSftp(
        ["ssh", *ssh_options(key), "-p", str(SSH_PORT), "-s", "lxdadm@127.0.0.1", "sftp"]
    )


def refused(call: Any) -> int:
    """The SSH2_FX_* code a request was refused with (the test fails if it was accepted)."""
    try:
        call()
    except SftpError as e:
        return e.code
    pytest.fail("the request was accepted")


def test_sftp_refuses_links_and_chmod(
    ssh_key: Path, images: dict[str, Image], container: Container, installed: Installed
) -> None:
    """Findings 1 and 9: no symlink (nginx or a mirror would follow it), no hard link, no
    chmod (`chmod 4755` left a setuid-lxdadm executable), with OpenSSH's own client too."""
    version = f"/images/{images['sftp'].relpath}"
    meta = f"{version}/lxd.tar.xz"
    with raw_sftp(ssh_key) as s:
        assert refused(lambda: s.symlink("/etc/shadow", f"{version}/evil")) == FX_PERMISSION_DENIED
        assert refused(lambda: s.symlink("/etc", "/images/etc")) == FX_PERMISSION_DENIED
        assert refused(lambda: s.hardlink(meta, f"{version}/hard")) == FX_PERMISSION_DENIED
        assert refused(lambda: s.setstat(meta, 0o104755)) == FX_PERMISSION_DENIED
    batch = [
        f"-symlink /etc/passwd {version}/evil2",
        f"-ln {meta} {version}/hard2",
        f"-chmod 4755 {meta}",
        f"-chmod 2775 {version}",
    ]
    proc = run(
        ["sftp", *ssh_options(ssh_key), "-P", str(SSH_PORT), "-b", "-", "lxdadm@127.0.0.1"],
        input="\n".join(batch) + "\n",
        timeout=120,
        check=False,
    )
    # symlink and the two chmods refused; ln: internal-sftp no longer offers hard links at all
    assert proc.stderr.count("Permission denied") == 3, proc
    assert "does not support hardlink@openssh.com" in proc.stderr, proc
    here = f"{ROOT}{version}"
    for name in ("evil", "evil2", "hard", "hard2"):
        assert container.run(f"test -e {here}/{name} -o -L {here}/{name}", check=False).returncode
    assert container.run(f"test -L {ROOT}/images/etc", check=False).returncode != 0
    assert container.run(f"stat -c '%h %a' {ROOT}{meta}").stdout.split() == ["1", "644"]
    assert_uploaded(container, images["sftp"])


def test_sftp_leaves_no_setuid_file(ssh_key: Path, container: Container) -> None:
    """Finding 9: a client may send any mode with OPEN (04755, 06775); internal-sftp passes it to
    open(2), the umask does not clear special bits, but the kernel clears setuid and setgid at
    the first write by a writer without CAP_FSETID, and no chmod is accepted afterwards. So no
    file with content keeps a setuid or setgid bit (an empty one may: it runs nothing)."""
    payload = b"#!/bin/sh\nid\n"
    with raw_sftp(ssh_key) as s:
        s.mkdir("/images/attack", 0o7777)
        s.put("/images/attack/suid", payload, 0o4755)
        s.put("/images/attack/sgid", payload, 0o6775)
        s.put("/images/attack/empty", b"", 0o4755)
        s.put("/images/attack/late", b"", 0o4755)
        handle = s.open("/images/attack/late", 0x02)  # WRITE, no CREAT: fill it afterwards
        s.write(handle, 0, payload)
        s.close(handle)
    attack = f"{ROOT}/images/attack"
    try:
        listing = container.run(f"stat -c '%n %s %A' {attack}/*").stdout
        special = container.run(f"find {attack} -type f -perm /6000 -size +0c").stdout
        assert special == "", f"a setuid/setgid file with content:\n{listing}"
        assert container.path(f"{attack}/suid").read_bytes() == payload
        # no way to run anything as lxdadm through it
        assert container.run(f"find {ROOT}/images -type f -perm /6000 -size +0c").stdout == ""
    finally:
        container.run(f"rm -rf {attack}")


def test_uploader_cannot_write_streams_lock_or_state(
    ssh_key: Path, server_cert: Path, container: Container, installed: Installed
) -> None:
    """Finding 3: the catalog, its lock, its page and the state are the writer's; neither sftp
    nor anything else running as lxdadm (the HTTPS upload app) can change them."""
    with raw_sftp(ssh_key) as s:
        html = b"<script>alert(1)</script>"
        for path in ("/streams/x.html", "/streams/v1/images.json", "/streams/v1/x.json"):
            assert refused(lambda p=path: s.put(p, html)) == FX_PERMISSION_DENIED, path
        assert refused(lambda: s.mkdir("/streams/v2")) == FX_PERMISSION_DENIED
        assert refused(lambda: s.rename("/streams/v1", "/streams/old")) == FX_PERMISSION_DENIED
        # the lock (in streams/v1 or the state): never replaced by a directory
        lock = "/streams/v1/.lxd-image-server.lock"
        assert refused(lambda: s.mkdir(lock)) in (FX_PERMISSION_DENIED, 4)
    assert container.run(f"test -d {ROOT}{lock}", check=False).returncode != 0
    assert (
        curl(
            "--cacert",
            str(server_cert),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"{URL}/streams/x.html",
        ).stdout
        == "404"
    )
    # as lxdadm outside the jail too (the upload app's identity): no write anywhere of the writer
    for path in (
        f"{ROOT}/streams/x.html",
        f"{ROOT}/streams/v1/images.json",
        f"{ROOT}/streams/v1/.lxd-image-server.lock",
        f"{STATE}/hashes.sqlite3",
        f"{STATE}/new-file",
    ):
        attempt = container.run(f"runuser -u {UPLOADER} -- sh -c ': >> {path}'", check=False)
        assert attempt.returncode != 0, path
    assert (
        container.run(
            f"runuser -u {UPLOADER} -- mv {ROOT}/streams/v1 {ROOT}/streams/old", check=False
        ).returncode
        != 0
    )
    assert not container.path(f"{ROOT}/streams/x.html").exists()


def test_a_symlink_in_images_is_not_served(
    server_cert: Path, images: dict[str, Image], container: Container
) -> None:
    """Finding 1: links root plants under images/ (standing in for any way one may get there)
    answer 403 or 404, never the target's bytes."""
    version = f"{ROOT}/images/{images['https'].relpath}"
    container.run(
        f"ln -s /etc/lxd-image-server/htpasswd {version}/rootfs-link.squashfs && "
        f"ln -s /etc {ROOT}/images/etc-link && ln -s {version} {ROOT}/images/version-link"
    )
    try:
        for path in (
            f"images/{images['https'].relpath}/rootfs-link.squashfs",
            "images/etc-link/passwd",
            f"images/version-link/{images['https'].root.name}",
        ):
            proc = curl("--cacert", str(server_cert), "-w", "\n%{http_code}", f"{URL}/{path}")
            code = proc.stdout.rsplit("\n", 1)[-1]
            assert code in ("403", "404"), (path, proc.stdout[-500:])
            assert "upload:" not in proc.stdout and "root:" not in proc.stdout, path
        # the real file next to the link is still served
        real = f"images/{images['https'].relpath}/{images['https'].root.name}"
        ok = curl(
            "--cacert", str(server_cert), "-o", "/dev/null", "-w", "%{http_code}", f"{URL}/{real}"
        )
        assert ok.stdout == "200", ok
    finally:
        container.run(
            f"rm -f {version}/rootfs-link.squashfs {ROOT}/images/etc-link "
            f"{ROOT}/images/version-link"
        )


# -- the other units ---------------------------------------------------------------------------


def unit_property(container: Container, unit: str, prop: str) -> str:
    return container.run(f"systemctl show -P {prop} {unit}").stdout.strip()


def run_update_by_trigger(container: Container) -> str:
    """Touches the .rebuild trigger, waits for the update unit's new run to end, checks that
    it succeeded and removed the trigger; returns that run's log."""
    unit = "lxd-image-server-update.service"
    before = unit_property(container, unit, "InvocationID")
    container.run(f"touch {ROOT}/.rebuild")
    wait_for(
        "the update unit ran after `touch .rebuild`",
        lambda: (
            unit_property(container, unit, "InvocationID") != before
            and unit_property(container, unit, "ActiveState") in ("inactive", "failed")
        ),
    )
    invocation = unit_property(container, unit, "InvocationID")
    log = container.run(f"journalctl -b -o cat _SYSTEMD_INVOCATION_ID={invocation}").stdout
    assert unit_property(container, unit, "Result") == "success", log
    assert not container.path(f"{ROOT}/.rebuild").exists(), "the trigger was not removed"
    return log


def test_rebuild_trigger_runs_a_full_update(installed: Installed, container: Container) -> None:
    log = run_update_by_trigger(container)
    assert re.search(r"catalog unchanged|published", log), log


def test_config_change_reloads_the_watcher(installed: Installed, container: Container) -> None:
    def reloads() -> int:
        log = container.run("journalctl -b -o cat -u lxd-image-server.service").stdout
        return log.count("reloading: rescanning everything")

    pid = unit_property(container, "lxd-image-server.service", "MainPID")
    before = reloads()
    container.run("echo '# written by the system test' > /etc/lxd-image-server/config.toml")
    wait_for("the watcher reloads after config.toml changed", lambda: reloads() > before)
    before = reloads()
    container.run("echo '# system test' > /etc/lxd-image-server/conf.d/system-test.toml")
    wait_for("the watcher reloads after a conf.d change", lambda: reloads() > before)
    assert unit_property(container, "lxd-image-server.service", "MainPID") == pid, "restarted"
    container.run("rm -f /etc/lxd-image-server/config.toml /etc/lxd-image-server/conf.d/*.toml")


def test_a_burst_of_config_edits_still_reloads_the_watcher(
    installed: Installed, container: Container
) -> None:
    """Fifteen edits in a few seconds (an admin's editor, a configuration tool): the reload
    service's start limit (5 in 10 s by default) made the path unit fail, and no later change
    reloaded the watcher."""

    def reloads() -> int:
        log = container.run("journalctl -b -o cat -u lxd-image-server.service").stdout
        return log.count("reloading: rescanning everything")

    burst = "/etc/lxd-image-server/conf.d/system-test-burst.toml"
    try:
        for i in range(15):
            container.run(f"echo '# burst {i}' > {burst}")
            time.sleep(0.2)
        time.sleep(2)
        before = reloads()
        container.run(f"echo '# after the burst' > {burst}")
        wait_for("the watcher reloads after the burst", lambda: reloads() > before)
        state = container.run("systemctl is-active lxd-image-server-config.path", check=False)
        assert state.stdout.strip() == "active", state.stdout
    finally:
        container.run(f"rm -f {burst}")


MIRROR_CONFIG = f"""\
[mirrors.self]
remote = "127.0.0.1"
port = {SSH_PORT}
user = "lxdmirror"
key_path = "/etc/lxd-image-server/mirror.key"
path = "/srv/mirror"
"""


def test_sandboxed_units_push_to_a_mirror(
    installed: Installed, images: dict[str, Image], container: Container
) -> None:
    """The watcher and the update unit reach a mirror over ssh from inside their sandbox.

    The mirror is another tree on the same machine, reached through sshd like a remote one."""
    container.run(
        "set -e; install -d /srv/mirror; "
        "ssh-keygen -q -t ed25519 -N '' -C mirror -f /etc/lxd-image-server/mirror.key; "
        f"chown {WRITER}:{WRITER} /etc/lxd-image-server/mirror.key; "
        "lxd-image-server mirror authorize /etc/lxd-image-server/mirror.key.pub --root /srv/mirror"
    )
    master = sha256_in_container(container, f"{ROOT}/streams/v1/images.json")
    # config.toml changes -> the watcher reloads and pushes
    container.run("cat > /etc/lxd-image-server/config.toml", input=MIRROR_CONFIG)
    wait_for(
        "the watcher pushed the catalog to the mirror",
        lambda: (
            container.path("/srv/mirror/streams/v1/images.json").is_file()
            and sha256_in_container(container, "/srv/mirror/streams/v1/images.json") == master
        ),
    )
    for image in images.values():
        for local in (image.meta, image.root):
            path = f"/srv/mirror/images/{image.relpath}/{local.name}"
            assert sha256_in_container(container, path) == sha256_file(local), path
    # the catalog page travels with the catalog, in streams/; nothing lands in the root
    page = sha256_in_container(container, f"{ROOT}/streams/index.html")
    assert sha256_in_container(container, "/srv/mirror/streams/index.html") == page
    assert not container.path("/srv/mirror/index.html").exists()
    # `update` (timer, .rebuild) pushes after every run too
    log = run_update_by_trigger(container)
    assert "mirror self: pushed" in log, log
    container.run("rm -f /etc/lxd-image-server/config.toml")


UPSTREAM_SERVER = """\
import functools, http.server, ssl, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="/srv/upstream")
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/etc/nginx/ssl/nginx.crt", "/etc/nginx/ssl/nginx.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def test_sandboxed_sync_unit(
    server_cert: Path,
    installed: Installed,
    images: dict[str, Image],
    container: Container,
    tmp_path: Path,
) -> None:
    """[sync.NAME] configured: the package's sync unit (sandboxed, as the catalog writer) brings
    an upstream's image into images/ and publishes it with upstream's fingerprint; the next run
    finds it not due."""
    img = images["https"]
    rel = f"images/synced/1.0/amd64/default/{img.serial}"
    upstream = container.path(f"/srv/upstream/{rel}")
    upstream.mkdir(parents=True)
    # metadata of its own: the same image twice in one catalog would make LXD's lookups of
    # the uploaded one ambiguous ("More than one match")
    meta = write_metadata_tarball(tmp_path / "meta", upstream / "lxd.tar.xz", "synced")
    shutil.copyfile(img.root, upstream / "rootfs.squashfs")
    fingerprint = sha256_file(meta, upstream / "rootfs.squashfs")
    container.run(
        "lxd-image-server --state-dir /srv/upstream-state update --root-dir /srv/upstream"
    )
    container.path("/srv/upstream-server.py").write_text(UPSTREAM_SERVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    container.run(f"systemd-run --unit=sync-upstream python3 /srv/upstream-server.py {port}")
    conf = "/etc/lxd-image-server/conf.d/sync-test.toml"
    try:
        # (from the host: the container shares its network, and has no curl)
        url = f"https://127.0.0.1:{port}/streams/v1/index.json"
        wait_for(
            "the upstream answers",
            lambda: (
                curl("--cacert", str(server_cert), "--fail", "-o", "/dev/null", url).returncode == 0
            ),
        )
        container.run(
            f"cat > {conf}",
            input=f'[sync.up]\nurl = "https://127.0.0.1:{port}"\nfilters = ["os=synced"]\n'
            'ca = "/etc/nginx/ssl/nginx.crt"\ninterval = "1h"\n',
        )
        unit = "lxd-image-server-sync.service"
        container.run(f"systemctl start {unit}", timeout=300, check=False)
        invocation = unit_property(container, unit, "InvocationID")
        log = container.run(f"journalctl -b -o cat _SYSTEMD_INVOCATION_ID={invocation}").stdout
        assert unit_property(container, unit, "Result") == "success", log
        assert "synced synced:1.0:amd64:default" in log, log
        # the packaged watcher took the publish (sync's sandbox reaches its socket)
        assert "published by the running watcher" in log, log
        version = f"{ROOT}/{rel}"
        # the writer's (who deletes it when it is pruned), not writable by the uploaders
        owner, mode = stat_in_container(container, version).split()
        assert owner.startswith(f"{WRITER}:") and mode in ("755", "2755"), (owner, mode)
        owner, mode = stat_in_container(container, f"{version}/rootfs.squashfs").split()
        assert owner.startswith(f"{WRITER}:") and mode == "644", (owner, mode)
        wait_for(
            "the synced image is published",
            lambda: fingerprint in published_fingerprints(catalog(server_cert)),
        )
        # the timer's next run: not due for an hour
        container.run(f"systemctl start {unit}", timeout=300)
        invocation = unit_property(container, unit, "InvocationID")
        log = container.run(f"journalctl -b -o cat _SYSTEMD_INVOCATION_ID={invocation}").stdout
        assert "no configured sync is due" in log, log
    finally:
        container.run(f"rm -f {conf}; systemctl stop sync-upstream", check=False)


# -- the real LXD daemon on the host ----------------------------------------------------------


@pytest.fixture(scope="module")
def host_lxd(server_cert: Path) -> Iterator[None]:
    """The host's LXD daemon trusts the server's certificate: it is in the host's CA store and
    the daemon was restarted to read it (once for the module); undone at the end."""
    if not lxd_is_up():
        pytest.fail("the LXD daemon does not answer `lxc info`: run `bash tests/host-setup.sh`")
    shutil.copyfile(server_cert, HOST_CA)
    HOST_CA.chmod(0o644)
    try:
        run(["update-ca-certificates"], timeout=120)
        # the daemon caches a remote's catalog per URL (on disk and in memory) and reads the
        # CA store once: forget the catalogs of this server's URLs and restart it
        for url in (URL, DELTA_URL):
            forget_lxd_catalog(url)
        restart_lxd()
        yield
    finally:
        HOST_CA.unlink(missing_ok=True)
        run(["update-ca-certificates"], timeout=120)


def forget_lxd_catalog(url: str) -> None:
    """Drops the LXD daemon's cached catalog of `url` (it would keep it for an hour)."""
    shutil.rmtree(LXD_CACHE / hashlib.sha256(url.encode()).hexdigest(), ignore_errors=True)


@pytest.mark.lxd
def test_lxd_launches_the_uploaded_images(
    server_cert: Path, images: dict[str, Image], installed: Installed, host_lxd: None
) -> None:
    wait_for(
        "images.json lists the uploads",
        lambda: (
            {i.fingerprint for i in images.values()} <= published_fingerprints(catalog(server_cert))
        ),
    )
    label = secrets.token_hex(3)
    remote = f"sys{label}"
    instances = []
    try:
        lxc("remote", "add", remote, URL, "--protocol", "simplestreams")
        listed = {img["fingerprint"] for img in lxc_json("image", "list", f"{remote}:")}
        assert {i.fingerprint for i in images.values()} <= listed, listed
        for image in images.values():
            name = f"lis-sys-{label}-{image.variant}"
            instances.append(name)
            lxc("launch", f"{remote}:{image.alias}", name, timeout=300)
            assert lxc("config", "get", name, "volatile.base_image").strip() == image.fingerprint
            assert lxc("exec", name, "--", "/bin/busybox", "echo", "ok", timeout=60) == "ok\n"
    finally:
        for name in instances:
            delete_instance(name)
        delete_images({i.fingerprint for i in images.values()})
        if remote in lxc_json("remote", "list"):
            lxc("remote", "remove", remote)


# -- every shipped feature through the package's units (issue 18) ------------------------------
# Each test has a product of its own, so none changes what another looks at.

#: the URL the delta test's remote uses: another spelling of the server than URL, so neither
#: the LXD client nor the daemon has a catalog of it cached from the tests above
DELTA_URL = f"https://localhost:{HTTPS_PORT}"
#: incompressible bytes in the delta test's root, over [deltas] min_size (1 MiB): the watcher
#: makes a delta of it
DELTA_PAD = 3 << 20
#: seconds for the watcher to make, check and list a delta of a few MiB
DELTA_DEADLINE = 180.0
ACCESS_LOG = "/var/log/nginx/access.log"
#: a request in nginx's combined log format: method, path, status
_REQUEST_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


def serial_ago(**delta: float) -> str:
    """A version key that long before now (UTC, the seeds' format)."""
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(**delta)
    return when.strftime("%Y%m%d_%H:%M")


def journal(container: Container, unit: str) -> str:
    return container.run(f"journalctl -b -o cat --no-pager -u {unit} | tail -n 60").stdout


def https_upload(installed: Installed, server_cert: Path, image: Image) -> None:
    """Both files of `image`, as the seeds upload: curl -F to the upload app."""
    for local in (image.meta, image.root):
        proc = curl(
            "--cacert",
            str(server_cert),
            "-u",
            f"{installed.user}:{installed.password}",
            "-F",
            f"upload=@{local};filename={image.relpath}/{local.name}",
            "-w",
            "\n%{http_code}",
            f"{URL}/images/",
        )
        assert proc.returncode == 0 and proc.stdout.endswith("\n201"), proc


def listed_versions(server_cert: Path, variant: str) -> set[str]:
    product = catalog(server_cert)["products"].get(f"busybox:1.35:amd64:{variant}", {})
    return set(product.get("versions", {}))


@pytest.fixture(scope="module")
def delta_images(tmp_path_factory: Any) -> tuple[Image, Image]:
    """Two versions of one product; the second's root is the first's plus a small file."""
    work = Path(tmp_path_factory.mktemp("delta"))
    rootfs = build_rootfs(work / "rootfs")
    (rootfs / "opt").mkdir()
    (rootfs / "opt" / "pad.bin").write_bytes(random.Random(18).randbytes(DELTA_PAD))
    made = []
    for n, serial in ((1, serial_ago(days=2)), (2, serial_ago(days=1))):
        d = work / "upload" / PREFIX / "delta" / serial
        d.mkdir(parents=True)
        (rootfs / "etc" / "lis-version").write_text(f"{n}\n")
        meta = write_metadata_tarball(work / f"meta-{n}", d / "lxd.tar.xz", f"delta test {n}")
        made.append(Image("delta", serial, meta, make_squashfs(rootfs, d / "rootfs.squashfs")))
    return made[0], made[1]


def listed_delta(server_cert: Path, image: Image) -> dict[str, Any] | None:
    """The squashfs.vcdiff item of `image`'s version in the served catalog, if any."""
    product = catalog(server_cert)["products"].get(f"busybox:1.35:amd64:{image.variant}", {})
    items = product.get("versions", {}).get(image.serial, {}).get("items", {})
    found = [i for i in items.values() if i["ftype"] == "squashfs.vcdiff"]
    return found[0] if found else None


def image_requests(container: Container, since: int) -> list[tuple[str, int]]:
    """(path, status) of every GET of an image file in nginx's access log after byte `since`."""
    text = container.path(ACCESS_LOG).read_bytes()[since:].decode("utf-8", "replace")
    return [
        (m["path"], int(m["status"]))
        for m in _REQUEST_RE.finditer(text)
        if m["method"] == "GET" and m["path"].startswith("/images/")
    ]


@pytest.mark.lxd
def test_lxd_refreshes_by_the_delta_the_packaged_watcher_made(
    installed: Installed,
    server_cert: Path,
    delta_images: tuple[Image, Image],
    container: Container,
    host_lxd: None,
) -> None:
    """Issue 18, finding 1: the watcher makes deltas inside its sandbox (xdelta3 at the lowest
    priority the unit allows), and the host's LXD refreshing an --auto-update image downloads
    the delta from the package's nginx, not the new root."""
    v1, v2 = delta_images
    https_upload(installed, server_cert, v1)
    wait_for(
        "images.json lists version 1", lambda: v1.serial in listed_versions(server_cert, "delta")
    )
    remote = f"sysd{secrets.token_hex(3)}"
    try:
        lxc("remote", "add", remote, DELTA_URL, "--protocol", "simplestreams")
        lxc("image", "copy", f"{remote}:{v1.alias}", "local:", "--auto-update", timeout=300)
        assert v1.fingerprint in local_images()

        https_upload(installed, server_cert, v2)
        end = time.monotonic() + DELTA_DEADLINE
        while (delta := listed_delta(server_cert, v2)) is None:
            if time.monotonic() > end:
                pytest.fail(
                    f"no delta listed for version 2 after {DELTA_DEADLINE:.0f} s; the watcher "
                    f"said:\n{journal(container, 'lxd-image-server.service')}"
                )
            time.sleep(1)
        assert delta["delta_base"] == v1.serial, delta
        delta_path = f"/images/{v2.relpath}/rootfs.{v1.serial.replace(':', '')}.vcdiff"
        assert f"/{delta['path']}" == delta_path, delta
        assert delta["size"] < v2.root.stat().st_size // 4, delta

        forget_lxd_catalog(DELTA_URL)
        since = container.path(ACCESS_LOG).stat().st_size
        out = lxc("image", "refresh", v1.fingerprint, timeout=300)
        fetched = image_requests(container, since)
        assert v2.fingerprint in local_images(), f"{out}\n{fetched}"
        assert (delta_path, 200) in fetched, fetched
        full_root = f"/images/{v2.relpath}/rootfs.squashfs"
        assert not [p for p, _ in fetched if p == full_root], fetched
        print(f"the refresh fetched {fetched}")
    finally:
        delete_images({v1.fingerprint, v2.fingerprint})
        if remote in lxc_json("remote", "list"):
            lxc("remote", "remove", remote)


def test_catalog_units_bound_memory_for_deltas(installed: Installed, container: Container) -> None:
    """Issue 18, finding 2: the units that run xdelta3 bound their memory (its window is sized
    to fit) and go on when the OOM killer takes xdelta3."""
    for unit in ("lxd-image-server.service", "lxd-image-server-update.service"):
        assert unit_property(container, unit, "MemoryHigh") == str(1536 << 20), unit
        assert unit_property(container, unit, "MemoryMax") == str(2 << 30), unit
        assert unit_property(container, unit, "OOMPolicy") == "continue", unit


def add_version_as_uploader(container: Container, variant: str, serial: str) -> None:
    """A small version placed as sftp would (as lxdadm, under hidden names, then renamed)."""
    d = f"{ROOT}/images/{PREFIX}/{variant}/{serial}"
    container.run(
        f"runuser -u {UPLOADER} -- sh -c 'set -e; mkdir -p {d}; "
        f"head -c 4096 /dev/urandom > {d}/.m; head -c 65536 /dev/urandom > {d}/.r; "
        f"mv {d}/.m {d}/lxd.tar.xz; mv {d}/.r {d}/rootfs.squashfs'"
    )


RETENTION_CONFIG = "/etc/lxd-image-server/conf.d/system-test-retention.toml"
#: the retention test's versions, oldest first (the last one added with the watcher stopped)
KEPT_SERIALS = tuple(serial_ago(days=d) for d in (9, 8, 7, 6))


def test_retention_applied_by_the_packaged_watcher(
    installed: Installed, server_cert: Path, container: Container
) -> None:
    """[retention] keep = 2: the watcher leaves the oldest of three versions out."""
    for serial in KEPT_SERIALS[:3]:
        add_version_as_uploader(container, "kept", serial)
    container.run(f"cat > {RETENTION_CONFIG}", input="[retention]\nkeep = 2\n")
    expected = set(KEPT_SERIALS[1:3])
    try:
        wait_for(
            "the watcher applied keep = 2",
            lambda: listed_versions(server_cert, "kept") == expected,
        )
    except pytest.fail.Exception:
        said = journal(container, "lxd-image-server.service")
        pytest.fail(f"the watcher did not apply keep = 2; its journal:\n{said[-4000:]}")
    said = journal(container, "lxd-image-server.service")
    assert f"retention: busybox:1.35:amd64:kept {KEPT_SERIALS[0]} leaves the catalog" in said


def test_update_service_publishes_and_applies_retention(
    installed: Installed, server_cert: Path, container: Container
) -> None:
    """The timer's service (`update`) publishes a version the watcher did not see (it is
    stopped) and applies [retention] itself."""
    unit = "lxd-image-server-update.service"
    container.run("systemctl stop lxd-image-server.service")
    try:
        add_version_as_uploader(container, "kept", KEPT_SERIALS[3])
        assert listed_versions(server_cert, "kept") == set(KEPT_SERIALS[1:3])
        container.run(f"systemctl start {unit}", timeout=300)
        assert unit_property(container, unit, "Result") == "success", journal(container, unit)
        assert listed_versions(server_cert, "kept") == set(KEPT_SERIALS[2:])
        said = journal(container, unit)
        assert f"retention: busybox:1.35:amd64:kept {KEPT_SERIALS[1]} leaves" in said, said
    finally:
        container.run(f"rm -f {RETENTION_CONFIG}; systemctl start lxd-image-server.service")


def test_prune_as_root_is_published_by_the_packaged_watcher(
    installed: Installed, server_cert: Path, container: Container
) -> None:
    """`prune` run as root (as an admin would), the packaged watcher running: it becomes the
    writer, chooses from the record of what the watcher published, and hands the versions to
    the watcher's socket (its unit's user, its sandbox), which publishes without them; only
    the one product with more versions than --keep loses its oldest."""
    before = {k: set(p["versions"]) for k, p in catalog(server_cert)["products"].items()}
    keep = max((len(v) for v in before.values()), default=1)
    serials = [serial_ago(days=40 + keep - n) for n in range(keep + 1)]  # oldest first
    for serial in serials:
        add_version_as_uploader(container, "pruned", serial)
    wait_for(
        "the versions to prune are listed",
        lambda: listed_versions(server_cert, "pruned") == set(serials),
    )
    proc = container.run(
        f"lxd-image-server --verbose prune --keep {keep} --root-dir {ROOT}", timeout=300
    )
    assert "published by the running watcher" in proc.stdout, proc
    assert f"removed busybox:1.35:amd64:pruned {serials[0]} from the catalog" in proc.stdout, proc
    # chosen from the record, published by the watcher: the command built no catalog
    assert "whole tree" not in proc.stderr and "catalog.publish" not in proc.stderr, proc
    after = {k: set(p["versions"]) for k, p in catalog(server_cert)["products"].items()}
    assert after.pop(f"{PREFIX.replace('/', ':')}:pruned") == set(serials[1:])
    assert after == before
    said = journal(container, "lxd-image-server.service")
    assert f"{PREFIX}/pruned/{serials[0]}" in said, said[-4000:]


def free_host_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_init_http_listen_serves_image_files(
    installed: Installed, images: dict[str, Image], container: Container, tmp_path: Path
) -> None:
    """`init --http-listen` on the installed package: image files over plain HTTP, nothing
    else; `init` without it takes the listener away again."""
    port = free_host_port()
    init = f"lxd-image-server init --root-dir {ROOT} --password-file {PASSWORD_FILE}"
    container.run(f"{init} --http-listen 127.0.0.1:{port}")
    image = images["https"]
    base = f"http://127.0.0.1:{port}"
    got = tmp_path / "root"
    fetch = ["curl", "-sS", "--fail", "--max-time", "60", "-o", str(got),
             f"{base}/images/{image.relpath}/{image.root.name}"]  # fmt: skip
    try:
        # nginx's reload (init's last step) opens the listener a moment after init returns
        wait_for("the plain-HTTP listener serves", lambda: run(fetch, check=False).returncode == 0)
        assert sha256_file(got) == sha256_file(image.root)
        for path, method, status in (
            ("/streams/v1/images.json", "GET", "404"),
            ("/", "GET", "404"),
            (f"/images/{image.relpath}/lxd.tar.xz", "POST", "405"),
        ):
            proc = run(
                ["curl", "-sS", "--max-time", "60", "-X", method, "-o", "/dev/null",
                 "-w", "%{http_code}", f"{base}{path}"],
                check=False,
            )  # fmt: skip
            assert proc.stdout == status, (path, method, proc)
    finally:
        container.run(init)
    wait_for(
        "the listener is gone after init without --http-listen",
        lambda: run(["curl", "-sS", "--max-time", "10", f"{base}/"], check=False).returncode != 0,
    )


def test_import_as_root_leaves_files_the_writer_and_nginx_use(
    installed: Installed,
    server_cert: Path,
    images: dict[str, Image],
    container: Container,
    tmp_path: Path,
) -> None:
    """`import` run as root (as an admin would): the version is listed (published by the
    running watcher at import's request), its files download over HTTPS, the writer may
    delete them (retention, prune) and nothing the writer owns became root's."""
    meta = write_metadata_tarball(tmp_path / "meta", tmp_path / "lxd.tar.xz", "imported")
    root = images["https"].root
    container.run("install -d -m 0700 /root/import")
    shutil.copyfile(meta, container.path("/root/import/lxd.tar.xz"))
    shutil.copyfile(root, container.path("/root/import/rootfs.squashfs"))
    serial = serial_ago(days=3)
    proc = container.run(
        f"lxd-image-server import /root/import/lxd.tar.xz /root/import/rootfs.squashfs "
        f"--root-dir {ROOT} --variant imported --serial '{serial}'",
        timeout=300,
    )
    assert "published" in proc.stdout, proc
    # the packaged watcher (its unit, its user, its sandbox) took the publish over its socket
    assert "by the running watcher" in proc.stdout, proc
    image = Image("imported", serial, meta, root)
    wait_for("the import is listed", lambda: serial in listed_versions(server_cert, "imported"))
    for local in (meta, root):
        got = tmp_path / f"got-{local.name}"
        url = f"{URL}/images/{image.relpath}/{local.name}"
        proc = curl("--cacert", str(server_cert), "--fail", "-o", str(got), url)
        assert proc.returncode == 0, proc
        assert sha256_file(got) == sha256_file(local), url
    version = f"{ROOT}/images/{image.relpath}"
    # like an upload: group lxdadm, the directories group-writable (the writer deletes what
    # retention and prune let go), the files readable by nginx
    for path in (f"{ROOT}/images/{PREFIX}/imported", version):
        owner, mode = stat_in_container(container, path).split()
        assert owner.endswith(f":{UPLOADER}") and mode == "2775", (path, owner, mode)
    for name in ("lxd.tar.xz", "rootfs.squashfs"):
        owner, mode = stat_in_container(container, f"{version}/{name}").split()
        assert owner.endswith(f":{UPLOADER}") and mode == "644", (name, owner, mode)
    others = container.run(
        f"find {ROOT}/streams {STATE} -path {DIGESTS} -prune -o ! -user {WRITER} -printf '%u %p\\n'"
    ).stdout
    assert others == "", f"root's after the import:\n{others}"
    # the writer may delete the version, as retention and prune would
    container.run(f"runuser -u {WRITER} -- rm -r {version}")


# -- upgrade, remove, purge ----------------------------------------------------------------


ADMIN_STATE = (
    "/etc/nginx/ssl/nginx.crt",
    "/etc/nginx/ssl/nginx.key",
    "/etc/lxd-image-server/htpasswd",
    "/etc/nginx/sites-available/lxd-image-server",
    "/etc/default/lxd-image-server",
)


def test_upgrade_keeps_config_certificate_credentials_and_images(
    installed: Installed, images: dict[str, Image], container: Container
) -> None:
    # the admin's changes: a site edit and a conffile edit
    container.run(
        "echo '# edited by the admin' >> /etc/nginx/sites-available/lxd-image-server && "
        "echo 'UPLOAD_MAX_SIZE=0' >> /etc/default/lxd-image-server"
    )
    before = {p: sha256_in_container(container, p) for p in ADMIN_STATE}
    # the same package with a higher version: every maintainer script runs as in an upgrade
    container.run(
        "set -e; rm -rf /tmp/upgrade; "
        f"dpkg-deb -R {DIST_IN_CONTAINER}/apt/lxd-image-server_*_all.deb /tmp/upgrade; "
        "sed -i 's/^Version: .*/&+systemtest1/' /tmp/upgrade/DEBIAN/control; "
        "dpkg-deb -b /tmp/upgrade /tmp/lxd-image-server-upgrade.deb >/dev/null; "
        "apt-get install -y -q /tmp/lxd-image-server-upgrade.deb",
        timeout=300,
    )
    version = container.run("dpkg-query -W -f '${Version}' lxd-image-server").stdout
    assert version.endswith("+systemtest1"), version
    after = {p: sha256_in_container(container, p) for p in ADMIN_STATE}
    assert after == before
    for image in images.values():
        assert_uploaded(container, image)
    states = container.run(f"systemctl is-active {' '.join(RUNNING_UNITS)}", check=False).stdout
    assert states.split() == ["active"] * len(RUNNING_UNITS), states


def test_remove_stops_the_units(installed: Installed, container: Container) -> None:
    container.run("apt-get remove -y -q lxd-image-server", timeout=300)
    states = container.run(f"systemctl is-active {' '.join(OUR_UNITS)}", check=False).stdout
    # "failed" is a unit that stopped with an error earlier: not running either
    running = {
        unit: state
        for unit, state in zip(OUR_UNITS, states.split(), strict=True)
        if state not in ("inactive", "failed")
    }
    assert not running, running
    assert container.run("systemctl is-active nginx ssh").stdout.split() == ["active"] * 2
    # configuration stays until purge
    assert container.path("/etc/lxd-image-server/htpasswd").exists()


def test_purge_removes_configuration_and_keeps_images(
    installed: Installed, images: dict[str, Image], container: Container
) -> None:
    proc = container.run("apt-get purge -y -q lxd-image-server", timeout=300)
    left = [
        p for p in PURGED if container.run(f"test -e {p} -o -L {p}", check=False).returncode == 0
    ]
    assert not left, f"purge left {left}:\n{proc.stdout[-2000:]}"
    for image in images.values():
        for local in (image.meta, image.root):
            path = f"{ROOT}/images/{image.relpath}/{local.name}"
            assert sha256_in_container(container, path) == sha256_file(local), path
    assert container.run("nginx -t", check=False).returncode == 0
    assert container.run("sshd -t", check=False).returncode == 0
    assert container.run("systemctl is-active nginx ssh").stdout.split() == ["active"] * 2
    assert container.path("/etc/nginx/sites-enabled/default").exists()


# -- upgrade from the previous release ---------------------------------------------------------
# 0.1.0 (tests/system/fixtures/): lxdadm uploaded AND wrote the catalog. Installed on the purged
# machine (the images are still there), attacked the way its uploader could, then upgraded.

VICTIM = "/srv/victim"


def test_upgrade_from_the_previous_release(
    images: dict[str, Image], ssh_key: Path, container: Container, tmp_path: Path
) -> None:
    """Findings 3 and 4, and the acceptance's upgrade: ownership moves to the writer without
    following the link an uploader planted at streams/v1; what the uploader left in streams/
    is gone; images, credentials and certificate are kept."""
    container.run(
        f"deluser --quiet --system {WRITER} >/dev/null 2>&1 || true; "
        f"delgroup --quiet --system {WRITER} >/dev/null 2>&1 || true"
    )
    assert container.run(f"getent passwd {WRITER}", check=False).returncode != 0
    shutil.copyfile(PREVIOUS_DEB, container.path(f"/root/{PREVIOUS_DEB.name}"))
    proc = container.run(
        f"apt-get install -y -q --allow-downgrades /root/{PREVIOUS_DEB.name}", timeout=300
    )
    m = re.search(r"Upload user '(\S+)', password (\S+)", proc.stdout)
    assert m, proc.stdout[-3000:]
    login = f"{m[1]}:{m[2]}"
    assert stat_in_container(container, f"{ROOT}/streams/v1").startswith("lxdadm:lxdadm ")
    assert unit_property(container, "lxd-image-server.service", "User") == UPLOADER

    # what 0.1.0's uploader could do: a page in streams/, streams/v1 a link to a root-owned
    # directory (0.1.0's postinst gave its target to lxdadm at the next upgrade), a setuid file
    container.run(f"install -d -m 0755 {VICTIM} && echo root > {VICTIM}/file")
    page = tmp_path / "x.html"
    page.write_text("<script>alert(document.cookie)</script>\n")
    sftp_image = images["sftp"]
    batch = [
        f"put {page} /streams/x.html",
        "rename /streams/v1 /streams/v1.old",
        f"symlink {VICTIM} /streams/v1",
        f"chmod 4755 /images/{sftp_image.relpath}/lxd.tar.xz",
    ]
    attack = run(
        ["sftp", *ssh_options(ssh_key), "-P", str(SSH_PORT), "-b", "-", "lxdadm@127.0.0.1"],
        input="\n".join(batch) + "\n",
        timeout=120,
        check=False,
    )
    assert attack.returncode == 0, attack
    assert container.path(f"{ROOT}/streams/v1").is_symlink()
    mode = stat_in_container(container, f"{ROOT}/images/{sftp_image.relpath}/lxd.tar.xz")
    assert mode == "lxdadm:lxdadm 4755", mode
    before = {p: sha256_in_container(container, p) for p in ADMIN_STATE}

    proc = container.run("apt-get install -y -q lxd-image-server", timeout=600)
    (ARTIFACTS / "apt-upgrade-from-0.1.0.txt").write_text(proc.stdout + proc.stderr)
    version = container.run("dpkg-query -W -f '${Version}' lxd-image-server").stdout
    assert not version.startswith("0.1."), version
    said = proc.stdout + proc.stderr
    assert "streams/v1 was not a directory (a link?): removed, not followed" in said, said[-3000:]

    # the link's target is untouched; the tree and the state are the writer's, nothing else
    assert stat_in_container(container, VICTIM) == "root:root 755"
    assert stat_in_container(container, f"{VICTIM}/file") == "root:root 644"
    assert not container.path(f"{ROOT}/streams/v1").is_symlink()
    for path in (f"{ROOT}/streams", f"{ROOT}/streams/v1", STATE):
        assert stat_in_container(container, path) == f"{WRITER}:{WRITER} 755", path
    assert stat_in_container(container, f"{ROOT}/images") == "lxdadm:lxdadm 2775"
    others = container.run(
        f"find {ROOT}/streams {STATE} -path {DIGESTS} -prune -o ! -user {WRITER} -printf '%u %p\\n'"
    ).stdout
    assert others == "", others
    for gone in ("x.html", "v1.old"):
        assert not container.path(f"{ROOT}/streams/{gone}").exists(), gone
    assert UPLOADER in container.run(f"id -nG {WRITER}").stdout.split()
    assert unit_property(container, "lxd-image-server.service", "User") == WRITER
    states = container.run(f"systemctl is-active {' '.join(RUNNING_UNITS)}", check=False).stdout
    assert states.split() == ["active"] * len(RUNNING_UNITS), states

    # kept: certificate, key, credentials, site, images (the setuid bit cleared); the
    # conffile /etc/default/lxd-image-server, which no admin changed, is the new release's
    defaults = "/etc/default/lxd-image-server"
    kept = [p for p in ADMIN_STATE if p != defaults]
    assert {p: sha256_in_container(container, p) for p in kept} == {p: before[p] for p in kept}
    assert "UPLOAD_MAX_PARALLEL" in container.path(defaults).read_text()
    for image in images.values():
        assert_uploaded(container, image)
    cert = tmp_path / "nginx.crt"
    shutil.copyfile(container.path("/etc/nginx/ssl/nginx.crt"), cert)
    wait_for(
        "the writer published the catalog again",
        lambda: {i.fingerprint for i in images.values()} <= published_fingerprints(catalog(cert)),
    )
    page_status = curl(
        "--cacert", str(cert), "-o", "/dev/null", "-w", "%{http_code}", f"{URL}/streams/x.html"
    )
    assert page_status.stdout == "404", page_status
    # the old password still opens the upload app (401 without it)
    auth = [f"{URL}/images/", "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}"]
    assert curl("--cacert", str(cert), *auth).stdout == "401"
    assert curl("--cacert", str(cert), "-u", login, *auth).stdout not in ("401", "000")
    # and the new sshd drop-in is in force
    with raw_sftp(ssh_key) as s:
        assert refused(lambda: s.symlink("/etc", "/images/etc")) == FX_PERMISSION_DENIED
