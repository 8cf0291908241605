"""`import`: a file's bytes brought into the tree and hashed in one pass, on every core.

The copy is done by the kernel (copy_file_range: no trip through user space, and on file systems
that can, no copy at all); each chunk is then read back from the new file, so the digests are of
the bytes that landed in the tree, and hashed while the kernel copies the next chunk: each sink
(a file's sha256, the combined fingerprint) in a thread of its own, as hashlib releases the GIL.
Write-back of each chunk is started as soon as it is copied (fsutil.start_writeback), so the
fsync that makes the import durable finds most of the file on the disk already.
Where the kernel cannot copy (another file system on an old kernel, a special file system), the
bytes are read and written by this process instead: the same digests, the same file.
A small source (under THREADED_FROM: a metadata tarball) is copied and hashed the same way in the
calling thread, a small buffer at a time: threads and two 8 MiB buffers would cost it more than
its hashing (about 10 ms of each split image's import). A caller may also feed some sinks from
the copying thread itself (`mine`): fewer threads, less CPU time (import_early.py).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lxd_image_server.fsutil import start_writeback
from lxd_image_server.progress import Progress

if TYPE_CHECKING:
    from concurrent.futures import Future

    from lxd_image_server.catalog.hashread import Hasher

# (concurrent.futures is imported by the threaded copy alone: a metadata tarball, and a root
# copied as the command starts (import_early.py), are copied without threads)

#: bytes per copy and per hashing read: large enough that the per-call costs vanish, small
#: enough that two buffers of it are no burden
CHUNK = 8 << 20

#: copy_file_range refusing the pair of files: copy through user space instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


class Hashing:
    """Feeds chunks to the sinks, each sink in a thread of its own (so each sees its chunks in
    order), from two buffers of `chunk` bytes: one is filled while the sinks still read the
    other (`import` here, and `sync`'s downloads: sync_fetch.py)."""

    def __init__(self, sinks: Sequence[Hasher], chunk: int = CHUNK) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.sinks = sinks
        self.pools = [ThreadPoolExecutor(1) for _ in sinks]
        #: (buffer, the hashing of its chunk still running)
        self.slots: list[tuple[bytearray, list[Future[None]]]] = [
            (bytearray(chunk), []),
            (bytearray(chunk), []),
        ]

    def free_buffer(self) -> bytearray:
        """The buffer of the chunk before the last, once every sink is done with it."""
        self.slots.reverse()
        buf, pending = self.slots[0]
        for f in pending:
            f.result()
        pending.clear()
        return buf

    def wait(self) -> None:
        for _, pending in self.slots:
            for f in pending:
                f.result()
            pending.clear()

    def feed(self, buf: bytearray, n: int, skip: int = 0) -> None:
        """Hashes buf[:n] (`buf` from `free_buffer`, left alone until it returns it again)
        into every sink but the first `skip` (the caller feeds those itself; a pool's thread
        starts only when it is first given a chunk)."""
        chunk = memoryview(buf)[:n]
        pending = self.slots[0][1]
        for pool, sink in zip(self.pools[skip:], self.sinks[skip:], strict=True):
            pending.append(pool.submit(sink.update, chunk))

    def close(self) -> None:
        for _, pending in self.slots:
            for f in pending:
                f.cancel()
        for pool in self.pools:
            pool.shutdown(wait=True)


def _read_into(fd: int, buf: bytearray, offset: int | None) -> int:
    if offset is None:
        return os.readv(fd, [buf])
    return os.preadv(fd, [buf], offset)


def feed(fd: int, sinks: Sequence[Hasher], progress: Progress) -> int:
    """Reads `fd` to its end into every sink. -> bytes read."""
    hashing = Hashing(sinks)
    size = 0
    try:
        while True:
            buf = hashing.free_buffer()
            n = _read_into(fd, buf, None)
            if not n:
                hashing.wait()
                return size
            hashing.feed(buf, n)
            size += n
            progress(n)
    finally:
        hashing.close()


def copy(
    src: int,
    out: int,
    sinks: Sequence[Hasher],
    progress: Progress,
    mine: int = 0,
    chunk: int = CHUNK,
    spread: Callable[[], bool] | None = None,
) -> int:
    """Copies `src` (from its start) to `out` (a new, empty file opened for reading and
    writing) and feeds every sink the bytes of `out`. -> bytes copied.
    The first `mine` sinks are fed by the calling thread, between its copies, the others each
    by a thread of its own; `chunk` bytes at a time. Once `spread()` is true (checked at each
    chunk; it stays true), those are given threads of their own too (import_early.py: the
    command has nothing else to run beside the copy). With every sink the caller's, or a small
    source, no thread is started."""
    if mine >= len(sinks) or os.fstat(src).st_size < THREADED_FROM:
        return _copy_inline(src, out, sinks, progress, min(chunk, THREADED_FROM))
    hashing = Hashing(sinks, chunk)
    size = 0
    kernel = True
    try:
        while True:
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(src, out, chunk, size, size)
                except OSError as e:
                    if size or e.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
            buf = hashing.free_buffer()
            if kernel:
                if n:
                    start_writeback(out, size, n)
                    n = _read_back(out, buf, size, n)
            else:
                n = os.preadv(src, [buf], size)
                _write_all(out, memoryview(buf)[:n], size)
                if n:
                    start_writeback(out, size, n)
            if not n:
                hashing.wait()
                return size
            if mine and spread is not None and spread():
                mine = 0
            hashing.feed(buf, n, skip=mine)
            data = memoryview(buf)[:n]
            for sink in sinks[:mine]:
                sink.update(data)
            size += n
            progress(n)
    finally:
        hashing.close()


#: a source smaller than this (a metadata tarball) is copied and hashed in the calling thread,
#: this many bytes at a time: the threads and buffers of `Hashing` would cost it more than its
#: hashing
THREADED_FROM = 1 << 20


def _copy_inline(
    src: int, out: int, sinks: Sequence[Hasher], progress: Progress, chunk: int
) -> int:
    """`copy` in this thread, a buffer of `chunk` bytes at a time."""
    buf = bytearray(chunk)
    size = 0
    kernel = True
    while True:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src, out, len(buf), size, size)
            except OSError as e:
                if size or e.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
        if kernel:
            if n:
                n = _read_back(out, buf, size, n)
        else:
            n = os.preadv(src, [buf], size)
            _write_all(out, memoryview(buf)[:n], size)
        if not n:
            return size
        start_writeback(out, size, n)
        data = memoryview(buf)[:n]
        for sink in sinks:
            sink.update(data)
        size += n
        progress(n)


def _read_back(out: int, buf: bytearray, offset: int, n: int) -> int:
    got = 0
    view = memoryview(buf)
    while got < n:
        m = os.preadv(out, [view[got:n]], offset + got)
        if not m:
            raise OSError(errno.EIO, "the copy is shorter than what was copied")
        got += m
    return n


def _write_all(out: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(out, data, offset)
        data = data[written:]
        offset += written
