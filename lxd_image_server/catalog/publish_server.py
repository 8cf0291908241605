"""The watcher's side of the publish requests (publish_requests.py: the protocol, its limits
and the client): a listening socket in the state directory, the connections in progress, each
request read bounded, checked, and answered after the publish that takes its versions in."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import socket
import stat
import time
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field

from lxd_image_server.catalog.publish_requests import (
    ANSWER_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST,
    READ_TIMEOUT,
    Request,
    RequestError,
    parse_request,
    peer_of,
    socket_address,
)
from lxd_image_server.fsutil import open_dir

log = logging.getLogger(__name__)


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    #: the versions asked for, once the request is read
    versions: list[str] | None = None
    peer: str = "?"


class RequestServer:
    """The watcher's end: a listening socket and its connections, behind one pollable
    descriptor (`fileno`: an epoll set). The watcher's loop calls `handle` when it is
    readable, publishes what `handle` returned, then calls `answer`; `expire` at
    `next_deadline`."""

    def __init__(
        self,
        path: str,
        img_dir: str,
        clock: Callable[[], float] = time.monotonic,
        uids: Set[int] | None = None,
    ) -> None:
        self.path = path
        #: the tree's images directory, as requests name it (its real path)
        self.images = os.path.realpath(img_dir)
        self.clock = clock
        #: the users answered: root and the watcher's own
        self.uids = frozenset({0, os.geteuid()}) if uids is None else uids
        self._conns: dict[int, _Conn] = {}
        self._epoll = select.epoll()
        self._listener, self._bound = _listen(path)
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)

    def fileno(self) -> int:
        return self._epoll.fileno()

    @property
    def waiting(self) -> bool:
        """A request waits for a publish."""
        return any(c.versions is not None for c in self._conns.values())

    def next_deadline(self) -> float | None:
        """When the next connection times out (self.clock()), or None."""
        return min((c.deadline for c in self._conns.values()), default=None)

    def handle(self) -> list[str]:
        """Accepts and reads what is ready; the versions asked for by requests read whole
        now (to rescan and publish at once). Bad requests are answered and closed."""
        wanted: list[str] = []
        ready: list[int] = []
        for fd, _ in self._epoll.poll(0):
            if fd == self._listener.fileno():
                ready += self._accept()  # (what they sent already is read now)
            else:
                ready.append(fd)
        for fd in ready:
            wanted += self._service(fd)
        return wanted

    def _service(self, fd: int) -> list[str]:
        conn = self._conns.get(fd)
        if conn is None or conn.versions is not None:
            return []
        try:
            request = self._read(conn)
            if request is not None and request.images != self.images:
                raise RequestError(
                    f"{request.images[:200]} is not the images directory of this watcher's "
                    f"tree ({self.images})"
                )
        except RequestError as e:
            log.warning("refused a publish request from %s: %s", conn.peer, e)
            self._finish(fd, {"error": str(e)})
            return []
        except OSError as e:
            log.debug("publish request from %s dropped: %s", conn.peer, e)
            self._close(fd)
            return []
        if request is None:
            return []
        versions = conn.versions = request.versions
        conn.deadline = self.clock() + ANSWER_TIMEOUT
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)  # nothing more is read from it
        log.info("publish request from %s: %s", conn.peer, ", ".join(versions))
        return versions

    def wanted(self) -> set[str]:
        """The versions the requests waiting for their answer name."""
        return {rel for c in self._conns.values() for rel in c.versions or ()}

    def answer(self, listed: Set[str], busy: bool, img_dir: str) -> None:
        """Answers each request whose versions are all `listed` now (of those `wanted`), or,
        unless `busy` (versions being hashed), says why the others are not."""
        for fd, conn in list(self._conns.items()):
            if conn.versions is None:
                continue
            missing = [rel for rel in conn.versions if rel not in listed]
            if missing and busy:
                continue  # a later publish may list them (or the deadline answers)
            self._finish(fd, _answer(conn.versions, missing, img_dir, "not listed"))

    def expire(self, img_dir: str, listed: Callable[[Iterable[str]], Set[str]]) -> None:
        """Closes connections past their deadline: a request not read whole in time, or one
        whose versions were not published in time (answered with what is listed)."""
        now = self.clock()
        for fd, conn in list(self._conns.items()):
            if conn.deadline > now:
                continue
            if conn.versions is None:
                log.warning(
                    "publish request from %s not sent within %.0f s: closed",
                    conn.peer,
                    READ_TIMEOUT,
                )
                self._finish(fd, {"error": "request not sent in time"})
                continue
            shown = listed(conn.versions)
            missing = [rel for rel in conn.versions if rel not in shown]
            why = f"not published within {ANSWER_TIMEOUT:.0f} s (see the watcher's log)"
            self._finish(fd, _answer(conn.versions, missing, img_dir, why))

    def close(self) -> None:
        for fd in list(self._conns):
            self._close(fd)
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:  # not a later watcher's
                os.unlink(self.path)
        self._listener.close()
        self._epoll.close()

    # -- steps ----------------------------------------------------------------------------------

    def _accept(self) -> list[int]:
        """Accepts the connections waiting; their descriptors."""
        fds: list[int] = []
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return fds
            except OSError as e:
                log.warning("cannot accept a publish request: %s", e.strerror or e)
                return fds
            sock.setblocking(False)
            pid, uid, _gid = peer_of(sock)
            peer = f"pid {pid} (uid {uid})"
            if uid not in self.uids:
                log.warning("refused a publish request from %s: not root nor the watcher's", peer)
                _send_now(sock, {"error": "not allowed"})
                sock.close()
                continue
            if len(self._conns) >= MAX_CONNECTIONS:
                log.warning(
                    "refused a publish request from %s: %d open already", peer, MAX_CONNECTIONS
                )
                _send_now(sock, {"error": "busy"})
                sock.close()
                continue
            fd = sock.fileno()
            self._conns[fd] = _Conn(sock, self.clock() + READ_TIMEOUT, peer=peer)
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
            fds.append(fd)

    def _read(self, conn: _Conn) -> Request | None:
        """Reads what is there; the request once it is whole (a newline, or the end of the
        stream), else None. RequestError, OSError."""
        while True:
            try:
                chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.data))
            except (BlockingIOError, InterruptedError):
                return None
            if chunk:
                conn.data += chunk
            line, newline, _ = conn.data.partition(b"\n")
            if newline or not chunk:
                if not line.strip():
                    raise RequestError("empty request")
                return parse_request(bytes(line))
            if len(conn.data) > MAX_REQUEST:
                raise RequestError(f"request larger than {MAX_REQUEST} bytes")

    def _finish(self, fd: int, doc: dict[str, object]) -> None:
        conn = self._conns.get(fd)
        if conn is not None:
            _send_now(conn.sock, doc)
        self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        conn.sock.close()


def _answer(
    versions: Sequence[str], missing: Iterable[str], img_dir: str, why: str
) -> dict[str, object]:
    gone = set(missing)
    reasons = {}
    for rel in gone:
        try:
            is_dir = stat.S_ISDIR(os.lstat(os.path.join(img_dir, rel)).st_mode)
        except OSError:
            is_dir = False
        if not is_dir:
            reasons[rel] = "no such version directory"
        elif why == "not listed":
            reasons[rel] = (
                "not listed: incomplete, invalid, or held out by prune, remove or [retention] "
                "(see the watcher's log)"
            )
        else:
            reasons[rel] = why
    return {"listed": [rel for rel in versions if rel not in gone], "missing": reasons}


def _send_now(sock: socket.socket, doc: dict[str, object]) -> None:
    """Sends `doc` as one line if the socket takes it at once (an answer is far smaller than
    a socket's buffer); a client that does not read it gets nothing."""
    data = json.dumps(doc, sort_keys=True).encode() + b"\n"
    with contextlib.suppress(OSError):
        sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)


def _listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path`, mode 0600, and its file's (dev, inode): bound under a
    hidden random name, made 0600, then renamed over `path` (a socket left by a watcher that
    died is replaced)."""
    directory, name = os.path.split(path)
    dir_fd = open_dir(directory or ".")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp = f".{name}.{secrets.token_hex(6)}"
    try:
        sock.bind(socket_address(dir_fd, tmp))
        try:
            os.chmod(tmp, 0o600, dir_fd=dir_fd, follow_symlinks=True)
            st = os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock, (st.st_dev, st.st_ino)
