"""A throwaway Debian 12 or 13 booted with `systemd-nspawn -b`, for the system test.

- The suite is $LXD_IMAGE_SERVER_TEST_SUITE (`make system-test SUITE=...` sets it): bookworm
  (Debian 12, the default) or trixie (Debian 13).
- The base tree is made once with debootstrap (from the mirror the host's apt uses) and cached
  outside the repository, in CACHE_DIR/<suite> (rebuilt if missing). Each run boots a fresh
  copy of it, so every run starts from a clean Debian. tests/integration/test_real_images.py
  makes its Debian image from the same tree.
- Downloaded .debs are cached in CACHE_DIR/apt-archives, bind-mounted on the container's
  /var/cache/apt/archives: apt still resolves everything from Debian's archive, it just does not
  download the same files again.
- The container shares the host's network (nspawn's default): its nginx and sshd listen on
  host ports, which is how the host's ssh, curl and LXD daemon reach them.
- The host has no systemd, so nothing is registered with machined (--register=no, --keep-unit);
  commands run in the container through nsenter into the namespaces of its PID 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("LXD_IMAGE_SERVER_TEST_CACHE", "/var/cache/lxd-image-server-test"))
SUITES = ("bookworm", "trixie")
SUITE = os.environ.get("LXD_IMAGE_SERVER_TEST_SUITE") or SUITES[0]
#: what the container needs beyond debootstrap's minbase to boot and to run `man`
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "man-db")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
FALLBACK_SECURITY = "http://deb.debian.org/debian-security"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(AssertionError):
    """A step of preparing, booting or using the container failed; the message says which."""


def _run(
    argv: Sequence[str | os.PathLike[str]],
    timeout: float,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [os.fspath(a) for a in argv]
    try:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ContainerError(f"timed out after {timeout:.0f} s: {shlex.join(args)}") from e


# -- the mirror --------------------------------------------------------------------------------


def _sources_entries(etc_apt: Path) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled `deb` source of the host, one-line or deb822."""
    entries: list[tuple[str, list[str]]] = []
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split()))
    return entries


def host_mirrors(etc_apt: Path = Path("/etc/apt"), suite: str = SUITE) -> tuple[str, str]:
    """The Debian mirror and security mirror the host's apt uses for `suite`, or else for
    another Debian release (a Debian 12 host has no trixie sources: the same mirror serves
    it)."""
    entries = _sources_entries(etc_apt)
    for wanted in (suite, *SUITES):
        mirror = next((uri for uri, suites in entries if wanted in suites), "")
        security = next((uri for uri, suites in entries if f"{wanted}-security" in suites), "")
        if mirror:
            return mirror, security or FALLBACK_SECURITY
    return FALLBACK_MIRROR, FALLBACK_SECURITY


def sources_list(mirror: str, security: str, suite: str = SUITE) -> str:
    return (
        f"deb {mirror} {suite} main\n"
        f"deb {mirror} {suite}-updates main\n"
        f"deb {security} {suite}-security main\n"
    )


# -- the cached base tree ----------------------------------------------------------------------


def ensure_base(cache_dir: Path = CACHE_DIR, suite: str = SUITE) -> Path:
    """The debootstrapped tree of `suite`, made if missing (about a minute). Never booted
    itself."""
    if suite not in SUITES:
        raise ContainerError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    base = cache_dir / suite
    if (base / ".complete").is_file():
        release = (base / "etc/os-release").read_text()
        if f"VERSION_CODENAME={suite}\n" not in release:
            raise ContainerError(f"{base} is not Debian {suite}:\n{release}")
        return base
    if shutil.which("debootstrap") is None:
        raise ContainerError("debootstrap is missing: run `make deb-deps`")
    mirror, security = host_mirrors(suite=suite)
    tmp = cache_dir / f"{suite}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if base.exists():
        shutil.rmtree(base)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("debootstrap %s from %s into %s", suite, mirror, tmp)
    proc = _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            suite,
            tmp,
            mirror,
        ],
        timeout=1200,
    )
    if proc.returncode != 0:
        raise ContainerError(
            f"debootstrap failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr}"
        )
    (tmp / "etc/apt/sources.list").write_text(sources_list(mirror, security, suite))
    (tmp / "etc/hostname").write_text("lis-system-test\n")
    # an empty machine-id: systemd makes a new one at each boot of each copy
    (tmp / "etc/machine-id").write_text("")
    (tmp / ".complete").write_text(f"{suite} from {mirror}\n")
    tmp.rename(base)
    return base


# -- the booted container ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    host: Path
    container: str
    read_only: bool = False

    def option(self) -> str:
        return f"--bind{'-ro' if self.read_only else ''}={self.host}:{self.container}"


class Container:
    """A copy of the base tree under `workdir`, booted with systemd-nspawn. `options` are
    further systemd-nspawn options (tests/integration/incus_guest.py grants what a container
    manager needs)."""

    def __init__(
        self,
        base: Path,
        workdir: Path,
        name: str,
        binds: Sequence[Bind] = (),
        options: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.workdir = workdir
        self.root = workdir / "root"
        self.name = name
        self.binds = list(binds)
        self.options = list(options)
        self.console_log = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    # the tree, before and after boot (host-side paths)
    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def prepare(self) -> None:
        """Copies the base tree; the caller may then write files into it before boot."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = _run(["cp", "-a", "--reflink=auto", self.base, self.root], timeout=600)
        if proc.returncode != 0:
            raise ContainerError(f"copying {self.base} failed: {proc.stderr}")

    def boot(self, deadline: float = 120) -> None:
        if shutil.which("systemd-nspawn") is None:
            raise ContainerError("systemd-nspawn is missing: run `make deb-deps`")
        argv = [
            "systemd-nspawn",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            *(b.option() for b in self.binds),
            *self.options,
        ]
        log.info("booting: %s", shlex.join(argv))
        with open(self.console_log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + deadline
        while not self.leader:
            if self.proc.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console()}"
                )
            if time.monotonic() > end:
                raise ContainerError(f"no container init after {deadline:.0f} s:\n{self.console()}")
            self.leader = self._find_leader()
            if not self.leader:
                time.sleep(0.1)
        # 'degraded' (some unit failed) still lets the test go on; it looks at its own units.
        # Polled: right after the fork, systemctl cannot reach the new init yet.
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > end or self.proc.poll() is not None:
                raise ContainerError(
                    f"the container did not finish booting (state {state!r}):\n"
                    f"{self.run('systemctl --failed --no-pager', check=False).stdout}\n"
                    f"{self.console()}"
                )
            time.sleep(0.2)
            state = self.run("systemctl is-system-running", check=False).stdout.strip()

    def _find_leader(self) -> int:
        """The container's PID 1 as the host sees it: a child of systemd-nspawn whose PID in
        its own namespace is 1 (nspawn is a subreaper, so init ends up its direct child)."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return 0
        for pid in children.split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^NSpid:\s+(.*)$", status, re.M)
            if m and len(m[1].split()) > 1 and m[1].split()[-1] == "1":
                return int(pid)
        return 0

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(
        self,
        script: str,
        *,
        input: str | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Runs a shell script as root inside the container, with a clean environment."""
        if not self.leader:
            raise ContainerError("the container is not running")
        argv = [
            "nsenter",
            f"--target={self.leader}",
            "--mount",
            "--uts",
            "--ipc",
            "--pid",
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            f"PATH={CONTAINER_PATH}",
            "LANG=C.UTF-8",
            "HOME=/root",
            "TERM=dumb",
            "DEBIAN_FRONTEND=noninteractive",
            "/bin/sh",
            "-c",
            script,
        ]
        proc = _run(argv, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise ContainerError(
                f"in the container, exit {proc.returncode}: {script}\n"
                f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
            )
        return proc

    def stop(self, deadline: float = 60) -> None:
        """Powers the container off (nspawn turns SIGTERM into a clean shutdown)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            log.warning("the container did not power off in %.0f s; killing it", deadline)
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.leader = 0

    def remove(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.workdir)
