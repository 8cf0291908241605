"""Pushing to the mirrors: one worker thread per [mirrors.NAME], with backoff, and `push_once`
for `update`.

The master (`watch`, `run`): after every publish each worker is asked to push; asks that arrive
during a push are folded into one more push. A failed push is retried after 5 s, doubling up to
10 min; the state (ok -> failing, failing -> ok) is logged once per change and recorded in
<state>/mirrors.json for `lxd-image-server mirror status` (state.py).
A mirror that is down never holds back the others nor the publishing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from lxd_image_server.config import Paths
from lxd_image_server.mirror.state import MirrorStatus, utc_stamp, write_state
from lxd_image_server.mirror.transport import (
    PushCancelled,
    Pusher,
    PushError,
    RsyncPusher,
    Source,
    describe_target,
)
from lxd_image_server.settings import MirrorConfig

log = logging.getLogger(__name__)

FIRST_RETRY = 5.0
MAX_RETRY = 600.0


def retry_delay(failures: int, first: float = FIRST_RETRY, maximum: float = MAX_RETRY) -> float:
    """Seconds to wait after `failures` failed pushes in a row (1, 2, ...)."""
    return float(min(maximum, first * 2 ** max(0, failures - 1)))


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
                st.last_success, st.last_duration = utc_stamp(now), round(duration, 3)
                self._retry_at = None
            else:
                st.state, st.failures = "failing", failures + 1
                st.last_error, st.last_error_at = error, utc_stamp(now)
                delay = retry_delay(st.failures, self.first_retry, self.max_retry)
                self._retry_at = time.monotonic() + delay
                st.next_attempt = utc_stamp(now + delay)
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
        now = utc_stamp(time.time())
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
