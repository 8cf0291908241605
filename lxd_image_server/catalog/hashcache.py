"""The persistent cache of digests: each file's sha256 and each combined fingerprint
(sha256(metadata bytes + root bytes)), in sqlite3 under the state directory, so that an update
reads only the files that changed since the last.

Invalidation: a digest is answered only while the file's identity (device, inode, size,
mtime, ctime; both files' for a combined fingerprint) is still the one it was computed from;
any write, truncation, replacement or rename of a file changes that identity. Entries of files
no longer in the tree are dropped after a full scan (forget_except).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from lxd_image_server.tree.handover import Key, Records, record_name
from lxd_image_server.tree.layout import Role
from lxd_image_server.tree.scan import FileStat, ScannedVersion

log = logging.getLogger(__name__)


class HashCache:
    """sqlite3 cache: a digest is reused only while path, device, inode, size, mtime and ctime
    all match, so any write, truncation, replacement or rename of a file invalidates it."""

    #: Each table is its primary key's b-tree (WITHOUT ROWID): a row is written once, not to
    #: a rowid table and again to the key's index (a cold update of 20,000 versions writes
    #: 60,000 rows: 0.27 s against 0.15 s with 16 KiB pages, PAGE_SIZE)
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS files (
        path TEXT PRIMARY KEY, dev INTEGER, inode INTEGER, size INTEGER,
        mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS combined (
        meta_path TEXT, root_path TEXT, meta_ident TEXT, root_ident TEXT, sha256 TEXT NOT NULL,
        PRIMARY KEY (meta_path, root_path)) WITHOUT ROWID;
    """
    TABLES = ("files", "combined")
    #: of a new database (an existing one keeps its own): fewer, fuller pages for rows keyed
    #: by long paths
    PAGE_SIZE = 16384

    def __init__(self, path: str | None) -> None:
        """`path` None keeps the cache in memory (nothing persists)."""
        self.path = path
        self._db: sqlite3.Connection | None = None
        try:
            if path is not None:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._db = sqlite3.connect(path or ":memory:", timeout=60, isolation_level=None)
            self._db.execute(f"PRAGMA page_size={self.PAGE_SIZE}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create(self._db)
        except (OSError, sqlite3.Error) as e:
            log.warning("hash cache %s unusable (%s); hashing everything", path, e)
            self._db = None
        #: both tables in memory while `preloaded` (a full scan looks up every file), keyed by
        #: path. Invalidation: they live for that `with` block only; this cache's writes go to
        #: them and to sqlite alike; a row another process wrote meanwhile is missed (the file
        #: is hashed again) or, if older, fails the identity check like any stale row.
        self._files: dict[str, tuple[Any, ...]] | None = None
        self._combined: dict[tuple[str, str], tuple[Any, ...]] | None = None
        #: the thread writing the rows of a put_many(apart=True), until settled
        self._writer: threading.Thread | None = None

    def _create(self, db: sqlite3.Connection) -> None:
        """The tables, made if missing. Tables of an earlier release (with a rowid, the
        primary key an index beside it) are copied into new ones once, in one transaction
        (another process converting them meanwhile waits, then finds them done), so no digest
        is lost."""
        if not self._rowid_tables(db):
            db.executescript(self.SCHEMA)
            return
        with db:
            db.execute("BEGIN IMMEDIATE")
            old = self._rowid_tables(db)
            for name in old:  # (names from TABLES, not from the file)
                db.execute(f"ALTER TABLE {name} RENAME TO {name}_rowid")
            for statement in self.SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for name in old:
                db.execute(f"INSERT OR REPLACE INTO {name} SELECT * FROM {name}_rowid")
                db.execute(f"DROP TABLE {name}_rowid")
        log.info("hash cache %s: tables converted to the new layout", self.path)

    def _rowid_tables(self, db: sqlite3.Connection) -> list[str]:
        """Those of TABLES the database holds with a rowid (an earlier release's)."""
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
        return [
            name
            for name, sql in rows
            if name in self.TABLES and "WITHOUT ROWID" not in str(sql).upper()
        ]

    @contextlib.contextmanager
    def preloaded(self) -> Iterator[None]:
        """Answers lookups from one read of each table instead of one query per file (what
        looking up a whole tree wants); writes go to both."""
        self._settle()
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
        self._settle()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _settle(self) -> None:
        """Waits until the rows a put_many(apart=True) is writing are in the database (or
        failed, logged): every use of the database after put_many sees them."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _query(self, sql: str, args: Sequence[Any]) -> Any:
        self._settle()
        if self._db is None:
            return None
        try:
            return self._db.execute(sql, args).fetchone()
        except sqlite3.Error as e:
            log.warning("hash cache read failed (%s); hashing instead", e)
            return None

    def _write(self, *writes: tuple[str, Iterable[Sequence[Any]]]) -> None:
        """Each (statement, rows) of `writes`, all in one transaction."""
        self._settle()
        if self._db is None:
            return
        _write_in(self._db, writes)

    def _write_apart(
        self, path: str, writes: Sequence[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        """_write in a thread of its own, on a connection of its own to `path` (a connection
        serves the thread that made it; the database's lock orders the two)."""

        def write() -> None:
            try:
                db = sqlite3.connect(path, timeout=60, isolation_level=None)
                try:
                    db.execute("PRAGMA synchronous=NORMAL")
                    _write_in(db, writes)
                finally:
                    db.close()
            except sqlite3.Error as e:
                log.warning("hash cache write failed (%s); results not cached", e)

        self._writer = threading.Thread(target=write, name="hash-cache-write")
        self._writer.start()

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
        apart: bool = False,
    ) -> None:
        """Stores digests. `apart`: written by a thread of its own while the caller goes on
        (a cold update's 60,000 rows, while it builds and writes the catalog); this cache
        waits for them before its next use of the database (`_settle`), lookups in a
        `preloaded` block see them at once, and close() waits for them."""
        file_rows = [(f.path, f.dev, f.inode, f.size, f.mtime_ns, f.ctime_ns, d) for f, d in files]
        combined_rows = [(m.path, r.path, _ident(m), _ident(r), d) for m, r, d in combined]
        if not file_rows and not combined_rows:
            return
        writes = (
            ("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", file_rows),
            ("INSERT OR REPLACE INTO combined VALUES (?, ?, ?, ?, ?)", combined_rows),
        )
        if apart and self.path is not None and self._db is not None:
            self._settle()
            self._write_apart(self.path, writes)
        else:
            self._write(*writes)
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
        self._settle()
        if self._db is None:
            return
        try:
            # (row by row from the cursor: no list of every path, 60,000 rows at 20,000
            # versions, made at the watcher's start, after its first publish)
            files = self._db.execute("SELECT path FROM files")
            gone = [(p,) for (p,) in files if p not in keep_paths]
            combined = self._db.execute("SELECT meta_path, root_path FROM combined")
            gone_c = [(m, r) for (m, r) in combined if m not in keep_paths or r not in keep_paths]
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM files WHERE path = ?", gone)
                self._db.executemany(
                    "DELETE FROM combined WHERE meta_path = ? AND root_path = ?", gone_c
                )
        except sqlite3.Error as e:
            log.warning("hash cache cleanup failed (%s)", e)


def _write_in(
    db: sqlite3.Connection, writes: Iterable[tuple[str, Iterable[Sequence[Any]]]]
) -> None:
    """Each (statement, rows) of `writes` on `db`, all in one transaction (logged if not)."""
    try:
        with db:
            db.execute("BEGIN")
            for sql, rows in writes:
                db.executemany(sql, rows)
    except sqlite3.Error as e:
        log.warning("hash cache write failed (%s); results not cached", e)


def _key(f: FileStat) -> Key:
    return (f.dev, f.inode, f.size, f.mtime_ns, f.ctime_ns)


def _ident(f: FileStat) -> str:
    """dev:inode:size:mtime_ns:ctime_ns."""
    return f"{f.dev}:{f.inode}:{f.size}:{f.mtime_ns}:{f.ctime_ns}"
