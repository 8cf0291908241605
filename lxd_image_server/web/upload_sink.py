"""Where an upload's bytes go: written to its file and fed to its digests by a second thread
while the request thread receives the next buffer.

Buffers are reused (a pool of DEPTH buffers of CHUNK_SIZE bytes), so memory stays flat whatever
the size of the body, and each byte is copied once from the socket into a buffer, once into the
page cache, and read once per digest. os.write and hashlib release the GIL, so receiving,
writing and hashing use two cores.

Every WRITEBACK bytes, the kernel is asked to start writing the pages just written to disk
(posix_fadvise DONTNEED starts write-back of dirty pages and drops none of them), so the fsync
before the answer finds little left to do.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

# CHUNK_SIZE: bytes per buffer (one read from the client, one write)
from lxd_image_server.fsutil import CHUNK_SIZE

#: Buffers per upload: one being received, the others written and hashed.
DEPTH = 3
#: Write-back is started every this many bytes.
WRITEBACK = 8 << 20

#: fills a buffer with the next bytes of the body -> how many (0: the end)
ReadInto = Callable[[bytearray], int]


class Sink:
    def __init__(self, fd: int, digests: Sequence[Any]) -> None:
        self._fd = fd
        self._digests = list(digests)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(DEPTH):
            self._free.put(bytearray(CHUNK_SIZE))
        self._full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._written = 0
        self._flushed = 0
        self._thread = threading.Thread(target=self._run, name="upload-sink", daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        """A free buffer (waits while all are being written)."""
        buf = self._free.get()
        if self._error is not None:
            raise self._error
        return buf

    def put(self, buf: bytearray, n: int) -> None:
        """Hands the first `n` bytes of `buf` over to be written and hashed."""
        self._full.put((buf, n))

    def close(self) -> None:
        """Waits until every byte is written; raises the writer's error, if any."""
        self._full.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    self._write(memoryview(buf)[:n])
                except BaseException as e:  # re-raised in the request thread
                    self._error = e
            self._free.put(buf)

    def _write(self, view: memoryview) -> None:
        data = view
        while data:
            data = data[os.write(self._fd, data) :]
        for d in self._digests:
            d.update(view)
        self._written += len(view)
        if self._written - self._flushed >= WRITEBACK:
            os.posix_fadvise(
                self._fd, self._flushed, self._written - self._flushed, os.POSIX_FADV_DONTNEED
            )
            self._flushed = self._written
