"""The watcher's publish-request channel (catalog/publish_requests.py), attacked first: every
client is untrusted; nothing one sends may stop the server or keep it from serving the next."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import publish_requests as pr
from lxd_image_server.catalog.publish_requests import RequestError
from lxd_image_server.catalog.publish_server import RequestServer

V1 = "busybox/1.35/amd64/default/20240101_12:00"
V2 = "busybox/1.35/amd64/default/20240102_12:00"
#: the images directory the servers here publish (as requests name it; it need not exist: the
#: answers look at the tmp_path given to them)
IMAGES = "/nonexistent/lxd-image-server-tests/images"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(tmp_path: Path):
    clock = Clock()
    srv = RequestServer(str(tmp_path / "publish.sock"), IMAGES, clock=clock)
    srv.clock_ = clock  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.close()


def connect(srv: RequestServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.path)
    s.settimeout(5)
    return s


def answer_of(s: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data) if data else {}


def request(versions: object, images: str = IMAGES) -> bytes:
    return json.dumps({"images": images, "publish": versions}).encode() + b"\n"


def served(srv: RequestServer, tmp_path: Path) -> None:
    """A well-formed request is still taken and answered."""
    (tmp_path / "images" / V1).mkdir(parents=True, exist_ok=True)
    with connect(srv) as s:
        s.sendall(request([V1]))
        assert srv.handle() == [V1]
        srv.answer({V1}, busy=False, img_dir=str(tmp_path / "images"))
        assert answer_of(s) == {"listed": [V1], "missing": {}}


def test_the_socket_is_the_watchers_alone(server: RequestServer) -> None:
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_a_request_is_answered_once_its_versions_are_listed(
    server: RequestServer, tmp_path: Path
) -> None:
    img = tmp_path / "images"
    (img / V1).mkdir(parents=True)
    (img / V2).mkdir(parents=True)
    with connect(server) as s:
        s.sendall(request([V1, V2, V1]))
        assert server.handle() == [V1, V2]  # each once
        assert server.waiting
        # V2 still hashing: no answer yet
        server.answer({V1}, busy=True, img_dir=str(img))
        s.settimeout(0.05)
        with pytest.raises(TimeoutError):
            s.recv(10)
        s.settimeout(5)
        server.answer({V1, V2}, busy=False, img_dir=str(img))
        assert answer_of(s) == {"listed": [V1, V2], "missing": {}}
    assert not server.waiting


def test_versions_not_listed_are_named_with_why(server: RequestServer, tmp_path: Path) -> None:
    img = tmp_path / "images"
    (img / V1).mkdir(parents=True)
    with connect(server) as s:
        s.sendall(request([V1, V2]))
        server.handle()
        server.answer(set(), busy=False, img_dir=str(img))
        doc = answer_of(s)
    assert doc["listed"] == []
    assert doc["missing"][V2] == "no such version directory"
    assert "not listed" in doc["missing"][V1]


def test_a_request_never_published_is_answered_at_its_deadline(
    server: RequestServer, tmp_path: Path
) -> None:
    with connect(server) as s:
        s.sendall(request([V1]))
        server.handle()
        server.clock_.now += pr.ANSWER_TIMEOUT + 1  # type: ignore[attr-defined]
        server.expire(str(tmp_path), lambda rels: set())
        doc = answer_of(s)
    assert doc["listed"] == [] and V1 in doc["missing"]
    assert server.next_deadline() is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json\n",
        b"\n",
        b"[1, 2]\n",
        b'{"images": "' + IMAGES.encode() + b'", "publish": "' + V1.encode() + b'"}\n',
        request([]),
        request([1]),
        request([None]),
        b'{"publish": ["' + V1.encode() + b'"]}\n',  # no images
        request([V1], images="images"),  # not absolute
        request([V1], images="/srv/other/images"),  # another tree's
        request([V1], images="/" + "x" * 5000),
        request([V1], images=IMAGES + "\x00"),
        b'{"images": "' + IMAGES.encode() + b'", "publish": ["' + V1.encode() + b'"], "x": 1}\n',
        request(["/" + V1]),
        request([V1 + "/"]),
        request(["../" + V1]),
        request(["busybox/1.35/amd64/default/../../../../etc"]),
        request(["busybox/1.35/amd64/default"]),
        request([V1 + "/lxd.tar.xz"]),
        request(["busybox/1.35/amd64/.hidden/20240101_12:00"]),
        request(["busybox//1.35/amd64/default/20240101_12:00"]),
        request(["busybox/1.35/amd64/default/not-a-serial"]),
        request(["busybox/1.35/amd64/default/20240101_12:00\n"]),
        request(["busybox/1.35/amd64/default/20240101_12:00\x00x"]),
        request(["x" * (pr.MAX_PATH + 1)]),
        request([V1] * (pr.MAX_VERSIONS + 1)),
        b'{"images": "' + IMAGES.encode() + b'", "publish": [[[[[["deep"]]]]]]}\n',
        b"\xff\xfe\n",
    ],
)
def test_bad_requests_are_refused_and_the_next_one_served(
    server: RequestServer, tmp_path: Path, payload: bytes
) -> None:
    with connect(server) as s:
        s.sendall(payload)
        assert server.handle() == []
        doc = answer_of(s)
    assert set(doc) == {"error"}
    assert not server.waiting
    served(server, tmp_path)


def test_an_oversized_request_is_cut_off(server: RequestServer, tmp_path: Path) -> None:
    with connect(server) as s:
        s.setblocking(False)
        sent = 0
        try:
            while sent < 4 * pr.MAX_REQUEST:
                sent += s.send(b"[" * 65536)
                server.handle()
        except (BlockingIOError, BrokenPipeError):
            pass  # (the server closed its end once it had too much)
        s.setblocking(True)
        s.settimeout(5)
        server.handle()
        doc = answer_of(s)
    assert "larger than" in doc["error"]
    served(server, tmp_path)


def test_a_slow_client_is_closed_at_its_deadline(server: RequestServer, tmp_path: Path) -> None:
    slow = connect(server)
    slow.sendall(b'{"publish": ["busy')  # and then nothing
    assert server.handle() == []
    served(server, tmp_path)  # served meanwhile
    server.clock_.now += pr.READ_TIMEOUT + 1  # type: ignore[attr-defined]
    server.expire(str(tmp_path), set)
    assert answer_of(slow) == {"error": "request not sent in time"}
    assert slow.recv(10) == b""  # closed
    slow.close()
    assert server.next_deadline() is None


def test_a_client_that_hangs_up_is_forgotten(server: RequestServer, tmp_path: Path) -> None:
    s = connect(server)
    s.sendall(b'{"publish": [')
    server.handle()
    s.close()
    assert server.handle() == []  # the end of the stream: an incomplete request
    assert server.next_deadline() is None
    # one that hangs up while waiting for its answer costs nothing either
    s = connect(server)
    s.sendall(request([V1]))
    server.handle()
    s.close()
    server.answer(set(), busy=False, img_dir=str(tmp_path))
    assert not server.waiting
    served(server, tmp_path)


def test_connections_past_the_limit_are_told_busy(server: RequestServer, tmp_path: Path) -> None:
    held = [connect(server) for _ in range(pr.MAX_CONNECTIONS)]
    server.handle()
    with connect(server) as extra:
        server.handle()
        assert answer_of(extra) == {"error": "busy"}
    for s in held:
        s.close()
    server.handle()
    assert server.next_deadline() is None
    served(server, tmp_path)


def test_a_user_other_than_root_and_the_watchers_is_refused(tmp_path: Path) -> None:
    # (the socket is 0600 anyway; this is what a loosened mode would meet)
    srv = RequestServer(str(tmp_path / "publish.sock"), IMAGES, uids={os.geteuid() + 4242})
    try:
        with connect(srv) as s:
            s.sendall(request([V1]))
            assert srv.handle() == []
            assert answer_of(s) == {"error": "not allowed"}
    finally:
        srv.close()


def test_a_socket_left_by_a_dead_watcher_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "publish.sock"
    first = RequestServer(str(path), IMAGES)
    first._listener.close()  # died without cleaning up
    second = RequestServer(str(path), IMAGES)
    try:
        served(second, tmp_path)
    finally:
        second.close()
    assert not path.exists()
    first._epoll.close()


def test_closing_leaves_a_later_watchers_socket(tmp_path: Path) -> None:
    path = tmp_path / "publish.sock"
    first = RequestServer(str(path), IMAGES)
    second = RequestServer(str(path), IMAGES)
    first.close()
    assert path.exists()
    second.close()
    assert not path.exists()


def test_a_long_state_directory_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    srv = RequestServer(str(deep / "publish.sock"), IMAGES)
    try:
        assert stat.S_ISSOCK(os.lstat(deep / "publish.sock").st_mode)
    finally:
        srv.close()


# -- the client ------------------------------------------------------------------------------


def test_parse_request_canonical_paths_only() -> None:
    assert pr.parse_request(request([V1, V2])) == pr.Request(IMAGES, [V1, V2])
    for bad in ("", ".", "a/b/c/d", "busybox/1.35/amd64/default/20240101_12:00/"):
        with pytest.raises(RequestError):
            pr.check_version_path(bad)


def test_no_watcher_means_publish_yourself(tmp_path: Path) -> None:
    sock, pid_file = str(tmp_path / "publish.sock"), str(tmp_path / "watch.pid")
    assert pr.request_publish(sock, pid_file, IMAGES, [V1]) is None  # no pid file
    Path(pid_file).write_text(f"{os.getpid()}\n")  # a live process, not a watcher
    assert pr.request_publish(sock, pid_file, IMAGES, [V1]) is None
    Path(pid_file).write_text("999999999\n")  # gone
    assert pr.request_publish(sock, pid_file, IMAGES, [V1]) is None
    Path(pid_file).write_text("garbage\n")
    assert pr.request_publish(sock, pid_file, IMAGES, [V1]) is None
    with pytest.raises(ProcessLookupError, match="missing or empty"):
        pr.running_watcher(pid_file)


def test_a_watcher_proc_does_not_show_is_asked_if_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another unit's sandbox hides the watcher's /proc entry (PrivateUsers, ProtectProc):
    it is taken for the watcher while it exists (its socket's other end is then checked)."""
    pid_file = tmp_path / "watch.pid"

    def hidden(pid: int) -> bytes:
        raise FileNotFoundError(f"/proc/{pid}/cmdline")

    monkeypatch.setattr(pr, "_cmdline", hidden)
    pid_file.write_text(f"{os.getpid()}\n")
    assert pr.running_watcher(str(pid_file)) == os.getpid()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names no process now
    pid_file.write_text(f"{gone.pid}\n")
    with pytest.raises(ProcessLookupError, match="is gone"):
        pr.running_watcher(str(pid_file))


def test_more_versions_than_a_request_names_are_not_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher is there, but no request may name that many: publish yourself, without
    connecting (prune, remove and import of many versions alike)."""
    monkeypatch.setattr(pr, "_cmdline", lambda pid: b"lxd-image-server\0watch\0")
    (tmp_path / "watch.pid").write_text(f"{os.getpid()}\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "publish.sock"))
        listener.listen(4)
        got = pr.request_publish(
            str(tmp_path / "publish.sock"),
            str(tmp_path / "watch.pid"),
            IMAGES,
            [V1] * (pr.MAX_VERSIONS + 1),
            1,
        )
        assert got is None
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected


def test_a_process_that_is_not_the_socket_s_listener_is_not_asked(tmp_path: Path) -> None:
    """The pid file names a live process, but the socket is someone else's: no request."""
    srv = RequestServer(str(tmp_path / "publish.sock"), IMAGES)
    try:
        # a live process that is not the listener, with "watch" in its argv (`sleep 30 watch`
        # would exit at once: "watch" is no interval)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "watch"])
        try:
            while not Path(f"/proc/{child.pid}/cmdline").read_bytes():
                time.sleep(0.01)  # (its exec not complete yet)
            (tmp_path / "watch.pid").write_text(f"{child.pid}\n")
            assert pr.running_watcher(str(tmp_path / "watch.pid")) == child.pid
            got = pr.request_publish(
                str(tmp_path / "publish.sock"), str(tmp_path / "watch.pid"), IMAGES, [V1], 5
            )
        finally:
            child.kill()
            child.wait()
        assert got is None
        assert srv.handle() == []  # what it sent, if anything, was never a request read
    finally:
        srv.close()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"error": "busy"}',
        b'{"listed": ["x"], "missing": {}}',
        b'{"listed": [], "missing": {"' + V1.encode() + b'": 3}}',
        b'{"listed": "' + V1.encode() + b'", "missing": {}}',
    ],
)
def test_malformed_answers_are_a_failed_channel(data: bytes) -> None:
    with pytest.raises(ValueError):
        pr.parse_answer(data, [V1])


def test_an_answer() -> None:
    a = pr.parse_answer(json.dumps({"listed": [V1], "missing": {V2: "why"}}).encode(), [V1, V2])
    assert a.listed == (V1,) and a.missing == {V2: "why"}
