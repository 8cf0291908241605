"""Mirrors: push the published tree to other servers with rsync over ssh.

The master (`watch`, `run`): one worker thread per [mirrors.NAME]. After every publish each
worker is asked to push; asks that arrive during a push are folded into one more push. A push
is a few rsync runs over one ssh connection, in this order, so that a mirror never lists a
file it does not have:

  0. the catalog (streams/v1 and the page, streams/index.html) is copied aside; what its
     images.json lists, checked, is all that travels below images/ (mirror_list.py);
  1. images: the listed files, regular files only, never through a link, kept sparse;
  2. the catalog copied in step 0, so it lists nothing step 1 did not send;
  3. deletions: below images/, whatever that catalog does not list goes from the mirror.

Hidden files (uploads in progress, locks) and temporary names are never pushed nor deleted.
A failed push is retried after 5 s, doubling up to 10 min; the state (ok -> failing,
failing -> ok) is logged once per change and recorded in <state>/mirrors.json for
`lxd-image-server mirror status`.
A mirror that is down never holds back the others nor the publishing.

Host keys: first contact is trusted and remembered in <state>/mirrors/known_hosts; a changed
key is refused afterwards (ssh's StrictHostKeyChecking=accept-new).

The mirror (`authorize`): a push user whose key may only run rrsync, write-only, in the tree.
See docs/mirrors.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import pwd
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .config import DEFAULT_MIRROR_USER, Paths, StateDir
from .fsutil import can_traverse, open_dir, write_atomic
from .layout import TEMP_SUFFIXES
from .mirror_list import (
    CatalogError,
    Listing,
    copy_catalog,
    held_batches,
    image_prefix,
    list_catalog,
    make_keep_tree,
)
from .procs import pid_alive
from .settings import MirrorConfig

log = logging.getLogger(__name__)

FIRST_RETRY = 5.0
MAX_RETRY = 600.0
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


def retry_delay(failures: int, first: float = FIRST_RETRY, maximum: float = MAX_RETRY) -> float:
    """Seconds to wait after `failures` failed pushes in a row (1, 2, ...)."""
    return float(min(maximum, first * 2 ** max(0, failures - 1)))


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


@dataclass
class MirrorStatus:
    """What `mirror status` shows of one mirror (also its JSON form)."""

    target: str
    #: never (no push yet), ok, failing
    state: str = "never"
    pending: bool = False
    pushing: bool = False
    last_success: str | None = None
    last_duration: float | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    #: failed pushes in a row
    failures: int = 0
    next_attempt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> MirrorStatus | None:
        if not isinstance(doc, dict):
            return None
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return None


class MirrorWorker:
    """Pushes to one mirror in its own thread whenever asked; retries with backoff."""

    def __init__(
        self,
        config: MirrorConfig,
        pusher: Pusher,
        on_change: Callable[[], None] = lambda: None,
        first_retry: float = FIRST_RETRY,
        max_retry: float = MAX_RETRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.pusher = pusher
        self.on_change = on_change
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.clock = clock
        self._cond = threading.Condition()
        self._status = MirrorStatus(target=describe_target(config))
        self._pending = False
        self._retry_at: float | None = None  # time.monotonic()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"mirror-{config.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.config.name

    def status(self) -> MirrorStatus:
        with self._cond:
            return MirrorStatus(**asdict(self._status))

    def start(self) -> None:
        self._thread.start()

    def request(self) -> None:
        """Asks for a push (non-blocking). During a backoff, the retry brings it."""
        with self._cond:
            self._pending = self._status.pending = True
            self._cond.notify()

    def retry_now(self) -> None:
        """Asks for a push now, backoff or not (after a reload)."""
        with self._cond:
            self._retry_at = None
            self._status.next_attempt = None
            self._pending = self._status.pending = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.pusher.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("mirror %s: the push did not stop in %.0f s", self.name, timeout)

    def _wait_for_work(self) -> bool:
        """Blocks until a push is due; False when stopping."""
        with self._cond:
            while not self._stopping:
                if self._pending:
                    wait = 0.0 if self._retry_at is None else self._retry_at - time.monotonic()
                    if wait <= 0:
                        self._pending = self._status.pending = False
                        self._status.pushing = True
                        self._status.next_attempt = None
                        return True
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            return False

    def _run(self) -> None:
        while self._wait_for_work():
            self.on_change()
            started = time.monotonic()
            error: str | None = None
            try:
                self.pusher.push()
            except PushCancelled:
                with self._cond:
                    self._status.pushing = False
                    self._pending = self._status.pending = True  # not done: do it again
                continue
            except PushError as e:
                error = str(e)
            except Exception as e:  # a bug must not end the thread: report and retry
                log.exception("mirror %s: unexpected error during a push", self.name)
                error = f"unexpected error: {e!r}"
            self._finished(error, time.monotonic() - started)
            self.on_change()

    def _finished(self, error: str | None, duration: float) -> None:
        now = self.clock()
        with self._cond:
            st = self._status
            was_failing, failures = st.state == "failing", st.failures
            st.pushing = False
            if error is None:
                st.state, st.failures = "ok", 0
                st.last_success, st.last_duration = _utc(now), round(duration, 3)
                self._retry_at = None
            else:
                st.state, st.failures = "failing", failures + 1
                st.last_error, st.last_error_at = error, _utc(now)
                delay = retry_delay(st.failures, self.first_retry, self.max_retry)
                self._retry_at = time.monotonic() + delay
                st.next_attempt = _utc(now + delay)
                self._pending = st.pending = True
        if error is None:
            if was_failing:
                log.warning(
                    "mirror %s: push works again after %d failed attempt(s) (%.1f s)",
                    self.name,
                    failures,
                    duration,
                )
            else:
                log.info("mirror %s: pushed in %.1f s", self.name, duration)
        elif not was_failing:
            log.error(
                "mirror %s (%s): push failed, retrying with backoff: %s",
                self.name,
                describe_target(self.config),
                error,
            )
        else:
            log.debug("mirror %s: still failing (%d attempts): %s", self.name, failures + 1, error)


# -- all mirrors, and the state file ------------------------------------------------------------


def state_path(state_dir: str) -> str:
    return StateDir(state_dir).mirror_state


def read_state(state_dir: str) -> dict[str, Any] | None:
    try:
        with open(state_path(state_dir), "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_state(state_dir: str, mirrors: dict[str, MirrorStatus], merge: bool = False) -> None:
    """Writes <state>/mirrors.json atomically. `merge`: keeps the other mirrors' entries."""
    entries: dict[str, Any] = {}
    if merge:
        old = (read_state(state_dir) or {}).get("mirrors")
        if isinstance(old, dict):
            entries.update(old)
    entries.update({name: st.to_json() for name, st in mirrors.items()})
    doc = {"pid": os.getpid(), "updated": _utc(time.time()), "mirrors": entries}
    os.makedirs(state_dir, exist_ok=True)
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(state_path(state_dir), data)


class Mirrors:
    """The workers of the configured mirrors; `request` is the pipeline's on_publish hook."""

    def __init__(
        self,
        paths: Paths,
        make_pusher: Callable[[MirrorConfig], Pusher] | None = None,
        first_retry: float = FIRST_RETRY,
        max_retry: float = MAX_RETRY,
    ) -> None:
        self.state_dir = paths.state_dir
        self.work_dir = paths.state.mirror_work
        source = Source.from_paths(paths)
        self.make_pusher = make_pusher or (lambda m: RsyncPusher(m, source, self.work_dir))
        self.first_retry = first_retry
        self.max_retry = max_retry
        self._lock = threading.Lock()
        self._workers: dict[str, MirrorWorker] = {}
        self._write_failed = False

    def configure(self, configs: Iterable[MirrorConfig]) -> None:
        """Starts, keeps, restarts or stops workers to match `configs`; every mirror is then
        pushed (at once: a reload is also how to retry a failing mirror now)."""
        wanted = {m.name: m for m in configs}
        with self._lock:
            old = self._workers
            keep = {n: w for n, w in old.items() if wanted.get(n) == w.config}
            gone = [w for n, w in old.items() if n not in keep]
            fresh = {
                n: MirrorWorker(
                    m, self.make_pusher(m), self._changed, self.first_retry, self.max_retry
                )
                for n, m in wanted.items()
                if n not in keep
            }
            self._workers = {**keep, **fresh}
        for w in gone:  # outside the lock: their threads may be writing the state file
            w.stop()
        for w in fresh.values():
            log.info("mirror %s: pushing to %s", w.name, describe_target(w.config))
            w.start()
        for w in [*keep.values(), *fresh.values()]:
            w.retry_now()
        if old or wanted:
            self._changed()

    def request(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.request()

    def stop(self) -> None:
        """Stops every worker (a push in progress is cancelled: it stays pending) and
        records their last state."""
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.stop()
        if workers:
            self._changed()
        with self._lock:
            self._workers = {}

    def statuses(self) -> dict[str, MirrorStatus]:
        with self._lock:
            workers = list(self._workers.values())
        return {w.name: w.status() for w in workers}

    def _changed(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
            try:
                write_state(self.state_dir, {w.name: w.status() for w in workers})
                self._write_failed = False
            except OSError as e:
                if not self._write_failed:
                    log.warning("cannot record the mirrors' state in %s: %s", self.state_dir, e)
                self._write_failed = True


@dataclass
class PushResult:
    name: str
    ok: bool
    message: str
    duration: float
    status: MirrorStatus = field(repr=False, default_factory=lambda: MirrorStatus(target=""))


def push_once(
    configs: Iterable[MirrorConfig],
    paths: Paths,
    attempts: int = 3,
    wait: float = 2.0,
    make_pusher: Callable[[MirrorConfig], Pusher] | None = None,
) -> list[PushResult]:
    """`update` by hand: pushes to every mirror now, in turn, and records the outcome.

    A failure is tried again (`attempts` in all): the running watcher may be pushing to the
    same mirror, which rrsync refuses while it lasts.
    """
    source = Source.from_paths(paths)
    work_dir = paths.state.mirror_work
    make = make_pusher or (lambda m: RsyncPusher(m, source, work_dir))
    results = []
    for m in configs:
        pusher = make(m)
        started = time.monotonic()
        status = MirrorStatus(target=describe_target(m))
        error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait)
            try:
                pusher.push()
                error = ""
                break
            except PushError as e:
                error = str(e)
                log.debug("mirror %s: attempt %d failed: %s", m.name, attempt + 1, e)
        duration = time.monotonic() - started
        now = _utc(time.time())
        if error:
            status.state, status.failures = "failing", 1
            status.last_error, status.last_error_at = error, now
        else:
            status.state, status.last_success, status.last_duration = "ok", now, duration
        results.append(PushResult(m.name, not error, error or "pushed", duration, status))
    if results:
        try:
            write_state(paths.state_dir, {r.name: r.status for r in results}, merge=True)
        except OSError as e:
            log.warning("cannot record the mirrors' state in %s: %s", paths.state_dir, e)
    return results


def _ago(iso: str | None, now: float) -> str:
    if not iso:
        return "never"
    try:
        ts = dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return iso
    secs = now - ts
    if secs < 0:
        return f"{iso} (in {_span(-secs)})"
    return f"{iso} ({_span(secs)} ago)"


def _span(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f} s"
    if secs < 5400:
        return f"{secs / 60:.0f} min"
    if secs < 172800:
        return f"{secs / 3600:.1f} h"
    return f"{secs / 86400:.0f} days"


def describe(
    doc: dict[str, Any] | None, configured: Sequence[MirrorConfig], now: float
) -> tuple[list[str], bool]:
    """`mirror status`: the lines to print, and whether every mirror's last push worked."""
    lines: list[str] = []
    recorded = doc.get("mirrors") if doc else None
    entries = recorded if isinstance(recorded, dict) else {}
    if doc is None:
        lines.append("no mirror state recorded yet (the watcher writes it once it pushes)")
    else:
        pid = doc.get("pid")
        alive = "" if pid_alive(pid) else ", which is no longer running"
        lines.append(f"recorded {_ago(doc.get('updated'), now)} by pid {pid}{alive}")
    names = sorted({*entries, *(m.name for m in configured)})
    if not names:
        lines.append("no mirrors configured ([mirrors.NAME] in the configuration)")
        return lines, True
    all_ok = True
    by_name = {m.name: m for m in configured}
    for name in names:
        st = MirrorStatus.from_json(entries.get(name))
        m = by_name.get(name)
        lines.append("")
        if m is None:
            lines.append(f"{name}: {st.target if st else '?'} (no longer configured)")
        else:
            lines.append(f"{name}: {describe_target(m)}")
            if st is not None and st.target != describe_target(m):
                lines.append(f"  recorded for {st.target} (reload to push to the new target)")
        if st is None:
            lines.append("  state:        not pushed yet")
            all_ok = False
            continue
        state = st.state
        if st.state == "failing":
            state = f"failing ({st.failures} attempt(s) in a row)"
        extra = [x for x, on in (("pushing now", st.pushing), ("push pending", st.pending)) if on]
        lines.append(f"  state:        {state}{'; ' + ', '.join(extra) if extra else ''}")
        took = f", took {st.last_duration:.1f} s" if st.last_duration is not None else ""
        lines.append(
            f"  last success: {_ago(st.last_success, now)}{took if st.last_success else ''}"
        )
        if st.last_error:
            lines.append(f"  last error:   {_ago(st.last_error_at, now)}: {st.last_error}")
        if st.next_attempt and st.state == "failing":
            lines.append(f"  next attempt: {_ago(st.next_attempt, now)}")
        if st.state != "ok":
            all_ok = False
    return lines, all_ok


# -- the receiving side: `mirror authorize` -----------------------------------------------------

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class AuthorizeError(Exception):
    """The mirror cannot be prepared; the message says why."""


@dataclass(frozen=True)
class PublicKey:
    kind: str
    blob: str
    comment: str = ""

    def line(self, options: str) -> str:
        return " ".join(p for p in (options, self.kind, self.blob, self.comment) if p)


def parse_public_keys(text: str) -> list[PublicKey]:
    """The keys of a .pub file (one per line; no options: this command sets them)."""
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if parts[0] not in KEY_TYPES:
            raise AuthorizeError(
                f"line {number}: expected a public key (ssh-ed25519 AAAA... comment), "
                f"not {line[:40]!r}"
            )
        if len(parts) < 2:
            raise AuthorizeError(f"line {number}: the key itself is missing")
        try:
            decoded = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raise AuthorizeError(f"line {number}: the key is not base64") from None
        length = int.from_bytes(decoded[:4], "big")
        if decoded[4 : 4 + length] != parts[0].encode():
            raise AuthorizeError(f"line {number}: the key does not match its type {parts[0]}")
        keys.append(PublicKey(parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    if not keys:
        raise AuthorizeError("no public key found")
    return keys


def key_options(rrsync: str, root: str, absolute: bool) -> str:
    """The authorized_keys options: no pty, forwarding or rc (`restrict`), and rrsync in the
    tree, write-only (no reads at all), symlinks munged (a push cannot plant a live one)."""
    flags = "-wo -munge -absolute" if absolute else "-wo -munge"
    command = f"{shlex.quote(rrsync)} {flags} {shlex.quote(root)}"
    escaped = command.replace("\\", "\\\\").replace('"', '\\"')
    return f'restrict,command="{escaped}"'


def _key_of(line: str) -> tuple[str, str] | None:
    """(type, base64) of an authorized_keys line, whatever its options."""
    try:
        parts = shlex.split(line, comments=False, posix=True)
    except ValueError:
        parts = line.split()
    for i, part in enumerate(parts[:-1]):
        if part in KEY_TYPES:
            return part, parts[i + 1]
    return None


def merge_authorized_keys(existing: str, keys: Sequence[PublicKey], options: str) -> str:
    """`existing` with each key present once, with `options` (replacing older options)."""
    wanted = {(k.kind, k.blob): k.line(options) for k in keys}
    out: list[str] = []
    placed: set[tuple[str, str]] = set()
    for line in existing.splitlines():
        key = _key_of(line) if line.strip() and not line.lstrip().startswith("#") else None
        if key in wanted:
            if key not in placed:
                out.append(wanted[key])
                placed.add(key)
            continue
        out.append(line)
    out += [line for key, line in wanted.items() if key not in placed]
    return "\n".join(out) + "\n" if out else ""


def rrsync_path() -> str:
    found = shutil.which("rrsync") or (
        "/usr/bin/rrsync" if os.path.exists("/usr/bin/rrsync") else None
    )
    if found is None:
        raise AuthorizeError(
            "rrsync is missing: apt install rsync (Debian ships it as /usr/bin/rrsync)"
        )
    return found


def rrsync_has_absolute(rrsync: str) -> bool:
    """rsync >= 3.5's rrsync accepts the tree's absolute path with -absolute."""
    try:
        out = subprocess.run(
            [rrsync, "-help"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return "-absolute" in out.stdout + out.stderr


@dataclass
class AuthorizeReport:
    changes: list[str] = field(default_factory=list)
    user: str = DEFAULT_MIRROR_USER
    #: the `path` the master must use for this mirror
    path: str = ""


def _ensure_user(name: str, report: AuthorizeReport) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        # --system: no aging; a home for ~/.ssh; '*': no password, yet not "locked" (sshd
        # refuses locked accounts without PAM); a real shell: sshd runs the forced command
        # through it (nologin would refuse)
        cmd = [
            "useradd",
            "--system",
            "--create-home",
            "--home-dir",
            f"/home/{name}",
            "--shell",
            "/bin/sh",
            "--user-group",
            "--password",
            "*",
            name,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise AuthorizeError(f"useradd {name} failed: {proc.stderr.strip()}") from None
        report.changes.append(f"created the system user {name} (home /home/{name})")
        pw = pwd.getpwnam(name)
    if os.path.basename(pw.pw_shell) in ("nologin", "false"):
        raise AuthorizeError(
            f"{name}'s shell is {pw.pw_shell}: sshd runs rrsync through the login shell; "
            f"give it one (chsh -s /bin/sh {name}) or pick another --user"
        )
    return pw


def _root_owns(fd: int, mode: int) -> bool:
    """Makes the open file root's, with `mode`; True if that changed anything."""
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode):
        return False
    os.fchown(fd, 0, 0)
    os.fchmod(fd, mode)
    return True


def _lock_ssh_dir(pw: pwd.struct_passwd) -> bool:
    """The push user's home, ~/.ssh and authorized_keys become root's (0755, 0755, 0644, as
    sshd's StrictModes accepts): whatever the push user may run, it cannot change its key's
    restrictions. Links there are refused, never followed. True if anything changed."""
    try:
        home_fd = os.open(pw.pw_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise AuthorizeError(f"{pw.pw_name}'s home {pw.pw_dir} is not a directory") from None
    try:
        changed = _root_owns(home_fd, 0o755)
        try:
            ssh_fd = open_dir(".ssh", dir_fd=home_fd)
        except FileNotFoundError:
            os.mkdir(".ssh", 0o755, dir_fd=home_fd)
            ssh_fd = open_dir(".ssh", dir_fd=home_fd)
        except NotADirectoryError:
            raise AuthorizeError(
                f"{pw.pw_dir}/.ssh is a symlink or not a directory; refusing to write through it"
            ) from None
    finally:
        os.close(home_fd)
    try:
        changed = _root_owns(ssh_fd, 0o755) or changed
        try:
            keys_fd = os.open(
                "authorized_keys", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ssh_fd
            )
        except FileNotFoundError:
            return changed
        except OSError as e:
            raise AuthorizeError(f"cannot open {pw.pw_dir}/.ssh/authorized_keys: {e}") from e
        try:
            return _root_owns(keys_fd, 0o644) or changed
        finally:
            os.close(keys_fd)
    finally:
        os.close(ssh_fd)


def _install_keys(pw: pwd.struct_passwd, keys: Sequence[PublicKey], options: str) -> bool:
    """Merges `keys` with `options` into the push user's authorized_keys (root's, 0644, see
    _lock_ssh_dir, which must have run). True if the file changed."""
    ssh_dir = os.path.join(pw.pw_dir, ".ssh")
    path = os.path.join(ssh_dir, "authorized_keys")
    existing = ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise AuthorizeError(f"cannot read {path}: {e.strerror}") from e
    else:
        with os.fdopen(fd, encoding="utf-8", errors="surrogateescape") as f:
            existing = f.read()
    merged = merge_authorized_keys(existing, keys, options)
    if merged == existing:
        return False
    fd, tmp = tempfile.mkstemp(prefix=".authorized_keys.", dir=ssh_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(merged)
            f.flush()
            _root_owns(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a symlink at `path` is replaced, never followed
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _own_tree(top: str, uid: int, gid: int) -> int:
    """Makes everything below `top` the push user's, through directory descriptors opened
    without following links (os.fwalk): a link, or a directory swapped for one meanwhile, is
    never followed out of the tree. Returns the number of entries changed."""
    changed = 0
    for _, dirnames, filenames, dir_fd in os.fwalk(top, follow_symlinks=False):
        for name in [*dirnames, *filenames]:
            try:
                st = os.lstat(name, dir_fd=dir_fd)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                    changed += 1
            except FileNotFoundError:
                continue  # gone meanwhile
    return changed


def _home_inside(real_root: str, user: str) -> str | None:
    """The push user's home (existing, or the one useradd will make) if `real_root` holds it:
    rrsync there could replace ~/.ssh/authorized_keys and lift the key's restrictions."""
    try:
        home = pwd.getpwnam(user).pw_dir
    except KeyError:
        home = f"/home/{user}"
    real_home = os.path.realpath(home)
    if real_home == real_root or real_home.startswith(real_root.rstrip("/") + "/"):
        return home
    return None


def _push_dir(root_fd: int, rel: str, pw: pwd.struct_passwd, shown: str) -> str | None:
    """Makes `rel` (below the tree) a real directory of the push user's, mode 0755, through
    descriptors (a link there is refused, never followed). Returns what changed, if anything."""
    parent, name = os.path.split(rel)
    parent_fd = open_dir(parent, dir_fd=root_fd) if parent else os.dup(root_fd)
    try:
        made = None
        try:
            fd = open_dir(name, dir_fd=parent_fd)
        except FileNotFoundError:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            fd = open_dir(name, dir_fd=parent_fd)
            made = f"created {shown}, owned by {pw.pw_name}"
    except NotADirectoryError:
        raise AuthorizeError(
            f"{shown} is a symlink or not a directory; the push writes into a real directory"
        ) from None
    finally:
        os.close(parent_fd)
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid) or stat.S_IMODE(st.st_mode) != 0o755:
            os.fchown(fd, pw.pw_uid, pw.pw_gid)
            os.fchmod(fd, 0o755)
            made = made or f"{shown}: owned by {pw.pw_name}, mode 0755"
    finally:
        os.close(fd)
    return made


def authorize(key_text: str, user: str, root: str) -> AuthorizeReport:
    """Prepares this machine (as root) to receive pushes for `root` from the holder of the
    keys in `key_text`. Idempotent."""
    if not _USER_NAME.fullmatch(user):
        raise AuthorizeError(f"{user!r} is not a valid user name")
    keys = parse_public_keys(key_text)
    if os.geteuid() != 0:
        raise AuthorizeError("run it as root (it creates a user and changes owners)")
    rrsync = rrsync_path()
    report = AuthorizeReport(user=user)
    real_root = os.path.realpath(root)
    home = _home_inside(real_root, user)
    if home is not None:
        raise AuthorizeError(
            f"{real_root} holds {user}'s home {home}: a push there could replace "
            "~/.ssh/authorized_keys and lift the key's restrictions; choose another --root "
            "or --user"
        )
    if not os.path.isdir(root):
        os.makedirs(root, mode=0o755)
        report.changes.append(f"created {root}")
    pw = _ensure_user(user, report)
    gids = {pw.pw_gid, *os.getgrouplist(user, pw.pw_gid)}
    if not can_traverse(real_root, pw.pw_uid, gids):
        raise AuthorizeError(
            f"{user} cannot reach {real_root}: make it and its parents traversable "
            "(chmod o+x), then run this again"
        )
    root_fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for rel in ("images", "streams", "streams/v1"):
            change = _push_dir(root_fd, rel, pw, os.path.join(real_root, rel))
            if change:
                report.changes.append(change)
    finally:
        os.close(root_fd)
    for rel in ("images", "streams"):
        n = _own_tree(os.path.join(real_root, rel), pw.pw_uid, pw.pw_gid)
        if n:
            report.changes.append(f"{real_root}/{rel}: {n} entries given to {user}")
    absolute = rrsync_has_absolute(rrsync)
    report.path = real_root if absolute else "/"
    if _lock_ssh_dir(pw):
        report.changes.append(
            f"{pw.pw_dir}, its .ssh/ and authorized_keys: root's, so {user} cannot change "
            "its key's restrictions"
        )
    if _install_keys(pw, keys, key_options(rrsync, real_root, absolute)):
        report.changes.append(
            f"{pw.pw_dir}/.ssh/authorized_keys: {len(keys)} key(s) limited to "
            f"`rrsync -wo` in {real_root}"
        )
    return report
