"""Publish requests: a command that placed versions in the tree (`import`) asks the running
watcher, the tree's one catalog writer, to publish them now, and waits for its answer.

The watcher already holds the whole tree scanned, hashed and built: it rescans only the named
version directories and publishes at once (no debounce), where the command would otherwise
scan, look up and encode the whole tree again in a new process.

The channel: a unix stream socket in the state directory (`StateDir.publish_socket`), mode
0600, the watcher's own; one request and one answer per connection, each one line of JSON:

    -> {"images": "/abs/images", "publish": ["os/release/arch/variant/serial", ...]}
    <- {"listed": [...], "missing": {"os/release/arch/variant/serial": "why", ...}}
    <- {"error": "why"}                          (a request refused; nothing was done)

The answer comes after the publish that took the request's versions in (or once none of them
is still being hashed, or after ANSWER_TIMEOUT). Whoever can reach the socket is untrusted:
only root and the watcher's own user are answered (SO_PEERCRED); every read is bounded in
size (MAX_REQUEST) and time (READ_TIMEOUT); a request must name at most MAX_VERSIONS
well-formed relative version paths below images/ (tree/layout.py), nothing else; at most
MAX_CONNECTIONS are open at once (one more is told "busy" and closed). A bad request is
answered with an error and one log line; nothing a client sends stops the watcher. A request
names the images directory it placed the versions in (its real path): a watcher of another
tree (two trees sharing a state directory) refuses it, and the client publishes by itself.

The client (`request_publish`) talks only to the live watcher named by the pid file
(`running_watcher`: the process exists and is a watcher), and checks that the socket's other
end is that process (SO_PEERCRED). Without one, or when the channel fails, it returns None:
the command publishes by itself, as it did before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import select
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field

from lxd_image_server.fsutil import load_json_bounded, open_dir
from lxd_image_server.tree.layout import LayoutError, parse_version_dir

log = logging.getLogger(__name__)

#: bytes of one request, at most (a version path is at most a few hundred bytes)
MAX_REQUEST = 64 << 10
#: bytes of one answer, at most (what the client reads)
MAX_ANSWER = 256 << 10
#: versions one request may name
MAX_VERSIONS = 256
#: a version path's length, at most
MAX_PATH = 1024
#: the images directory's path, at most
MAX_IMAGES_PATH = 4096
#: connections open at once (reading or waiting for their answer)
MAX_CONNECTIONS = 16
#: seconds a client has to send its request once connected
READ_TIMEOUT = 5.0
#: seconds a request waits for its versions to be published before it is answered anyway
ANSWER_TIMEOUT = 60.0
#: seconds the client waits to connect, and for the answer (a little longer than the watcher)
CONNECT_TIMEOUT = 2.0
CLIENT_TIMEOUT = ANSWER_TIMEOUT + 5.0

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class RequestError(ValueError):
    """A request that is not well formed: the one line that says why."""


@dataclass(frozen=True)
class Request:
    #: the images directory the versions are in (a real path)
    images: str
    #: version directories relative to it, each once
    versions: list[str]


def parse_request(data: bytes) -> Request:
    """The request in `data`, or RequestError."""
    try:
        doc = load_json_bounded(data, MAX_REQUEST, 3)
    except ValueError as e:
        raise RequestError(f"not a request: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"images", "publish"}:
        raise RequestError('not a request: expected {"images": DIR, "publish": [VERSION, ...]}')
    images = doc["images"]
    if (
        not isinstance(images, str)
        or not images.startswith("/")
        or len(images) > MAX_IMAGES_PATH
        or "\0" in images
    ):
        raise RequestError('"images" must be an absolute path')
    versions = doc["publish"]
    if not isinstance(versions, list) or not 1 <= len(versions) <= MAX_VERSIONS:
        raise RequestError(f'"publish" must list 1 to {MAX_VERSIONS} version paths')
    out: dict[str, None] = {}
    for rel in versions:
        out[check_version_path(rel)] = None
    return Request(images, list(out))


def check_version_path(rel: object) -> str:
    """`rel` if it is a well-formed version path relative to images/
    (os/release/arch/variant/serial, as the layout allows it), else RequestError."""
    if not isinstance(rel, str) or not rel or len(rel) > MAX_PATH:
        raise RequestError("a version path must be a non-empty string of at most "
                           f"{MAX_PATH} characters")  # fmt: skip
    shown = json.dumps(rel[:100])
    try:
        key = parse_version_dir(rel.split("/"))
    except LayoutError as e:
        raise RequestError(f"{shown} is not a version path below images/: {e}") from None
    if key.relpath != rel:
        raise RequestError(f"{shown} is not a version path below images/ as the layout names it")
    return rel


# -- the watcher's side ---------------------------------------------------------------------------


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
            pid, uid, _gid = _peer(sock)
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


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return (-1, -1, -1)
    return pid, uid, gid


def _in_dir(dir_fd: int, name: str) -> str:
    """`name` in the directory `dir_fd`, as a socket address of bounded length (a state
    directory's path may be longer than a unix socket's 108 bytes)."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def _listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path`, mode 0600, and its file's (dev, inode): bound under a
    hidden random name, made 0600, then renamed over `path` (a socket left by a watcher that
    died is replaced)."""
    directory, name = os.path.split(path)
    dir_fd = open_dir(directory or ".")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp = f".{name}.{secrets.token_hex(6)}"
    try:
        sock.bind(_in_dir(dir_fd, tmp))
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


# -- the client's side -------------------------------------------------------------------------


def running_watcher(pid_file: str) -> int:
    """The pid of the live watcher `pid_file` names. ProcessLookupError (with a clear
    message) when none runs: the file is missing, its process is gone or is no watcher.

    A process /proc does not show (another unit's sandbox: PrivateUsers with
    ProtectProc=invisible, as the package's sync unit and watcher have) is taken for the
    watcher while it exists: the socket's other end is checked to be that very process."""
    try:
        with open(pid_file, "rb") as f:
            pid = int(f.read(32).strip())
    except (OSError, ValueError):
        raise ProcessLookupError(f"no running watcher ({pid_file} is missing or empty)") from None
    if pid <= 0:
        raise ProcessLookupError(f"no running watcher ({pid_file} names no process)")
    try:
        cmdline = _cmdline(pid)
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise ProcessLookupError(
                f"no running watcher (pid {pid} from {pid_file} is gone)"
            ) from None
        except PermissionError:
            pass  # it exists
        return pid
    if b"watch" not in cmdline.split(b"\0"):
        raise ProcessLookupError(f"pid {pid} from {pid_file} is not a watcher")
    return pid


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read(1 << 16)


@dataclass(frozen=True)
class Answer:
    """The watcher's answer: the versions listed now, and why each other one is not."""

    listed: tuple[str, ...]
    missing: dict[str, str]


def request_publish(
    socket_path: str,
    pid_file: str,
    img_dir: str,
    versions: Sequence[str],
    timeout: float = CLIENT_TIMEOUT,
) -> Answer | None:
    """Asks the running watcher to publish `versions` (paths relative to `img_dir`) and
    returns its answer; None when there is no live watcher (of this tree) or the channel
    failed (logged in one line): then publish by yourself."""
    try:
        for rel in versions:
            check_version_path(rel)
    except RequestError as e:
        log.warning("not asking the watcher: %s; publishing here", e)
        return None
    try:
        pid = running_watcher(pid_file)
    except ProcessLookupError as e:
        log.debug("%s: publishing by ourselves", e)
        return None
    try:
        return _ask(socket_path, pid, os.path.realpath(img_dir), list(versions), timeout)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        log.info("the watcher (pid %d) did not take the publish (%s): publishing here", pid, why)
        return None


def _ask(socket_path: str, pid: int, images: str, versions: list[str], timeout: float) -> Answer:
    directory, name = os.path.split(socket_path)
    dir_fd = open_dir(directory or ".")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(_in_dir(dir_fd, name))
            peer_pid, _uid, _gid = _peer(sock)
            if peer_pid != pid:
                raise ValueError(f"the socket's other end is pid {peer_pid}, not the watcher")
            request = {"images": images, "publish": versions}
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = _read_line(sock, time.monotonic() + timeout)
    finally:
        os.close(dir_fd)
    return parse_answer(data, versions)


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "no answer in time")
        sock.settimeout(left)
        chunk = sock.recv(MAX_ANSWER + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_ANSWER:
            raise ValueError("answer too large")
    return bytes(data.partition(b"\n")[0])


def parse_answer(data: bytes, versions: Sequence[str]) -> Answer:
    """The answer to a request for `versions`; ValueError when it is not one."""
    if not data:
        raise ValueError("no answer")
    doc = load_json_bounded(data, MAX_ANSWER, 3)
    if not isinstance(doc, dict):
        raise ValueError("malformed answer")
    if "error" in doc:
        raise ValueError(f"the watcher refused the request: {str(doc['error'])[:200]}")
    listed, missing = doc.get("listed"), doc.get("missing")
    if (
        not isinstance(listed, list)
        or not isinstance(missing, dict)
        or not all(isinstance(v, str) for v in listed)
        or not all(isinstance(v, str) for v in missing.values())
        or set(listed) | set(missing) != set(versions)
    ):
        raise ValueError("malformed answer")
    return Answer(tuple(listed), {str(k): v[:300] for k, v in missing.items()})
