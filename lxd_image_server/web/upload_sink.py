"""Where an upload's bytes go: written to its file and fed to its digests while the request
thread receives the next buffers.

A pipeline of three threads: the request thread fills a buffer from the body, a writer thread
writes it to the file, a hasher thread feeds it to the digests, then the buffer is free again.
Buffers are reused (a pool of DEPTH buffers of CHUNK_SIZE bytes), so memory stays flat whatever
the size of the body, and each byte is copied once from the socket into a buffer, once into the
page cache, and read once per digest. recv, os.write and hashlib release the GIL, so receiving,
writing and hashing run on as many cores as there are.

Write-behind: every WRITEBACK bytes, the kernel is asked to start writing the file's dirty
pages to disk, and to drop from the page cache the pages already on disk (posix_fadvise
DONTNEED on the whole file: it starts write-back of dirty pages and drops only clean ones).
So the fsync before the answer only waits for the last few MiB, an upload does not push the
rest of the page cache out, and the next pages are allocated from the ones just freed: on
virtual machines that hand free memory back to the host (free page reporting), writing into
pages the guest has not touched lately costs up to 20 times more CPU than into recycled ones.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

# CHUNK_SIZE: bytes per buffer (one read from the client, one write)
from lxd_image_server.fsutil import CHUNK_SIZE

#: Buffers per upload: being received, written, hashed, and one spare.
DEPTH = 4
#: Write-back is started every this many bytes.
WRITEBACK = 8 << 20

#: fills a buffer with the next bytes of the body -> how many (0: the end)
ReadInto = Callable[[bytearray], int]

_Item = tuple[bytearray, int] | None


class Sink:
    def __init__(self, fd: int, digests: Sequence[Any]) -> None:
        self._fd = fd
        self._digests = list(digests)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(DEPTH):
            self._free.put(bytearray(CHUNK_SIZE))
        self._to_write: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._written = 0
        self._flushed = 0
        self._threads = [
            threading.Thread(target=self._writer, name="upload-write", daemon=True),
            threading.Thread(target=self._hasher, name="upload-hash", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def buffer(self) -> bytearray:
        """A free buffer (waits while all are being written)."""
        buf = self._free.get()
        if self._error is not None:
            raise self._error
        return buf

    def put(self, buf: bytearray, n: int) -> None:
        """Hands the first `n` bytes of `buf` over to be written and hashed."""
        self._to_write.put((buf, n))

    def close(self) -> None:
        """Waits until every byte is written and hashed; raises the first error, if any."""
        self._to_write.put(None)
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error

    def _writer(self) -> None:
        while (item := self._to_write.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    self._write(memoryview(buf)[:n])
                except BaseException as e:  # re-raised in the request thread
                    self._error = e
            self._to_hash.put(item)
        self._to_hash.put(None)

    def _hasher(self) -> None:
        while (item := self._to_hash.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    view = memoryview(buf)[:n]
                    for d in self._digests:
                        d.update(view)
                except BaseException as e:
                    self._error = e
            self._free.put(buf)

    def _write(self, view: memoryview) -> None:
        data = view
        while data:
            data = data[os.write(self._fd, data) :]
        self._written += len(view)
        if self._written - self._flushed >= WRITEBACK:
            # starts write-back of every dirty page of the file and drops the pages written
            # back since the last call (DONTNEED skips dirty pages and pages under write-back)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._flushed = self._written
