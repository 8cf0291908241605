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
    lxc,
    lxc_json,
    lxd_is_up,
    restart_lxd,
    run,
)

from .container import CACHE_DIR, Bind, Container, ensure_base

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
)
#: started (or listening) after installation
RUNNING_UNITS = (
    "lxd-image-server.service",
    "lxd-image-server-upload.socket",
    "lxd-image-server-config.path",
    "lxd-image-server-rebuild.path",
    "lxd-image-server-update.timer",
    "nginx.service",
    "ssh.service",
)
OUR_UNITS = (
    "lxd-image-server.service",
    "lxd-image-server-upload.socket",
    "lxd-image-server-upload.service",
    "lxd-image-server-update.service",
    "lxd-image-server-update.timer",
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
    m = re.search(r"Upload user '(\S+)', password (\S+)", proc.stdout)
    assert m, f"init printed no upload credentials:\n{proc.stdout[-3000:]}"
    return Installed(proc.stdout, hosts_before, m[1], m[2])


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
    for path in (f"{ROOT}/images", f"{ROOT}/streams", f"{ROOT}/streams/v1"):
        assert stat_in_container(container, path).startswith("lxdadm:lxdadm "), path
    assert stat_in_container(container, "/etc/lxd-image-server/htpasswd") == "root:www-data 640"
    assert container.path("/etc/nginx/ssl/nginx.crt").is_file()
    assert container.path("/etc/nginx/ssl/nginx.key").is_file()
    assert stat_in_container(container, "/home/lxdadm/.ssh") == "lxdadm:lxdadm 700"
    passwd = container.run("getent passwd lxdadm").stdout.strip().split(":")
    assert passwd[5] == "/home/lxdadm", passwd
    assert container.path("/etc/nginx/sites-enabled/lxd-image-server").is_symlink()
    assert container.path("/etc/nginx/sites-enabled/default").exists(), "Debian's site is gone"
    listening = container.run("ss -ltn").stdout
    assert re.search(r":80\s", listening) and re.search(rf":{HTTPS_PORT}\s", listening), listening


def test_units_verify_and_are_hardened(installed: Installed, container: Container) -> None:
    paths = " ".join(f"/lib/systemd/system/{u}" for u in OUR_UNITS)
    proc = container.run(f"systemd-analyze verify {paths}", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
    for unit in ("lxd-image-server.service", "lxd-image-server-upload.service"):
        out = container.run(f"systemd-analyze security --no-pager {unit}", check=False).stdout
        m = re.search(rf"Overall exposure level for {re.escape(unit)}: ([\d.]+)", out)
        assert m, out
        print(f"{unit}: exposure {m[1]}")
        assert float(m[1]) <= 2.0, out


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
        "chown lxdadm:lxdadm /etc/lxd-image-server/mirror.key; "
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


# -- the real LXD daemon on the host ----------------------------------------------------------


@pytest.mark.lxd
def test_lxd_launches_the_uploaded_images(
    server_cert: Path, images: dict[str, Image], installed: Installed
) -> None:
    if not lxd_is_up():
        pytest.fail("the LXD daemon does not answer `lxc info`: run `bash tests/host-setup.sh`")
    wait_for(
        "images.json lists the uploads",
        lambda: (
            {i.fingerprint for i in images.values()} <= published_fingerprints(catalog(server_cert))
        ),
    )
    label = secrets.token_hex(3)
    remote = f"sys{label}"
    instances = []
    shutil.copyfile(server_cert, HOST_CA)
    HOST_CA.chmod(0o644)
    try:
        run(["update-ca-certificates"], timeout=120)
        # the daemon caches a remote's catalog per URL (on disk and in memory) and reads the
        # CA store once: forget this URL's catalog and restart it
        shutil.rmtree(LXD_CACHE / hashlib.sha256(URL.encode()).hexdigest(), ignore_errors=True)
        restart_lxd()
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
        HOST_CA.unlink(missing_ok=True)
        run(["update-ca-certificates"], timeout=120)


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
