"""`run` under load and under parallel uploads (issue 18, findings 3 and 6): real nginx,
gunicorn, watcher and curl.

- 3: nginx takes connections only once the upload server listens and the watcher watches, so
  an upload sent the moment the port answers is stored (201), never a 502.
- 6: the limit on uploads in progress belongs to the credential (8 by default, the upload
  app's count), not to the client address (nginx's 4): a CI job's eight parallel uploads go
  through, a ninth is told to retry (429, Retry-After), another credential is never starved.
"""

from __future__ import annotations

import base64
import http.client
import os
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .servers import Pki, free_port
from .test_run import BIN, DEADLINE, PASSWORD, Server, curl, reachable_dir, start_server

#: how long the busy loops spin at most (they are stopped as soon as the upload is done)
LOAD_SECONDS = 120
BUSY = f"import time\nend = time.monotonic() + {LOAD_SECONDS}\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def reachable() -> Iterator[Path]:
    yield from reachable_dir()


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Server]:
    for base in reachable_dir():
        yield from start_server(base, pki, {})


def _answers(url: str) -> bool:
    """An HTTP answer, whatever its status (nginx's workers serve: not only its listen queue)."""
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return r.stdout not in ("", "000")


def test_an_upload_the_moment_the_catalog_answers_is_stored(
    reachable: Path, tmp_path: Path
) -> None:
    """Under CPU load (busy loops on every core), the seeds' first upload, sent the moment
    the catalog first answers, gets 201: it got 502 when nginx started with the others and
    took requests before the upload server listened."""
    meta = tmp_path / "lxd.tar.xz"
    meta.write_bytes(b"metadata")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load = [
        subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 * (os.cpu_count() or 1))
    ]
    log = reachable / "run.log"
    d = "ready/1.0/amd64/default/20240101_1200"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    BIN, "--state-dir", reachable / "state", "run",
                    "--root-dir", reachable / "root", "--listen", f"127.0.0.1:{port}",
                    "--plain-http", "--allow-anonymous-uploads",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + LOAD_SECONDS
            while not _answers(f"{url}/streams/v1/index.json"):
                assert proc.poll() is None, f"run exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"run never answered:\n{log.read_text()}"
                time.sleep(0.005)
            code, body = curl("-T", meta, f"{url}/images/{d}/lxd.tar.xz", auth=False)
            assert code == 201, f"{code} {body}\n{log.read_text()}"
            # what the health check (the container's, Kubernetes' probes) says: all three ready
            health = subprocess.run(
                [BIN, "--state-dir", reachable / "state", "health"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert health.returncode == 0, health.stdout
        finally:
            for p in load:
                p.kill()
                p.wait()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()
    finally:
        for p in load:
            if p.poll() is None:
                p.kill()
    assert (reachable / "root/images" / d / "lxd.tar.xz").read_bytes() == b"metadata"


def _auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class StalledUpload:
    """A PUT whose body is half sent: an upload in progress until `finish`."""

    def __init__(self, server: Server, context: ssl.SSLContext, path: str, auth: str) -> None:
        self.body = os.urandom(64 << 10)
        self.conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
        self.conn.putrequest("PUT", path)
        self.conn.putheader("Authorization", auth)
        self.conn.putheader("Content-Length", str(len(self.body)))
        self.conn.endheaders()
        self.conn.send(self.body[: len(self.body) // 2])

    def finish(self) -> int:
        self.conn.send(self.body[len(self.body) // 2 :])
        status = self.conn.getresponse().status
        self.conn.close()
        return status


def test_eight_uploads_of_one_credential_at_once_and_another_credential_not_starved(
    server: Server, pki: Pki, tmp_path: Path
) -> None:
    htpasswd = server.root.parent / "htpasswd"
    subprocess.run(
        [BIN, "passwd", "other", "--htpasswd", htpasswd],
        input="other-pw-1\n",
        text=True,
        check=True,
    )
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    d = "parallel/1.0/amd64/default/20240101_1200"
    mine = _auth("upload", PASSWORD)
    uploads = [StalledUpload(server, context, f"/images/{d}/p{i}.tar.gz", mine) for i in range(8)]
    try:
        # the ninth of the same credential: 429 once the eight hold their slots (a path that
        # is refused anyway, so that nothing lands while they are still being taken)
        deadline = time.monotonic() + DEADLINE
        while True:
            out = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}",
                 "-u", f"upload:{PASSWORD}", "-T", "/dev/null",
                 f"{server.url}/images/parallel/1.0/amd64/default/notaserial/lxd.tar.xz"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if out.stdout.endswith("429"):
                break
            assert out.stdout.endswith("400"), out.stdout
            assert time.monotonic() < deadline, "the ninth upload was never refused"
            time.sleep(0.05)
        assert "retry-after:" in out.stdout.lower()
        # another credential is not starved
        other = tmp_path / "other"
        other.write_bytes(b"other")
        code, body = curl(
            "-u", "other:other-pw-1", "-T", other, f"{server.url}/images/{d}/o.tar.gz"
        )
        assert code == 201, body
    finally:
        statuses = [u.finish() for u in uploads]
    assert statuses == [201] * 8
    for i, u in enumerate(uploads):
        assert (server.root / "images" / d / f"p{i}.tar.gz").read_bytes() == u.body


# -- finding 4: `run` started as root ------------------------------------------------------------


def _uid(pid: int) -> int:
    line = next(
        ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:")
    )
    return int(line.split()[1])  # the real uid: nothing runs set-uid here


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_run_as_root_hands_the_upload_server_and_the_watcher_to_a_user(
    server: Server, run_user: str | None, tmp_path: Path
) -> None:
    """The README's claim: only nginx's master stays root (its workers are www-data); the
    upload server and the watcher run as the user, so uploads and the catalog are its files,
    never root's (they landed root:www-data)."""
    assert os.geteuid() == 0 and run_user, "this test runs as root, with the session's run user"
    uid = pwd.getpwnam(run_user).pw_uid
    meta = tmp_path / "lxd.tar.xz"
    meta.write_bytes(b"owned metadata")
    d = "owned/1.0/amd64/default/20240101_1200"
    code, body = curl("-T", meta, f"{server.url}/images/{d}/lxd.tar.xz")
    assert code == 201, body
    stored = server.root / "images" / d
    for path in (stored / "lxd.tar.xz", stored, server.root / "images" / "owned"):
        assert path.stat().st_uid == uid, path
    assert (server.root / "streams/v1/index.json").stat().st_uid == uid
    parts = _children(server.proc.pid)
    by_uid = {p: _uid(p) for p in parts}
    nginx_master = int((server.root.parent / "state/run/nginx.pid").read_text())
    assert by_uid.pop(nginx_master) == 0
    assert sorted(by_uid.values()) == [uid, uid], by_uid  # gunicorn's master and the watcher
    for p in by_uid:
        assert all(_uid(c) == uid for c in _children(p))  # gunicorn's workers


def _run_as_root(base: Path, *extra: str, env_user: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "LXD_IMAGE_SERVER_RUN_USER"}
    if env_user:
        env["LXD_IMAGE_SERVER_RUN_USER"] = env_user
    port = free_port()
    r = subprocess.run(
        [BIN, "--state-dir", base / "state", "run", "--root-dir", base / "root",
         "--listen", f"127.0.0.1:{port}", "--plain-http", "--allow-anonymous-uploads", *extra],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return r.returncode, r.stderr


def test_run_as_root_without_a_user_refuses_in_one_line(reachable: Path) -> None:
    rc, err = _run_as_root(reachable)
    assert rc == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert "--user" in err and "as root" in err
    assert not (reachable / "root").exists()


def test_run_as_root_refuses_root_as_the_user(reachable: Path) -> None:
    rc, err = _run_as_root(reachable, "--user", "root")
    assert rc == 1 and "uid 0" in err and len(err.strip().splitlines()) == 1, err


def test_run_as_root_refuses_a_tree_of_another_user(reachable: Path, run_user: str | None) -> None:
    """The tree is someone else's: the user could not write it (and root will not chown a tree
    it did not make)."""
    assert run_user
    (reachable / "root").mkdir()
    os.chown(reachable / "root", pwd.getpwnam("daemon").pw_uid, pwd.getpwnam("daemon").pw_gid)
    rc, err = _run_as_root(reachable, env_user=run_user)
    assert rc == 1 and "belongs to daemon" in err and len(err.strip().splitlines()) == 1, err


def test_run_as_root_refuses_a_state_directory_the_user_could_swap(
    reachable: Path, run_user: str | None
) -> None:
    """Root writes nginx's configuration and the certificate below the state directory: a
    directory above it that the user may change would let it swap them for links."""
    assert run_user
    parent = reachable / "users"
    parent.mkdir()
    os.chown(parent, pwd.getpwnam(run_user).pw_uid, -1)
    port = free_port()
    r = subprocess.run(
        [BIN, "--state-dir", parent / "state", "run", "--root-dir", reachable / "root",
         "--listen", f"127.0.0.1:{port}", "--plain-http", "--allow-anonymous-uploads"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert f"{parent} may be changed by others than root" in r.stderr
    assert not (parent / "state").exists()


def test_run_as_root_refuses_the_state_of_an_earlier_root_run(
    reachable: Path, run_user: str | None
) -> None:
    """An earlier `run` as root left the watcher's files root's: the watcher, now the user,
    could not write them; `run` says what to give it instead of failing later."""
    assert run_user
    (reachable / "state").mkdir()
    (reachable / "state" / "hashes.sqlite3").write_bytes(b"")
    rc, err = _run_as_root(reachable, env_user=run_user)
    assert rc == 1 and "hashes.sqlite3 is root's" in err and len(err.strip().splitlines()) == 1
