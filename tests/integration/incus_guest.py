"""Incus in a booted Debian 13 container, one container per Incus build the tests run.

The host is Debian 12: its only Incus is bookworm-backports' 6.0.4 build, which lacks the
fingerprint checks of trixie's 6.0.4-2+deb13u9 and later, and Incus 7 needs Debian 13's
libraries. So each build in INCUS_BUILDS runs in its own copy of the system test's cached
trixie tree (tests/system/container.py: debootstrap, apt archive cache, nsenter), booted with
systemd-nspawn and what a container manager needs (every capability, the mount, keyring and
bpf system calls):

1. the test CA is written into the tree's /usr/local/share/ca-certificates before boot;
2. `apt-get install incus ca-certificates xdelta3` (trixie-backports for Incus 7): the CA is
   in the store before the daemon first starts, so no restart is needed; xdelta3 is what the
   daemon patches deltas with;
3. a `dir` storage pool and a default profile with a root disk, as tests/host-setup.sh gives
   the host's LXD (no network: `init --auto` would want a bridge).

The container shares the host's network, so its Incus reaches the test servers on 127.0.0.1;
Incus listens on its unix socket only, which is inside the container. GuestClient runs `incus`
in the container; the daemon's cache is read through the container's root on the host.
At the end the journal and console of each container go to tests/artifacts/incus/<key>/.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..system.container import CACHE_DIR, Bind, Container, ensure_base, host_mirrors
from .servers import REPO, Client, CommandError

log = logging.getLogger(__name__)

SUITE = "trixie"
ARTIFACTS = REPO / "tests" / "artifacts" / "incus"
#: what a container manager needs of systemd-nspawn (found by hand: Incus 6 and 7 launch
#: containers with these, and fail to mount or to load their bpf device filter without)
NSPAWN_OPTIONS = ("--capability=all", "--system-call-filter=@mount @keyring bpf")
CA_IN_GUEST = "/usr/local/share/ca-certificates/lxd-image-server-test.crt"
BUNDLE_IN_GUEST = "/etc/ssl/certs/ca-certificates.crt"
PACKAGES = ("incus", "ca-certificates", "xdelta3")
PRESEED = """\
storage_pools:
- name: default
  driver: dir
profiles:
- name: default
  description: Default profile
  devices:
    root:
      path: /
      pool: default
      type: disk
"""


@dataclass(frozen=True)
class IncusBuild:
    """One Debian build of Incus the client tests run against."""

    #: the test id, and part of instance names (so: letters and digits)
    key: str
    #: "" for trixie's own version, or the suite apt installs it from (`-t`)
    target: str
    #: the package version range accepted: minimum <= version < below (dpkg's ordering)
    minimum: str
    below: str
    #: why this build
    why: str


INCUS_BUILDS = (
    IncusBuild(
        "incus6",
        "",
        "6.0.4-2+deb13u12",
        "6.0.5~",
        "Debian 13's Incus 6.0.4 LTS, with the fingerprint checks (deb13u9 and later)",
    ),
    IncusBuild(
        "incus7",
        f"{SUITE}-backports",
        "7.0.2",
        "8~",
        "Incus 7 from trixie-backports: unified VM tarballs typed by combined_type",
    ),
)
BUILDS = {b.key: b for b in INCUS_BUILDS}


@dataclass(frozen=True)
class GuestClient(Client):
    """`incus` in the build's container, talking to the daemon there."""

    build: IncusBuild
    container: Container
    #: `dpkg-query -W incus` there, e.g. 7.0.2-3~bpo13+1
    package: str
    daemon: str
    command: str = "incus"

    @property
    def name(self) -> str:
        return self.build.key

    @property
    def cache_dir(self) -> Path:
        return self.container.path("/var/cache/incus")

    def run(
        self, args: Sequence[str], *, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.command, *args]
        proc = self.container.run(shlex.join(argv), timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise CommandError(
                f"command failed in {self.container.name} (exit {proc.returncode}): "
                f"{shlex.join(argv)}\n--- stderr ---\n{proc.stderr[-4000:]}\n"
                f"--- stdout ---\n{proc.stdout[-2000:]}"
            )
        return proc


def _apt_sources(build: IncusBuild) -> str:
    if not build.target:
        return ""
    mirror, _ = host_mirrors(suite=SUITE)
    return f"deb {mirror} {build.target} main\n"


def guest_container(build: IncusBuild, label: str) -> Container:
    """The build's container, not yet copied nor booted (boot_guest does both)."""
    base = ensure_base(suite=SUITE)
    archives = CACHE_DIR / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    name = f"lis-{build.key}-{label}"
    return Container(
        base,
        Path("/var/tmp") / name,
        name,
        [Bind(archives, "/var/cache/apt/archives")],
        NSPAWN_OPTIONS,
    )


def boot_guest(build: IncusBuild, c: Container, ca_cert: Path) -> GuestClient:
    """Copies and boots `c`, installs the build, trusts the CA, makes a storage pool. The
    caller removes the container (remove_guest) whether or not this returns."""
    started = time.monotonic()
    name = c.name
    c.prepare()
    c.path("/etc/hostname").write_text(f"{name}\n")
    c.path("/etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost\n")
    extra = _apt_sources(build)
    if extra:
        c.path("/etc/apt/sources.list.d/backports.list").write_text(extra)
    ca = c.path(CA_IN_GUEST)
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_cert, ca)
    ca.chmod(0o644)
    c.boot()
    booted = time.monotonic()
    c.run("apt-get update -q", timeout=600)
    target = f"-t {build.target} " if build.target else ""
    c.run(
        f"apt-get install -y -q --no-install-recommends {target}{' '.join(PACKAGES)}",
        timeout=1200,
    )
    installed = time.monotonic()
    if ca_cert.read_text().strip() not in c.path(BUNDLE_IN_GUEST).read_text():
        raise AssertionError(f"{name}: the test CA is not in {BUNDLE_IN_GUEST}")
    c.run("incus admin waitready --timeout 120", timeout=180)
    c.run("incus admin init --preseed", input=PRESEED, timeout=180)
    package = c.run("dpkg-query -W -f '${Version}' incus").stdout.strip()
    version = c.run("incus version").stdout
    print(
        f"{name}: incus {package} ({' '.join(version.split())}); copied and booted in "
        f"{booted - started:.1f} s, apt in {installed - booted:.1f} s, ready after "
        f"{time.monotonic() - started:.1f} s"
    )
    return GuestClient(build, c, package, f"Incus {package} (Debian 13 container)")


def remove_guest(key: str, container: Container) -> None:
    """Saves the journal and console to tests/artifacts/incus/KEY/ (the last run's), then
    powers the container off and deletes it."""
    out = ARTIFACTS / key
    out.mkdir(parents=True, exist_ok=True)
    if container.leader:
        journal = container.run("journalctl -b --no-pager", check=False, timeout=60).stdout
        (out / "journal.txt").write_text(journal)
    (out / "console.txt").write_text(container.console())
    container.remove()


class Guests:
    """The Incus containers of a test session, each booted when a test first asks for it (so
    `-k lxc` boots none) and all removed by close(). A build whose container failed to come
    up fails every later test that asks for it, with the first error, without a second try."""

    def __init__(
        self, ca_cert: Path, label: str | None = None, builds: Mapping[str, IncusBuild] = BUILDS
    ) -> None:
        self.ca_cert = ca_cert
        self.label = label or secrets.token_hex(3)
        self.builds = builds
        self._clients: dict[str, GuestClient] = {}
        self._containers: dict[str, Container] = {}
        self._failed: dict[str, str] = {}

    def client(self, key: str) -> GuestClient:
        if key in self._failed:
            raise AssertionError(f"the {key} container did not come up:\n{self._failed[key]}")
        if key not in self._clients:
            build = self.builds[key]
            c = guest_container(build, self.label)
            self._containers[key] = c  # close() removes it even if the boot fails half-way
            try:
                self._clients[key] = boot_guest(build, c, self.ca_cert)
            except Exception as e:
                self._failed[key] = str(e)
                raise
        return self._clients[key]

    def close(self) -> None:
        for key, c in self._containers.items():
            try:
                remove_guest(key, c)
            except Exception:
                log.exception("removing %s failed", c.name)
        self._containers.clear()
        self._clients.clear()
