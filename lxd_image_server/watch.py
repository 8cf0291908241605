"""Follow images/ with inotify and republish as soon as a version changes.

- Every visible directory down to the version level is watched; a directory created or moved
  in is watched and rescanned whole (it may arrive with files inside).
- A file is "being written" from its first write until it is closed; such files are left out of
  the catalog, so a slow scp/sftp upload is published only once complete.
- Events are coalesced: the pipeline runs once things have been quiet for `quiet` seconds, and
  at the latest `max_delay` seconds after the first event of a burst.
- Queue overflow: everything is rescanned. SIGTERM/SIGINT: the current publish finishes, then
  exit 0. SIGHUP: full rescan (and whatever `on_reload` does).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from types import FrameType

from inotify_simple import INotify, flags

from .config import ConfigError
from .layout import VERSION_DEPTH, is_ignored_name
from .pipeline import Pipeline
from .publish import PublishError

log = logging.getLogger(__name__)

DIR_MASK = (
    flags.CREATE
    | flags.CLOSE_WRITE
    | flags.MODIFY
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.DELETE
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
)
RETRY_AFTER_ERROR = 5.0


def _depth(rel: str) -> int:
    return 0 if rel == "" else rel.count("/") + 1


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class Watcher:
    def __init__(
        self,
        pipeline: Pipeline,
        quiet: float = 0.2,
        max_delay: float = 1.0,
        on_reload: Callable[[], None] | None = None,
        pid_file: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.img_dir = pipeline.paths.img_dir
        self.quiet = quiet
        self.max_delay = max_delay
        self.on_reload = on_reload
        self.pid_file = pid_file
        #: absolute paths of files opened for writing and not yet closed
        self.writing: set[str] = set()
        pipeline.scanner.exclude = self.writing.__contains__
        self.inotify = INotify()
        self.wds: dict[int, str] = {}
        self.dirty: set[str] = set()
        self.first_event = 0.0
        self.last_event = 0.0
        self.retry_at: float | None = None
        self.stopping = False
        self.reload_requested = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals ----------------------------------------------------------------------------

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing current work and exiting", signal.Signals(signum).name)
        self.stopping = True
        self._wake()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True
        self._wake()

    def _stop_requested(self) -> bool:
        return self.stopping

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- watches ----------------------------------------------------------------------------

    def _add_tree(self, rel: str) -> None:
        """Watches `rel` and every visible directory below it, down to version directories."""
        path = os.path.join(self.img_dir, rel) if rel else self.img_dir
        try:
            wd = self.inotify.add_watch(path, DIR_MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                log.error(
                    "cannot watch %s: inotify watch limit reached "
                    "(raise fs.inotify.max_user_watches)",
                    path,
                )
            elif e.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("cannot watch %s: %s", path, e.strerror or e)
            return
        self.wds[wd] = rel
        if _depth(rel) >= VERSION_DEPTH:
            return
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            if not is_ignored_name(entry.name) and entry.is_dir(follow_symlinks=False):
                self._add_tree(_join(rel, entry.name))

    def _drop_tree(self, rel: str) -> None:
        """Stops watching `rel` and below (it was moved away)."""
        for wd, wrel in list(self.wds.items()):
            if wrel == rel or wrel.startswith(rel + "/"):
                del self.wds[wd]
                with contextlib.suppress(OSError):
                    self.inotify.rm_watch(wd)
        prefix = os.path.join(self.img_dir, rel) + "/"
        for p in [p for p in self.writing if p.startswith(prefix)]:
            self.writing.discard(p)

    def _rewatch_all(self) -> None:
        for wd in list(self.wds):
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(wd)
        self.wds.clear()
        self.writing.clear()
        self._add_tree("")

    # -- events -----------------------------------------------------------------------------

    def _mark(self, rel: str) -> None:
        now = time.monotonic()
        if not self.dirty:
            self.first_event = now
        self.last_event = now
        self.dirty.add(rel)

    def handle(self, wd: int, mask: int, name: str) -> None:
        if mask & flags.Q_OVERFLOW:
            log.warning("inotify queue overflowed; rescanning everything")
            self._rewatch_all()
            self._mark("")
            return
        if mask & flags.IGNORED:
            rel = self.wds.pop(wd, None)
            if rel == "":
                log.error("%s disappeared; waiting for it to come back", self.img_dir)
                self._mark("")
            return
        base = self.wds.get(wd)
        if base is None:
            return
        if mask & (flags.DELETE_SELF | flags.MOVE_SELF):
            if base == "":
                self._mark("")
            return
        if not name or is_ignored_name(name):
            return
        rel = _join(base, name)
        if mask & flags.ISDIR:
            if _depth(rel) > VERSION_DEPTH:
                return
            if mask & (flags.CREATE | flags.MOVED_TO):
                self._add_tree(rel)
            elif mask & flags.MOVED_FROM:
                self._drop_tree(rel)
            self._mark(rel)
            return
        if _depth(base) != VERSION_DEPTH:
            log.debug("ignoring %s: not inside a version directory", rel)
            return
        path = os.path.join(self.img_dir, rel)
        if mask & flags.CREATE:
            try:
                empty = os.stat(path).st_size == 0
            except OSError:
                empty = False
            if empty:
                self.writing.add(path)
        elif mask & flags.MODIFY:
            if path in self.writing:
                return
            self.writing.add(path)
        elif mask & (flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE):
            self.writing.discard(path)
        self._mark(base)

    def _due(self) -> float | None:
        """Seconds until the pending work is due (0: now), None if nothing is pending."""
        now = time.monotonic()
        times = []
        if self.dirty:
            times.append(min(self.last_event + self.quiet, self.first_event + self.max_delay))
        if self.retry_at is not None:
            times.append(self.retry_at)
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _process(self) -> None:
        prefixes, self.dirty = self.dirty, set()
        if "" in prefixes and "" not in self.wds.values() and os.path.isdir(self.img_dir):
            self._rewatch_all()
        try:
            self.pipeline.refresh(prefixes)
            self.retry_at = None
        except PublishError as e:
            log.error("%s; retrying in %.0f s", e, RETRY_AFTER_ERROR)
            self._retry(prefixes)
        except Exception:
            log.exception(
                "unexpected error while publishing; retrying in %.0f s", RETRY_AFTER_ERROR
            )
            self._retry(prefixes)

    def _retry(self, prefixes: set[str]) -> None:
        self.dirty |= prefixes
        self.first_event = self.last_event = time.monotonic() + RETRY_AFTER_ERROR
        self.retry_at = self.first_event

    def _reload(self) -> None:
        self.reload_requested = False
        log.info("reloading: rescanning everything")
        if self.on_reload is not None:
            try:
                self.on_reload()
            except ConfigError as e:
                log.error("%s; keeping the previous configuration", e)
            except Exception:
                log.exception("reload failed; keeping the previous configuration")
        self._rewatch_all()
        self._mark("")

    # -- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        previous = {
            s: signal.signal(s, h)
            for s, h in (
                (signal.SIGTERM, self._on_stop),
                (signal.SIGINT, self._on_stop),
                (signal.SIGHUP, self._on_hup),
            )
        }
        try:
            if self.pid_file:
                write_pid_file(self.pid_file)
            os.makedirs(self.img_dir, exist_ok=True)
            self._add_tree("")
            log.info("watching %s (%d directories)", self.img_dir, len(self.wds))
            try:
                self.pipeline.update_all()
            except PublishError as e:
                log.error("%s; retrying in %.0f s", e, RETRY_AFTER_ERROR)
                self._retry({""})
            poller = select.poll()
            poller.register(self.inotify.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while not self.stopping:
                due = self._due()
                timeout_ms = None if due is None else int(due * 1000) + 1
                for fd, _ in poller.poll(timeout_ms):
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                if self._stop_requested():
                    break
                for event in self.inotify.read(timeout=0):
                    self.handle(event.wd, event.mask, event.name)
                if self.reload_requested:
                    self._reload()
                due = self._due()
                if due is not None and due <= 0:
                    self._process()
            log.info("stopped")
            return 0
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(self.pid_file)
            self.inotify.close()
            os.close(self._wake_r)
            os.close(self._wake_w)


def write_pid_file(path: str) -> None:
    """Where `lxd-image-server reload` finds the running watcher."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(path + ".tmp", path)


def signal_watcher(pid_file: str, signum: int = signal.SIGHUP) -> int:
    """Sends `signum` to the watcher named in `pid_file`; returns its pid.

    Raises ProcessLookupError (with a clear message) when no watcher runs.
    """
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        raise ProcessLookupError(f"no running watcher ({pid_file} is missing or empty)") from None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        raise ProcessLookupError(
            f"no running watcher (pid {pid} from {pid_file} is gone)"
        ) from None
    if b"watch" not in cmdline:
        raise ProcessLookupError(f"pid {pid} from {pid_file} is not a watcher")
    os.kill(pid, signum)
    return pid
