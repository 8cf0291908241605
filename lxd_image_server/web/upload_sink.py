"""Where an upload's bytes go: written to its file and fed to its digests while the request
thread receives the next buffers.

A pipeline: the request thread fills a buffer from the body; a writer thread writes it to the
file; then one thread per digest feeds it to its digest (the sha256 of the file, and of the
combined fingerprint when it is computed in the same pass); then the buffer is free again.
Each stage works on its own buffer, so receiving, writing and each digest run at the same time
on as many cores as there are (recv, os.write and hashlib release the GIL). Buffers are reused
(a pool of `stages + 2` buffers of CHUNK_SIZE bytes), so memory stays flat whatever the size of
the body; each byte is copied once from the socket into a buffer, once into the page cache,
and read once per digest.

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

#: Buffers per upload beyond one per stage: one being received, one waiting.
SPARE = 2
#: Write-back is started every this many bytes.
WRITEBACK = 8 << 20

#: fills a buffer with the next bytes of the body -> how many (0: the end)
ReadInto = Callable[[bytearray], int]

_Item = tuple[bytearray, int] | None
_Stage = Callable[[memoryview], None]


class Sink:
    def __init__(self, fd: int, digests: Sequence[Any]) -> None:
        self._fd = fd
        self._written = 0
        self._flushed = 0
        self._error: BaseException | None = None
        stages: list[tuple[str, _Stage]] = [("write", self._write)]
        stages += [(f"hash{i}", d.update) for i, d in enumerate(digests)]
        self.depth = len(stages) + SPARE
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(self.depth):
            self._free.put(bytearray(CHUNK_SIZE))
        queues: list[queue.SimpleQueue[_Item]] = [queue.SimpleQueue() for _ in stages]
        self._first = queues[0]
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(work, inbox, queues[i + 1] if i + 1 < len(queues) else None),
                name=f"upload-{name}",
                daemon=True,
            )
            for i, ((name, work), inbox) in enumerate(zip(stages, queues, strict=True))
        ]
        for t in self._threads:
            t.start()

    def buffer(self) -> bytearray:
        """A free buffer (waits while all are in the pipeline)."""
        buf = self._free.get()
        if self._error is not None:
            raise self._error
        return buf

    def put(self, buf: bytearray, n: int) -> None:
        """Hands the first `n` bytes of `buf` over to be written and hashed."""
        self._first.put((buf, n))

    def close(self) -> None:
        """Waits until every byte is written and hashed; raises the first error, if any."""
        self._first.put(None)
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error

    def _run(
        self,
        work: _Stage,
        inbox: queue.SimpleQueue[_Item],
        outbox: queue.SimpleQueue[_Item] | None,
    ) -> None:
        while (item := inbox.get()) is not None:
            if self._error is None:
                buf, n = item
                try:
                    with memoryview(buf) as view:
                        work(view[:n])
                except BaseException as e:  # re-raised in the request thread
                    self._error = self._error or e
            if outbox is None:
                self._free.put(item[0])
            else:
                outbox.put(item)
        if outbox is not None:
            outbox.put(None)

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
