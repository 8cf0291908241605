"""The hashing threads (catalog/hashpool.py): each file read once into all of its digests; a
thread with nothing left takes digests away from a running file and reads the rest itself;
the digests are those of the bytes whoever reads them, and a file that changes while any
thread reads it fails as a whole."""

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import hashpool, hashread
from lxd_image_server.catalog.hashpool import Job, hash_file, run
from lxd_image_server.catalog.hashread import FileChanged, Hasher, Offer, feed_file
from lxd_image_server.fsutil import CHUNK_SIZE as CHUNK
from lxd_image_server.tree.scan import FileStat, Scanner

from .helpers import blob, sha, version_dir, write

WAIT = 30.0
BIG = blob(hashpool.MIN_SPLIT + 5 * CHUNK + 777, 7)


def stat_of(tmp_path: Path, data: bytes, serial: str = "20240101_12:00") -> FileStat:
    d = version_dir(tmp_path / "images", serial=serial)
    write(d / "lxd.tar.xz", b"meta")
    write(d / "rootfs.squashfs", data)
    (v,) = [v for v in Scanner(tmp_path / "images").scan() if v.path == str(d)]
    return v.files["rootfs.squashfs"]


Read = tuple[str, int]  # (file name, offset the read started at)


def watch_reads(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[int, Offer | None], None] | None = None
) -> list[Read]:
    """Records each feed_file call (its file and start), after `before(start, offer)`."""
    seen: list[Read] = []
    real: Callable[..., None] = hashread.feed_file
    lock = threading.Lock()

    def watched(f: FileStat, *args: Any, start: int = 0, offer: Offer | None = None) -> None:
        with lock:
            seen.append((f.path, start))
        if before is not None:
            before(start, offer)
        real(f, *args, start=start, offer=offer)

    monkeypatch.setattr(hashread, "feed_file", watched)
    return seen


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def asked_first(start: int, offer: Offer | None) -> None:
    """The first reader waits until an idle thread asks it for digests (a loaded machine may
    start the second thread late; this makes the split certain)."""
    if start == 0 and offer is not None:
        until(lambda: offer.wanted)


def test_one_big_file_has_its_two_digests_on_two_threads(tmp_path, monkeypatch):
    f = stat_of(tmp_path, BIG)
    reads = watch_reads(monkeypatch, asked_first)
    prefix = hashlib.sha256(b"meta")
    own, combined = hashlib.sha256(), prefix.copy()
    job = Job(f, [own, combined])
    run([job], 2)
    assert job.error is None
    assert own.hexdigest() == sha(BIG)
    assert combined.hexdigest() == sha(b"meta", BIG)
    # the second thread continued one digest from where the first reader was
    assert len(reads) == 2 and reads[0][1] == 0 and 0 < reads[1][1] < len(BIG)


def test_many_files_each_read_once_when_no_thread_idles(tmp_path, monkeypatch):
    """Four files with two digests each on two threads: each file is read once, by one
    thread into both digests (the idle thread asks only when no file is left to start, and
    the last files are below the size worth sharing)."""
    small = hashpool.MIN_SPLIT - 1
    datas = [blob(small, 10 + i) for i in range(4)]
    files = [stat_of(tmp_path, d, f"20240101_12:0{i}") for i, d in enumerate(datas)]
    reads = watch_reads(monkeypatch)
    jobs = [Job(f, [hashlib.sha256(), hashlib.sha256(b"m")]) for f in files]
    run(jobs, 2)
    assert sorted(reads) == sorted((f.path, 0) for f in files)
    for job, data in zip(jobs, datas, strict=True):
        assert job.error is None
        assert [s.hexdigest() for s in job.sinks] == [sha(data), sha(b"m", data)]


def test_digests_are_right_however_the_work_is_shared(tmp_path):
    """Files of several sizes, one to three digests each, on one to four threads."""
    sizes = [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 5, hashpool.MIN_SPLIT + 2 * CHUNK + 3]
    datas = [blob(n, 20 + i) for i, n in enumerate(sizes)]
    files = [stat_of(tmp_path, d, f"20240101_12:{i:02}") for i, d in enumerate(datas)]
    for workers in (1, 2, 4):
        prefixes = [b"", b"a", b"bb"]
        jobs = [
            Job(f, [hashlib.sha256(p) for p in prefixes[: 1 + i % 3]]) for i, f in enumerate(files)
        ]
        run(jobs, workers)
        for i, (job, data) in enumerate(zip(jobs, datas, strict=True)):
            assert job.error is None
            assert [s.hexdigest() for s in job.sinks] == [
                sha(p, data) for p in prefixes[: 1 + i % 3]
            ]


def test_a_file_changed_under_the_thread_that_took_over_fails_whole(tmp_path, monkeypatch):
    """The digests given away are read on by another thread, which opens the file again: a
    file rewritten in between fails the job (neither digest is used)."""
    f = stat_of(tmp_path, BIG)
    path = Path(f.path)

    def rewrite_before_the_rest(start: int, offer: Offer | None) -> None:
        asked_first(start, offer)
        if start > 0:
            with open(path, "r+b") as g:
                g.write(b"\xff")

    watch_reads(monkeypatch, rewrite_before_the_rest)
    job = Job(f, [hashlib.sha256(), hashlib.sha256()])
    run([job], 2)
    assert isinstance(job.error, FileChanged)


def test_hash_file_raises_for_a_changed_file(tmp_path):
    f = stat_of(tmp_path, BIG)
    os.truncate(f.path, 10)
    with pytest.raises(FileChanged):
        hash_file(f, [hashlib.sha256(), hashlib.sha256()])


def test_a_file_growing_while_read_is_read_no_further_than_its_size(tmp_path):
    """Appending faster than the reader reads must not keep it reading: at most the scanned
    size plus one byte is read, then the file is refused."""
    data = blob(3 * CHUNK, 3)
    f = stat_of(tmp_path, data)
    fed = 0

    class Appending:
        def update(self, chunk: bytes | memoryview, /) -> None:
            nonlocal fed
            fed += len(chunk)
            with open(f.path, "ab") as g:
                g.write(blob(2 * CHUNK, fed))

        def hexdigest(self) -> str:
            return ""

        def copy(self) -> Any:
            return self

    sink: Hasher = Appending()
    with pytest.raises(FileChanged):
        feed_file(f, [sink])
    assert fed == len(data) + 1
