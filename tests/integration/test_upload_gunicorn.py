"""The upload app under a real gunicorn on a unix socket, driven by a real curl.

Uses the seeds' commands (`-u u:p "-Fupload=@file;filename=<path>"`, `-T file`), a chunked PUT
from stdin, ~300 MB uploads while the worker's memory is watched in /proc, and a curl killed
in the middle of its body. gunicorn runs with the settings the package and `run` use
(-c python:lxd_image_server.web.gunicorn_conf). Attacks straight on the socket (issue 9): no or
wrong credentials, 66 MB of refused multipart parts, more stalled clients than threads.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server import htpasswd

GUNICORN = Path(sys.executable).parent / "gunicorn"
VERSION = "busybox/1.35/amd64/default/20240101_12:00"
MiB = 1 << 20
BIG_SIZE = 300 * MiB
MEMORY_BOUND = 32 * MiB
DEADLINE = 60.0
USER, PASSWORD = "u", "p"
CONFIG = "python:lxd_image_server.web.gunicorn_conf"


def _require_tools() -> None:
    if not GUNICORN.exists():
        pytest.fail(f"{GUNICORN} is missing: gunicorn must be installed in the venv")
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: apt-get install curl")


def _wait_for(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"gave up after {deadline:.0f} s waiting for {what}")
        time.sleep(0.02)


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


@dataclass
class Server:
    sock: Path
    images: Path
    log: Path
    proc: subprocess.Popen[bytes]
    worker: int

    def curl(
        self, *args: str, path: str = "/images/", stdin: Any = None, auth: bool = True
    ) -> tuple[int, Any]:
        """Runs curl against the server (with the right credentials unless `auth` is False)
        -> (HTTP status, JSON body)."""
        creds = ["-u", f"{USER}:{PASSWORD}"] if auth else []
        out = subprocess.run(
            [
                "curl", "-sS", "--unix-socket", str(self.sock), "-w", "\n%{http_code}",
                *creds, *args, f"http://localhost{path}",
            ],
            stdin=stdin,
            capture_output=True,
            timeout=DEADLINE * 5,
        )  # fmt: skip
        text = out.stdout.decode()
        assert out.returncode == 0, f"curl failed ({out.returncode}): {out.stderr.decode()}"
        body, _, status = text.rpartition("\n")
        return int(status), json.loads(body) if body.strip() else None

    def leftovers(self) -> list[str]:
        return [str(p.relative_to(self.images)) for p in self.images.rglob(".*")]


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: a unix socket path may not exceed 107 bytes, tmp_path often would.
    d = Path(tempfile.mkdtemp(prefix="lis-upload-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_server(workdir: Path) -> Iterator[Callable[..., Server]]:
    _require_tools()
    started: list[Server] = []

    def start(*options: str, workers: int = 1, **env: str) -> Server:
        n = len(started)
        images = workdir / f"root{n}" / "images"
        images.mkdir(parents=True)
        sock = workdir / f"upload{n}.sock"
        log = workdir / f"gunicorn{n}.log"
        passwords = workdir / f"htpasswd{n}"
        htpasswd.set_password(str(passwords), USER, PASSWORD)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        environ.update(
            {
                "LXD_IMAGE_SERVER_IMG_DIR": str(images),
                "LXD_IMAGE_SERVER_HTPASSWD": str(passwords),
                "DEBUG": "1",
                **env,
            }
        )
        if not options:
            options = ("--threads", "2", "--timeout", "300")
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [
                    str(GUNICORN), "-c", CONFIG, "--bind", f"unix:{sock}",
                    "--workers", str(workers), *options,
                    "lxd_image_server.web.upload:app_from_env()",
                ],
                env=environ,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )  # fmt: skip

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {proc.returncode}:\n{log.read_text()}")
            return sock.exists() and len(_children(proc.pid)) == workers

        _wait_for("gunicorn to start", up)
        server = Server(sock, images, log, proc, _children(proc.pid)[0])
        started.append(server)
        return server

    yield start
    for s in started:
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


def _big_file(path: Path, size: int) -> str:
    """Writes `size` bytes (not all alike) -> their sha256."""
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk = i.to_bytes(8, "big") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


# -- the seeds' commands -----------------------------------------------------------------------


def test_seed_form_upload(start_server: Callable[..., Server], workdir: Path) -> None:
    server = start_server()
    meta = workdir / "meta.tar.xz"
    meta.write_bytes(os.urandom(40_000))
    rootfs = workdir / "rootfs.squashfs"
    rootfs.write_bytes(os.urandom(3 * MiB))
    status, doc = server.curl(
        "-u", "u:p",
        f"-Fupload=@{meta};filename={VERSION}/lxd.tar.xz",
        f"-Fupload=@{rootfs};filename={VERSION}/rootfs.squashfs",
        "-Fcomment=ignored",
    )  # fmt: skip
    assert status == 201, doc
    assert doc == {
        "files": [
            {"path": f"{VERSION}/lxd.tar.xz", "size": 40_000, "sha256": _sha(meta)},
            {"path": f"{VERSION}/rootfs.squashfs", "size": 3 * MiB, "sha256": _sha(rootfs)},
        ]
    }
    version = server.images / VERSION
    assert (version / "lxd.tar.xz").read_bytes() == meta.read_bytes()
    assert (version / "rootfs.squashfs").read_bytes() == rootfs.read_bytes()
    assert sorted(p.name for p in version.iterdir()) == ["lxd.tar.xz", "rootfs.squashfs"]
    # overwrites are off: the same upload again goes beside the first
    status, doc = server.curl("-u", "u:p", f"-Fupload=@{meta};filename={VERSION}/lxd.tar.xz")
    assert status == 201, doc
    assert doc["files"][0]["stored_as"] == f"{VERSION}/lxd.tar.xz.1"
    # the request log (DEBUG=1) reaches gunicorn's output
    assert f"POST /images/ by {USER} -> 201" in server.log.read_text()
    assert server.leftovers() == []


def test_put_content_length_chunked_and_delete(
    start_server: Callable[..., Server], workdir: Path
) -> None:
    server = start_server(ALLOW_OVERWRITES="yes", ALLOW_DELETES="true")
    data = workdir / "disk.qcow2"
    data.write_bytes(os.urandom(5 * MiB))
    url = f"/images/{VERSION}/disk.qcow2"
    status, doc = server.curl("-u", "u:p", "-T", str(data), path=url)
    assert status == 201, doc
    assert doc["files"][0]["sha256"] == _sha(data)
    # chunked: curl -T - reads stdin and sends Transfer-Encoding: chunked
    other = workdir / "other"
    other.write_bytes(os.urandom(2 * MiB + 17))
    with open(other, "rb") as stdin:
        status, doc = server.curl("-T", "-", path=url, stdin=stdin)
    assert status == 201, doc
    assert doc["files"][0]["replaced"] is True
    assert _sha(server.images / VERSION / "disk.qcow2") == _sha(other)
    # %3A for the ':' of the serial works too
    status, doc = server.curl("-T", str(data), path=url.replace(":", "%3A"))
    assert status == 201, doc
    assert doc["files"][0]["path"] == f"{VERSION}/disk.qcow2"
    status, doc = server.curl("-X", "DELETE", path=f"/images/{VERSION}")
    assert status == 200, doc
    assert list(server.images.iterdir()) == []
    status, doc = server.curl("--path-as-is", "-T", str(data), path="/images/../../etc/x")
    assert status in (400, 404), doc


def test_limits_and_refusals(start_server: Callable[..., Server], workdir: Path) -> None:
    server = start_server(UPLOAD_MAX_SIZE=str(MiB))
    data = workdir / "root.tar.xz"
    data.write_bytes(os.urandom(2 * MiB))
    status, doc = server.curl("-T", str(data), path=f"/images/{VERSION}/root.tar.xz")
    assert status == 413, doc
    status, doc = server.curl(f"-Fupload=@{data};filename={VERSION}/root.tar.xz")
    assert status == 413, doc
    status, doc = server.curl("-X", "DELETE", path=f"/images/{VERSION}")
    assert status == 405, doc
    bad = workdir / "metadata.json"
    bad.write_text("{not json")
    status, doc = server.curl(f"-Fupload=@{bad};filename={VERSION}/metadata.json")
    assert status == 400, doc
    assert list(server.images.iterdir()) == []


# -- memory and broken clients -----------------------------------------------------------------


class RssSampler:
    """Samples a process's VmRSS in a thread; VmHWM is reset at the start (clear_refs 5)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.baseline = _proc_status(pid)["VmRSS"]
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _proc_status(self.pid)["VmRSS"])

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        hwm = _proc_status(self.pid)["VmHWM"]
        return max(self.peak, hwm) - self.baseline


@pytest.mark.timeout(600)
def test_large_uploads_keep_memory_flat(start_server: Callable[..., Server], workdir: Path) -> None:
    server = start_server()
    big = workdir / "big.squashfs"
    expected = _big_file(big, BIG_SIZE)
    # warm up: imports, first-request allocations
    small = workdir / "small"
    small.write_bytes(os.urandom(3 * MiB))
    status, doc = server.curl("-T", str(small), path=f"/images/{VERSION}/warmup")
    assert status == 201, doc

    sampler = RssSampler(server.worker)
    status, doc = server.curl("-T", str(big), path=f"/images/{VERSION}/rootfs.squashfs")
    growth = sampler.growth()
    assert status == 201, doc
    assert doc["files"][0] == {
        "path": f"{VERSION}/rootfs.squashfs",
        "size": BIG_SIZE,
        "sha256": expected,
    }
    assert _sha(server.images / VERSION / "rootfs.squashfs") == expected
    assert growth < MEMORY_BOUND, f"the worker grew by {growth / MiB:.1f} MiB during a PUT"

    sampler = RssSampler(server.worker)
    status, doc = server.curl(f"-Fupload=@{big};filename={VERSION}/root.squashfs")
    growth = sampler.growth()
    assert status == 201, doc
    assert doc["files"][0]["sha256"] == expected
    assert growth < MEMORY_BOUND, f"the worker grew by {growth / MiB:.1f} MiB during a POST"
    assert server.leftovers() == []


@pytest.mark.parametrize("how", ["put", "chunked", "post"])
def test_client_killed_mid_body_leaves_nothing(
    start_server: Callable[..., Server], workdir: Path, how: str
) -> None:
    server = start_server()
    big = workdir / "big"
    _big_file(big, 64 * MiB)
    if how in ("put", "chunked"):
        source = "-" if how == "chunked" else str(big)
        args = ["-T", source, f"http://localhost/images/{VERSION}/rootfs.squashfs"]
    else:
        args = [f"-Fupload=@{big};filename={VERSION}/rootfs.squashfs", "http://localhost/images/"]
    auth = ["-u", f"{USER}:{PASSWORD}"]
    with open(big, "rb") as stdin:
        curl = subprocess.Popen(
            ["curl", "-sS", "--unix-socket", str(server.sock), "--limit-rate", "4M", *auth, *args],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        version = server.images / VERSION
        _wait_for(
            "the upload to start",
            lambda: version.is_dir() and any(version.glob(".upload-*.part")),
        )
        assert curl.poll() is None, "curl finished before it could be killed"
    finally:
        curl.kill()
        curl.wait()
    _wait_for("the server to clean up", lambda: not server.images.joinpath("busybox").exists())
    assert list(server.images.iterdir()) == []
    # the server is still fine afterwards
    small = workdir / "small"
    small.write_bytes(b"x" * 1000)
    status, doc = server.curl("-T", str(small), path=f"/images/{VERSION}/lxd.tar.xz")
    assert status == 201, doc
    assert server.proc.poll() is None


# -- attacks straight on the socket (issue 9) --------------------------------------------------


def _request(sock: Path, head: str, body: bytes = b"", timeout: float = DEADLINE) -> bytes:
    """One raw HTTP/1.1 request on the unix socket -> the whole answer (the body is sent by
    a thread, so an answer that comes before the body is complete is read too)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(head.encode())

        def send() -> None:
            with contextlib.suppress(OSError):
                view = memoryview(body)
                while view:
                    view = view[s.send(view[: 1 << 20]) :]

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = bytearray()
        try:
            while chunk := s.recv(1 << 16):
                answer += chunk
                if len(answer) > 64 << 20:
                    break
        except ConnectionResetError:
            # a unix socket closed with unread data (the rest of a refused body) is reset,
            # after the answer, which was read in full before
            if not answer:
                raise
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        sender.join(timeout)
    return bytes(answer)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_socket_is_no_way_around_credentials(
    start_server: Callable[..., Server], workdir: Path
) -> None:
    """Finding 8: whoever reaches the socket (group www-data) must still know a password."""
    server = start_server()
    data = workdir / "lxd.tar.xz"
    data.write_bytes(b"meta")
    url = f"/images/{VERSION}/lxd.tar.xz"
    status, doc = server.curl("-T", str(data), path=url, auth=False)
    assert status == 401, doc
    status, doc = server.curl("-H", "X-Remote-User: u", "-T", str(data), path=url, auth=False)
    assert status == 401, doc
    status, doc = server.curl("-u", "u:wrong", "-T", str(data), path=url, auth=False)
    assert status == 401, doc
    status, doc = server.curl(f"-Fupload=@{data};filename={VERSION}/lxd.tar.xz", auth=False)
    assert status == 401, doc
    assert list(server.images.iterdir()) == []
    status, doc = server.curl("-T", str(data), path=url)
    assert status == 201, doc
    anonymous = start_server(ALLOW_ANONYMOUS_UPLOADS="yes")
    status, doc = anonymous.curl("-T", str(data), path=url, auth=False)
    assert status == 201, doc


@pytest.mark.timeout(600)
def test_refused_parts_keep_memory_and_answer_small(start_server: Callable[..., Server]) -> None:
    """Finding 7: 66 MB of parts with refused names grew a worker to 1 GiB, answered 222 MB."""
    server = start_server()
    boundary = "refused-parts-boundary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="upload"; '
        f'filename="../../etc/{"x" * 40}"\r\n\r\nx\r\n'
    ).encode()
    end = f"--{boundary}--\r\n".encode()

    def head(length: int) -> str:
        return (
            "POST /images/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Authorization: {_basic(USER, PASSWORD)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )

    # warm up: imports, first-request allocations
    small = part * 10 + end
    assert _status(_request(server.sock, head(len(small)), small)) == 400
    body = part * (66_000_000 // len(part)) + end
    sampler = RssSampler(server.worker)
    try:
        answer = _request(server.sock, head(len(body)), body)
    finally:
        growth = sampler.growth()
    assert 400 <= _status(answer) < 500, answer[:300]
    assert len(answer) < 64 * 1024, f"an answer of {len(answer)} bytes"
    assert growth < 50 * MiB, f"the worker grew by {growth / MiB:.1f} MiB"
    assert list(server.images.iterdir()) == []
    assert server.proc.poll() is None


@pytest.mark.timeout(600)
def test_stalled_clients_do_not_starve_uploads(
    start_server: Callable[..., Server], workdir: Path
) -> None:
    """Finding 11: more stalled clients than threads (some silent, some sending a byte now
    and then) hold no thread for long: another upload still gets through. Issue 18: they share
    one credential, which holds at most upload.max_parallel threads (the others are answered
    429 at once); the upload that gets through is another credential's."""
    from lxd_image_server.web import gunicorn_conf

    server = start_server("--timeout", "300", workers=2, UPLOAD_READ_TIMEOUT="2")
    stalled = gunicorn_conf.workers * gunicorn_conf.threads + 8
    head = (
        f"PUT /images/{VERSION}/rootfs.squashfs HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: {_basic(USER, PASSWORD)}\r\nContent-Length: 1000000\r\n\r\n"
    )
    stop = threading.Event()
    answers: list[bytes] = []
    clients = []
    for i in range(stalled):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(str(server.sock))
        s.sendall(head.encode() + b"x" * 100)
        clients.append((s, i % 2 == 0))

    def trickle(s: socket.socket) -> None:
        while not stop.wait(0.5):
            try:
                s.sendall(b"x")
            except OSError:
                return

    def collect(s: socket.socket) -> None:
        answer = bytearray()
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
        answers.append(bytes(answer))

    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s, t in clients if t]
    threads += [threading.Thread(target=collect, args=(s,), daemon=True) for s, _ in clients]
    for t in threads:
        t.start()
    try:
        data = workdir / "lxd.tar.xz"
        data.write_bytes(os.urandom(100_000))
        for passwords in workdir.glob("htpasswd*"):
            htpasswd.set_password(str(passwords), "other", "other-password")
        status, doc = server.curl(
            *("--max-time", str(DEADLINE), "-u", "other:other-password", "-T", str(data)),
            path=f"/images/{VERSION}/lxd.tar.xz",
            auth=False,
        )
        assert status == 201, doc
        _wait_for("every stalled client to be answered", lambda: len(answers) == stalled)
    finally:
        stop.set()
        for s, _ in clients:
            s.close()
    statuses = sorted({_status(a) for a in answers if a})
    assert statuses == [408, 429], statuses
    assert sorted(p.name for p in (server.images / VERSION).iterdir()) == ["lxd.tar.xz"]
