"""The rsync transport of a mirror push: ssh and rsync command lines, the catalog copied
aside (a snapshot), and `RsyncPusher`, which runs one push over one ssh connection.

A push is a few rsync runs over one ssh connection, in this order, so that a mirror never lists
a file it does not have:

  0. the catalog (streams/v1 and the page, streams/index.html) is copied aside; what its
     images.json lists, checked, is all that travels below images/ (sendlist.py);
  1. images: the listed files, regular files only, never through a link, kept sparse;
  2. the catalog copied in step 0, so it lists nothing step 1 did not send;
  3. deletions: below images/, whatever that catalog does not list goes from the mirror.

Hidden files (uploads in progress, locks) and temporary names are never pushed nor deleted.
Host keys: first contact is trusted and remembered in <state>/mirrors/known_hosts; a changed
key is refused afterwards (ssh's StrictHostKeyChecking=accept-new).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lxd_image_server.config import Paths
from lxd_image_server.mirror.sendlist import (
    CatalogError,
    Listing,
    copy_catalog,
    held_batches,
    image_prefix,
    list_catalog,
    make_keep_tree,
)
from lxd_image_server.settings import MirrorConfig
from lxd_image_server.tree.layout import TEMP_SUFFIXES

log = logging.getLogger(__name__)

#: rsync gives up when no data moved for this long (a hung connection)
IO_TIMEOUT = 300
CONNECT_TIMEOUT = 20
#: what is never pushed: hidden names (uploads in progress, lock files) and temporary suffixes
EXCLUDES = (".*", "~*", *(f"*{suffix}" for suffix in TEMP_SUFFIXES))
#: rsync: "some files vanished before they could be transferred" (deleted meanwhile; the
#: publish that follows the deletion asks for another push)
RSYNC_VANISHED = 24


class PushError(Exception):
    """A push failed; the message says which step and why."""


class PushCancelled(PushError):
    """The push was stopped from outside (shutdown, reconfiguration)."""


def describe_target(m: MirrorConfig) -> str:
    return f"ssh://{m.user}@{_host(m.host)}:{m.port}{m.path}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the rsync transport ------------------------------------------------------------------------


class Pusher(Protocol):
    def push(self) -> None:
        """One complete push; raises PushError."""

    def cancel(self) -> None:
        """Stops a push in progress (from another thread); it raises PushCancelled."""


_SAFE_ARG = re.compile(r"[\w@%+=:,./-]+")


def _rsh_quote(arg: str) -> str:
    """Quoting rsync's -e understands: spaces separate, '...' and "..." group."""
    if _SAFE_ARG.fullmatch(arg):
        return arg
    if "'" not in arg:
        return f"'{arg}'"
    if '"' not in arg:
        return f'"{arg}"'
    raise PushError(f"cannot pass {arg!r} to ssh through rsync (it has both kinds of quotes)")


def ssh_command(m: MirrorConfig, known_hosts: str, control: str | None = None) -> list[str]:
    """ssh as rsync runs it; `control`: the socket of a connection to share (if it is gone,
    ssh connects by itself)."""
    cmd = ["ssh", "-p", str(m.port)]
    if m.key_path:
        cmd += ["-i", m.key_path, "-o", "IdentitiesOnly=yes"]
    for opt in (
        "BatchMode=yes",
        "StrictHostKeyChecking=accept-new",
        f"UserKnownHostsFile={known_hosts}",
        "HashKnownHosts=no",
        f"ConnectTimeout={CONNECT_TIMEOUT}",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=4",
        "LogLevel=ERROR",
    ):
        cmd += ["-o", opt]
    if control:
        cmd += ["-S", control, "-o", "ControlMaster=no"]
    return cmd


@dataclass(frozen=True)
class Source:
    """What a push sends: the served root, its image tree and catalog."""

    root_dir: str
    img_dir: str
    streams_dir: str

    @classmethod
    def from_paths(cls, paths: Paths) -> Source:
        return cls(paths.root_dir, paths.img_dir, paths.streams_dir)


def rsync_command(m: MirrorConfig, known_hosts: str, control: str | None = None) -> list[str]:
    """What every rsync run of a push has in common.

    Regular files only, never dereferenced: no -l/-L, so a link is skipped, and rsync opens
    each file with O_NOFOLLOW; no devices or specials. Permissions are set, not copied: D755
    and F644 exactly (nginx on the mirror reads them whatever the master's umask; no setuid,
    setgid or executable bit travels). Directory times are left alone (ours come from staging
    trees). Hidden names and temporary suffixes are never sent nor deleted.
    """
    rsh = " ".join(_rsh_quote(a) for a in ssh_command(m, known_hosts, control))
    return [
        "rsync",
        "--times",
        "--omit-dir-times",
        "--perms",
        "--chmod=D755,F644",
        "--no-links",
        "--no-devices",
        "--no-specials",
        f"--timeout={IO_TIMEOUT}",
        "-e",
        rsh,
        *(f"--exclude={pattern}" for pattern in EXCLUDES),
    ]


def _remote(m: MirrorConfig, rel: str) -> str:
    path = posixpath.join(m.path, rel) if rel else m.path
    return f"{m.user}@{_host(m.host)}:{path.rstrip('/')}/"


def images_command(common: list[str], m: MirrorConfig, stage: str, files_from: str) -> list[str]:
    """Pass 1: the listed files (NUL-separated paths in `files_from`, relative to `stage`, the
    staging tree), kept sparse, nothing deleted. A file gone since it was checked is no error."""
    return [
        *common,
        f"--files-from={files_from}",
        "--from0",
        "--sparse",
        "--ignore-missing-args",
        stage.rstrip("/") + "/",
        _remote(m, ""),
    ]


def catalog_command(common: list[str], m: MirrorConfig, snapshot: Snapshot) -> list[str]:
    """Pass 2: streams/ as copied aside (v1/ and the page), replacing what the mirror has.

    The source carries no trailing slash: rsync then sets the attributes of streams/ (the push
    user's on the mirror), never those of the mirror's root, which the push user cannot write.
    """
    return [*common, "--recursive", "--delete-after", snapshot.streams, _remote(m, "")]


def deletions_command(common: list[str], m: MirrorConfig, snapshot: Snapshot) -> list[str]:
    """Pass 3: below images/, whatever the pushed catalog does not list goes. Nothing is sent
    (--existing --ignore-existing): the placeholders only name what stays."""
    return [
        *common,
        "--recursive",
        "--existing",
        "--ignore-existing",
        "--delete-after",
        snapshot.keep_images,
        _remote(m, posixpath.dirname(snapshot.images_rel)),
    ]


@dataclass(frozen=True)
class Snapshot:
    """The catalog as it was when a push began, copied aside below `root`: streams/ (with the
    page streams/index.html if the master has one), what its images.json lists, and the
    placeholder tree of those files for the deletions."""

    root: str
    #: the image directory relative to the served root ('images')
    images_rel: str
    listing: Listing = field(default_factory=lambda: Listing(()))

    @property
    def streams(self) -> str:
        return os.path.join(self.root, "streams")

    @property
    def keep_images(self) -> str:
        return os.path.join(self.root, "keep", self.images_rel)


def take_snapshot(source: Source, root: str) -> Snapshot:
    """Copies the catalog and the page into `root` (bounded, regular files only), reads what
    images.json lists and makes the placeholders. CatalogError: this push cannot go ahead."""
    prefix = image_prefix(source.root_dir, source.img_dir)
    if os.path.relpath(os.path.dirname(source.streams_dir), source.root_dir) != "streams":
        raise CatalogError(f"{source.streams_dir} is not <root>/streams/v1")
    streams = os.path.join(root, "streams")
    copied = copy_catalog(source.streams_dir, streams)
    if "images.json" not in copied:
        raise CatalogError("streams/v1/images.json is missing or not a regular file")
    with open(os.path.join(streams, "v1", "images.json"), "rb") as f:
        data = f.read()
    listing = list_catalog(data, prefix)
    snapshot = Snapshot(root, "/".join(prefix), listing)
    keep = os.path.join(root, "keep")
    shutil.rmtree(keep, ignore_errors=True)
    make_keep_tree(listing.paths, keep)
    os.makedirs(snapshot.keep_images, exist_ok=True)
    return snapshot


def _examples(pairs: Sequence[tuple[str, str]], limit: int = 3) -> str:
    shown = "; ".join(f"{path}: {why}" for path, why in pairs[:limit])
    more = len(pairs) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


#: the lines that say what went wrong, ahead of ssh's banners and rsync's epilogue
_DECISIVE = ("verification failed", "ssh:", "Permission denied", "rrsync error", "No such file")


def _summary(stderr: str, limit: int = 400) -> str:
    lines = [line.strip(" @") for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    decisive = [line for line in lines if any(d in line for d in _DECISIVE)]
    chosen = list(dict.fromkeys([*decisive, *lines]))[:3]
    text = "; ".join(chosen)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RsyncPusher:
    """Pushes `source` to one mirror with the system's rsync and ssh: one ssh connection per
    push, which the rsync runs share (a handshake costs more than a small push)."""

    def __init__(self, mirror: MirrorConfig, source: Source, work_dir: str) -> None:
        self.mirror = mirror
        self.source = source
        self.work_dir = work_dir
        self.known_hosts = os.path.join(work_dir, "known_hosts")
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[str]] = []
        self._cancelled = False

    def push(self) -> None:
        with self._lock:
            self._cancelled = False
        for what, value in (("remote", self.mirror.host), ("user", self.mirror.user)):
            if not value or value.startswith("-") or any(c.isspace() for c in value):
                raise PushError(f"mirror {self.mirror.name}: {what} {value!r} is not usable")
        if not os.path.lexists(os.path.join(self.source.streams_dir, "images.json")):
            log.debug("mirror %s: nothing published yet; nothing to push", self.mirror.name)
            return
        # a directory of its own: `update` by hand may push to the same mirror meanwhile
        try:
            os.makedirs(self.work_dir, exist_ok=True)
            snap_dir = tempfile.mkdtemp(
                prefix=f"push-{_file_name(self.mirror.name)}-", dir=self.work_dir
            )
        except OSError as e:
            raise PushError(f"cannot make a directory in {self.work_dir}: {e}") from e
        try:
            try:
                snapshot = take_snapshot(self.source, snap_dir)
            except CatalogError as e:
                raise PushError(f"catalog: {e}") from e
            except OSError as e:
                raise PushError(f"cannot copy the catalog to {snap_dir}: {e}") from e
            if snapshot.listing.refused:
                log.warning(
                    "mirror %s: %d path(s) of the catalog are not pushed: %s",
                    self.mirror.name,
                    len(snapshot.listing.refused),
                    _examples(snapshot.listing.refused),
                )
            self._push(snapshot)
        finally:
            shutil.rmtree(snap_dir, ignore_errors=True)

    def _push(self, snapshot: Snapshot) -> None:
        # short: a unix socket's path has room for about 100 bytes
        control = os.path.join(self.work_dir, f"cm-{secrets.token_hex(4)}")
        master = self._connect(control)
        try:
            common = rsync_command(self.mirror, self.known_hosts, control)
            self._send_images(snapshot, common)
            self._run("catalog", catalog_command(common, self.mirror, snapshot))
            self._run("deletions", deletions_command(common, self.mirror, snapshot))
        finally:
            master.terminate()
            master.communicate()
            with self._lock:
                self._procs.remove(master)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)

    def _send_images(self, snapshot: Snapshot, common: list[str]) -> None:
        """Pass 1, in runs of at most PINS_PER_RUN held directories."""
        skipped: list[tuple[str, str]] = []
        src = self.source
        prefix = snapshot.images_rel.split("/")
        try:
            with held_batches(snapshot.listing.paths, src.img_dir, prefix, skipped) as batches:
                for n, batch in enumerate(batches):
                    stage = os.path.join(snapshot.root, f"stage-{n}")
                    files_from = os.path.join(snapshot.root, f"files-{n}")
                    batch.stage(stage, files_from)
                    cmd = images_command(common, self.mirror, stage, files_from)
                    self._run("images", cmd, pass_fds=batch.fds)
                    shutil.rmtree(stage, ignore_errors=True)
        except OSError as e:
            where = e.filename or src.img_dir
            raise PushError(f"images: {where}: {e.strerror or e}") from e
        if skipped:
            log.warning(
                "mirror %s: %d listed file(s) not pushed (the mirror keeps what it has): %s",
                self.mirror.name,
                len(skipped),
                _examples(skipped),
            )

    def _spawn(
        self, step: str, cmd: list[str], pass_fds: Sequence[int] = ()
    ) -> subprocess.Popen[str]:
        log.debug("mirror %s: %s", self.mirror.name, shlex.join(cmd))
        with self._lock:
            if self._cancelled:
                raise PushCancelled(f"{step}: cancelled")
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    errors="replace",
                    pass_fds=pass_fds,
                )
            except FileNotFoundError as e:
                raise PushError(f"{step}: {e.filename} is not installed") from e
            self._procs.append(proc)
        return proc

    def _connect(self, control: str) -> subprocess.Popen[str]:
        """The shared connection: ssh -M -N, up once its control socket exists."""
        m = self.mirror
        cmd = [
            *ssh_command(m, self.known_hosts),
            *("-M", "-N", "-S", control, "-o", "ControlPersist=no"),
            f"{m.user}@{m.host}",
        ]
        proc = self._spawn("connect", cmd)
        deadline = time.monotonic() + CONNECT_TIMEOUT + 10
        while not os.path.exists(control):
            if proc.poll() is not None or self._cancelled or time.monotonic() > deadline:
                proc.terminate()
                _, stderr = proc.communicate()
                with self._lock:
                    self._procs.remove(proc)
                if self._cancelled:
                    raise PushCancelled("connect: cancelled")
                why = _summary(stderr) or f"no connection after {CONNECT_TIMEOUT + 10} s"
                raise PushError(f"connect: ssh exited {proc.returncode}: {why}")
            time.sleep(0.01)
        return proc

    def _run(self, step: str, cmd: list[str], pass_fds: Sequence[int] = ()) -> None:
        proc = self._spawn(step, cmd, pass_fds)
        try:
            _, stderr = proc.communicate()
        finally:
            with self._lock:
                self._procs.remove(proc)
        if self._cancelled:
            raise PushCancelled(f"{step}: cancelled")
        if proc.returncode == RSYNC_VANISHED:
            log.debug("mirror %s: %s: files vanished during the transfer", self.mirror.name, step)
        elif proc.returncode != 0:
            raise PushError(
                f"{step}: rsync exited {proc.returncode}: {_summary(stderr) or 'no message'}"
            )

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for proc in self._procs:
                if proc.poll() is None:
                    proc.terminate()


def _file_name(name: str) -> str:
    """A file name for a mirror's name (any TOML key), short and distinct."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:32]
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


# -- one worker per mirror ----------------------------------------------------------------------
