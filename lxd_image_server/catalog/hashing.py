"""The digests the catalog lists for the files of some versions: each file's sha256 and, for a
root filesystem, its combined fingerprint with each metadata file of its version
(sha256(metadata bytes + root bytes)), taken from the hash cache where still valid
(hashcache.py) and computed for the rest.

The only step whose cost grows with the bytes on disk. A metadata file is read first; its
hash state then primes each combined fingerprint, which continues with the root's bytes, so
every file is read once: the root's chunks feed its own sha256 and every combined fingerprint
(hashpool.py spreads those digests over the cores). Versions whose files are all small are
read whole in the calling thread instead (read_whole): there the work is per file, not per
byte.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lxd_image_server.catalog import hashread
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashpool import Job, run
from lxd_image_server.catalog.hashread import FileChanged, Hasher, VersionDirs
from lxd_image_server.progress import Progress, no_progress
from lxd_image_server.tree.layout import Role
from lxd_image_server.tree.scan import FileStat, ScannedVersion

log = logging.getLogger(__name__)

#: a version whose files to read are all at most this big is read whole, one file after the
#: other, through one descriptor of its directory, in the calling thread (read_whole): for
#: many small versions (a cold update of 20,000 of them) the work is per file, not per byte,
#: and threads only add to it
WHOLE = 1 << 20


@dataclass
class Digests:
    """sha256 by file path, and combined fingerprints by (metadata path, root path)."""

    files: dict[str, str] = field(default_factory=dict)
    combined: dict[tuple[str, str], str] = field(default_factory=dict)
    #: Files that could not be hashed this time (changed or vanished); left out of the catalog.
    failed: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Plan:
    """What must be read of one file: its own sha256 unless cached, and for a root the
    combined fingerprints with the metadata files `combine_with` (those not cached)."""

    file: FileStat
    need_plain: bool
    combine_with: list[FileStat] = field(default_factory=list)


@dataclass
class _Work:
    """The plans of the versions to hash: read whole (all small), or by the thread pool."""

    whole: list[tuple[ScannedVersion, list[_Plan], list[_Plan]]] = field(default_factory=list)
    metas: list[_Plan] = field(default_factory=list)
    roots: list[_Plan] = field(default_factory=list)

    def size(self) -> int:
        plans = [*self.metas, *self.roots]
        plans += [p for _, ms, rs in self.whole for p in (*ms, *rs)]
        return sum(p.file.size for p in plans)


class HashEngine:
    def __init__(self, cache: HashCache, workers: int | None = None) -> None:
        self.cache = cache
        self.workers = workers or min(8, os.cpu_count() or 1)

    def digest(
        self,
        versions: Iterable[ScannedVersion],
        rehash: bool = False,
        progress_start: Callable[[int], Progress] | None = None,
        cache_apart: bool = False,
    ) -> Digests:
        """Digests for every file of `versions`, from the cache where still valid.

        `progress_start(total_bytes)` is called once if anything must be read, and returns
        the callback that receives byte counts as they are hashed. `cache_apart`: the new
        digests are written to the cache by a thread of its own (HashCache.put_many).
        """
        out = Digests()
        work = self._plan(versions, rehash, out)
        if not (work.whole or work.metas or work.roots):
            return out
        progress = progress_start(work.size()) if progress_start else no_progress
        new_files: list[tuple[FileStat, str]] = []
        new_combined: list[tuple[FileStat, FileStat, str]] = []
        if work.whole:
            _digest_whole(work.whole, out, new_files, new_combined, progress)
        if work.metas or work.roots:
            self._digest_read(work, out, new_files, new_combined, progress)
        self.cache.put_many(new_files, new_combined, apart=cache_apart)
        return out

    def _plan(self, versions: Iterable[ScannedVersion], rehash: bool, out: Digests) -> _Work:
        """What to read of each version (the rest into `out`, from the cache)."""
        work = _Work()
        for v in versions:
            vmetas = [f for f in v.files.values() if f.role.role is Role.META]
            vplain: dict[str, _Plan] = {}
            vroots: list[_Plan] = []
            for f in v.files.values():
                cached = None if rehash else self.cache.get(f)
                if cached:
                    out.files[f.path] = cached
                plan = _Plan(f, need_plain=cached is None)
                if f.role.role is Role.ROOT:
                    for m in vmetas:
                        c = None if rehash else self.cache.get_combined(m, f)
                        if c:
                            out.combined[(m.path, f.path)] = c
                        else:
                            plan.combine_with.append(m)
                    if plan.need_plain or plan.combine_with:
                        vroots.append(plan)
                elif plan.need_plain:
                    vplain[f.path] = plan
            if not vplain and not vroots:
                continue
            # metadata files that prime a combined hash are read again even when cached
            for r in vroots:
                for m in r.combine_with:
                    vplain.setdefault(m.path, _Plan(m, need_plain=False))
            vmeta_plans = list(vplain.values())
            if all(p.file.size <= WHOLE for p in (*vmeta_plans, *vroots)):
                work.whole.append((v, vmeta_plans, vroots))
            else:
                work.metas += vmeta_plans
                work.roots += vroots
        return work

    def _digest_read(
        self,
        work: _Work,
        out: Digests,
        new_files: list[tuple[FileStat, str]],
        new_combined: list[tuple[FileStat, FileStat, str]],
        progress: Progress,
    ) -> None:
        """The digests of the versions not read whole, on the thread pool: first the
        metadata files (and unified tarballs), whose hash states prime the combined
        fingerprints; then the roots, each read once into all of its digests."""
        lock = threading.Lock()

        def safe_progress(n: int) -> None:
            with lock:
                progress(n)

        primed: dict[str, Hasher] = {}
        meta_jobs = [Job(p.file, [hashlib.sha256()]) for p in work.metas]
        run(meta_jobs, self.workers, safe_progress)
        for plan, job in zip(work.metas, meta_jobs, strict=True):
            if job.error is not None:
                _not_yet(plan.file, job.error, out)
                continue
            primed[plan.file.path] = job.sinks[0]
            digest = job.sinks[0].hexdigest()
            out.files[plan.file.path] = digest
            if plan.need_plain:
                new_files.append((plan.file, digest))
        roots: list[tuple[_Plan, Hasher | None, list[tuple[FileStat, Hasher]], Job]] = []
        for plan in work.roots:
            own: Hasher | None = hashlib.sha256() if plan.need_plain else None
            combos = [(m, primed[m.path].copy()) for m in plan.combine_with if m.path in primed]
            sinks = ([own] if own is not None else []) + [h for _, h in combos]
            roots.append((plan, own, combos, Job(plan.file, sinks)))
        run([job for *_, job in roots], self.workers, safe_progress)
        for plan, plain, combos, job in roots:
            if job.error is not None:
                _not_yet(plan.file, job.error, out)
                continue
            if plain is not None:
                out.files[plan.file.path] = digest = plain.hexdigest()
                new_files.append((plan.file, digest))
            for meta, h in combos:
                out.combined[(meta.path, plan.file.path)] = digest = h.hexdigest()
                new_combined.append((meta, plan.file, digest))


def _not_yet(f: FileStat, e: FileChanged, out: Digests) -> None:
    log.warning("not publishing %s yet: %s", f.path, e)
    out.failed.add(f.path)


def _digest_whole(
    versions: list[tuple[ScannedVersion, list[_Plan], list[_Plan]]],
    out: Digests,
    new_files: list[tuple[FileStat, str]],
    new_combined: list[tuple[FileStat, FileStat, str]],
    progress: Progress,
) -> None:
    """The digests of small versions, each file read whole (read_whole) once: its sha256 and,
    for a root, every combined fingerprint continue from the metadata's hash state."""
    dirs = VersionDirs()
    try:
        for v, meta_plans, root_plans in versions:
            base = (meta_plans or root_plans)[0].file.base
            try:
                dir_fd = dirs.open(base, v.path)
            except OSError as e:
                for p in (*meta_plans, *root_plans):
                    _not_yet(p.file, FileChanged(f"cannot open it ({e})"), out)
                continue
            try:
                primed: dict[str, Hasher] = {}
                for p in meta_plans:
                    try:
                        h = hashlib.sha256(hashread.read_whole(dir_fd, p.file))
                    except FileChanged as e:
                        _not_yet(p.file, e, out)
                        continue
                    progress(p.file.size)
                    primed[p.file.path] = h
                    digest = h.hexdigest()
                    out.files[p.file.path] = digest
                    if p.need_plain:
                        new_files.append((p.file, digest))
                for p in root_plans:
                    try:
                        data = hashread.read_whole(dir_fd, p.file)
                    except FileChanged as e:
                        _not_yet(p.file, e, out)
                        continue
                    progress(p.file.size)
                    if p.need_plain:
                        digest = hashlib.sha256(data).hexdigest()
                        out.files[p.file.path] = digest
                        new_files.append((p.file, digest))
                    for m in p.combine_with:
                        if m.path not in primed:
                            continue
                        c = primed[m.path].copy()
                        c.update(data)
                        digest = c.hexdigest()
                        out.combined[(m.path, p.file.path)] = digest
                        new_combined.append((m, p.file, digest))
            finally:
                os.close(dir_fd)
    finally:
        dirs.close()
