"""Follow images/ with inotify and republish as soon as a version changes.

- Every visible directory down to the version level is watched; a directory created or moved
  in is watched and rescanned whole (it may arrive with files inside).
- A file is "being written" from its first write until it is closed; such files are left out of
  the catalog, so a slow scp/sftp upload is published only once complete.
- Events are coalesced: the pipeline runs once things have been quiet for `quiet` seconds, and
  at the latest `max_delay` seconds after the first event of a burst.
- Queue overflow: everything is rescanned. SIGTERM/SIGINT: the current publish finishes, then
  exit 0. SIGHUP: full rescan (and whatever `on_reload` does).
- Versions are hashed in the background (pipeline.py): a pass publishes what is hashed within
  `budget` seconds; a version slow to hash is added by a later pass, woken when it is done.
- Versions out of the catalog (prune, remove, [retention]) lose their files when their grace
  period is over: the watcher wakes then and deletes them (as `update` does), so a server
  without the daily `update` (run, the container) does not keep them forever.

What an uploader can do to it (every uploader is assumed hostile):
- Only directories that fit the layout get a watch (valid names, no deeper than a version),
  and at most `max_watches` of them (default 4096: half of the smallest default of
  fs.inotify.max_user_watches, 8192, so the kernel limit is never what stops us; enough for
  about 3,000 versions). The directories above the versions are watched first (every new
  version appears in one of them), then the versions, newest first. Past the cap: one warning,
  and the whole tree is rescanned every `rescan_interval` seconds, with new watches added as
  room frees; a version directory created or moved in takes the watch of the version quiet
  the longest, so new uploads are followed as closely as below the cap; a file in a directory
  without a watch is published only once unchanged for that long (nothing tells us it is
  still being written).
- Warnings about the same bad path are logged once an hour, not at every scan (logs.Once).
- Nothing on disk stops the loop: every pass's error is logged and retried.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import select
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from types import FrameType

from inotify_simple import INotify, flags

from .config import ConfigError
from .layout import (
    KNOWN_ARCHES,
    VERSION_DEPTH,
    LayoutError,
    check_component,
    classify,
    is_ignored_name,
    valid_serial,
)
from .logs import Once
from .pipeline import Pipeline
from .publish import PublishError
from .retention import RetentionError, delete_expired, next_expiry

log = logging.getLogger(__name__)
#: what an uploader can make us say again and again: said once an hour (QUIET_LOGGERS)
quiet_log = logging.getLogger(f"{__name__}.quiet")

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
DEFAULT_MAX_WATCHES = 4096
DEFAULT_RESCAN_INTERVAL = 60.0
#: seconds a pass waits for the versions it hashes before publishing those that are done
DEFAULT_BUDGET = 1.0
#: loggers whose repeated warnings (one per bad path per scan) are said once an hour
QUIET_LOGGERS = ("scan", "catalog", "overrides", "hashing", "watch.quiet")


def _depth(rel: str) -> int:
    return 0 if rel == "" else rel.count("/") + 1


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def fits_layout(depth: int, name: str) -> bool:
    """Whether a directory `name` at `depth` below images/ could hold or lead to a version."""
    if depth < 1 or depth > VERSION_DEPTH or is_ignored_name(name):
        return False
    if depth == 3:
        return name in KNOWN_ARCHES
    if depth == VERSION_DEPTH:
        return valid_serial(name)
    try:
        check_component(name, "name")
    except LayoutError:
        return False
    return True


class Watcher:
    def __init__(
        self,
        pipeline: Pipeline,
        quiet: float = 0.2,
        max_delay: float = 1.0,
        on_reload: Callable[[], None] | None = None,
        pid_file: str | None = None,
        max_watches: int = DEFAULT_MAX_WATCHES,
        rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        self.pipeline = pipeline
        self.img_dir = pipeline.paths.img_dir
        self.quiet = quiet
        self.max_delay = max_delay
        self.on_reload = on_reload
        self.pid_file = pid_file
        self.max_watches = max(1, max_watches)
        self.rescan_interval = rescan_interval
        self.budget = budget
        #: absolute paths of files opened for writing and not yet closed
        self.writing: set[str] = set()
        pipeline.scanner.exclude = self._excluded
        pipeline.on_hashed = self._wake
        pipeline.defer_page = True  # written once no publish is due (_write_page)
        self.inotify = INotify()
        self.wds: dict[int, str] = {}
        #: the same, the other way round: watched directory (relative to images/) -> wd
        self.watched: dict[str, int] = {}
        #: the watched version directories, the one quiet the longest first (evicted first
        #: when a new version needs a watch at the cap)
        self.version_watches: OrderedDict[str, None] = OrderedDict()
        #: some directory that fits the layout has no watch (the cap): poll the tree
        self.over_cap = False
        self._cap_hit = False
        self.next_rescan: float | None = None
        self.dirty: set[str] = set()
        self.collect_due = False
        self.first_event = 0.0
        self.last_event = 0.0
        self.retry_at: float | None = None
        self.stopping = False
        self.reload_requested = False
        #: when the first pruned version's grace period is over (time.time()), or None
        self.next_expiry: float | None = None
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

    def _add_tree(self, rel: str, evict: bool = False) -> None:
        """Watches `rel` and every directory below it that fits the layout, down to versions
        (at most `max_watches` in all), level by level: every directory above the versions
        first (each new version appears in one of them), then the version directories, the
        most recently changed first. Each directory is listed only once it is watched, so
        nothing created meanwhile goes unseen.

        `evict`: the version directories found are new (created or moved in): at the cap, each
        takes the watch of the version directory that has been quiet the longest (an old
        version, complete for a long time, needs no watch: a rescan still sees it change)."""
        level = [rel]
        depth = _depth(rel)
        while level:
            below: list[tuple[int, str]] = []
            for r in level:
                if not self._add_watch(r, evict and depth == VERSION_DEPTH):
                    continue
                if depth < VERSION_DEPTH:
                    self._list_into(r, depth, below)
            if depth + 1 == VERSION_DEPTH:
                below.sort(key=lambda e: e[0], reverse=True)  # newest first
            level = [r for _, r in below]
            depth += 1

    def _list_into(self, rel: str, depth: int, out: list[tuple[int, str]]) -> None:
        """The subdirectories of `rel` that fit the layout, with their mtime, into `out`."""
        path = os.path.join(self.img_dir, rel) if rel else self.img_dir
        try:
            entries = os.scandir(path)
        except OSError:
            return
        with entries:
            for entry in entries:
                if not fits_layout(depth + 1, entry.name):
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
                out.append((mtime, _join(rel, entry.name)))

    def _add_watch(self, rel: str, evict: bool) -> bool:
        """Watches the directory `rel` (True), unless the cap or an error prevents it."""
        if rel in self.watched:
            return True
        if len(self.watched) >= self.max_watches and evict and self.version_watches:
            quiet, _ = self.version_watches.popitem(last=False)
            wd = self.watched[quiet]
            self._forget_wd(wd)
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(wd)
        if len(self.watched) >= self.max_watches:
            self._cap_hit = True
            return False
        path = os.path.join(self.img_dir, rel) if rel else self.img_dir
        try:
            wd = self.inotify.add_watch(path, DIR_MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                quiet_log.warning(
                    "cannot watch %r: inotify watch limit reached "
                    "(raise fs.inotify.max_user_watches or lower --max-watches)",
                    path,
                )
                self._cap_hit = True
            elif e.errno not in (errno.ENOENT, errno.ENOTDIR):
                quiet_log.warning("cannot watch %r: %s", path, e.strerror or e)
            return False
        old = self.wds.get(wd)
        if old is not None and self.watched.get(old) == wd:
            self._forget_wd(wd)  # the same directory, moved: known by its new name
        self.wds[wd] = rel
        self.watched[rel] = wd
        if _depth(rel) == VERSION_DEPTH:
            self.version_watches[rel] = None
        return True

    def _watch_tree(self, rel: str, evict: bool = False) -> None:
        """`_add_tree`, then says once when the cap left directories without a watch."""
        self._cap_hit = False
        self._add_tree(rel, evict)
        if self._cap_hit and not self.over_cap:
            quiet_log.warning(
                "inotify watch cap (%d) reached: directories beyond it are not watched; "
                "rescanning the whole tree every %.0f s",
                self.max_watches,
                self.rescan_interval,
            )
            self.over_cap = True
            self.next_rescan = time.monotonic() + self.rescan_interval
        elif not self._cap_hit and rel == "" and self.over_cap:
            log.info("every directory is watched again (%d watches)", len(self.watched))
            self.over_cap = False
            self.next_rescan = None

    def _forget_wd(self, wd: int) -> str | None:
        rel = self.wds.pop(wd, None)
        if rel is not None and self.watched.get(rel) == wd:
            del self.watched[rel]
            self.version_watches.pop(rel, None)
        return rel

    def _drop_tree(self, rel: str) -> None:
        """Stops watching `rel` and below (it was moved away)."""
        for wd, wrel in list(self.wds.items()):
            if wrel == rel or wrel.startswith(rel + "/"):
                self._forget_wd(wd)
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
        self.watched.clear()
        self.version_watches.clear()
        self.writing.clear()
        self.over_cap = False
        self._watch_tree("")

    def _excluded(self, path: str) -> bool:
        """Files the scanner leaves out: being written, as far as we can tell."""
        if path in self.writing:
            return True
        if not self.over_cap:
            return False
        # (the scanner's paths are img_dir/rel/name: no relpath needed)
        parent = path[len(self.img_dir) + 1 :].rpartition("/")[0]
        if parent in self.watched:
            return False
        # no watch there: publish it only once it has not changed for a rescan interval
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return time.time() - max(st.st_mtime, st.st_ctime) < self.rescan_interval

    # -- events -----------------------------------------------------------------------------

    def _mark(self, rel: str) -> None:
        now = time.monotonic()
        if not self.dirty:
            self.first_event = now
        self.last_event = now
        self.dirty.add(rel)

    def handle(self, wd: int, mask: int, name: str) -> None:
        if mask & flags.Q_OVERFLOW:
            quiet_log.warning("inotify queue overflowed; rescanning everything")
            self._rewatch_all()
            self._mark("")
            return
        if mask & flags.IGNORED:
            rel = self._forget_wd(wd)
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
            if not fits_layout(_depth(rel), name):
                return  # nothing that does not fit the layout is published: no watch either
            if mask & (flags.CREATE | flags.MOVED_TO):
                self._watch_tree(rel, evict=True)
            elif mask & flags.MOVED_FROM:
                self._drop_tree(rel)
            self._mark(rel)
            return
        if _depth(base) != VERSION_DEPTH:
            log.debug("ignoring %r: not inside a version directory", rel)
            return
        if base in self.version_watches:
            self.version_watches.move_to_end(base)
        path = os.path.join(self.img_dir, rel)
        if mask & (flags.CREATE | flags.MODIFY) and classify(name) is None:
            self._mark(base)  # never published: no need to remember it is being written
            return
        if mask & flags.CREATE:
            try:
                empty = os.lstat(path).st_size == 0
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
        if self.dirty or self.collect_due:
            times.append(min(self.last_event + self.quiet, self.first_event + self.max_delay))
        if self.retry_at is not None:
            times.append(self.retry_at)
        if self.next_rescan is not None:
            times.append(self.next_rescan)
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _wait(self) -> float | None:
        """Seconds to sleep: until pending work or the next expiry is due (None: no limit)."""
        due = self._due()
        if self.next_expiry is not None:
            expiry = max(0.0, self.next_expiry - time.time())
            due = expiry if due is None else min(due, expiry)
        return due

    def _plan_expiry(self) -> None:
        self.next_expiry = next_expiry(self.pipeline.paths)

    def _expire(self) -> None:
        """Deletes the files of versions whose grace period is over."""
        if self.next_expiry is None or time.time() < self.next_expiry:
            return
        try:
            deleted = delete_expired(self.pipeline.paths)
        except RetentionError as e:
            log.error("not deleting pruned versions: %s", e)
            self.next_expiry = None  # until a publish records another (the file may be fixed)
            return
        except Exception:
            log.exception("deleting expired versions failed; retrying later")
            self.next_expiry = time.time() + RETRY_AFTER_ERROR
            return
        if deleted:
            log.info("deleted the files of %d expired version(s)", len(deleted))
        self._plan_expiry()
        if self.next_expiry is not None and self.next_expiry <= time.time():
            # kept for a later try (a link, a permission): not in a busy loop
            self.next_expiry = time.time() + DEFAULT_RESCAN_INTERVAL

    def _results_ready(self) -> None:
        """A version hashed in the background: publish it with the next pass."""
        if not self.collect_due:
            self.collect_due = True
            now = time.monotonic()
            if not self.dirty:
                self.first_event = now
            self.last_event = now

    def _process(self) -> None:
        if self.next_rescan is not None and time.monotonic() >= self.next_rescan:
            self.next_rescan = time.monotonic() + self.rescan_interval
            self._watch_tree("")  # room may have freed up
            self.dirty.add("")
        prefixes, self.dirty = self.dirty, set()
        self.collect_due = False
        if "" in prefixes and "" not in self.watched and os.path.isdir(self.img_dir):
            self._rewatch_all()
        try:
            self.pipeline.refresh(prefixes, self.budget)
            self.retry_at = None
            self._plan_expiry()  # the publish may have pruned versions
            if "" in prefixes:
                _settle_heap()
        except PublishError as e:
            log.error("%s; retrying in %.0f s", e, RETRY_AFTER_ERROR)
            self._retry(prefixes)
        except Exception:
            log.exception(
                "unexpected error while publishing; retrying in %.0f s", RETRY_AFTER_ERROR
            )
            self._retry(prefixes)

    def _page_ready(self) -> bool:
        """The catalog page is due and no publish is pending: its turn."""
        return self.pipeline.page_due and not self.dirty and not self.collect_due

    def _write_page(self) -> None:
        try:
            self.pipeline.write_page()
        except PublishError as e:
            log.error("%s; writing it again after the next publish", e)
        except Exception:
            log.exception("unexpected error while writing the catalog page")

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
        gc.unfreeze()  # the next full pass collects, then freezes again (_settle_heap)

    # -- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        once = Once()
        quiet = [logging.getLogger(f"{__package__}.{name}") for name in QUIET_LOGGERS]
        for logger in quiet:
            logger.addFilter(once)
        try:
            return self._run()
        finally:
            for logger in quiet:
                logger.removeFilter(once)

    def _run(self) -> int:
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
            self._watch_tree("")
            log.info("watching %s (%d directories)", self.img_dir, len(self.wds))
            try:
                # at start, everything is hashed before the first publish (without the lock):
                # a lost hash cache must not publish a shrunken catalog for a while
                self.pipeline.update_all()
            except PublishError as e:
                log.error("%s; retrying in %.0f s", e, RETRY_AFTER_ERROR)
                self._retry({""})
            except Exception:
                log.exception("unexpected error while publishing; retrying")
                self._retry({""})
            self._plan_expiry()
            _settle_heap()
            poller = select.poll()
            poller.register(self.inotify.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while not self.stopping:
                wait = self._wait()
                timeout_ms = None if wait is None else int(wait * 1000) + 1
                if self._page_ready():
                    timeout_ms = 0  # look for events first: the page waits for them
                for fd, _ in poller.poll(timeout_ms):
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                if self._stop_requested():
                    break
                for event in self.inotify.read(timeout=0):
                    self.handle(event.wd, event.mask, event.name)
                if self.pipeline.has_news():
                    self._results_ready()
                if self.reload_requested:
                    self._reload()
                self._expire()
                due = self._due()
                if due is not None and due <= 0:
                    self._process()
                elif self._page_ready():
                    self._write_page()
            if self.pipeline.page_due:
                self._write_page()
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


def _settle_heap() -> None:
    """After a pass over the whole tree: the objects describing it (hundreds of thousands at
    20,000 versions) live until the next such pass, and the garbage collector would walk them
    all at every full collection, stalling publishes by a tenth of a second or more. They are
    moved out of its sight (gc.freeze), after a collection when nothing is frozen yet (at
    start, and after a reload (SIGHUP) gave everything back to the collector). What is created
    later is collected as usual."""
    if gc.get_freeze_count() == 0:
        gc.collect()
    gc.freeze()


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
