"""Reading one published file for its digests, safely: opened below its base without following
a link or waiting on a FIFO, only if it is still the regular file scanned (device, inode, size,
mtime, ctime), read at most up to its scanned size, and checked again after the read. Raises
FileChanged otherwise; nothing here decides which digests a file needs (hashing.py) or which
thread reads it (hashpool.py).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

from lxd_image_server.fsutil import (
    CHUNK_SIZE,
    TooLarge,
    open_dir,
    open_dir_below,
    open_regular_stat,
    read_bounded,
)
from lxd_image_server.progress import Progress, no_progress
from lxd_image_server.tree.scan import FileStat, open_below

log = logging.getLogger(__name__)


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...
    def copy(self) -> Any: ...


class FileChanged(Exception):
    """The file changed or vanished while it was being hashed."""


class Offer(Protocol):
    """Asked by feed_file between two chunks: may another thread take some of the sinks?"""

    #: set (by another thread) when one is idle and would take some
    wanted: bool
    #: the offset the reader has reached (kept up to date by feed_file)
    offset: int

    def give(self, sinks: list[Hasher], offset: int) -> list[Hasher]:
        """Hands some of `sinks`, each fed up to `offset`, to the idle thread (which reads the
        rest of the file itself); returns the sinks this reader keeps feeding."""
        ...


def _is_scanned(st: os.stat_result, f: FileStat) -> bool:
    """Whether `st` describes the file `f` as it was scanned: the same device, inode, size,
    mtime and ctime (compared field by field: no tuple made for each of 40,000 files)."""
    return (
        st.st_ino == f.inode
        and st.st_dev == f.dev
        and st.st_size == f.size
        and st.st_mtime_ns == f.mtime_ns
        and st.st_ctime_ns == f.ctime_ns
    )


def feed_file(
    f: FileStat,
    sinks: Sequence[Hasher],
    progress: Progress = no_progress,
    start: int = 0,
    offer: Offer | None = None,
) -> None:
    """Feeds the bytes of `f` from `start` to its end to each of `sinks`, in this thread: each
    chunk is read once (into one reused buffer, 1 MiB: it stays in the core's cache while every
    sink hashes it) and given to every sink in turn. `progress` receives the byte counts read.

    `offer`: between chunks, when another thread asks (Offer.wanted), some sinks are given
    away with the offset reached (Offer.give) and are no longer fed here.

    The file is opened below `f.base` through directory descriptors (scan.open_below) and read
    only if it is the regular file scanned; at most its scanned size plus one byte is read.
    Raises FileChanged otherwise, or if it changes while being read.
    """
    log.debug("reading %s from %d to hash it (%d bytes)", f.path, start, f.size)
    try:
        fd = open_below(f.base, f.rel)
    except OSError as e:
        raise FileChanged(f"cannot open it ({e.strerror or e})") from e
    try:
        if not _is_scanned(os.fstat(fd), f):
            raise FileChanged("it changed since it was scanned")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, 0, os.POSIX_FADV_SEQUENTIAL)
        # (bounded: a file that grows while it is read is not read for ever)
        limit = f.size + 1
        buf = bytearray(max(1, min(CHUNK_SIZE, limit - start)))
        view = memoryview(buf)
        feeding = list(sinks)
        offset = start
        try:
            while offset < limit and (
                n := os.preadv(fd, [view[: min(len(buf), limit - offset)]], offset)
            ):
                chunk = view[:n]
                for sink in feeding:
                    sink.update(chunk)
                offset += n
                progress(n)
                if offer is not None:
                    offer.offset = offset
                    if offer.wanted:
                        feeding = offer.give(feeding, offset)
        except OSError as e:
            raise FileChanged(f"read error ({e.strerror or e})") from e
        if offset != f.size or not _is_scanned(os.fstat(fd), f):
            raise FileChanged("it was modified while being hashed")
    finally:
        os.close(fd)


def read_whole(dir_fd: int, f: FileStat) -> bytes:
    """The bytes of `f` (at most a few MiB), opened by name in its version directory `dir_fd`
    without following a link or waiting on a FIFO (fsutil.open_regular_stat), only if it is
    still the file scanned (same device, inode, size, mtime and ctime), and read up to its
    scanned size. Raises FileChanged otherwise, or if it changes while being read."""
    try:
        fd, st = open_regular_stat(f.name, dir_fd, blocking=False)
    except OSError as e:
        raise FileChanged(f"cannot open it ({e.strerror or e})") from e
    try:
        if not _is_scanned(st, f):
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
        if len(data) != f.size or not _is_scanned(os.fstat(fd), f):
            raise FileChanged("it was modified while being hashed")
        return data
    finally:
        os.close(fd)


class VersionDirs:
    """Opens version directories below their base without following a link (fsutil.
    open_dir_below), keeping the last one's parent open: the versions of a scan come product
    by product, so most share it with the one before.

    Invalidation: the open parent is reused only for the same (base, relative parent path),
    and only until close() (the end of one digest call). A parent renamed or replaced
    meanwhile is not noticed here, but every file read through it is checked against the
    identity it was scanned with (read_whole), so a wrong file is refused, never hashed."""

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
