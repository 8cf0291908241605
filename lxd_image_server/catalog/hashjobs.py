"""Hashing versions in the background, one job per version, so that a version slow to hash
(a big or sparse upload) delays no other and never holds the catalog lock.

Jobs run in up to `limit` threads, the version with the fewest bytes still to read first. A job
is given the digests its caller already knows (from the hash cache) and computes the rest with
its own HashEngine and its own in-memory cache: the shared sqlite cache stays with the thread
that owns it. Results wait in `take()` until that thread collects them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import Digests, HashEngine
from lxd_image_server.tree.scan import FileStat, ScannedVersion

log = logging.getLogger(__name__)

#: versions hashed at the same time (each with its own reading threads)
DEFAULT_JOBS = 8

#: a version's files by path: two are equal when each file's identity (FileStat.identity) is
#: (the other fields of a FileStat follow from its path), and the FileStats are those the
#: version holds anyway, not a tuple made for each file of 20,000 versions
Identity = tuple[FileStat, ...]


def _path(f: FileStat) -> str:
    return f.path


def identity(v: ScannedVersion) -> Identity:
    """What a version's digests depend on: the identity of each of its files."""
    return files_identity(v.files.values())


def files_identity(files: Iterable[FileStat]) -> Identity:
    """The identity of the files `files` (some of a version's)."""
    return tuple(sorted(files, key=_path))


@dataclass
class Known:
    """Digests found in the cache for some of a version's files."""

    files: list[tuple[FileStat, str]] = field(default_factory=list)
    combined: list[tuple[FileStat, FileStat, str]] = field(default_factory=list)
    complete: bool = True

    def digests(self) -> Digests:
        return Digests(
            files={f.path: d for f, d in self.files},
            combined={(m.path, r.path): d for m, r, d in self.combined},
        )


def hash_version(v: ScannedVersion, known: Known) -> Digests:
    """Every digest of `v`, reading only what `known` lacks. Safe in any thread."""
    cache = HashCache(None)
    try:
        cache.put_many(known.files, known.combined)
        return HashEngine(cache).digest([v])
    finally:
        cache.close()


@dataclass(frozen=True)
class Result:
    rel: str
    ident: Identity
    digests: Digests


@dataclass(order=True)
class _Job:
    size: int
    seq: int
    rel: str = field(compare=False)
    ident: Identity = field(compare=False)
    work: Callable[[], Digests] = field(compare=False)


class HashJobs:
    def __init__(self, limit: int = DEFAULT_JOBS, on_done: Callable[[], None] | None = None):
        self.limit = max(1, limit)
        #: called (in the job's thread) after each result is ready, e.g. to wake a loop
        self.on_done = on_done
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._running = 0
        self._seq = itertools.count()
        #: version -> the identity being hashed (queued or running)
        self._pending: dict[str, Identity] = {}
        self._results: list[Result] = []

    def submit(self, rel: str, ident: Identity, size: int, work: Callable[[], Digests]) -> None:
        """Queues `work` for version `rel` unless the same identity is already pending."""
        with self._cond:
            if self._pending.get(rel) == ident:
                return
            self._pending[rel] = ident
            heapq.heappush(self._queue, _Job(size, next(self._seq), rel, ident, work))
            if self._running < self.limit:
                self._running += 1
                threading.Thread(target=self._worker, name="hash-version", daemon=True).start()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def wait(self, timeout: float | None, rels: Set[str]) -> None:
        """Until none of the versions `rels` is pending, or `timeout` seconds (None: no limit)
        have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(rel in self._pending for rel in rels):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._cond.wait(left)

    def has_results(self) -> bool:
        with self._cond:
            return bool(self._results)

    def take(self) -> list[Result]:
        with self._cond:
            out, self._results = self._results, []
            return out

    def _worker(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._running -= 1
                    return
                job = heapq.heappop(self._queue)
                if self._pending.get(job.rel) != job.ident:
                    continue  # the version changed again since: a newer job is queued
            try:
                result: Result | None = Result(job.rel, job.ident, job.work())
            except Exception:
                log.exception("hashing %s failed", job.rel)
                result = None
            with self._cond:
                if self._pending.get(job.rel) == job.ident:
                    del self._pending[job.rel]
                if result is not None:
                    self._results.append(result)
                self._cond.notify_all()
            if self.on_done is not None:
                self.on_done()
