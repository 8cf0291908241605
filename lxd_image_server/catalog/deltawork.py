"""Deltas for the pipeline: which may be listed now, and making or checking the others, in
the background (the watcher) or at once (`update`).

After every publish the pipeline hands over the versions it published; the deltas still to be
made or checked (deltas.plan) run one at a time, in batches: a batch holds the deltas lock,
runs jobs until `save_every` seconds have passed (at least one job), then writes the records
to <state_dir>/deltas.json once and lets go of the lock. So many small deltas cost one write,
and a long run still saves (and shows) its progress every few seconds; a crash loses at most
the records of one batch (the deltas it made are then made again). The full version is
published at once; its deltas join the catalog in a later publish, once made, hashed and
checked.

In the background, a job is run no sooner than deltas.due says (`check_interval` after the
last run for its path, longer after failures): until then it waits here, the newest job for
each path replacing the one before, and the worker thread sleeps until the first is due.
`update` (in the foreground) runs what it finds at once: the operator, or the timer, asked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from lxd_image_server.catalog import deltas
from lxd_image_server.catalog.deltagen import Limits, environment, run_job, xdelta3_path
from lxd_image_server.settings import DeltaSettings
from lxd_image_server.tree.scan import ScannedVersion

log = logging.getLogger(__name__)

#: seconds a batch of jobs runs before its records are written (and the lock let go)
SAVE_EVERY = 2.0
#: a job whose record changed, and that record
Done = tuple[deltas.Job, deltas.Record]


#: what a DeltaService does with the deltas to make or check: nothing (it only says which
#: may be listed: the operator commands), run them when asked (`update`), or in a thread of
#: its own (the watcher)
LIST_ONLY, FOREGROUND, BACKGROUND = "list", "foreground", "background"


class DeltaService:
    def __init__(
        self,
        img_dir: str,
        state_dir: str,
        config: DeltaSettings | None = None,
        mode: str = LIST_ONLY,
        save_every: float = SAVE_EVERY,
    ) -> None:
        self.img_dir = os.path.abspath(img_dir)
        self.state_dir = state_dir
        self.config = config or DeltaSettings()
        self.mode = mode
        self.background = mode == BACKGROUND
        self.save_every = save_every
        self.records = deltas.Records(state_dir)
        #: called (in the worker's thread) after each job, e.g. to wake the watcher
        self.on_done: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._queue: deque[deltas.Job] = deque()
        self._queued: set[tuple[str, str, str, str]] = set()
        #: jobs not due yet (background only), by path: (when, job)
        self._deferred: dict[str, tuple[float, deltas.Job]] = {}
        self._news = False
        self._worker: threading.Thread | None = None
        self._warned = False

    def configure(self, config: DeltaSettings) -> None:
        self.config = config

    # -- the pipeline's side --------------------------------------------------------------------

    def listable(self, versions: Iterable[ScannedVersion]) -> frozenset[str]:
        """The delta files among `versions` checked for what they and their roots are now."""
        return deltas.listable(deltas.candidates(versions), self.records())

    def plan_key(self) -> tuple[object, ...]:
        """What `published` plans with besides the versions: the records as last read, the
        settings and xdelta3 (a plan with the same key and versions plans the same jobs)."""
        self.records()
        xdelta3 = xdelta3_path() if self.mode != LIST_ONLY else None
        return (self.mode, self.records.seen, self.config, xdelta3 and environment(xdelta3))

    def published(self, versions: Iterable[ScannedVersion], sha: Mapping[str, str]) -> None:
        """After a publish of `versions` (whole products): queues what is to be made or
        checked. `sha`: the files' digests by path."""
        if self.mode == LIST_ONLY:
            return
        xdelta3 = self._xdelta3()
        if xdelta3 is None:
            return
        env = environment(xdelta3)
        records = self.records()
        now = time.time()
        jobs = deltas.plan(
            versions,
            sha,
            records,
            self.config.bases,
            self.config.enabled,
            env=env,
            min_size=self.config.min_size,
            now=now,
        )
        with self._cond:
            for job in jobs:
                if job.key in self._queued:
                    continue
                when = 0.0
                if self.background:
                    when = deltas.due(records.get(job.path), self.config.check_interval, env)
                if when > now:
                    if job.path not in self._deferred:
                        log.info(
                            "delta %s: xdelta3 ran for it %.0f s ago; next run in %.0f s "
                            "([deltas] check_interval)",
                            job.path,
                            now - records[job.path].at,
                            when - now,
                        )
                    self._deferred[job.path] = (when, job)
                    continue
                self._deferred.pop(job.path, None)
                self._queued.add(job.key)
                self._queue.append(job)
            if (self._queue or self._deferred) and self.background and self._worker is None:
                self._worker = threading.Thread(target=self._work, name="deltas", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def run_pending(self) -> list[Done]:
        """Runs the queued jobs here and now (`update`); returns those that changed a record,
        with their new record."""
        done: list[Done] = []
        while True:
            with self._cond:
                if not self._queue:
                    return done
            done += self._run_batch()

    def take_news(self) -> bool:
        """True (once) when a job finished since the last call: republish."""
        with self._cond:
            news, self._news = self._news, False
            return news

    def has_news(self) -> bool:
        with self._cond:
            return self._news

    def pending(self) -> int:
        """Jobs to run now (not those waiting to be due)."""
        with self._cond:
            return len(self._queue)

    def deferred(self) -> dict[str, float]:
        """The jobs waiting to be due: when each path's is (time.time())."""
        with self._cond:
            return {path: when for path, (when, _) in self._deferred.items()}

    # -- running --------------------------------------------------------------------------------

    def _xdelta3(self) -> str | None:
        path = xdelta3_path()
        if path is None and not self._warned:
            log.warning(
                "xdelta3 is not installed: deltas are neither made nor checked, none is listed "
                "(apt install xdelta3)"
            )
            self._warned = True
        return path

    def _limits(self) -> Limits:
        return Limits(
            max_ratio=self.config.max_ratio,
            timeout=self.config.timeout,
            xdelta3=self._xdelta3() or "xdelta3",
        )

    def _next(self) -> deltas.Job | None:
        with self._cond:
            return self._queue[0] if self._queue else None

    def _finished(self, job: deltas.Job) -> None:
        with self._cond:
            if self._queue and self._queue[0] is job:
                self._queue.popleft()
            self._queued.discard(job.key)

    def _run_batch(self) -> list[Done]:
        """Runs queued jobs under the deltas lock until `save_every` seconds have passed or
        the queue is empty, then writes their records at once. Returns the jobs whose record
        changed (a job someone else did meanwhile changes none)."""
        done: list[Done] = []
        with deltas.state_lock(self.state_dir):
            records = deltas.load(self.state_dir)
            deadline = time.monotonic() + self.save_every
            try:
                while (job := self._next()) is not None:
                    try:
                        rec = self._run(job, records)
                    except Exception:
                        log.exception("delta %s failed", job.path)
                        rec = None
                    if rec is not None:
                        records[job.path] = rec
                        done.append((job, rec))
                    self._finished(job)
                    if time.monotonic() >= deadline:
                        break
            finally:
                if done:
                    kept = {p: r for p, r in records.items() if os.path.isdir(os.path.dirname(p))}
                    deltas.save(self.state_dir, kept)
        return done

    def _run(self, job: deltas.Job, records: dict[str, deltas.Record]) -> deltas.Record | None:
        """The new record of `job`, run now; None when there is nothing to do (done
        meanwhile). The caller holds the deltas lock, `records` read under it."""
        current = records.get(job.path)
        limits = self._limits()
        env = environment(limits.xdelta3)
        if current is not None:
            if current.at > job.planned:
                return None  # run since it was planned (`update` by hand, say)
            same = (current.base, current.target, current.delta) == job.key[1:]
            if same and current.final(env):
                return None  # another writer did it meanwhile
        if job.delta is None and os.path.lexists(job.path):
            return None  # made (or uploaded) meanwhile: checked on the next pass
        rec = run_job(job, limits, self.img_dir)
        tries = 0
        if rec.result == deltas.FAILED:
            tries = 1 + (current.tries if current and current.result == deltas.FAILED else 0)
        return replace(rec, at=time.time(), tries=tries, env=env)

    def _take_due(self) -> bool:
        """Waits (holding the condition) until a job is queued or a deferred one is due, and
        queues those due. False when there is nothing left to wait for."""
        while not self._queue:
            if not self._deferred:
                return False
            now = time.time()
            soonest = min(when for when, _ in self._deferred.values())
            if soonest > now:
                self._cond.wait(soonest - now)
                continue
            for path, (when, job) in list(self._deferred.items()):
                if when <= now:
                    del self._deferred[path]
                    if job.key not in self._queued:
                        self._queued.add(job.key)
                        self._queue.append(job)
        return True

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._take_due():
                    self._worker = None
                    return
            try:
                changed = bool(self._run_batch())
            except Exception:
                log.exception("deltas failed")
                with self._cond:
                    if self._queue:  # (not run again and again)
                        self._queued.discard(self._queue.popleft().key)
                changed = False
            if changed:
                with self._cond:
                    self._news = True
                if self.on_done is not None:
                    self.on_done()
