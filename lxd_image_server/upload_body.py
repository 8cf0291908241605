"""The request body of an upload: bounded by its length, and cut off when the client stalls.

gunicorn's wsgi.input reads until it has the number of bytes asked for, so a client that
sends one byte now and then keeps a read (and a worker thread) busy forever; a socket timeout
alone does not help. Here every read of the body has a deadline: a watchdog thread shuts the
client's socket for reading when a read has not returned within `timeout` seconds, the read
returns early, and the request ends with 408. A read asks for at most READ_PIECE bytes, so a
client must send READ_PIECE bytes per `timeout` seconds (256 KiB per 60 s: 4.4 KB/s) to stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from .upload_errors import ClientDisconnected, ClientStalled, HTTPError

log = logging.getLogger(__name__)

#: At most this much is asked of wsgi.input at once (see the module's note on stalls).
READ_PIECE = 256 << 10
#: After an error, at most this much of an unread body is read and discarded, so the client
#: gets the response instead of a reset connection. Larger rests are left unread.
DRAIN_LIMIT = 16 << 20
#: How often the watchdog looks at the reads in progress, at most (seconds).
_TICK = 0.25


class StallGuard:
    """Shuts a socket for reading when a read on it takes longer than `timeout` seconds.

    One per app (and process): its thread starts with the first read it guards, again in a
    forked child. Thread-safe.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._reads: dict[int, tuple[float, socket.socket]] = {}
        self._expired: set[int] = set()
        self._next = 0
        self._pid = 0
        self._wake = threading.Event()

    @contextlib.contextmanager
    def read(self, sock: socket.socket) -> Iterator[list[bool]]:
        """Guards the reads in the `with` block; afterwards the yielded list holds True if
        the deadline passed (the socket is then shut for reading)."""
        expired = [False]
        with self._lock:
            self._ensure_thread()
            token = self._next
            self._next += 1
            self._reads[token] = (time.monotonic() + self.timeout, sock)
        try:
            yield expired
        finally:
            with self._lock:
                self._reads.pop(token, None)
                if token in self._expired:
                    self._expired.discard(token)
                    expired[0] = True

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._reads.clear()
        self._expired.clear()
        threading.Thread(target=self._run, name="upload-stall-guard", daemon=True).start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            self._wake.wait(min(_TICK, self.timeout / 4))
            now = time.monotonic()
            with self._lock:
                late = [(t, s) for t, (deadline, s) in self._reads.items() if deadline <= now]
                for token, sock in late:
                    del self._reads[token]
                    self._expired.add(token)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RD)


class BodyReader:
    """wsgi.input limited to the request body.

    With a Content-Length, never reads past it, and a body that ends early (the client went
    away) raises ClientDisconnected. Without one (chunked; the server sets
    wsgi.input_terminated) reads until b"". Any error from the server's stream is taken as a
    disconnect. With a `guard` and the client's socket, a read that takes too long raises
    ClientStalled (408).
    """

    def __init__(
        self,
        stream: BinaryIO | None,
        length: int | None,
        delimited: bool = True,
        guard: StallGuard | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self._stream = stream
        self.remaining = length
        self.received = 0
        self.finished = length == 0 or stream is None
        #: False: neither a Content-Length nor a server that marks the end of the body.
        self.delimited = delimited
        self._guard = guard if sock is not None else None
        self._sock = sock

    def read(self, n: int = READ_PIECE) -> bytes:
        if self.finished or self._stream is None:
            return b""
        n = min(n, READ_PIECE)
        if self.remaining is not None:
            n = min(n, self.remaining)
        expired = [False]
        try:
            if self._guard is not None and self._sock is not None:
                with self._guard.read(self._sock) as expired:
                    data = self._stream.read(n)
            else:
                data = self._stream.read(n)
        except Exception as e:
            self.finished = True
            if expired[0]:
                raise self._stalled() from None
            why = str(e) or type(e).__name__
            raise ClientDisconnected(f"reading the request body failed: {why}") from e
        if expired[0]:
            self.finished = True
            raise self._stalled()
        if not data:
            self.finished = True
            if self.remaining:
                raise ClientDisconnected(
                    f"the request body ended {self.remaining} bytes short of its "
                    "Content-Length (client disconnected?)"
                )
            return b""
        data = data[:n]
        self.received += len(data)
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self.finished = True
        return data

    def _stalled(self) -> ClientStalled:
        assert self._guard is not None
        return ClientStalled(
            f"the client sent less than {READ_PIECE} bytes in {self._guard.timeout:g} s; "
            "the upload was cut off"
        )

    def drain(self, limit: int = DRAIN_LIMIT) -> None:
        """Reads and discards the rest, unless it is known to be larger than `limit`."""
        if self.finished or (self.remaining is not None and self.remaining > limit):
            return
        seen = 0
        with contextlib.suppress(HTTPError):
            while seen <= limit and (data := self.read()):
                seen += len(data)

    def abandon(self) -> None:
        """The rest of the body will not be read: shut the socket for reading, so that the
        server does not read (and wait for) it either before closing the connection."""
        if not self.finished and self._sock is not None:
            self.finished = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)
