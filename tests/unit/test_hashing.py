import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import HashEngine
from lxd_image_server.catalog.hashpool import hash_file
from lxd_image_server.catalog.hashread import FileChanged
from lxd_image_server.fsutil import CHUNK_SIZE as CHUNK
from lxd_image_server.tree.scan import FileStat, ScannedVersion, Scanner

from .helpers import blob, digest_once, sha, version_dir, write

META = blob(5000, 1)
ROOT = blob(3 * CHUNK + 12345, 2)  # several chunks, ragged end


def scan(root: Path) -> list[ScannedVersion]:
    return Scanner(root / "images").scan()


def tree(root: Path) -> Path:
    d = version_dir(root / "images")
    write(d / "lxd.tar.xz", META)
    write(d / "rootfs.squashfs", ROOT)
    return d


class Counting:
    """Progress sink that records the bytes read."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.read = 0

    def start(self, total: int) -> Callable[[int], None]:
        self.total = total
        return self.add

    def add(self, n: int) -> None:
        self.read += n


def test_digests_and_combined(tmp_path):
    d = tree(tmp_path)
    digests = digest_once(None, scan(tmp_path))
    assert digests.files[str(d / "lxd.tar.xz")] == sha(META)
    assert digests.files[str(d / "rootfs.squashfs")] == sha(ROOT)
    assert digests.combined[(str(d / "lxd.tar.xz"), str(d / "rootfs.squashfs"))] == sha(META, ROOT)


def test_cache_persists_and_skips_unchanged(tmp_path):
    tree(tmp_path)
    db = str(tmp_path / "state" / "hashes.sqlite3")
    first = Counting()
    digest_once(db, scan(tmp_path), progress_start=first.start)
    assert first.read == len(META) + len(ROOT)
    again = Counting()
    digests = digest_once(db, scan(tmp_path), progress_start=again.start)
    assert again.total is None  # nothing to read at all
    assert len(digests.files) == 2
    assert len(digests.combined) == 1


def test_rehash_ignores_cache(tmp_path):
    tree(tmp_path)
    db = str(tmp_path / "hashes.sqlite3")
    digest_once(db, scan(tmp_path))
    c = Counting()
    digest_once(db, scan(tmp_path), rehash=True, progress_start=c.start)
    assert c.read == len(META) + len(ROOT)


@pytest.mark.parametrize("how", ["rewrite_same_size", "append", "replace"])
def test_any_change_invalidates(tmp_path, how):
    d = tree(tmp_path)
    db = str(tmp_path / "hashes.sqlite3")
    digest_once(db, scan(tmp_path))
    root = d / "rootfs.squashfs"
    st = root.stat()
    new = bytearray(ROOT)
    new[100] ^= 0xFF
    if how == "rewrite_same_size":
        with open(root, "r+b") as f:
            f.seek(100)
            f.write(bytes(new[100:101]))
        os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: ctime still moves
    elif how == "append":
        new = bytearray(ROOT + b"x")
        root.write_bytes(new)
    else:
        tmp = d / ".new"
        tmp.write_bytes(new)
        os.replace(tmp, root)
    digests = digest_once(db, scan(tmp_path))
    assert digests.files[str(root)] == sha(bytes(new))
    assert digests.combined[(str(d / "lxd.tar.xz"), str(root))] == sha(META, bytes(new))


def test_meta_change_recomputes_combined_only_needing_one_read_of_root(tmp_path):
    d = tree(tmp_path)
    db = str(tmp_path / "hashes.sqlite3")
    digest_once(db, scan(tmp_path))
    new_meta = blob(4000, 7)
    (d / "lxd.tar.xz").write_bytes(new_meta)
    c = Counting()
    digests = digest_once(db, scan(tmp_path), progress_start=c.start)
    assert c.read == len(new_meta) + len(ROOT)
    assert digests.combined[(str(d / "lxd.tar.xz"), str(d / "rootfs.squashfs"))] == sha(
        new_meta, ROOT
    )


def test_file_replaced_after_scan_is_not_trusted(tmp_path):
    d = tree(tmp_path)
    versions = scan(tmp_path)
    (d / "rootfs.squashfs").write_bytes(b"short now")
    digests = digest_once(None, versions)
    assert str(d / "rootfs.squashfs") in digests.failed
    assert str(d / "rootfs.squashfs") not in digests.files


def test_vanished_file(tmp_path):
    d = tree(tmp_path)
    versions = scan(tmp_path)
    (d / "rootfs.squashfs").unlink()
    digests = digest_once(None, versions)
    assert str(d / "rootfs.squashfs") in digests.failed


def test_hash_file_detects_identity_mismatch(tmp_path):
    d = tree(tmp_path)
    (f,) = [f for f in scan(tmp_path)[0].files.values() if f.name == "rootfs.squashfs"]
    os.truncate(d / "rootfs.squashfs", 10)
    with pytest.raises(FileChanged):
        import hashlib

        hash_file(f, [hashlib.sha256()])


def test_unusable_cache_still_hashes(tmp_path, caplog):
    tree(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    digests = digest_once(str(blocker / "hashes.sqlite3"), scan(tmp_path))
    assert len(digests.files) == 2
    assert "hash cache" in caplog.text


def test_forget_except_prunes(tmp_path):
    d = tree(tmp_path)
    cache = HashCache(str(tmp_path / "h.sqlite3"))
    HashEngine(cache).digest(scan(tmp_path))
    cache.forget_except({str(d / "lxd.tar.xz")})
    (meta,) = [f for f in scan(tmp_path)[0].files.values() if f.name == "lxd.tar.xz"]
    (root,) = [f for f in scan(tmp_path)[0].files.values() if f.name == "rootfs.squashfs"]
    assert cache.get(meta) == sha(META)
    assert cache.get(root) is None
    assert cache.get_combined(meta, root) is None
    cache.close()


@pytest.mark.parametrize("how", ["rewrite_same_size", "append", "replace"])
def test_preloaded_cache_answers_as_the_queries_do(tmp_path, how):
    """The whole-tree lookup (one read per table) trusts exactly what a query per file does:
    a changed file misses, an unchanged one hits, and what is hashed meanwhile is seen."""
    d = tree(tmp_path)
    other = version_dir(tmp_path / "images", serial="20240202_12:00")
    write(other / "lxd.tar.xz", META)
    write(other / "rootfs.squashfs", ROOT)
    cache = HashCache(str(tmp_path / "hashes.sqlite3"))
    try:
        HashEngine(cache).digest(scan(tmp_path))
        root = d / "rootfs.squashfs"
        if how == "rewrite_same_size":
            st = root.stat()
            with open(root, "r+b") as f:
                f.write(b"\0")
            os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif how == "append":
            with open(root, "ab") as g:
                g.write(b"x")
        else:
            write(d / ".new", ROOT)
            os.replace(d / ".new", root)
        versions = scan(tmp_path)
        files = [f for v in versions for f in v.files.values()]
        pairs = [(v.files["lxd.tar.xz"], v.files["rootfs.squashfs"]) for v in versions]
        plain = [cache.get(f) for f in files], [cache.get_combined(m, r) for m, r in pairs]
        with cache.preloaded():
            assert (
                [cache.get(f) for f in files],
                [cache.get_combined(m, r) for m, r in pairs],
            ) == plain
            assert None in plain[0] and None in plain[1]
            c = Counting()
            HashEngine(cache).digest(versions, progress_start=c.start)
            assert c.read > 0
            assert None not in [cache.get(f) for f in files]
            assert None not in [cache.get_combined(m, r) for m, r in pairs]
        assert None not in [cache.get(f) for f in files]
    finally:
        cache.close()


#: the hash cache's tables as releases before WITHOUT ROWID made them
_ROWID_SCHEMA = """
CREATE TABLE files (
    path TEXT PRIMARY KEY, dev INTEGER, inode INTEGER, size INTEGER,
    mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT NOT NULL);
CREATE TABLE combined (
    meta_path TEXT, root_path TEXT, meta_ident TEXT, root_ident TEXT, sha256 TEXT NOT NULL,
    PRIMARY KEY (meta_path, root_path));
"""


def _table_sql(db_path: str) -> dict[str, str]:
    db = sqlite3.connect(db_path)
    try:
        return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    finally:
        db.close()


def test_a_cache_of_an_earlier_release_keeps_its_digests(tmp_path):
    """Tables with a rowid (before) are converted once when the cache is opened: every digest
    they held is still answered, so nothing is hashed again, and a second open changes
    nothing."""
    tree(tmp_path)
    versions = scan(tmp_path)
    db_path = str(tmp_path / "hashes.sqlite3")
    old = sqlite3.connect(db_path, isolation_level=None)
    old.executescript(_ROWID_SCHEMA)
    old.close()
    made = HashCache(db_path)
    HashEngine(made).digest(versions)
    made.close()
    # the rows written to the tables of before (a copy of what that release wrote)
    db = sqlite3.connect(db_path, isolation_level=None)
    files = db.execute("SELECT * FROM files ORDER BY path").fetchall()
    combined = db.execute("SELECT * FROM combined").fetchall()
    db.executescript(
        "ALTER TABLE files RENAME TO f; ALTER TABLE combined RENAME TO c;"
        + _ROWID_SCHEMA
        + "INSERT INTO files SELECT * FROM f; INSERT INTO combined SELECT * FROM c;"
        + "DROP TABLE f; DROP TABLE c;"
    )
    db.close()
    assert all("WITHOUT ROWID" not in sql for sql in _table_sql(db_path).values())
    assert len(files) == 2 and len(combined) == 1

    for _ in range(2):
        cache = HashCache(db_path)
        try:
            f = {f.name: f for f in versions[0].files.values()}
            meta, root = f["lxd.tar.xz"], f["rootfs.squashfs"]
            assert cache.get(meta) == sha(META)
            assert cache.get(root) == sha(ROOT)
            assert cache.get_combined(meta, root) == sha(META, ROOT)
        finally:
            cache.close()
        tables = _table_sql(db_path)
        assert sorted(tables) == ["combined", "files"]
        assert all("WITHOUT ROWID" in sql for sql in tables.values())
        db = sqlite3.connect(db_path)
        assert db.execute("SELECT * FROM files ORDER BY path").fetchall() == files
        assert db.execute("SELECT * FROM combined").fetchall() == combined
        db.close()
    again = Counting()
    assert digest_once(db_path, versions, progress_start=again.start).files
    assert again.total is None and again.read == 0  # nothing read again


def _files_of(versions: list[ScannedVersion]) -> tuple[FileStat, FileStat]:
    f = {f.name: f for f in versions[0].files.values()}
    return f["lxd.tar.xz"], f["rootfs.squashfs"]


def test_digests_written_apart_are_seen_by_every_later_use(tmp_path):
    """put_many(apart=True) (a full update's new digests, written while it publishes): a
    lookup right after sees them, forget_except keeps them, and they persist."""
    tree(tmp_path)
    versions = scan(tmp_path)
    meta, root = _files_of(versions)
    db_path = str(tmp_path / "hashes.sqlite3")
    cache = HashCache(db_path)
    try:
        cache.put_many([(meta, "m" * 64), (root, "r" * 64)], [(meta, root, "c" * 64)], apart=True)
        assert cache.get(meta) == "m" * 64
        assert cache.get_combined(meta, root) == "c" * 64
        cache.put_many([(meta, "n" * 64)], [], apart=True)
        cache.forget_except({meta.path, root.path})
    finally:
        cache.close()
    again = HashCache(db_path)
    try:
        assert again.get(meta) == "n" * 64
        assert again.get(root) == "r" * 64
        assert again.get_combined(meta, root) == "c" * 64
    finally:
        again.close()


def test_a_full_digest_writes_apart_and_close_waits_for_it(tmp_path, monkeypatch):
    tree(tmp_path)
    versions = scan(tmp_path)
    meta, root = _files_of(versions)
    db_path = str(tmp_path / "hashes.sqlite3")
    cache = HashCache(db_path)
    writers: list[object] = []
    real = cache._write_apart

    def spying(*args: Any) -> None:
        real(*args)
        writers.append(cache._writer)

    monkeypatch.setattr(cache, "_write_apart", spying)
    HashEngine(cache).digest(versions, cache_apart=True)
    cache.close()
    assert len(writers) == 1 and cache._writer is None  # written apart, waited for
    again = HashCache(db_path)
    try:
        assert again.get(meta) == sha(META)
        assert again.get_combined(meta, root) == sha(META, ROOT)
    finally:
        again.close()


def test_a_failed_write_apart_is_one_warning(tmp_path, caplog):
    """The database replaced under the cache (its tables gone): the writing thread logs one
    line, nothing is raised, the caller goes on hashing instead of trusting the cache."""
    tree(tmp_path)
    versions = scan(tmp_path)
    meta, _ = _files_of(versions)
    db_path = tmp_path / "hashes.sqlite3"
    cache = HashCache(str(db_path))
    for p in tmp_path.glob("hashes.sqlite3*"):
        p.unlink()
    try:
        cache.put_many([(meta, "m" * 64)], [], apart=True)
        cache.close()
    finally:
        cache.close()
    failed = [r for r in caplog.records if "hash cache write failed" in r.getMessage()]
    assert len(failed) == 1
