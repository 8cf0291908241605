"""Where an upload's bytes go: written to its file and fed to its digests while the request
thread receives the next buffers.

A pipeline: the request thread fills a buffer from the body; a writer thread writes it to the
file; then one thread per digest feeds it to its digest (the sha256 of the file, and of the
combined fingerprint when it is computed in the same pass); then the buffer is free again.
Each stage works on its own buffer, so receiving, writing and each digest run at the same time
on as many cores as there are (recv, os.write and hashlib release the GIL). Buffers are reused
(a pool of `stages + 2` buffers of BUFFER_SIZE bytes: 10 MiB with two digests), so memory
stays flat whatever the size of the body; each byte is copied once from the socket into a
buffer, once to the disk (or the page cache), and read once per digest.

Direct I/O: where the file system takes it, the file is written with O_DIRECT from
page-aligned buffers (anonymous mmaps): the disk reads the bytes straight from the buffer,
without a copy into the page cache, its write-back, or reclaiming the pages afterwards
(per GiB here: 0.07 CPU-s instead of 0.3-1.4). The writer waits for each write, but it is a
stage of its own: receiving and hashing go on meanwhile. A write that O_DIRECT refuses
(a file system without it, a short or unaligned buffer: the last one) and everything after
it goes through the page cache instead; the fsync before the answer covers both.

Otherwise write-behind: every WRITEBACK bytes, the kernel is asked to start writing the file's
dirty pages to disk, and to drop from the page cache the pages already on disk (posix_fadvise
DONTNEED on the whole file: it starts write-back of dirty pages and drops only clean ones).
So the fsync before the answer only waits for the last few MiB, an upload does not push the
rest of the page cache out, and the next pages are allocated from the ones just freed: on
virtual machines that hand free memory back to the host (free page reporting), writing into
pages the guest has not touched lately costs up to 20 times more CPU than into recycled ones.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

#: Bytes per buffer: one read from the client, one write. Per GiB, 2 MiB buffers took 0.1 s
#: less than 1 MiB ones (fewer hand-overs between the threads), 4 MiB hardly less than 2.
BUFFER_SIZE = 2 << 20
#: Buffers per upload beyond one per stage: one being received, one waiting.
SPARE = 2
#: Write-back is started every this many bytes (without O_DIRECT).
WRITEBACK = 8 << 20
#: O_DIRECT writes are whole multiples of this (the largest logical block size in use).
DIRECT_ALIGN = 4096

#: fills a buffer with the next bytes of the body -> how many (0: the end)
ReadInto = Callable[[memoryview], int]

_Item = tuple[memoryview, int] | None
_Stage = Callable[[memoryview], None]


class Sink:
    def __init__(self, fd: int, digests: Sequence[Any]) -> None:
        self._fd = fd
        self._written = 0
        self._flushed = 0
        self._error: BaseException | None = None
        #: the file is being written with O_DIRECT
        self.direct = _set_direct(fd, True)
        stages: list[tuple[str, _Stage]] = [("write", self._write)]
        stages += [(f"hash{i}", d.update) for i, d in enumerate(digests)]
        self.depth = len(stages) + SPARE
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(self.depth):
            # page-aligned, as O_DIRECT needs; unmapped once the last view of it is gone
            self._free.put(memoryview(mmap.mmap(-1, BUFFER_SIZE)))
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

    def buffer(self) -> memoryview:
        """A free buffer (waits while all are in the pipeline)."""
        buf = self._free.get()
        if self._error is not None:
            raise self._error
        return buf

    def put(self, buf: memoryview, n: int) -> None:
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
                    work(buf[:n])
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
            if self.direct and (len(data) % DIRECT_ALIGN or self._written % DIRECT_ALIGN):
                self.direct = _set_direct(self._fd, False)
            try:
                n = os.write(self._fd, data)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self._fd, False)  # refused: through the page cache
                continue
            data = data[n:]
            self._written += n
        if not self.direct and self._written - self._flushed >= WRITEBACK:
            # starts write-back of every dirty page of the file and drops the pages written
            # back since the last call (DONTNEED skips dirty pages and pages under write-back)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._flushed = self._written


def _set_direct(fd: int, on: bool) -> bool:
    """Turns O_DIRECT on or off for `fd` -> whether it is on now."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        if on:
            return False  # a file system without O_DIRECT
        raise
    return on
