"""Publish requests: a command that placed versions in the tree (`import`, `sync`) or took
them out (`prune`, `remove`: recorded as pruned first) asks the running watcher, the tree's one
catalog writer, to publish them now, and waits for its answer.

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
the command publishes by itself, as it did before. The watcher's side, the listening socket
and its connections, is publish_server.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lxd_image_server.catalog.watch_pid import read_pid_file
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
        parse_version_dir(rel.split("/"))
    except LayoutError as e:
        raise RequestError(f"{shown} is not a version path below images/: {e}") from None
    return rel


def peer_of(sock: socket.socket) -> tuple[int, int, int]:
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return (-1, -1, -1)
    return pid, uid, gid


def socket_address(dir_fd: int, name: str) -> str:
    """`name` in the directory `dir_fd`, as a socket address of bounded length (a state
    directory's path may be longer than a unix socket's 108 bytes)."""
    return f"/proc/self/fd/{dir_fd}/{name}"


# -- the client's side -------------------------------------------------------------------------


def running_watcher(pid_file: str) -> int:
    """The pid of the live watcher `pid_file` names. ProcessLookupError (with a clear
    message) when none runs: the file is missing, its process is gone or is no watcher.

    A process /proc does not show (another unit's sandbox: PrivateUsers with
    ProtectProc=invisible, as the package's sync unit and watcher have) is taken for the
    watcher while it exists: the socket's other end is checked to be that very process."""
    pid = read_pid_file(pid_file)
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
    failed (logged in one line): then publish by yourself. More versions than one request
    names (MAX_VERSIONS) are not asked for either: the publish of them all is the whole
    catalog's anyway."""
    if len(versions) > MAX_VERSIONS:
        log.info("%d versions, more than one request names: publishing here", len(versions))
        return None
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
            sock.connect(socket_address(dir_fd, name))
            peer_pid, _uid, _gid = peer_of(sock)
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
