"""The pipeline's scheduling (issue 9, finding 6): hashing never holds the catalog lock, and a
version slow to hash neither delays the others nor is published before its digests are done."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import hashread
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import Digests, HashEngine
from lxd_image_server.catalog.pipeline import Pipeline, Use
from lxd_image_server.config import Paths
from lxd_image_server.tree.scan import FileStat, ScannedVersion

from .helpers import blob, version_dir, write

WAIT = 30.0
SLOW = "20240101_1200"
FAST = "20240202_1200"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    return p


def add_version(paths: Paths, serial: str, seed: int) -> Path:
    d = version_dir(Path(paths.img_dir), serial=serial)
    write(d / "lxd.tar.xz", blob(100, seed))
    write(d / "rootfs.squashfs", blob(1000, seed + 1))
    return d


def published(paths: Paths) -> set[str]:
    try:
        doc = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    except FileNotFoundError:
        return set()
    return {s for p in doc["products"].values() for s in p["versions"]}


def lock_is_free(paths: Paths) -> bool:
    """Whether the catalog lock (where it is now, or where it was) can be taken right now."""
    for path in (
        os.path.join(paths.state_dir, "catalog.lock"),
        os.path.join(paths.streams_dir, ".lxd-image-server.lock"),
    ):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            assert e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            return False
        finally:
            os.close(fd)
    return True


class Gate:
    """Makes hashing the files of versions whose path contains `word` wait until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, word: str) -> None:
        self.word = word
        self.entered = threading.Event()
        self.opened = threading.Event()
        real, real_whole = hashread.feed_file, hashread.read_whole

        def wait(f: FileStat) -> None:
            if word in f.path:
                self.entered.set()
                assert self.opened.wait(WAIT), "the gate was never opened"

        def gated(f: FileStat, *args: Any, **kwargs: Any) -> None:
            wait(f)
            real(f, *args, **kwargs)

        def gated_whole(dir_fd: int, f: FileStat) -> bytes:
            wait(f)
            return real_whole(dir_fd, f)

        # big files are read by feed_file, small versions whole (read_whole)
        monkeypatch.setattr(hashread, "feed_file", gated)
        monkeypatch.setattr(hashread, "read_whole", gated_whole)


def test_a_slow_version_holds_no_lock_and_delays_no_other(paths, monkeypatch):
    cache = HashCache(None)
    pipeline = Pipeline(paths, cache)
    assert pipeline.update_all()  # an empty catalog
    gate = Gate(monkeypatch, SLOW)
    add_version(paths, SLOW, 1)
    add_version(paths, FAST, 2)
    prefix = "busybox/1.35/amd64/default"
    try:
        # a pass waits for its versions at most its budget, then publishes what is ready
        pipeline.refresh([f"{prefix}/{SLOW}", f"{prefix}/{FAST}"], 0.2)
        assert gate.entered.wait(WAIT)
        # while the slow version is being hashed, nobody holds the catalog lock ...
        assert lock_is_free(paths)
        # ... and the fast version, scanned in the same pass, is published (by that pass or,
        # on a busy machine, by the next collection)
        for _ in range(int(WAIT / 0.02)):
            pipeline.collect()
            if FAST in published(paths):
                break
            threading.Event().wait(0.02)
        assert published(paths) == {FAST}
        assert pipeline.hashing() == 1
    finally:
        gate.opened.set()
    # the slow one follows in a later publish, once its digests are done
    for _ in range(int(WAIT / 0.02)):
        pipeline.collect()
        if published(paths) == {FAST, SLOW}:
            break
        threading.Event().wait(0.02)
    assert published(paths) == {FAST, SLOW}
    cache.close()


class SlowEngine(HashEngine):
    """Blocks `digest` until released, to see what the pipeline holds meanwhile."""

    def __init__(self, cache: HashCache, entered: threading.Event, release: threading.Event):
        super().__init__(cache)
        self.entered = entered
        self.release = release

    def digest(
        self,
        versions: Iterable[ScannedVersion],
        rehash: bool = False,
        progress_start=None,
        cache_apart: bool = False,
    ) -> Digests:
        versions = list(versions)
        if versions:
            self.entered.set()
            assert self.release.wait(WAIT)
        return super().digest(versions, rehash, progress_start, cache_apart)


def slow_update(paths: Paths) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """`update` in a thread of its own (its hash cache too), slow to hash."""
    entered, release = threading.Event(), threading.Event()

    def run() -> None:
        cache = HashCache(paths.cache_path)
        pipeline = Pipeline(paths, cache)
        pipeline.known.hasher = SlowEngine(cache, entered, release)
        pipeline.update_all()
        cache.close()

    worker = threading.Thread(target=run)
    worker.start()
    return worker, entered, release


@pytest.fixture
def cache() -> Iterator[HashCache]:
    c = HashCache(None)
    yield c
    c.close()


def test_update_waits_for_every_digest_but_not_under_the_lock(paths):
    add_version(paths, SLOW, 1)
    worker, entered, release = slow_update(paths)
    try:
        assert entered.wait(WAIT)
        assert lock_is_free(paths)
        assert published(paths) == set()
    finally:
        release.set()
        worker.join(WAIT)
    assert published(paths) == {SLOW}


def test_update_does_not_undo_what_another_writer_published_while_it_hashed(paths):
    """`update` scans, then hashes for a long time without the lock; meanwhile the watcher
    publishes a version uploaded later. `update` must not publish its older view over it."""
    add_version(paths, SLOW, 1)
    worker, entered, release = slow_update(paths)
    try:
        assert entered.wait(WAIT)
        add_version(paths, FAST, 2)
        if lock_is_free(paths):  # (the old code would wait here for ever)
            cache = HashCache(paths.cache_path)  # the watcher, say: same hash cache
            assert Pipeline(paths, cache).update_all()
            cache.close()
            assert published(paths) == {SLOW, FAST}
    finally:
        release.set()
        worker.join(WAIT)
    assert published(paths) == {SLOW, FAST}


def test_a_removed_version_leaves_and_stale_results_are_dropped(paths, cache):
    pipeline = Pipeline(paths, cache)
    d = add_version(paths, SLOW, 1)
    assert pipeline.update_all()
    assert published(paths) == {SLOW}
    (d / "rootfs.squashfs").write_bytes(blob(2000, 9))
    pipeline.refresh([os.path.relpath(d, paths.img_dir)])
    assert published(paths) == {SLOW}
    doc = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    items = next(iter(doc["products"].values()))["versions"][SLOW]["items"]
    assert items["squashfs"]["size"] == 2000
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    pipeline.refresh(["busybox"])
    assert published(paths) == set()


def test_a_directory_where_the_lock_used_to_be_stops_nothing(paths, cache):
    """Finding 3: the lock no longer lives in streams/ (served, and once writable by uploaders):
    a directory planted at its old name does not stop publishing."""
    os.makedirs(os.path.join(paths.streams_dir, ".lxd-image-server.lock"))
    add_version(paths, SLOW, 1)
    assert Pipeline(paths, cache).update_all()
    assert published(paths) == {SLOW}


@pytest.mark.parametrize(("use", "apart"), [(Use.UPDATE, True), (Use.WATCH, False)])
def test_only_update_writes_its_new_digests_apart(paths, monkeypatch, use, apart):
    """`update` publishes while its new digests are written to the hash cache (a thread of
    their own); the watcher's start writes them first (its peak memory). Either way they are
    in the cache after the publish."""
    add_version(paths, SLOW, 1)
    calls: list[bool] = []
    real = HashCache.put_many

    def spying(self: HashCache, files: Any, combined: Any, apart: bool = False) -> None:
        calls.append(apart)
        real(self, files, combined, apart)

    monkeypatch.setattr(HashCache, "put_many", spying)
    cache = HashCache(paths.cache_path)
    try:
        assert Pipeline(paths, cache, use=use).update_all()
        assert calls == [apart]
        assert published(paths) == {SLOW}
    finally:
        cache.close()
    again = HashCache(paths.cache_path)
    try:
        version = Pipeline(paths, again).known.scanner.scan()[0]
        assert all(again.get(f) for f in version.files.values())
    finally:
        again.close()
