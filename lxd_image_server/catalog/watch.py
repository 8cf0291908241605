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
- Only directories that fit the layout get a watch, at most `max_watches` of them, the
  directories above the versions first, then the newest versions (watch_set.py: the watches
  and the cap). Past the cap the whole tree is rescanned every `rescan_interval` seconds; a
  file in a directory without a watch is published only once unchanged for that long (nothing
  tells us it is still being written).
- Warnings about the same bad path are logged once an hour, not at every scan (logs.Once).
- Nothing on disk stops the loop: every pass's error is logged and retried.
- Publish requests (publish_requests.py: `import` names the versions it placed) are taken on
  a socket polled next to the inotify descriptor: those versions are rescanned and published
  at once, and the request answered after that publish. Nothing a client sends stops the loop.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType

from inotify_simple import flags

from lxd_image_server.catalog.departures import UnexplainedDepartures
from lxd_image_server.catalog.listed import listed_among
from lxd_image_server.catalog.pipeline import Pipeline, Use
from lxd_image_server.catalog.publish import PublishError
from lxd_image_server.catalog.publish_server import RequestServer
from lxd_image_server.catalog.retention import RetentionError, delete_expired, next_expiry
from lxd_image_server.catalog.watch_pid import write_pid_file
from lxd_image_server.catalog.watch_set import (
    DEFAULT_MAX_WATCHES,
    DEFAULT_RESCAN_INTERVAL,
    WatchSet,
    fits_layout,
    rel_depth,
    rel_join,
)
from lxd_image_server.config import ConfigError, Paths
from lxd_image_server.gcpause import settle_heap
from lxd_image_server.logs import Once
from lxd_image_server.tree.layout import VERSION_DEPTH, classify, is_ignored_name
from lxd_image_server.tree.scan import Exclude

log = logging.getLogger(__name__)
#: what an uploader can make us say again and again: said once an hour (QUIET_LOGGERS)
quiet_log = logging.getLogger(f"{__name__}.quiet")

RETRY_AFTER_ERROR = 5.0
#: seconds a pass waits for the versions it hashes before publishing those that are done
DEFAULT_BUDGET = 1.0
#: loggers whose repeated warnings (one per bad path per scan) are said once an hour
QUIET_LOGGERS = (
    "tree.scan",
    "catalog.products",
    "tree.overrides",
    "catalog.hashing",
    "catalog.watch.quiet",
)


#: builds the watcher's pipeline (Use.WATCH), given what the watcher must tell it: the files
#: the scanner leaves out (being written) and whom to wake when background work is done
PipelineFor = Callable[[Exclude, Callable[[], None]], Pipeline]


class Watcher:
    def __init__(
        self,
        paths: Paths,
        pipeline_for: PipelineFor,
        quiet: float = 0.2,
        max_delay: float = 1.0,
        on_reload: Callable[[], None] | None = None,
        pid_file: str | None = None,
        max_watches: int = DEFAULT_MAX_WATCHES,
        rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
        budget: float = DEFAULT_BUDGET,
        publish_socket: str | None = None,
    ) -> None:
        self.img_dir = paths.img_dir
        # (its scanner asks `_excluded` from its first scan on, in `run`; the page is written
        # once no publish is due: _write_page)
        self.pipeline = pipeline_for(self._excluded, self._wake)
        if self.pipeline.use is not Use.WATCH:
            raise ValueError("the watcher needs a pipeline built for Use.WATCH")
        self.quiet = quiet
        self.max_delay = max_delay
        self.on_reload = on_reload
        self.pid_file = pid_file
        self.budget = budget
        #: absolute paths of files opened for writing and not yet closed
        self.writing: set[str] = set()
        #: version directories without a watch holding a file that changed lately -> when
        #: that file will have been unchanged for a rescan interval (time.monotonic()): the
        #: directory is rescanned then, and the file published
        self.held: dict[str, float] = {}
        #: images/ as the catalog's item paths name it
        self.served_prefix = paths.served_images
        self.watches = WatchSet(self.img_dir, max_watches, rescan_interval)
        self.dirty: set[str] = set()
        self.collect_due = False
        self.first_event = 0.0
        self.last_event = 0.0
        self.retry_at: float | None = None
        self.stopping = False
        self.reload_requested = False
        #: when the first pruned version's grace period is over (time.time()), or None
        self.next_expiry: float | None = None
        #: where publish requests are taken (None: not at all), and their server once running
        self.publish_socket = publish_socket
        self.requests: RequestServer | None = None
        #: a publish request waits: publish now, no debounce
        self.urgent = False
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

    def _drop_tree(self, rel: str) -> None:
        """Stops watching `rel` and below (it was moved away)."""
        self.watches.drop_tree(rel)
        prefix = os.path.join(self.img_dir, rel) + "/"
        for p in [p for p in self.writing if p.startswith(prefix)]:
            self.writing.discard(p)

    def _rewatch_all(self) -> None:
        self.writing.clear()
        self.watches.rewatch_all()

    def _excluded(self, path: str) -> bool:
        """Files the scanner leaves out: being written, as far as we can tell."""
        if path in self.writing:
            return True
        if not self.watches.over_cap:
            return False
        # (the scanner's paths are img_dir/rel/name: no relpath needed)
        rel = path[len(self.img_dir) + 1 :]
        listed = self.served_prefix + rel
        due = self.watches.unsettled(path, rel, lambda: self.pipeline.listing().sizes.get(listed))
        if due is None:
            return False
        # published once unchanged for a rescan interval: that directory is rescanned then
        parent = rel.rpartition("/")[0]
        self.held[parent] = min(self.held.get(parent, due), due)
        return True

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
            rel = self.watches.forget(wd)
            if rel == "":
                log.error("%s disappeared; waiting for it to come back", self.img_dir)
                self._mark("")
            return
        base = self.watches.wds.get(wd)
        if base is None:
            return
        if mask & (flags.DELETE_SELF | flags.MOVE_SELF):
            if base == "":
                self._mark("")
            return
        if not name or is_ignored_name(name):
            return
        rel = rel_join(base, name)
        if mask & flags.ISDIR:
            if not fits_layout(rel_depth(rel), name):
                return  # nothing that does not fit the layout is published: no watch either
            if mask & (flags.CREATE | flags.MOVED_TO):
                self.watches.watch_tree(rel, evict=True)
            elif mask & flags.MOVED_FROM:
                self._drop_tree(rel)
            self._mark(rel)
            return
        if rel_depth(base) != VERSION_DEPTH:
            log.debug("ignoring %r: not inside a version directory", rel)
            return
        self.watches.touched(base)
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
        if self.urgent:
            return 0.0
        times = []
        if self.requests is not None and (deadline := self.requests.next_deadline()) is not None:
            times.append(deadline)
        if self.dirty or self.collect_due:
            times.append(min(self.last_event + self.quiet, self.first_event + self.max_delay))
        if self.retry_at is not None:
            times.append(self.retry_at)
        if self.watches.next_rescan is not None:
            times.append(self.watches.next_rescan)
        if self.held:
            times.append(min(self.held.values()))
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
        if self.watches.rescan_due():
            log.debug("rescanning the whole tree (%d directories watched)", len(self.watches.wds))
            self.watches.watch_tree("")  # room may have freed up
            self.dirty.add("")
        now = time.monotonic()
        for rel, due in list(self.held.items()):
            if due <= now:
                del self.held[rel]
                self.dirty.add(rel)
        prefixes, self.dirty = self.dirty, set()
        self.collect_due = self.urgent = False
        if "" in prefixes and "" not in self.watches.watched and os.path.isdir(self.img_dir):
            self._rewatch_all()
        try:
            self.pipeline.refresh(prefixes, self.budget)
            self.retry_at = None
            self._answer_requests()
            self._plan_expiry()  # the publish may have pruned versions
            if "" in prefixes:
                settle_heap()
        except UnexplainedDepartures as e:
            # a partial view of the tree: look at all of it again (said once an hour)
            quiet_log.warning("%s; rescanning everything in %.0f s", e, RETRY_AFTER_ERROR)
            self._retry(prefixes | {""})
        except PublishError as e:
            log.error("%s; retrying in %.0f s", e, RETRY_AFTER_ERROR)
            self._retry(prefixes)
        except Exception:
            log.exception(
                "unexpected error while publishing; retrying in %.0f s", RETRY_AFTER_ERROR
            )
            self._retry(prefixes)

    # -- publish requests (publish_requests.py) ---------------------------------------------

    def _serve_requests(self, poller: select.poll) -> None:
        if self.publish_socket is None:
            return
        try:
            self.requests = RequestServer(self.publish_socket, self.img_dir)
        except OSError as e:
            log.error("cannot take publish requests at %s: %s", self.publish_socket, e)
            return
        poller.register(self.requests.fileno(), select.POLLIN)

    def _take_requests(self) -> None:
        """Versions named by a request read now: rescanned and published at once."""
        if self.requests is None:
            return
        try:
            wanted = self.requests.handle()
            if self.requests.next_deadline() is not None:
                self.requests.expire(self.img_dir, self._listed)
        except Exception:
            log.exception("unexpected error while taking publish requests")
            return
        if wanted:
            for rel in wanted:
                self._mark(rel)
            self.urgent = True

    def _answer_requests(self) -> None:
        if self.requests is None or not self.requests.waiting:
            return
        try:
            listed = self._listed(self.requests.wanted())
            self.requests.answer(listed, self.pipeline.hashing() > 0, self.img_dir)
        except Exception:
            log.exception("unexpected error while answering publish requests")

    def _listed(self, rels: Iterable[str]) -> set[str]:
        """Those of the version directories `rels` the catalog lists now (listed.py)."""
        return listed_among(self.pipeline.products, rels)

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
        gc.unfreeze()  # the next full pass collects, then freezes again (gcpause.settle_heap)

    # -- main loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Watches and publishes until SIGTERM or SIGINT."""
        once = Once()
        quiet = [logging.getLogger(f"lxd_image_server.{name}") for name in QUIET_LOGGERS]
        for logger in quiet:
            logger.addFilter(once)
        try:
            self._run()
        finally:
            for logger in quiet:
                logger.removeFilter(once)

    def _run(self) -> None:
        previous = {
            s: signal.signal(s, h)
            for s, h in (
                (signal.SIGTERM, self._on_stop),
                (signal.SIGINT, self._on_stop),
                (signal.SIGHUP, self._on_hup),
            )
        }
        wrote_pid = False
        try:
            os.makedirs(self.img_dir, exist_ok=True)
            self.watches.watch_tree("")
            log.info("watching %s (%d directories)", self.img_dir, len(self.watches.wds))
            poller = select.poll()
            self._serve_requests(poller)  # (before the pid file: that says it is there)
            if self.pid_file:
                # only now: the pid file says the watcher sees every upload from here on
                # (`run` waits for it before nginx takes connections; `health` reads it)
                write_pid_file(self.pid_file)
                wrote_pid = True
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
            settle_heap()
            poller.register(self.watches.inotify.fileno(), select.POLLIN)
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
                for event in self.watches.inotify.read(timeout=0):
                    self.handle(event.wd, event.mask, event.name)
                self._take_requests()
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
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if wrote_pid and self.pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(self.pid_file)
            self.watches.close()
            if self.requests is not None:
                self.requests.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
