"""Mirrors end to end, all real and on this machine: a master (`lxd-image-server run`) pushes
with rsync over ssh to a mirror, which is Debian's sshd on a loopback port with its own host
key and a push user made by `lxd-image-server mirror authorize` (rrsync, write-only), and
nginx serving the mirror's tree over TLS. The LXD daemon launches an image from the mirror.

A watchdog thread reads the mirror's catalog all along and checks that every file it lists is
on the mirror's disk: the push order (images, catalog, deletions) must never break that.

Prerequisites: root, `bash tests/host-setup.sh` (openssh-server, rsync, nginx, LXD).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import pytest

from lxd_image_server.config import Paths
from lxd_image_server.mirror.worker import PushResult, push_once
from lxd_image_server.settings import MirrorConfig

from .images import build_rootfs, make_squashfs, sha256_file, write_metadata_tarball
from .servers import Nginx, Pki, delete_images, delete_instance, free_port, lxc, run
from .test_run import BIN, Server, curl, start_server
from .verified import assert_verifies

SSHD = Path("/usr/sbin/sshd")
TOOLS = ("rsync", "rrsync", "ssh", "ssh-keygen", "useradd", "userdel")
DEADLINE = 60.0
#: a push that failed is retried after 5 s, 10 s, 20 s...: room for a few of them
CATCH_UP = 180.0

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {work}/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# pam_loginuid fails in containers; `mirror authorize` gives the user the password '*', which
# sshd accepts for key logins with or without PAM
UsePAM no
PermitRootLogin no
AllowUsers {user}
StrictModes yes
LogLevel VERBOSE
"""


class Sshd:
    """Debian's sshd in the foreground (-D), as root, with its own config and host key."""

    def __init__(self, work: Path, port: int, user: str, host_key: Path) -> None:
        self.work = work
        self.port = port
        self.user = user
        self.host_key = host_key
        self.conf = work / "sshd_config"
        self.log = work / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # the privilege separation directory, normally made by the init system
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.conf.write_text(
            SSHD_CONFIG.format(
                port=self.port, host_key=self.host_key, work=self.work, user=self.user
            )
        )
        run([SSHD, "-t", "-f", self.conf])
        self.proc = subprocess.Popen(
            [os.fspath(SSHD), "-D", "-f", os.fspath(self.conf), "-E", os.fspath(self.log)]
        )
        end = time.monotonic() + DEADLINE
        while True:
            assert self.proc.poll() is None, f"sshd exited:\n{self.log.read_text()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert time.monotonic() < end, f"sshd never listened:\n{self.log.read_text()}"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


@dataclass
class MirrorHost:
    root: Path
    user: str
    key: Path
    sshd: Sshd
    nginx: Nginx
    ctx: ssl.SSLContext

    def fetch(self, path: str) -> tuple[int, bytes]:
        """GET from the mirror's nginx."""
        try:
            with urllib.request.urlopen(
                f"{self.nginx.url}/{path}", context=self.ctx, timeout=10
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""

    def files(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}


class Watchdog(threading.Thread):
    """Checks, as often as it can, that every file the mirror's catalog lists is on its disk.
    A listing read just before the catalog changed is not held against the mirror."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.catalog = root / "streams" / "v1" / "images.json"
        self.stop_event = threading.Event()
        self.violations: list[str] = []
        self.checks = 0

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.catalog.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def run(self) -> None:
        while not self.stop_event.wait(0.005):
            before = self._stamp()
            if before is None:
                continue
            try:
                doc = json.loads(self.catalog.read_bytes())
            except (OSError, ValueError):
                continue
            missing = [
                item["path"]
                for product in doc.get("products", {}).values()
                for version in product.get("versions", {}).values()
                for item in version.get("items", {}).values()
                if not (self.root / item["path"]).is_file()
            ]
            if missing and self._stamp() == before:
                self.violations.append(f"listed but missing on the mirror: {missing}")
            self.checks += 1


def wait_until(predicate, what: str, deadline: float, log: Path | None = None) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > deadline:
            detail = f"\n--- master log ---\n{log.read_text()[-6000:]}" if log else ""
            raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}{detail}")
        time.sleep(0.01)
    return time.monotonic() - start


def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or not SSHD.exists():
        pytest.fail(
            f"missing {', '.join(missing) or SSHD}: run `bash tests/host-setup.sh` "
            "(openssh-server, rsync)"
        )


def remove_user(user: str) -> subprocess.CompletedProcess[str]:
    """userdel -r, once the user's last sshd session process has gone (they outlive the
    listening sshd for a moment)."""
    end = time.monotonic() + DEADLINE
    while True:
        gone = run(["userdel", "-r", user], check=False)
        if gone.returncode != 8 or time.monotonic() > end:  # 8: the user is logged in
            return gone
        time.sleep(0.1)


@contextlib.contextmanager
def prepared_mirror(user: str, label: str) -> Iterator[tuple[Path, Path, Sshd]]:
    """A mirror tree prepared by `mirror authorize` for a new push user, and an sshd (not yet
    started) that lets only that user in: (root, push key, sshd). Everything goes at exit."""
    require_tools()
    with pytest.raises(KeyError):
        pwd.getpwnam(user)  # unique to this run
    base = Path(tempfile.mkdtemp(prefix="lis-mirror-", dir="/var/tmp"))
    base.chmod(0o755)  # the push user and nginx's workers must reach the tree
    root = base / "root"
    key, host_key = base / "push_key", base / "host_key"
    for k in (key, host_key):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lis-{label}", "-f", k])
    sshd = Sshd(base, free_port(), user, host_key)
    try:
        first = run([BIN, "mirror", "authorize", f"{key}.pub", "--user", user, "--root", root])
        assert f"created the system user {user}" in first.stdout
        assert f'path = "{root}"' in first.stdout
        yield root, key, sshd
    finally:
        sshd.stop()
        try:
            home: str | None = pwd.getpwnam(user).pw_dir
        except KeyError:
            home = None
        gone = remove_user(user)
        shutil.rmtree(base, ignore_errors=True)
        # `authorize` gives the home to root (the push user must not lift its key's
        # restrictions), so `userdel -r` leaves it: a later user of the same name must not
        # find this one's authorized_keys
        if home and home.startswith("/home/"):
            shutil.rmtree(home, ignore_errors=True)
        assert gone.returncode in (0, 12), gone.stderr  # 12: no mail spool to remove
        with pytest.raises(KeyError):
            pwd.getpwnam(user)


@pytest.fixture(scope="module")
def mirror_host(pki: Pki, label: str) -> Iterator[MirrorHost]:
    user = f"lism{label}"
    with prepared_mirror(user, label) as (root, key, sshd):
        nginx = Nginx(root, pki, root.parent / "nginx", free_port())
        try:
            again = run([BIN, "mirror", "authorize", f"{key}.pub", "--user", user, "--root", root])
            assert "Nothing to change" in again.stdout, again.stdout
            home = Path(pwd.getpwnam(user).pw_dir)
            lines = (home / ".ssh" / "authorized_keys").read_text().splitlines()
            assert len(lines) == 1, lines
            assert lines[0].startswith(
                f'restrict,command="/usr/bin/rrsync -wo -munge -absolute {root}"'
            )
            for d in ("images", "streams", "streams/v1"):
                assert (root / d).owner() == user
            # the root stays root's and gets nothing else: the page travels inside streams/
            assert root.owner() == "root"
            assert sorted(p.name for p in root.iterdir()) == ["images", "streams"]
            sshd.start()
            nginx.start()
            ctx = ssl.create_default_context(cafile=os.fspath(pki.ca_cert))
            yield MirrorHost(root, user, key, sshd, nginx, ctx)
        finally:
            nginx.stop()


def watchers_key(key: Path, base: Path, run_user: str | None) -> Path:
    """The push key where the watcher reads it: `run` started as root runs the watcher as
    its user, whose key it must be (0600, as ssh wants it)."""
    copy = base / "watcher_key"
    shutil.copyfile(key, copy)
    copy.chmod(0o600)
    if run_user:
        shutil.chown(copy, run_user, run_user)
    return copy


@pytest.fixture(scope="module")
def master(pki: Pki, mirror_host: MirrorHost, run_user: str | None) -> Iterator[Server]:
    base = Path(tempfile.mkdtemp(prefix="lis-master-", dir="/var/tmp"))
    base.chmod(0o755)
    config = base / "config.toml"
    config.write_text(
        "[mirrors.m1]\n"
        'remote = "127.0.0.1"\n'
        f'user = "{mirror_host.user}"\n'
        f'key_path = "{watchers_key(mirror_host.key, base, run_user)}"\n'
        f"port = {mirror_host.sshd.port}\n"
        f'path = "{mirror_host.root}"\n'
    )
    env = {"LXD_IMAGE_SERVER_CONFIG": os.fspath(config), "ALLOW_DELETES": "1"}
    try:
        yield from start_server(base, pki, env)
    finally:
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def watchdog(mirror_host: MirrorHost) -> Iterator[Watchdog]:
    w = Watchdog(mirror_host.root)
    w.start()
    yield w
    w.stop_event.set()
    w.join(10)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, label: str) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("mirror-image")
    rootfs = build_rootfs(work / "rootfs")
    meta = write_metadata_tarball(work / "meta", work / "meta.tar.xz", f"mirror test {label}")
    return meta, make_squashfs(rootfs, work / "rootfs.squashfs")


def upload(server: Server, image: tuple[Path, Path], version_dir: str) -> None:
    meta, squashfs = image
    for src, name in ((meta, "lxd.tar.xz"), (squashfs, "rootfs.squashfs")):
        code, body = curl("-T", src, f"{server.url}/images/{version_dir}/{name}")
        assert code == 201, body


def listed(catalog: bytes, product: str) -> set[str]:
    try:
        doc = json.loads(catalog)
    except ValueError:
        return set()
    return set(doc["products"].get(product, {}).get("versions", {}))


def master_catalog(server: Server) -> bytes:
    return (server.root / "streams/v1/images.json").read_bytes()


def in_step(server: Server, mirror: MirrorHost) -> bool:
    """The mirror serves the master's catalog, byte for byte."""
    code, served = mirror.fetch("streams/v1/images.json")
    if code != 200 or served != master_catalog(server):
        return False
    code, served = mirror.fetch("streams/v1/index.json")
    return code == 200 and served == (server.root / "streams/v1/index.json").read_bytes()


def mirror_status(server: Server) -> subprocess.CompletedProcess[str]:
    return run([BIN, "--state-dir", server.root.parent / "state", "mirror", "status"], check=False)


@pytest.mark.lxd
def test_upload_reaches_the_mirror_and_lxd_launches_from_it(
    master: Server, mirror_host: MirrorHost, watchdog: Watchdog, image, label: str
) -> None:
    serial = "20240105_1000"
    d, product = f"busymirror/1.35/amd64/default/{serial}", "busymirror:1.35:amd64:default"
    upload(master, image, d)
    latency = wait_until(
        lambda: serial in listed(mirror_host.fetch("streams/v1/images.json")[1], product),
        "the mirror to serve the new version",
        DEADLINE,
        master.log,
    )
    print(f"\nthe mirror served the upload {latency:.2f} s after the upload returned")
    wait_until(lambda: in_step(master, mirror_host), "identical catalogs", DEADLINE, master.log)
    pushes = [line for line in master.log.read_text().splitlines() if "m1: pushed in" in line]
    print("pushes so far:", *pushes, sep="\n  ")
    for name in ("streams/v1/images.json", "streams/v1/index.json", "streams/v1/images.json.gz"):
        assert (mirror_host.root / name).read_bytes() == (master.root / name).read_bytes(), name
    for name in ("lxd.tar.xz", "rootfs.squashfs"):
        mirrored = mirror_host.root / "images" / d / name
        assert mirrored.read_bytes() == (master.root / "images" / d / name).read_bytes()
        assert mirrored.stat().st_mode & 0o777 == 0o644
    # the catalog page, in streams/ with the catalog; the mirror's nginx serves it at /
    page = master.root / "streams" / "index.html"
    assert product in page.read_text()
    wait_until(
        lambda: mirror_host.fetch("") == (200, page.read_bytes()),
        "the mirror's page to match",
        DEADLINE,
        master.log,
    )
    assert not (mirror_host.root / "index.html").exists()
    hidden = [f for f in mirror_host.files() if any(p.startswith(".") for p in f.split("/"))]
    assert not hidden, f"hidden files were pushed: {hidden}"
    known_hosts = (master.root.parent / "state" / "mirrors" / "known_hosts").read_text()
    host_key = (mirror_host.sshd.host_key.parent / "host_key.pub").read_text().split()[1]
    assert f"[127.0.0.1]:{mirror_host.sshd.port} ssh-ed25519 {host_key}" in known_hosts
    status = mirror_status(master)
    assert status.returncode == 0, status.stdout
    assert "state:        ok" in status.stdout

    remote = f"mir{mirror_host.nginx.port}"
    name = f"lis-{label}-mirror"
    meta, squashfs = image
    lxc("remote", "add", remote, mirror_host.nginx.url, "--protocol", "simplestreams")
    try:
        lxc("launch", f"{remote}:busymirror/1.35", name, timeout=300)
        assert lxc("exec", name, "--", "/bin/busybox", "echo", "ok").strip() == "ok"
    finally:
        delete_instance(name)
        lxc("remote", "remove", remote)
        delete_images({sha256_file(meta, squashfs)})
    served = {(m, s, p) for m, s, p in mirror_host.nginx.requests() if m == "GET" and s == 200}
    for name in ("lxd.tar.xz", "rootfs.squashfs"):
        assert ("GET", 200, f"/images/{d}/{name}") in served, "LXD did not download from the mirror"
    assert not watchdog.violations, watchdog.violations


def test_removal_propagates(master: Server, mirror_host: MirrorHost, watchdog: Watchdog, image):
    d, product = "gonemirror/1.0/amd64/default/20240101_1200", "gonemirror:1.0:amd64:default"
    upload(master, image, d)
    wait_until(
        lambda: "20240101_1200" in listed(mirror_host.fetch("streams/v1/images.json")[1], product),
        "the mirror to list the version",
        DEADLINE,
        master.log,
    )
    assert (mirror_host.root / "images" / d / "rootfs.squashfs").is_file()
    code, body = curl("-X", "DELETE", f"{master.url}/images/{d}")
    assert code in (200, 204), body
    wait_until(
        lambda: not listed(mirror_host.fetch("streams/v1/images.json")[1], product),
        "the mirror to drop the version",
        DEADLINE,
        master.log,
    )
    wait_until(
        lambda: not (mirror_host.root / "images" / d).exists(),
        "the version's files to go from the mirror",
        DEADLINE,
        master.log,
    )
    wait_until(lambda: in_step(master, mirror_host), "identical catalogs", DEADLINE, master.log)
    assert not watchdog.violations, watchdog.violations
    assert watchdog.checks > 0


def test_an_unreachable_mirror_does_not_stop_publishing_and_catches_up(
    master: Server, mirror_host: MirrorHost, watchdog: Watchdog, image
) -> None:
    wait_until(lambda: in_step(master, mirror_host), "a mirror in step", DEADLINE, master.log)
    mirror_host.sshd.stop()
    try:
        d, product = "offline/1.0/amd64/default/20240101_1200", "offline:1.0:amd64:default"
        upload(master, image, d)
        wait_until(
            lambda: "20240101_1200" in listed(master_catalog(master), product),
            "the master to publish while its mirror is down",
            DEADLINE,
            master.log,
        )
        wait_until(
            lambda: "Connection refused" in mirror_status(master).stdout,
            "`mirror status` to show the failure",
            DEADLINE,
            master.log,
        )
        status = mirror_status(master)
        assert status.returncode == 1, status.stdout
        assert "failing" in status.stdout and "next attempt" in status.stdout, status.stdout
        assert "mirror m1" in master.log.read_text() and "push failed" in master.log.read_text()
        assert not listed(mirror_host.fetch("streams/v1/images.json")[1], product)
    finally:
        mirror_host.sshd.start()
    took = wait_until(
        lambda: in_step(master, mirror_host), "the mirror to catch up", CATCH_UP, master.log
    )
    print(f"\nthe mirror caught up {took:.1f} s after its sshd came back")
    assert (mirror_host.root / "images" / d / "rootfs.squashfs").is_file()
    wait_until(
        lambda: mirror_status(master).returncode == 0, "status ok again", DEADLINE, master.log
    )
    text = master.log.read_text()
    assert text.count("mirror m1 (") == 1, "the failure was logged more than once"
    assert "push works again" in text
    assert not watchdog.violations, watchdog.violations


def test_a_changed_host_key_is_refused_until_forgotten(
    master: Server, mirror_host: MirrorHost, watchdog: Watchdog, image, run_user: str | None
) -> None:
    """accept-new: the key seen first is kept; a different one stops the pushes until the
    operator removes the old one (ssh-keygen -R) and reloads (which also retries at once)."""
    sshd = mirror_host.sshd
    wait_until(lambda: in_step(master, mirror_host), "a mirror in step", DEADLINE, master.log)
    sshd.stop()
    new_key = sshd.host_key.parent / "host_key_new"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", new_key])
    sshd.host_key = new_key
    sshd.start()
    d, product = "rekeyed/1.0/amd64/default/20240101_1200", "rekeyed:1.0:amd64:default"
    upload(master, image, d)
    wait_until(
        lambda: "Host key verification failed" in mirror_status(master).stdout,
        "`mirror status` to show the refused host key",
        DEADLINE,
        master.log,
    )
    assert not listed(mirror_host.fetch("streams/v1/images.json")[1], product)
    state = master.root.parent / "state"
    # as the watcher's user (docs/mirrors.md): root's ssh-keygen would leave a file of root's
    as_watcher: list[str | Path] = ["runuser", "-u", run_user, "--"] if run_user else []
    forget: list[str | Path] = ["ssh-keygen", "-R", f"[127.0.0.1]:{sshd.port}"]
    forget += ["-f", state / "mirrors/known_hosts"]
    run([*as_watcher, *forget])
    run([BIN, "--state-dir", state, "reload"])
    took = wait_until(
        lambda: in_step(master, mirror_host), "the mirror to catch up", DEADLINE, master.log
    )
    print(f"\nafter the reload the mirror caught up in {took:.1f} s")
    known_hosts = (state / "mirrors" / "known_hosts").read_text()
    assert Path(f"{new_key}.pub").read_text().split()[1] in known_hosts
    assert not watchdog.violations, watchdog.violations


def test_update_by_hand_pushes_and_reports_each_mirror(
    master: Server,
    mirror_host: MirrorHost,
    watchdog: Watchdog,
    tmp_path: Path,
    run_user: str | None,
) -> None:
    down = free_port()  # nothing listens there
    # started as root, `update` acts as the owner of the tree's streams/ (the user `run`
    # handed the watcher to): its state and its push key are that user's, as the watcher's are
    key = master.root.parent / "watcher_key"  # (the master fixture's watchers_key)
    config = tmp_path / "update.toml"
    config.write_text(
        "[mirrors.m1]\n"
        'remote = "127.0.0.1"\n'
        f'user = "{mirror_host.user}"\n'
        f'key_path = "{key}"\n'
        f"port = {mirror_host.sshd.port}\n"
        f'path = "{mirror_host.root}"\n'
        "[mirrors.down]\n"
        'remote = "127.0.0.1"\n'
        f'key_path = "{key}"\n'
        f"port = {down}\n"
    )
    state = master.root.parent / "update-state"
    state.mkdir()
    if run_user:
        shutil.chown(state, run_user, run_user)
    env = {**os.environ, "LXD_IMAGE_SERVER_CONFIG": os.fspath(config)}
    proc = subprocess.run(
        [BIN, "--state-dir", state, "update", "--root-dir", master.root],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "mirror m1: pushed in" in proc.stderr
    assert "mirror down: push failed: connect:" in proc.stderr
    assert "Connection refused" in proc.stderr
    doc = json.loads((state / "mirrors.json").read_text())
    assert doc["mirrors"]["m1"]["state"] == "ok"
    assert doc["mirrors"]["down"]["state"] == "failing"
    assert in_step(master, mirror_host)
    status = subprocess.run(
        [BIN, "--state-dir", state, "mirror", "status"], env=env, capture_output=True, text=True
    )
    assert status.returncode == 1
    assert "down: ssh://lxdmirror@127.0.0.1:" in status.stdout
    assert not watchdog.violations, watchdog.violations


# -- an uploader's plants must not reach the mirror (issue 9, finding 2) -------------------------
#
# No LXD, no nginx, no CA: a master tree published and pushed by `update` (the real scanner,
# hasher, publisher and rsync over a real sshd to a tree `mirror authorize` prepared), and
# pushes without a publish (push_once, in this process) for files swapped after publishing.

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- (the mirror push key, say)\n"
#: below the scanner's sparse-file rule (64 MiB), so it is published
LISTED_SPARSE_SIZE = 48 << 20
SPARSE_SIZE = 1 << 30


@dataclass
class AttackSite:
    """The mirror of the attack tests, and what lies outside any tree: a secret file and an
    /etc-like directory an uploader would like to see copied."""

    root: Path
    user: str
    key: Path
    sshd: Sshd
    outside: Path

    @property
    def secret(self) -> Path:
        return self.outside / "id_ed25519"

    @property
    def etc(self) -> Path:
        return self.outside / "etc"


@pytest.fixture(scope="module")
def attack_site(label: str) -> Iterator[AttackSite]:
    with prepared_mirror(f"lisa{label}", label) as (root, key, sshd):
        outside = root.parent / "outside"
        (outside / "etc").mkdir(parents=True)
        (outside / "id_ed25519").write_bytes(SECRET)
        (outside / "etc" / "shadow").write_bytes(b"root:$6$secret-hash:19000::::::\n" + SECRET)
        (outside / "etc" / "rootfs.squashfs").write_bytes(SECRET)
        (outside / "etc" / "lxd.tar.xz").write_bytes(SECRET)
        sshd.start()
        yield AttackSite(root, f"lisa{label}", key, sshd, outside)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory, label: str) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("attack-image")
    rootfs = build_rootfs(work / "rootfs")
    meta = write_metadata_tarball(work / "meta", work / "meta.tar.xz", f"attack {label}")
    return meta, make_squashfs(rootfs, work / "rootfs.squashfs")


class Master:
    """A master tree on disk, its state directory and a configuration naming the mirror."""

    def __init__(self, base: Path, site: AttackSite, image: tuple[Path, Path]) -> None:
        self.root = base / "root"
        self.state = base / "state"
        self.image = image
        (self.root / "images").mkdir(parents=True)
        self.mirror = MirrorConfig(
            name="attacked",
            host="127.0.0.1",
            user=site.user,
            key_path=os.fspath(site.key),
            port=site.sshd.port,
            path=os.fspath(site.root),
        )
        self.config = base / "config.toml"
        self.config.write_text(
            "[mirrors.attacked]\n"
            'remote = "127.0.0.1"\n'
            f'user = "{site.user}"\n'
            f'key_path = "{site.key}"\n'
            f"port = {site.sshd.port}\n"
            f'path = "{site.root}"\n'
        )
        self.serial = 0

    def version(self, product: str = "attack/1.0/amd64/default") -> Path:
        """A real image version, as an sftp upload leaves it: a new serial each time."""
        self.serial += 1
        d = self.root / "images" / product / f"20240101_{self.serial:04d}"
        d.mkdir(parents=True)
        meta, squashfs = self.image
        shutil.copyfile(meta, d / "lxd.tar.xz")
        shutil.copyfile(squashfs, d / "rootfs.squashfs")
        return d

    def update(self) -> subprocess.CompletedProcess[str]:
        """`update`: scan, hash, publish, then push to the mirror."""
        return subprocess.run(
            [BIN, "--state-dir", self.state, "update", "--root-dir", self.root],
            env={**os.environ, "LXD_IMAGE_SERVER_CONFIG": os.fspath(self.config)},
            capture_output=True,
            text=True,
            timeout=600,
        )

    def push(self) -> PushResult:
        """A push of what is published now, without publishing first."""
        paths = Paths.resolve(root_dir=os.fspath(self.root), state_dir=os.fspath(self.state))
        [result] = push_once([self.mirror], paths, attempts=1)
        return result

    def listed(self) -> set[str]:
        doc = json.loads((self.root / "streams/v1/images.json").read_bytes())
        return {
            item["path"]
            for product in doc["products"].values()
            for version in product["versions"].values()
            for item in version["items"].values()
        }


@pytest.fixture
def attack_master(
    attack_site: AttackSite, small_image: tuple[Path, Path], tmp_path: Path
) -> Master:
    return Master(tmp_path, attack_site, small_image)


def mirror_entries(root: Path) -> dict[str, os.stat_result]:
    """Every entry below the mirror's root (never following a link), by relative path."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            found[os.path.relpath(p, root)] = os.lstat(p)
    return found


def assert_mirror_clean(site: AttackSite) -> None:
    """The mirror holds regular files and directories only; every file below images/ is one its
    catalog lists; no byte of the secret arrived anywhere."""
    entries = mirror_entries(site.root)
    odd = sorted(p for p, st in entries.items() if not (S_ISREG(st.st_mode) or S_ISDIR(st.st_mode)))
    assert not odd, f"not regular files on the mirror: {odd}"
    catalog = json.loads((site.root / "streams/v1/images.json").read_bytes())
    listed = {
        item["path"]
        for product in catalog["products"].values()
        for version in product["versions"].values()
        for item in version["items"].values()
    }
    files = {p for p, st in entries.items() if S_ISREG(st.st_mode) and p.startswith("images/")}
    assert files <= listed, f"on the mirror but not in its catalog: {sorted(files - listed)}"
    for p, st in entries.items():
        if S_ISREG(st.st_mode) and st.st_size < (64 << 20):
            assert SECRET not in (site.root / p).read_bytes(), f"the secret reached {p}"


def assert_real_version_arrives(master: Master, site: AttackSite) -> None:
    """A real version uploaded after the attack is published and arrives on the mirror."""
    d = master.version("later/1.0/amd64/default")
    proc = master.update()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rel = d.relative_to(master.root)
    for name in ("lxd.tar.xz", "rootfs.squashfs"):
        assert f"{rel}/{name}" in master.listed()
        assert (site.root / rel / name).read_bytes() == (d / name).read_bytes()
    assert_verifies(master.root)
    assert_verifies(site.root)
    mirrored = (site.root / "streams/v1/images.json").read_bytes()
    assert mirrored == (master.root / "streams/v1/images.json").read_bytes()
    assert_mirror_clean(site)


def test_attack_symlinks_to_a_secret_file_are_not_pushed(
    attack_master: Master, attack_site: AttackSite
) -> None:
    """(a) links to a file outside the tree (a private key): planted where nothing lists them,
    as a file of an incomplete version, and swapped in for a published file after publishing."""
    images = attack_master.root / "images"
    (images / "id_ed25519").symlink_to(attack_site.secret)
    incomplete = images / "attack/1.0/amd64/default/20230101_0000"
    incomplete.mkdir(parents=True)
    (incomplete / "rootfs.squashfs").symlink_to(attack_site.secret)
    published = attack_master.version()
    proc = attack_master.update()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_mirror_clean(attack_site)
    assert not (attack_site.root / "images/id_ed25519").exists()
    assert not (attack_site.root / incomplete.relative_to(attack_master.root)).exists()

    # swapped after publishing: the catalog still lists the file, the link is not followed
    rel = published.relative_to(attack_master.root)
    before = (attack_site.root / rel / "rootfs.squashfs").read_bytes()
    (published / "rootfs.squashfs").unlink()
    (published / "rootfs.squashfs").symlink_to(attack_site.secret)
    other = attack_master.version("other/1.0/amd64/default")
    shutil.copytree(other, other.parent / "20240201_0000")  # in no catalog yet
    result = attack_master.push()
    assert result.ok, result.message
    assert (attack_site.root / rel / "rootfs.squashfs").read_bytes() == before
    assert_mirror_clean(attack_site)
    assert_real_version_arrives(attack_master, attack_site)


def test_attack_symlink_to_a_directory_outside_is_not_pushed(
    attack_master: Master, attack_site: AttackSite
) -> None:
    """(b) a link to an /etc-like directory: planted, and swapped in for a published version's
    directory (whose files' names the outside directory has too)."""
    images = attack_master.root / "images"
    (images / "etc").symlink_to(attack_site.etc, target_is_directory=True)
    published = attack_master.version()
    proc = attack_master.update()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (attack_site.root / "images/etc").exists()
    assert_mirror_clean(attack_site)

    rel = published.relative_to(attack_master.root)
    published.rename(published.with_name("moved-away"))
    published.symlink_to(attack_site.etc, target_is_directory=True)
    result = attack_master.push()
    assert result.ok, result.message
    # what the mirror had stays; the outside directory's files never arrive
    assert (attack_site.root / rel / "lxd.tar.xz").read_bytes() == attack_master.image[
        0
    ].read_bytes()
    assert_mirror_clean(attack_site)
    assert_real_version_arrives(attack_master, attack_site)


def test_attack_symlink_loop_does_not_grow_on_the_mirror(
    attack_master: Master, attack_site: AttackSite
) -> None:
    """(c) a directory holding a link to itself: followed, it nests until paths are too long."""
    loop = attack_master.root / "images/loop"
    loop.mkdir()
    (loop / "data").write_bytes(b"x" * 1024)
    (loop / "again").symlink_to(".", target_is_directory=True)
    proc = attack_master.update()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (attack_site.root / "images/loop").exists()
    assert_mirror_clean(attack_site)
    assert_real_version_arrives(attack_master, attack_site)


def test_attack_dangling_symlink_does_not_stop_pushing(
    attack_master: Master, attack_site: AttackSite
) -> None:
    """(d) a link to nothing: with links followed, rsync exits 23 and no push ever succeeds."""
    published = attack_master.version()
    (published.parent / "dangling").symlink_to(attack_master.root / "nothing-here")
    proc = attack_master.update()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_mirror_clean(attack_site)
    # swapped after publishing: a listed file that is now a dangling link or gone
    (published / "lxd.tar.xz").unlink()
    (published / "lxd.tar.xz").symlink_to("/nonexistent")
    (published / "rootfs.squashfs").unlink()
    result = attack_master.push()
    assert result.ok, result.message
    assert_mirror_clean(attack_site)
    assert_real_version_arrives(attack_master, attack_site)


def test_attack_fifo_is_not_pushed_and_blocks_nothing(
    attack_master: Master, attack_site: AttackSite
) -> None:
    """(e) a FIFO (nobody ever writes to it), planted and swapped in for a published file."""
    published = attack_master.version()
    os.mkfifo(attack_master.root / "images/fifo")
    proc = attack_master.update()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (attack_site.root / "images/fifo").exists()
    (published / "rootfs.squashfs").unlink()
    os.mkfifo(published / "rootfs.squashfs")
    result = attack_master.push()
    assert result.ok, result.message
    assert_mirror_clean(attack_site)
    assert_real_version_arrives(attack_master, attack_site)


def test_attack_sparse_file_arrives_sparse(attack_master: Master, attack_site: AttackSite) -> None:
    """(f) a listed root file of 48 MiB apparent size and no data (one write at its end): it
    arrives, as sparse as it left. A sparse giant (1 GiB, no data) is never published (the
    scanner leaves it out), so it never travels; nor does a file never listed."""
    d = attack_master.root / "images/sparse/1.0/amd64/default/20240101_0000"
    giant = attack_master.root / "images/sparse/1.0/amd64/default/20240102_0000"
    for version, size in ((d, LISTED_SPARSE_SIZE), (giant, SPARSE_SIZE)):
        version.mkdir(parents=True)
        shutil.copyfile(attack_master.image[0], version / "lxd.tar.xz")
        with (version / "rootfs.squashfs").open("wb") as f:
            f.truncate(size - 1)
            f.seek(size - 1)
            f.write(b"\1")
    with (attack_master.root / "images/unlisted.img").open("wb") as f:
        f.truncate(SPARSE_SIZE)
    proc = attack_master.update()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rel = d.relative_to(attack_master.root)
    assert f"{rel}/rootfs.squashfs" in attack_master.listed()
    giant_rel = giant.relative_to(attack_master.root)
    assert f"{giant_rel}/rootfs.squashfs" not in attack_master.listed()
    st = os.stat(attack_site.root / rel / "rootfs.squashfs")
    assert st.st_size == LISTED_SPARSE_SIZE
    assert st.st_blocks * 512 < (16 << 20), f"{st.st_blocks * 512} bytes on the mirror's disk"
    assert not (attack_site.root / giant_rel).exists()
    assert not (attack_site.root / "images/unlisted.img").exists()
    assert_mirror_clean(attack_site)
    assert_real_version_arrives(attack_master, attack_site)


def test_authorize_refuses_a_tree_that_holds_the_push_users_home(label: str) -> None:
    """rrsync -wo in a tree that holds the push user's home would let a push replace
    ~/.ssh/authorized_keys, dropping the forced command: a shell on the mirror."""
    require_tools()
    user = f"lish{label}"
    base = Path(tempfile.mkdtemp(prefix="lis-home-", dir="/var/tmp"))
    base.chmod(0o755)
    root = base / "root"
    home = root / "home" / user
    key = base / "push_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    run(["useradd", "--system", "--create-home", "--home-dir", home, "--shell", "/bin/sh", user])
    try:
        proc = run(
            [BIN, "mirror", "authorize", f"{key}.pub", "--user", user, "--root", root],
            check=False,
        )
        assert proc.returncode == 1, proc.stdout
        assert f"holds {user}'s home" in proc.stderr
        assert not (home / ".ssh").exists()
        assert sorted(p.name for p in root.iterdir()) == ["home"]
    finally:
        gone = run(["userdel", "-r", user], check=False)
        shutil.rmtree(base, ignore_errors=True)
        assert gone.returncode in (0, 12), gone.stderr


def test_a_stolen_push_key_plants_no_live_link_outside_the_tree(
    attack_site: AttackSite, tmp_path: Path
) -> None:
    """The receiving side, as `authorize` sets it up, against a pusher that sends links
    (-l), FIFOs (--specials), setuid modes (-p) and paths out of the tree: links arrive
    munged (pointing nowhere), nothing lands outside the tree, and reading is refused."""
    src = tmp_path / "src" / "images"
    src.mkdir(parents=True)
    (src / "passwd").symlink_to("/etc/passwd")
    (src / "setuid").write_text("#!/bin/sh\n")
    (src / "setuid").chmod(0o4755)
    os.mkfifo(src / "fifo")
    known_hosts = tmp_path / "known_hosts"
    rsh = (
        f"ssh -p {attack_site.sshd.port} -i {attack_site.key} -o IdentitiesOnly=yes "
        f"-o BatchMode=yes -o StrictHostKeyChecking=accept-new "
        f"-o UserKnownHostsFile={known_hosts}"
    )
    dest = f"{attack_site.user}@127.0.0.1:{attack_site.root}/"
    base = ["rsync", "-e", rsh, "--timeout=60"]
    proc = subprocess.run(
        [*base, "-rlp", "--specials", src, dest], capture_output=True, text=True, timeout=120
    )
    planted = attack_site.root / "images" / "passwd"
    assert planted.is_symlink(), proc.stderr
    assert os.readlink(planted).startswith("/rsyncd-munged/"), os.readlink(planted)
    assert not planted.exists()  # points nowhere
    outside = f"{attack_site.user}@127.0.0.1:{attack_site.root.parent / 'outside'}/"
    escape = subprocess.run(
        [*base, "-r", src, outside], capture_output=True, text=True, timeout=120
    )
    assert escape.returncode != 0
    assert not (attack_site.root.parent / "outside" / "images").exists()
    read = subprocess.run(
        [*base, "-r", f"{attack_site.user}@127.0.0.1:{attack_site.root}/streams/", tmp_path / "r"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert read.returncode != 0 and not (tmp_path / "r").exists()
    fifo = attack_site.root / "images" / "fifo"
    print(
        f"\nrsync {proc.returncode}; FIFO on the mirror: {os.path.lexists(fifo)}; "
        f"setuid file mode: {oct((attack_site.root / 'images/setuid').stat().st_mode)}"
    )
    # the next real push cleans up what the stolen key left below images/


def test_the_push_user_cannot_change_its_own_key_restrictions(attack_site: AttackSite) -> None:
    """Whatever the push user gets to run (a setuid file a stolen key planted, say), its home,
    ~/.ssh and authorized_keys are root's: the forced rrsync command stays. sshd accepts that
    (the other attack tests push through it), and `authorize` again changes nothing."""
    home = Path(pwd.getpwnam(attack_site.user).pw_dir)
    for path, mode in (
        (home, 0o755),
        (home / ".ssh", 0o755),
        (home / ".ssh/authorized_keys", 0o644),
    ):
        st = path.lstat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, mode), path
    again = run(
        [
            BIN,
            "mirror",
            "authorize",
            f"{attack_site.key}.pub",
            "--user",
            attack_site.user,
            "--root",
            attack_site.root,
        ]
    )
    assert "Nothing to change" in again.stdout, again.stdout


# -- issue 18, finding 7a: `authorize --user EXISTING` -------------------------------------------


def _owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _authorize_as(user: str, base: Path) -> subprocess.CompletedProcess[str]:
    key = base / "push_key"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    return run(
        [BIN, "mirror", "authorize", f"{key}.pub", "--user", user, "--root", base / "root"],
        check=False,
    )


def test_authorize_never_takes_roots_home(tmp_path: Path) -> None:
    """`--user root` made /root and /root/.ssh root:root 0755: readable by every local user."""
    require_tools()
    before = {p: _owner_and_mode(p) for p in (Path("/root"), Path("/root/.ssh")) if p.exists()}
    keys = Path("/root/.ssh/authorized_keys")
    had_keys = keys.read_bytes() if keys.exists() else None
    proc = _authorize_as("root", tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "uid 0" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert {p: _owner_and_mode(p) for p in before} == before
    assert (keys.read_bytes() if keys.exists() else None) == had_keys
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("kind", ["login", "system"])
def test_authorize_leaves_an_existing_users_home_alone(label: str, kind: str) -> None:
    """An existing account (a person's login, a daemon's system user) keeps its home and
    ~/.ssh as they were: authorize refuses it, in one line, before changing anything (a tree
    the user can reach: nothing else would stop it)."""
    require_tools()
    tmp_path = Path(tempfile.mkdtemp(prefix="lis-auth-", dir="/var/tmp"))
    tmp_path.chmod(0o755)
    user = f"lise{kind[0]}{label}"[:32]
    home = Path(f"/home/{user}")
    flags = ["--create-home", "--shell", "/bin/bash"]
    if kind == "system":
        flags = ["--system", "--create-home", "--shell", "/bin/sh"]
    run(["useradd", *flags, "--home-dir", home, user])
    try:
        pw = pwd.getpwnam(user)
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA their own key\n")
        for p in (home / ".ssh", home / ".ssh" / "authorized_keys"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        home.chmod(0o700)
        watched = [home, home / ".ssh", home / ".ssh" / "authorized_keys"]
        before = {p: _owner_and_mode(p) for p in watched}
        proc = _authorize_as(user, tmp_path)
        assert proc.returncode == 1, proc.stdout
        assert "did not make" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert {p: _owner_and_mode(p) for p in watched} == before
        assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAA their own key\n"
        assert not (tmp_path / "root").exists()
    finally:
        gone = run(["userdel", "-r", user], check=False)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp_path, ignore_errors=True)
        assert gone.returncode in (0, 12), gone.stderr
