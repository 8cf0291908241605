"""The request body of an upload: bounded by its length, and cut off when the client stalls.

gunicorn's wsgi.input reads until it has the number of bytes asked for, so a client that
sends one byte now and then keeps a read (and a worker thread) busy forever; a socket timeout
alone does not help. Here every read of the body has a deadline: a watchdog thread shuts the
client's socket for reading when a read has not returned within `timeout` seconds, the read
returns early, and the request ends with 408. A read asks for at most READ_PIECE bytes, so a
client must send READ_PIECE bytes per `timeout` seconds (256 KiB per 60 s: 4.4 KB/s) to stay.

Speed: gunicorn's wsgi.input copies every byte several times through BytesIO buffers. A body of
known length under gunicorn is therefore read straight from the client's socket into the
caller's buffer (RawBody, `readinto`), after the bytes gunicorn had already buffered; gunicorn
is told the body was consumed. Anything else (chunked, another server) goes through wsgi.input.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from lxd_image_server.web.upload_errors import ClientDisconnected, ClientStalled, HTTPError

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


class RawBody:
    """The rest of a body of known length, read from the client's socket: first the bytes the
    server had buffered already, then recv_into the caller's buffer."""

    def __init__(self, sock: socket.socket, buffered: bytes, remaining: int) -> None:
        self._sock = sock
        self._pre = memoryview(buffered)
        self.remaining = remaining

    def readinto(self, buf: memoryview) -> int:
        """Up to len(buf) bytes (fewer only at the end of the body or of what has arrived)."""
        if self._pre:
            n = min(len(buf), len(self._pre))
            buf[:n] = self._pre[:n]
            self._pre = self._pre[n:]
            return n
        if self.remaining <= 0:
            return 0
        # MSG_WAITALL: one call (and one wake-up of this thread) per buffer, not per piece
        # the proxy wrote; it returns early at the end of the body or on shutdown (a stall)
        n = self._sock.recv_into(buf, min(len(buf), self.remaining), socket.MSG_WAITALL)
        self.remaining -= n
        return n

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        del buf[got:]
        return bytes(buf)

    @property
    def unread(self) -> int:
        return len(self._pre) + self.remaining


def raw_body(stream: Any, sock: socket.socket | None, length: int) -> RawBody | None:
    """The body of `length` bytes behind gunicorn's wsgi.input `stream`, read past gunicorn's
    buffers; None when `stream` is not a gunicorn body of that length not yet read from.

    Relies on the attributes gunicorn has had from 19.x to 23 (Body.reader, Body.buf,
    LengthReader.length/.unreader, SocketUnreader.sock/.buf); anything unexpected: None."""
    if sock is None:
        return None
    client: socket.socket = sock
    reader: Any = getattr(stream, "reader", None)
    unreader: Any = getattr(reader, "unreader", None)
    if (
        type(stream).__name__ != "Body"
        or type(reader).__name__ != "LengthReader"
        or type(unreader).__name__ != "SocketUnreader"
        or getattr(unreader, "sock", None) is not client
        or getattr(reader, "length", None) != length
    ):
        return None
    own, pending = getattr(stream, "buf", None), getattr(unreader, "buf", None)
    if not isinstance(own, io.BytesIO) or not isinstance(pending, io.BytesIO):
        return None
    if own.getbuffer().nbytes:
        return None  # the app read part of the body through wsgi.input already
    held = pending.getvalue()
    buffered, rest = held[:length], held[length:]
    # gunicorn now takes the body as read, and keeps what lies beyond it (a next request)
    unreader.buf = io.BytesIO()
    unreader.buf.write(rest)
    reader.length = 0
    return RawBody(client, buffered, length - len(buffered))


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
        stream: BinaryIO | RawBody | None,
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

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Fills `buffer` (fewer bytes only at the end of the body) -> the number of bytes."""
        buf = memoryview(buffer)
        if not isinstance(self._stream, RawBody):
            total = 0
            while total < len(buf) and (data := self.read(len(buf) - total)):
                buf[total : total + len(data)] = data
                total += len(data)
            return total
        total = 0
        while total < len(buf) and not self.finished:
            # one guarded read per READ_PIECE, as for wsgi.input
            piece = buf[total : min(len(buf), total + READ_PIECE)]
            total += self._guarded(functools.partial(self._fill, piece))
        return total

    def _fill(self, piece: memoryview) -> int:
        assert isinstance(self._stream, RawBody)
        got = 0
        while got < len(piece):
            n = self._stream.readinto(piece[got:])
            if n == 0:
                break
            got += n
        return got

    def _guarded(self, read: Any) -> int:
        expired = [False]
        try:
            if self._guard is not None and self._sock is not None:
                with self._guard.read(self._sock) as expired:
                    n: int = read()
            else:
                n = read()
        except Exception as e:
            self.finished = True
            if expired[0]:
                raise self._stalled() from None
            why = str(e) or type(e).__name__
            raise ClientDisconnected(f"reading the request body failed: {why}") from e
        if expired[0]:
            self.finished = True
            raise self._stalled()
        return self._count(n)

    def _count(self, n: int) -> int:
        if n == 0:
            self.finished = True
            if self.remaining:
                raise ClientDisconnected(
                    f"the request body ended {self.remaining} bytes short of its "
                    "Content-Length (client disconnected?)"
                )
            return 0
        self.received += n
        if self.remaining is not None:
            self.remaining -= n
            if self.remaining <= 0:
                self.finished = True
        return n

    def read(self, n: int = READ_PIECE) -> bytes:
        if self.finished or self._stream is None:
            return b""
        n = min(n, READ_PIECE)
        if self.remaining is not None:
            n = min(n, self.remaining)
        stream = self._stream
        if isinstance(stream, RawBody):
            buf = bytearray(n)
            got = self._guarded(lambda: self._fill(memoryview(buf)))
            return bytes(memoryview(buf)[:got])
        box: list[bytes] = []

        def once() -> int:
            box.append(stream.read(n)[:n])
            return len(box[0])

        self._guarded(once)
        return box[0] if box else b""

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

    @property
    def unread_on_socket(self) -> bool:
        """Bytes of the body are still in the socket, where the server thinks none are."""
        return isinstance(self._stream, RawBody) and self._stream.unread > 0

    def abandon(self) -> None:
        """The rest of the body will not be read: shut the socket for reading, so that the
        server does not read (and wait for) it either before closing the connection."""
        if (not self.finished or self.unread_on_socket) and self._sock is not None:
            self.finished = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)
