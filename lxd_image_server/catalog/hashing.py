"""sha256 of every published file and the combined fingerprints, cached on disk.

The only step whose cost grows with the bytes on disk. Each file is read once; when a root
filesystem needs both its own sha256 and one or more combined fingerprints
(sha256(metadata bytes + root bytes)), every chunk read is fed to one hashing thread per digest,
so two cores compute both in the time one needs for one (hashlib releases the GIL).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from lxd_image_server.fsutil import (
    CHUNK_SIZE,
    TooLarge,
    open_dir,
    open_dir_below,
    open_regular_stat,
    read_bounded,
)
from lxd_image_server.progress import Progress, no_progress
from lxd_image_server.tree.handover import Key, Records, record_name
from lxd_image_server.tree.layout import Role
from lxd_image_server.tree.scan import FileStat, ScannedVersion, open_below

log = logging.getLogger(__name__)

#: files up to this size feed their digests one after the other in one thread: starting a
#: thread per digest costs more than hashing a few MiB (a cold update of 20,000 small versions)
SMALL = 4 << 20
#: a version whose files to read are all at most this big is read whole, one file after the
#: other, through one descriptor of its directory, in the calling thread (hashing.read_whole):
#: for many small versions (a cold update of 20,000 of them) the work is per file, not per
#: byte, and threads only add to it
WHOLE = 1 << 20


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...
    def copy(self) -> Any: ...


class FileChanged(Exception):
    """The file changed or vanished while it was being hashed."""


# -- the cache ---------------------------------------------------------------------------------


class HashCache:
    """sqlite3 cache: a digest is reused only while path, device, inode, size, mtime and ctime
    all match, so any write, truncation, replacement or rename of a file invalidates it."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS files (
        path TEXT PRIMARY KEY, dev INTEGER, inode INTEGER, size INTEGER,
        mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS combined (
        meta_path TEXT, root_path TEXT, meta_ident TEXT, root_ident TEXT, sha256 TEXT NOT NULL,
        PRIMARY KEY (meta_path, root_path));
    """

    def __init__(self, path: str | None) -> None:
        """`path` None keeps the cache in memory (nothing persists)."""
        self.path = path
        self._db: sqlite3.Connection | None = None
        try:
            if path is not None:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._db = sqlite3.connect(path or ":memory:", timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(self.SCHEMA)
        except (OSError, sqlite3.Error) as e:
            log.warning("hash cache %s unusable (%s); hashing everything", path, e)
            self._db = None
        #: both tables in memory while `preloaded` (a full scan looks up every file)
        self._files: dict[str, tuple[Any, ...]] | None = None
        self._combined: dict[tuple[str, str], tuple[Any, ...]] | None = None

    @contextlib.contextmanager
    def preloaded(self) -> Iterator[None]:
        """Answers lookups from one read of each table instead of one query per file (what
        looking up a whole tree wants); writes go to both."""
        if self._db is None:
            yield
            return
        try:
            files = self._db.execute(
                "SELECT path, dev, inode, size, mtime_ns, ctime_ns, sha256 FROM files"
            ).fetchall()
            combined = self._db.execute(
                "SELECT meta_path, root_path, meta_ident, root_ident, sha256 FROM combined"
            ).fetchall()
        except sqlite3.Error as e:
            log.warning("hash cache read failed (%s); looking files up one by one", e)
            yield
            return
        self._files = {r[0]: r[1:] for r in files}
        self._combined = {(r[0], r[1]): r[2:] for r in combined}
        del files, combined
        try:
            yield
        finally:
            self._files = self._combined = None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _query(self, sql: str, args: Sequence[Any]) -> Any:
        if self._db is None:
            return None
        try:
            return self._db.execute(sql, args).fetchone()
        except sqlite3.Error as e:
            log.warning("hash cache read failed (%s); hashing instead", e)
            return None

    def _write(self, *writes: tuple[str, Iterable[Sequence[Any]]]) -> None:
        """Each (statement, rows) of `writes`, all in one transaction."""
        if self._db is None:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                for sql, rows in writes:
                    self._db.executemany(sql, rows)
        except sqlite3.Error as e:
            log.warning("hash cache write failed (%s); results not cached", e)

    def get(self, f: FileStat) -> str | None:
        if self._files is not None:
            row = self._files.get(f.path)
        else:
            row = self._query(
                "SELECT dev, inode, size, mtime_ns, ctime_ns, sha256 FROM files WHERE path = ?",
                (f.path,),
            )
        if row and tuple(row[:5]) == (f.dev, f.inode, f.size, f.mtime_ns, f.ctime_ns):
            return str(row[5])
        return None

    def get_combined(self, meta: FileStat, root: FileStat) -> str | None:
        if self._combined is not None:
            row = self._combined.get((meta.path, root.path))
        else:
            row = self._query(
                "SELECT meta_ident, root_ident, sha256 FROM combined "
                "WHERE meta_path = ? AND root_path = ?",
                (meta.path, root.path),
            )
        if row and row[0] == _ident(meta) and row[1] == _ident(root):
            return str(row[2])
        return None

    def put_many(
        self,
        files: Iterable[tuple[FileStat, str]],
        combined: Iterable[tuple[FileStat, FileStat, str]],
    ) -> None:
        file_rows = [(*f.identity, d) for f, d in files]
        combined_rows = [(m.path, r.path, _ident(m), _ident(r), d) for m, r, d in combined]
        if not file_rows and not combined_rows:
            return
        self._write(
            ("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", file_rows),
            ("INSERT OR REPLACE INTO combined VALUES (?, ?, ?, ?, ?)", combined_rows),
        )
        if self._files is not None and self._combined is not None:
            self._files.update((r[0], r[1:]) for r in file_rows)
            self._combined.update(((r[0], r[1]), r[2:]) for r in combined_rows)

    def adopt(
        self, records: Records, versions: Iterable[ScannedVersion], prune: bool = False
    ) -> None:
        """Takes the digests the upload app recorded for files of `versions` (handover.py):
        each is used only if it names the file's current identity. `prune`: `versions` is
        the whole tree; records matching none of its files are removed once stale."""
        waiting = records.names()
        if not waiting:
            return
        files: list[tuple[FileStat, str]] = []
        combined: list[tuple[FileStat, FileStat, str]] = []
        for v in versions:
            metas = {f.name: f for f in v.files.values() if f.role.role is Role.META}
            for f in v.files.values():
                key = _key(f)
                if record_name(key) not in waiting:
                    continue
                waiting.discard(record_name(key))
                rec = records.take(key)
                if rec is None:
                    continue
                log.debug("sha256 of %s taken from its upload, not read again", f.path)
                files.append((f, rec.sha256))
                for c in rec.combined:
                    m = metas.get(c.meta)
                    if m is not None and _key(m) == c.meta_key:
                        combined.append((m, f, c.sha256))
        if files:
            self.put_many(files, combined)
        if prune and waiting:
            records.prune(waiting)

    def forget_except(self, keep_paths: set[str]) -> None:
        """Drops entries of files no longer in the tree (after a full scan)."""
        if self._db is None:
            return
        try:
            rows = self._db.execute("SELECT path FROM files").fetchall()
            gone = [(p,) for (p,) in rows if p not in keep_paths]
            rows = self._db.execute("SELECT meta_path, root_path FROM combined").fetchall()
            gone_c = [(m, r) for (m, r) in rows if m not in keep_paths or r not in keep_paths]
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM files WHERE path = ?", gone)
                self._db.executemany(
                    "DELETE FROM combined WHERE meta_path = ? AND root_path = ?", gone_c
                )
        except sqlite3.Error as e:
            log.warning("hash cache cleanup failed (%s)", e)


def _key(f: FileStat) -> Key:
    return (f.dev, f.inode, f.size, f.mtime_ns, f.ctime_ns)


def _ident(f: FileStat) -> str:
    """dev:inode:size:mtime_ns:ctime_ns."""
    return f"{f.dev}:{f.inode}:{f.size}:{f.mtime_ns}:{f.ctime_ns}"


# -- hashing one file into several digests ------------------------------------------------------


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(f: FileStat, sinks: Sequence[Hasher], progress: Progress = no_progress) -> None:
    """Feeds every byte of `f` to each sink, in parallel when there are several.

    The file is opened again below `f.base` through directory descriptors, without following
    any link and without waiting on a FIFO (scan.open_below), and only if the opened file is
    the regular file scanned: same device, inode, size, mtime and ctime (by fstat of the open
    descriptor). Raises FileChanged otherwise, or if it changes while being read.
    """
    log.debug("reading %s to hash it (%d bytes)", f.path, f.size)
    try:
        fd = open_below(f.base, f.rel)
    except OSError as e:
        raise FileChanged(f"cannot open it ({e.strerror or e})") from e
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if _identity(os.fstat(fd)) != f.identity[1:]:
            raise FileChanged("it changed since it was scanned")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        try:
            if len(sinks) == 1 or f.size <= SMALL:
                _feed_each(fh, sinks, progress)
            else:
                _feed_many(fh, sinks, progress)
        except OSError as e:
            raise FileChanged(f"read error ({e.strerror or e})") from e
        st = os.fstat(fd)
    if _identity(st) != f.identity[1:]:
        raise FileChanged("it was modified while being hashed")


def _feed_each(fh: Any, sinks: Sequence[Hasher], progress: Progress) -> None:
    """Every chunk to each sink in turn, in this thread."""
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        for sink in sinks:
            sink.update(view[:n])
        progress(n)


def _feed_many(fh: Any, sinks: Sequence[Hasher], progress: Progress) -> None:
    """One thread per sink, each reading the file itself into a reused buffer (the second read
    comes from the page cache): cheaper than handing chunks between threads."""
    fd = fh.fileno()
    errors: list[BaseException] = []

    def consume(sink: Hasher, report: bool) -> None:
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        offset = 0
        try:
            while n := os.preadv(fd, [buf], offset):
                sink.update(view[:n])
                offset += n
                if report:
                    progress(n)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [
        threading.Thread(target=consume, args=(s, i == 0), daemon=True, name="sha256")
        for i, s in enumerate(sinks)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def read_whole(dir_fd: int, f: FileStat) -> bytes:
    """The bytes of `f` (at most a few MiB), opened by name in its version directory `dir_fd`
    without following a link or waiting on a FIFO (fsutil.open_regular_stat), only if it is
    still the file scanned (same device, inode, size, mtime and ctime), and read up to its
    scanned size. Raises FileChanged otherwise, or if it changes while being read."""
    try:
        fd, st = open_regular_stat(f.name, dir_fd)
    except OSError as e:
        raise FileChanged(f"cannot open it ({e.strerror or e})") from e
    try:
        if _identity(st) != f.identity[1:]:
            raise FileChanged("it changed since it was scanned")
        try:
            # one read when it has the size scanned (a regular file reads short only at its
            # end); the rest, if any, bounded by that size
            data = os.read(fd, f.size + 1)
            if len(data) < f.size:
                data += read_bounded(fd, f.size - len(data))
        except TooLarge:
            raise FileChanged("it was modified while being hashed") from None
        except OSError as e:
            raise FileChanged(f"read error ({e.strerror or e})") from e
        if len(data) != f.size or _identity(os.fstat(fd)) != f.identity[1:]:
            raise FileChanged("it was modified while being hashed")
        return data
    finally:
        os.close(fd)


class _VersionDirs:
    """Opens version directories below their base without following a link (fsutil.
    open_dir_below), keeping the last one's parent open: the versions of a scan come product
    by product, so most share it with the one before."""

    def __init__(self) -> None:
        self._parent: tuple[str, str, int] | None = None

    def open(self, base: str, path: str) -> int:
        """The version directory `path` (absolute, below `base`)."""
        rel = path[len(base) + 1 :] if path.startswith(base + "/") else os.path.relpath(path, base)
        parent, _, name = rel.rpartition("/")
        if self._parent is None or self._parent[:2] != (base, parent):
            self.close()
            self._parent = (base, parent, open_dir_below(base, parent))
        if name in ("", ".", ".."):
            raise NotADirectoryError(errno.EINVAL, "not a plain relative path", rel)
        return open_dir(name, dir_fd=self._parent[2])

    def close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[2])
            self._parent = None


# -- hashing versions ----------------------------------------------------------------------------


@dataclass
class Digests:
    """sha256 by file path, and combined fingerprints by (metadata path, root path)."""

    files: dict[str, str] = field(default_factory=dict)
    combined: dict[tuple[str, str], str] = field(default_factory=dict)
    #: Files that could not be hashed this time (changed or vanished); left out of the catalog.
    failed: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Plan:
    file: FileStat
    need_plain: bool
    #: metadata files whose combined fingerprint with this root is needed
    combine_with: list[FileStat] = field(default_factory=list)


#: small files handed to a hashing thread at a time (one task per file costs more than hashing
#: a 4 KiB file)
BATCH = 32

T = TypeVar("T")


def _map_batched(pool: ThreadPoolExecutor, fn: Callable[[_Plan], T], plans: list[_Plan]) -> list[T]:
    """[fn(p) for p in plans] on the pool's threads: a big file is a task of its own, small
    ones go BATCH at a time; results in the order of `plans`."""
    batches: list[list[_Plan]] = []
    for p in plans:
        if (
            p.file.size > SMALL
            or not batches
            or len(batches[-1]) >= BATCH
            or batches[-1][0].file.size > SMALL
        ):
            batches.append([p])
        else:
            batches[-1].append(p)
    done = pool.map(lambda batch: [fn(p) for p in batch], batches)
    return [r for batch in done for r in batch]


class HashEngine:
    def __init__(self, cache: HashCache, workers: int | None = None) -> None:
        self.cache = cache
        self.workers = workers or min(8, os.cpu_count() or 1)

    def digest(
        self,
        versions: Iterable[ScannedVersion],
        rehash: bool = False,
        progress_start: Callable[[int], Progress] | None = None,
    ) -> Digests:
        """Digests for every file of `versions`, from the cache where still valid.

        `progress_start(total_bytes)` is called once if anything must be read, and returns
        the callback that receives byte counts as they are hashed.
        """
        out = Digests()
        metas: dict[str, _Plan] = {}
        roots: dict[str, _Plan] = {}
        #: versions read whole in this thread (all their files to read are small)
        whole: list[tuple[ScannedVersion, list[_Plan], list[_Plan]]] = []
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
                whole.append((v, vmeta_plans, vroots))
            else:
                metas.update((p.file.path, p) for p in vmeta_plans)
                roots.update((p.file.path, p) for p in vroots)
        if not metas and not roots and not whole:
            return out
        total = sum(p.file.size for p in (*metas.values(), *roots.values()))
        total += sum(p.file.size for _, ms, rs in whole for p in (*ms, *rs))
        progress = progress_start(total) if progress_start else no_progress
        new_files: list[tuple[FileStat, str]] = []
        new_combined: list[tuple[FileStat, FileStat, str]] = []
        if whole:
            _digest_whole(whole, out, new_files, new_combined, progress)
        if not metas and not roots:
            self.cache.put_many(new_files, new_combined)
            return out
        lock = threading.Lock()

        def safe_progress(n: int) -> None:
            with lock:
                progress(n)

        # Phase 1: metadata tarballs and unified tarballs (their state primes the combined).
        primed: dict[str, Hasher] = {}
        with ThreadPoolExecutor(self.workers, thread_name_prefix="hash") as pool:
            results = _map_batched(
                pool, lambda p: self._run_plain(p, safe_progress), list(metas.values())
            )
        for plan, hasher in zip(metas.values(), results, strict=True):
            if hasher is None:
                out.failed.add(plan.file.path)
                continue
            primed[plan.file.path] = hasher
            out.files[plan.file.path] = hasher.hexdigest()
        # Phase 2: roots, each read once into its own sha256 and every combined fingerprint.
        with ThreadPoolExecutor(self.workers, thread_name_prefix="hash") as pool:
            root_results = _map_batched(
                pool, lambda p: self._run_root(p, primed, safe_progress), list(roots.values())
            )
        new_files += [
            (p.file, out.files[p.file.path])
            for p in metas.values()
            if p.file.path in out.files and p.need_plain
        ]
        for plan, res in zip(roots.values(), root_results, strict=True):
            if res is None:
                out.failed.add(plan.file.path)
                continue
            plain, combined = res
            if plain is not None:
                out.files[plan.file.path] = plain
                new_files.append((plan.file, plain))
            for meta, digest in combined:
                out.combined[(meta.path, plan.file.path)] = digest
                new_combined.append((meta, plan.file, digest))
        self.cache.put_many(new_files, new_combined)
        return out

    @staticmethod
    def _run_plain(plan: _Plan, progress: Progress) -> Hasher | None:
        h = hashlib.sha256()
        try:
            hash_file(plan.file, [h], progress)
        except FileChanged as e:
            log.warning("not publishing %s yet: %s", plan.file.path, e)
            return None
        return h

    @staticmethod
    def _run_root(
        plan: _Plan, primed: dict[str, Hasher], progress: Progress
    ) -> tuple[str | None, list[tuple[FileStat, str]]] | None:
        sinks: list[Hasher] = []
        plain = hashlib.sha256() if plan.need_plain else None
        if plain is not None:
            sinks.append(plain)
        combos = [(m, primed[m.path].copy()) for m in plan.combine_with if m.path in primed]
        sinks.extend(h for _, h in combos)
        if not sinks:
            return (None, [])
        try:
            hash_file(plan.file, sinks, progress)
        except FileChanged as e:
            log.warning("not publishing %s yet: %s", plan.file.path, e)
            return None
        return (
            plain.hexdigest() if plain is not None else None,
            [(m, h.hexdigest()) for m, h in combos],
        )


def _digest_whole(
    versions: list[tuple[ScannedVersion, list[_Plan], list[_Plan]]],
    out: Digests,
    new_files: list[tuple[FileStat, str]],
    new_combined: list[tuple[FileStat, FileStat, str]],
    progress: Progress,
) -> None:
    """The digests of small versions, each file read whole (read_whole) once: its sha256 and,
    for a root, every combined fingerprint continue from the metadata's hash state."""
    dirs = _VersionDirs()
    try:
        for v, meta_plans, root_plans in versions:
            base = (meta_plans or root_plans)[0].file.base
            try:
                dir_fd = dirs.open(base, v.path)
            except OSError as e:
                for p in (*meta_plans, *root_plans):
                    log.warning("not publishing %s yet: cannot open it (%s)", p.file.path, e)
                    out.failed.add(p.file.path)
                continue
            try:
                primed: dict[str, Hasher] = {}
                for p in meta_plans:
                    try:
                        h = hashlib.sha256(read_whole(dir_fd, p.file))
                    except FileChanged as e:
                        log.warning("not publishing %s yet: %s", p.file.path, e)
                        out.failed.add(p.file.path)
                        continue
                    progress(p.file.size)
                    primed[p.file.path] = h
                    digest = h.hexdigest()
                    out.files[p.file.path] = digest
                    if p.need_plain:
                        new_files.append((p.file, digest))
                for p in root_plans:
                    try:
                        data = read_whole(dir_fd, p.file)
                    except FileChanged as e:
                        log.warning("not publishing %s yet: %s", p.file.path, e)
                        out.failed.add(p.file.path)
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
