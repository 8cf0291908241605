"""Files read into their digests on a few threads, each file read once.

A job is one file and the digests ("sinks") wanted of it: a root filesystem's own sha256 and
its combined fingerprints. One thread reads the job's file and feeds every chunk to all of its
sinks (hashread.feed_file): the file's bytes are read once, not once per digest. Jobs start
largest first; a thread that finds no job left asks a running one to give some of its sinks
away, and continues those from the offset reached, reading the rest of the file itself. So a
tree of many files keeps every thread on a file of its own (one read per file), and a single
big file still has its digests computed on as many cores as it has digests (hashlib releases
the GIL while it hashes).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from lxd_image_server.catalog import hashread
from lxd_image_server.catalog.hashread import FileChanged, Hasher
from lxd_image_server.progress import Progress, no_progress
from lxd_image_server.tree.scan import FileStat

log = logging.getLogger(__name__)

#: a reader gives sinks away only with at least this much of its file left: below, reading
#: the rest a second time costs about what the other core would save
MIN_SPLIT = 4 << 20


@dataclass(eq=False)
class Job:
    """All of `file` fed to each of `sinks`. After run(): `error` says why not, if it failed."""

    file: FileStat
    sinks: list[Hasher]
    error: FileChanged | None = None


@dataclass(eq=False)
class _Part:
    """A job's file from `start` to its end, fed to `sinks` (all of the job's, or those given
    away to another thread at `start`). Implements hashread.Offer."""

    pool: _Pool
    seq: int
    job: Job
    sinks: list[Hasher]
    start: int
    offset: int = 0
    wanted: bool = False

    def give(self, sinks: list[Hasher], offset: int) -> list[Hasher]:
        return self.pool.split(self, sinks, offset)


class _Pool:
    def __init__(self, jobs: Sequence[Job], progress: Progress) -> None:
        self._cond = threading.Condition()
        self._seq = itertools.count()
        order = sorted(jobs, key=lambda j: j.file.size * len(j.sinks), reverse=True)
        self._todo = deque(self._part(j, j.sinks, 0) for j in order if j.sinks)
        #: the parts being read, by seq
        self._running: dict[int, _Part] = {}
        self._progress = progress
        self._errors: list[BaseException] = []

    def _part(self, job: Job, sinks: list[Hasher], start: int) -> _Part:
        return _Part(self, next(self._seq), job, sinks, start, start)

    def work(self) -> None:
        """Reads parts until none is left to read or to take sinks from."""
        while (part := self._next()) is not None:
            try:
                # (looked up at each call: tests watch the reads there; the rest of a file
                # given away counts no progress, the part it came from counted it)
                progress = self._progress if part.start == 0 else no_progress
                hashread.feed_file(
                    part.job.file, part.sinks, progress, start=part.start, offer=part
                )
            except FileChanged as e:
                with self._cond:
                    part.job.error = part.job.error or e
            except BaseException as e:  # re-raised in the caller's thread
                with self._cond:
                    self._errors.append(e)
            finally:
                with self._cond:
                    del self._running[part.seq]
                    self._cond.notify_all()

    def _next(self) -> _Part | None:
        """The next part to read: one not started, else sinks a running part gives away when
        asked (None when no running part has sinks worth sharing)."""
        with self._cond:
            asked: _Part | None = None
            while not self._todo:
                if asked is None or not asked.wanted or asked.seq not in self._running:
                    asked = self._victim()
                    if asked is None:
                        return None
                    asked.wanted = True
                self._cond.wait()
            part = self._todo.popleft()
            self._running[part.seq] = part
            return part

    def _victim(self) -> _Part | None:
        """The running part with the most bytes left whose sinks could be shared."""
        shareable = [
            p
            for p in self._running.values()
            if len(p.sinks) > 1 and not p.wanted and p.job.file.size - p.offset >= MIN_SPLIT
        ]
        return max(shareable, key=lambda p: p.job.file.size - p.offset, default=None)

    def split(self, part: _Part, sinks: list[Hasher], offset: int) -> list[Hasher]:
        """Called by `part`'s reader at `offset`: half of its sinks to a new part (taken by
        the thread that asked), the rest kept."""
        with self._cond:
            part.wanted = False
            if len(sinks) > 1 and part.job.file.size - offset >= MIN_SPLIT:
                keep, given = sinks[: len(sinks) // 2], sinks[len(sinks) // 2 :]
                part.sinks = keep
                self._todo.append(self._part(part.job, given, offset))
                log.debug("%s: %d digests go on in another thread", part.job.file.path, len(given))
                sinks = keep
            self._cond.notify_all()
            return sinks

    def raise_errors(self) -> None:
        if self._errors:
            raise self._errors[0]


def run(jobs: Sequence[Job], workers: int, progress: Progress = no_progress) -> None:
    """Runs `jobs` on up to `workers` threads (the calling one among them); a job that could
    not be read has its `error` set. `progress` receives each byte count read for the first
    time, from any of the threads (possibly two at once)."""
    pool = _Pool(jobs, progress)
    useful = min(workers, sum(len(j.sinks) for j in jobs))
    threads = [
        threading.Thread(target=pool.work, name="hash", daemon=True) for _ in range(useful - 1)
    ]
    for t in threads:
        t.start()
    try:
        pool.work()
    finally:
        for t in threads:
            t.join()
    pool.raise_errors()


def hash_file(f: FileStat, sinks: Sequence[Hasher], progress: Progress = no_progress) -> None:
    """Feeds every byte of `f` to each of `sinks`, on as many cores as there are sinks (up to
    the CPUs), reading it once where it can. Raises FileChanged as hashread.feed_file does."""
    job = Job(f, list(sinks))
    run([job], min(len(job.sinks), os.cpu_count() or 1), progress)
    if job.error is not None:
        raise job.error
