"""What users run, with every client (each test taking `client` runs with `lxc`, `incus6` and
`incus7`, see conftest.py):

- a `--private` `lxd-image-server run` server, reached through a
  `https://USER:PASSWORD@host:port` remote (and refused without the credentials);
- a real Debian image (debootstrap minbase with systemd), uploaded with the seeds' two curl
  commands, that LXD and Incus boot with systemd as PID 1;
- the round trip a user does: `lxc publish` of such a container, `lxc image export`,
  `lxd-image-server import`, and both clients launch the result.

One server for the module. The Debian tree is the system test's cached debootstrap
(tests/system/container.py, CACHE_DIR/<suite>); the image files made from it are cached next to
it in CACHE_DIR/image-<suite>/, so a warm run only uploads, launches and publishes.
Prerequisites: root, `bash tests/host-setup.sh` (LXD, debootstrap, systemd-nspawn,
squashfs-tools).
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..system.container import CACHE_DIR, SUITE, ensure_base
from .conftest import Scratch, added_remote
from .images import build_rootfs, make_squashfs, sha256_file, write_metadata_tarball
from .servers import LXC, Client, Pki, run
from .test_run import BIN, PASSWORD, Server, curl, start_server, wait_listed

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(900)]

SERIAL = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d_%H:%M")
BUSYBOX_DIR = f"busypriv/1.35/amd64/default/{SERIAL}"
DEBIAN_DIR = f"debian/{SUITE}/amd64/default/{SERIAL}"
#: a second upload user: its remote URL differs, so no client has a cached catalog for it
ROUND_TRIP_USER, ROUND_TRIP_PASSWORD = "roundtrip", "round-trip-password-1"
#: how long a Debian container may take to finish booting (it takes seconds here)
BOOT_DEADLINE = 180.0


@dataclass(frozen=True)
class Image:
    meta: Path
    root: Path

    @property
    def fingerprint(self) -> str:
        return sha256_file(self.meta, self.root)


# -- the Debian image --------------------------------------------------------------------------


def debian_image() -> Image:
    """lxd.tar.xz + rootfs.squashfs of the cached debootstrap tree, made once per tree."""
    base = ensure_base()
    out = CACHE_DIR / f"image-{SUITE}"
    made_from = (base / ".complete").read_text()
    stamp = out / ".complete"
    image = Image(out / "lxd.tar.xz", out / "rootfs.squashfs")
    if stamp.is_file() and stamp.read_text() == made_from:
        return image
    tmp = CACHE_DIR / f"image-{SUITE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "meta").mkdir(parents=True)
    created = int((base / ".complete").stat().st_mtime)
    (tmp / "meta" / "metadata.yaml").write_text(
        "architecture: x86_64\n"
        f"creation_date: {created}\n"
        "properties:\n"
        "  os: debian\n"
        f"  release: {SUITE}\n"
        "  variant: default\n"
        "  architecture: amd64\n"
        f"  description: Debian {SUITE} minbase with systemd (lxd-image-server tests)\n"
    )
    run(["tar", "-C", tmp / "meta", "-cJf", tmp / "lxd.tar.xz", "metadata.yaml"])
    # owners as in the tree (not -all-root): the daemons shift them for the container
    run(
        ["mksquashfs", base, tmp / "rootfs.squashfs", "-noappend", "-quiet", "-e", ".complete"],
        timeout=900,
    )
    shutil.rmtree(tmp / "meta")
    (tmp / ".complete").write_text(made_from)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return image


# -- the server and what is on it ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Server]:
    base = Path(tempfile.mkdtemp(prefix="lis-real-", dir="/var/tmp"))
    base.chmod(0o755)  # nginx's workers (www-data) must reach the tree
    try:
        yield from start_server(base, pki, {}, run_args=["--private"])
    finally:
        shutil.rmtree(base)


def seed_upload(server: Server, image: Image, version_dir: str) -> None:
    """The seeds' two curl commands, verbatim apart from host and credentials."""
    for src, name in ((image.meta, "lxd.tar.xz"), (image.root, "rootfs.squashfs")):
        code, body = curl(f"-Fupload=@{src};filename={version_dir}/{name}", f"{server.url}/images/")
        assert code == 201, body


@dataclass(frozen=True)
class Uploaded:
    busybox: Image
    debian: Image


@pytest.fixture(scope="module")
def uploaded(server: Server, tmp_path_factory: pytest.TempPathFactory, label: str) -> Uploaded:
    """Both images, listed, before any client reads the catalog (the daemons cache it)."""
    work = tmp_path_factory.mktemp("busypriv")
    meta = write_metadata_tarball(work / "meta", work / "meta.tar.xz", f"private {label}")
    busybox = Image(meta, make_squashfs(build_rootfs(work / "rootfs"), work / "rootfs.squashfs"))
    started = time.monotonic()
    debian = debian_image()
    print(f"Debian image ready in {time.monotonic() - started:.1f} s")
    for image, version_dir in ((busybox, BUSYBOX_DIR), (debian, DEBIAN_DIR)):
        seed_upload(server, image, version_dir)
    wait_listed(server, "busypriv:1.35:amd64:default", SERIAL)
    wait_listed(server, f"debian:{SUITE}:amd64:default", SERIAL)
    print(f"uploaded and listed in {time.monotonic() - started:.1f} s")
    return Uploaded(busybox, debian)


def credentials_url(server: Server, user: str = "upload", password: str = PASSWORD) -> str:
    return f"https://{user}:{password}@127.0.0.1:{server.port}"


@pytest.fixture
def private_remote(client: Client, server: Server, uploaded: Uploaded) -> Iterator[str]:
    with added_remote(client, f"p{server.port}", credentials_url(server)) as name:
        yield name


@pytest.fixture
def scratch(client: Client, label: str) -> Iterator[Scratch]:
    """Instances named by the test; this client's local copies of every image used here are
    removed before and after, so each launch downloads from the server."""
    s = Scratch(client, label, set())
    yield s
    s.cleanup()


def launch_fresh(client: Client, scratch: Scratch, image: str, fingerprint: str, short: str) -> str:
    """Launches `image` as lis-<label>-<client>-<short>, which must download it."""
    scratch.fingerprints.add(fingerprint)
    scratch.cleanup()
    assert fingerprint not in client.local_images(), "the image must come from the server"
    name = scratch.instance(f"{client}-{short}")
    client("launch", image, name, timeout=600)
    assert client("config", "get", name, "volatile.base_image").strip() == fingerprint
    return name


def wait_booted(client: Client, name: str) -> str:
    """systemd's own verdict on the boot: running, or degraded (a unit failed: still booted)."""
    end = time.monotonic() + BOOT_DEADLINE
    state = ""
    while state not in ("running", "degraded"):
        if time.monotonic() > end:
            failed = client.exec(name, "systemctl", "--failed", "--no-pager", check=False)
            raise AssertionError(
                f"{name} did not finish booting in {BOOT_DEADLINE:.0f} s (state {state!r}):\n"
                f"{failed.stdout}{failed.stderr}"
            )
        time.sleep(0.5)
        state = client.exec(name, "systemctl", "is-system-running", check=False).stdout.strip()
    return state


def assert_systemd_is_pid_1(client: Client, name: str) -> None:
    assert client.exec(name, "cat", "/proc/1/comm").stdout.strip() == "systemd"
    exe = client.exec(name, "readlink", "/proc/1/exe").stdout.strip()
    assert exe.rsplit("/", 1)[-1] == "systemd", exe


# -- the tests ----------------------------------------------------------------------------------


def test_a_private_server_refuses_a_remote_without_credentials(
    client: Client, server: Server, uploaded: Uploaded
) -> None:
    with added_remote(client, f"n{server.port}", server.url) as name:
        proc = client.run(["image", "list", f"{name}:"], timeout=120, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "busypriv" not in proc.stdout


def test_busybox_launches_through_a_credentials_url(
    client: Client, private_remote: str, uploaded: Uploaded, scratch: Scratch
) -> None:
    name = launch_fresh(
        client, scratch, f"{private_remote}:busypriv/1.35", uploaded.busybox.fingerprint, "priv"
    )
    assert client.exec(name, "/bin/busybox", "echo", "ok").stdout == "ok\n"


def test_debian_boots_with_systemd_as_pid_1(
    client: Client, private_remote: str, uploaded: Uploaded, scratch: Scratch
) -> None:
    started = time.monotonic()
    name = launch_fresh(
        client, scratch, f"{private_remote}:debian/{SUITE}", uploaded.debian.fingerprint, "deb"
    )
    launched = time.monotonic() - started
    state = wait_booted(client, name)
    assert_systemd_is_pid_1(client, name)
    assert client.exec(name, "cat", "/etc/os-release").stdout.count(SUITE) >= 1
    print(
        f"{client}: launched in {launched:.1f} s, systemd {state} after "
        f"{time.monotonic() - started:.1f} s"
    )


@dataclass(frozen=True)
class Republished:
    tarball: Path
    fingerprint: str


@pytest.fixture(scope="module")
def republished(
    server: Server, uploaded: Uploaded, label: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Republished]:
    """A booted Debian container of LXD, stopped, `lxc publish`ed, `lxc image export`ed and
    `lxd-image-server import`ed into the running server as the variant `published`."""
    out = tmp_path_factory.mktemp("republished")
    alias = f"lis-{label}-published"
    s = Scratch(LXC, label, {uploaded.debian.fingerprint})
    published: set[str] = set()
    try:
        with added_remote(LXC, f"r{server.port}", credentials_url(server)) as remote:
            source = f"{remote}:debian/{SUITE}"
            name = launch_fresh(LXC, s, source, uploaded.debian.fingerprint, "source")
        wait_booted(LXC, name)
        LXC("stop", name, "--timeout", "60", timeout=120)
        LXC("publish", name, "--alias", alias, timeout=600)
        s.cleanup()  # the source container and its image: not needed any more
        published = {
            fp
            for fp, img in LXC.local_images().items()
            if alias in {a["name"] for a in img.get("aliases") or []}
        }
        LXC("image", "export", alias, f"{out}/", timeout=600)
        (tarball,) = out.iterdir()
        fingerprint = tarball.name.removesuffix(".tar.gz")
        assert sha256_file(tarball) == fingerprint, tarball.name
        LXC.delete_images(published)  # the launches below must download it
        imported = run(
            [
                BIN,
                "--state-dir",
                server.root.parent / "state",
                "import",
                "--root-dir",
                server.root,
                "--variant",
                "published",
                "--serial",
                SERIAL,
                tarball,
            ],
            timeout=600,
        )
        assert f"imported debian:{SUITE}:amd64:published" in imported.stdout, imported.stdout
        wait_listed(server, f"debian:{SUITE}:amd64:published", SERIAL)
        run(
            [BIN, "passwd", ROUND_TRIP_USER, "--htpasswd", server.root.parent / "htpasswd"],
            input=ROUND_TRIP_PASSWORD + "\n",
        )
        yield Republished(tarball, fingerprint)
    finally:
        s.cleanup()
        LXC.delete_images(published)


def test_round_trip_publish_export_import_launches(
    client: Client, server: Server, republished: Republished, scratch: Scratch
) -> None:
    url = credentials_url(server, ROUND_TRIP_USER, ROUND_TRIP_PASSWORD)
    with added_remote(client, f"rt{server.port}", url) as remote:
        name = launch_fresh(
            client, scratch, f"{remote}:debian/{SUITE}/published", republished.fingerprint, "rt"
        )
    wait_booted(client, name)
    assert_systemd_is_pid_1(client, name)
