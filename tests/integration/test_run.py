"""`lxd-image-server run` end to end: real nginx, gunicorn, watcher, curl and the LXD daemon.

The seeds' own curl commands upload an image over HTTPS; LXD launches it from the same server.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .images import build_rootfs, make_squashfs, sha256_file, write_metadata_tarball
from .servers import Pki, delete_images, delete_instance, free_port, lxc
from .verified import assert_keeps_rules

BIN = Path(sys.executable).parent / "lxd-image-server"
PASSWORD = "seed-password-1"
DEADLINE = 60.0
SERIAL = "20240105_10:00"


@dataclass
class Server:
    root: Path
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def catalog(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.root / "streams/v1/images.json").read_bytes())
        return doc

    def files(self) -> set[str]:
        """Every file below the served root, hidden ones included (relative paths)."""
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}


def curl(*args: str | Path, auth: bool = True) -> tuple[int, str]:
    cmd = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    if auth:
        cmd += ["-u", f"upload:{PASSWORD}"]
    out = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def start_server(
    tmp: Path,
    pki: Pki,
    env_flags: dict[str, str],
    make_htpasswd: bool = True,
    global_args: Sequence[str | Path] = (),
    run_args: Sequence[str | Path] = (),
    port: int | None = None,
) -> Generator[Server, None, None]:
    """`lxd-image-server [GLOBAL_ARGS] run ... [RUN_ARGS]` on 127.0.0.1:`port` (a free one by
    default), once it serves and takes uploads."""
    root, state, ssl = tmp / "root", tmp / "state", tmp / "ssl"
    ssl.mkdir(parents=True)
    (ssl / "nginx.crt").write_bytes(pki.server_cert.read_bytes())
    (ssl / "nginx.key").write_bytes(pki.server_key.read_bytes())
    htpasswd = tmp / "htpasswd"
    if make_htpasswd:
        r = subprocess.run(
            [BIN, "passwd", "upload", "--htpasswd", htpasswd],
            input=PASSWORD + "\n",
            text=True,
            capture_output=True,
        )
        assert r.returncode == 0, r.stderr
    port = port or free_port()
    log = tmp / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("ALLOW_OVERWRITES", "ALLOW_DELETES")}
    env.update(env_flags)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                BIN,
                "--state-dir",
                state,
                *global_args,
                "run",
                "--root-dir",
                root,
                "--listen",
                f"127.0.0.1:{port}",
                "--ssl-dir",
                ssl,
                "--htpasswd",
                htpasswd,
                *run_args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(root, f"https://127.0.0.1:{port}", port, proc, log)
    deadline = time.monotonic() + DEADLINE
    private = "--private" in map(str, run_args)  # then reads need the credentials too
    try:  # a server that never becomes ready is stopped too, not left running
        while curl(f"{server.url}/streams/v1/index.json", auth=private)[0] != 200:
            assert proc.poll() is None, f"run exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"run never served:\n{log.read_text()}"
            time.sleep(0.1)
        # the upload server answers through nginx (a bad path: refused before anything is
        # written)
        while curl("-X", "PUT", "--data-binary", "x", f"{server.url}/images/x")[0] in (0, 502):
            assert time.monotonic() < deadline, f"upload server never answered:\n{log.read_text()}"
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            assert rc == 0, f"run exited {rc} on SIGTERM:\n{log.read_text()}"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, label: str) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("seed-image")
    rootfs = build_rootfs(work / "rootfs")
    meta = write_metadata_tarball(work / "meta", work / "meta.tar.xz", f"run test {label}")
    return meta, make_squashfs(rootfs, work / "rootfs.squashfs")


def reachable_dir() -> Iterator[Path]:
    """A directory www-data can traverse, so nginx's workers drop to www-data: `run` refuses
    to start them as root (pytest's own tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="lis-run-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@pytest.fixture
def reachable() -> Iterator[Path]:
    yield from reachable_dir()


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Server]:
    for base in reachable_dir():
        yield from start_server(base, pki, {})


@pytest.fixture(scope="module")
def permissive(pki: Pki) -> Iterator[Server]:
    for base in reachable_dir():
        yield from start_server(base, pki, {"ALLOW_OVERWRITES": "1", "ALLOW_DELETES": "true"})


def wait_listed(server: Server, product: str, serial: str) -> float:
    start = time.monotonic()
    while True:
        doc = server.catalog()
        versions = doc["products"].get(product, {}).get("versions", {})
        if serial in versions:
            assert_keeps_rules(doc)
            return time.monotonic() - start
        assert time.monotonic() - start < DEADLINE, f"{product} {serial} never listed"
        time.sleep(0.01)


@pytest.mark.lxd
def test_seed_curl_uploads_then_lxc_launch(server: Server, image, label: str) -> None:
    meta, squashfs = image
    d = f"busyrun/1.35/amd64/default/{SERIAL}"
    # the seeds' two commands, verbatim apart from host and credentials
    code, body = curl(f"-Fupload=@{meta};filename={d}/lxd.tar.xz", f"{server.url}/images/")
    assert code == 201, body
    code, body = curl(f"-Fupload=@{squashfs};filename={d}/rootfs.squashfs", f"{server.url}/images/")
    assert code == 201, body
    stored = json.loads(body)["files"][0]
    assert stored["path"] == f"{d}/rootfs.squashfs"
    assert stored["size"] == squashfs.stat().st_size
    # nginx's workers serve as www-data (never root)
    nginx_pid = int((server.root.parent / "state/run/nginx.pid").read_text())
    workers = Path(f"/proc/{nginx_pid}/task/{nginx_pid}/children").read_text().split()
    assert workers
    uids = {uid_of(int(w)) for w in workers}
    assert uids == {pwd.getpwnam("www-data").pw_uid}
    latency = wait_listed(server, "busyrun:1.35:amd64:default", SERIAL)
    print(f"catalog listed the upload {latency:.3f} s after the second curl returned")

    remote = f"run{server.port}"
    name = f"lis-{label}-run"
    lxc("remote", "add", remote, server.url, "--protocol", "simplestreams")
    try:
        lxc("launch", f"{remote}:busyrun/1.35", name, timeout=300)
        assert lxc("exec", name, "--", "/bin/busybox", "echo", "ok").strip() == "ok"
    finally:
        delete_instance(name)
        lxc("remote", "remove", remote)
        delete_images({sha256_file(meta, squashfs)})


def test_upload_without_credentials_is_refused(server: Server, image) -> None:
    meta, _ = image
    before = server.files()
    d = "nocreds/1.0/amd64/default/20240101_1200"
    code, _ = curl(f"-Fupload=@{meta};filename={d}/lxd.tar.xz", f"{server.url}/images/", auth=False)
    assert code == 401
    code, _ = curl("-T", meta, f"{server.url}/images/{d}/lxd.tar.xz", auth=False)
    assert code == 401
    code, _ = curl(
        "-u", "upload:wrong", "-T", meta, f"{server.url}/images/{d}/lxd.tar.xz", auth=False
    )
    assert code == 401
    assert server.files() == before


def test_put_is_the_fast_path(server: Server, image) -> None:
    _, squashfs = image
    d = "putter/1.0/amd64/default/20240101_1200"
    code, body = curl("-T", squashfs, f"{server.url}/images/{d}/rootfs.squashfs")
    assert code == 201, body
    assert (server.root / "images" / d / "rootfs.squashfs").read_bytes() == squashfs.read_bytes()


def test_delete_refused_without_allow_deletes(server: Server, image) -> None:
    meta, _ = image
    d = "keepme/1.0/amd64/default/20240101_1200"
    assert curl("-T", meta, f"{server.url}/images/{d}/lxd.tar.xz")[0] == 201
    code, _ = curl("-X", "DELETE", f"{server.url}/images/{d}/lxd.tar.xz")
    assert code == 405
    code, _ = curl("-X", "DELETE", f"{server.url}/images/{d}")
    assert code == 405
    assert (server.root / "images" / d / "lxd.tar.xz").exists()


def test_delete_with_allow_deletes(permissive: Server, image) -> None:
    meta, squashfs = image
    d = "gone/1.0/amd64/default/20240101_1200"
    assert curl("-T", meta, f"{permissive.url}/images/{d}/lxd.tar.xz")[0] == 201
    assert curl("-T", squashfs, f"{permissive.url}/images/{d}/rootfs.squashfs")[0] == 201
    wait_listed(permissive, "gone:1.0:amd64:default", "20240101_1200")
    code, body = curl("-X", "DELETE", f"{permissive.url}/images/{d}")
    assert code in (200, 204), body
    assert not (permissive.root / "images" / d).exists()
    deadline = time.monotonic() + DEADLINE
    while "gone:1.0:amd64:default" in permissive.catalog()["products"]:
        assert time.monotonic() < deadline, "the deleted version stayed in the catalog"
        time.sleep(0.02)
    code, _ = curl("-X", "DELETE", f"{permissive.url}/images/{d}")
    assert code == 404
    # without credentials, not even a permissive server deletes
    assert curl("-T", meta, f"{permissive.url}/images/{d}/lxd.tar.xz")[0] == 201
    code, _ = curl("-X", "DELETE", f"{permissive.url}/images/{d}/lxd.tar.xz", auth=False)
    assert code == 401
    assert (permissive.root / "images" / d / "lxd.tar.xz").exists()


def test_existing_file_kept_without_allow_overwrites(server: Server, tmp_path: Path) -> None:
    d = "twice/1.0/amd64/default/20240101_1200"
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"first version")
    second.write_bytes(b"second version")
    assert curl(f"-Fupload=@{first};filename={d}/lxd.tar.xz", f"{server.url}/images/")[0] == 201
    code, body = curl(f"-Fupload=@{second};filename={d}/lxd.tar.xz", f"{server.url}/images/")
    assert code == 201, body
    assert "ALLOW_OVERWRITES" in body
    target = server.root / "images" / d
    assert (target / "lxd.tar.xz").read_bytes() == b"first version"
    assert (target / "lxd.tar.xz.1").read_bytes() == b"second version"
    assert "lxd.tar.xz.1" in body


def test_existing_file_replaced_with_allow_overwrites(permissive: Server, tmp_path: Path) -> None:
    d = "twice/1.0/amd64/default/20240101_1200"
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"first version")
    second.write_bytes(b"second version")
    assert curl("-T", first, f"{permissive.url}/images/{d}/lxd.tar.xz")[0] == 201
    code, body = curl("-T", second, f"{permissive.url}/images/{d}/lxd.tar.xz")
    assert code == 201, body
    target = permissive.root / "images" / d
    assert (target / "lxd.tar.xz").read_bytes() == b"second version"
    assert not (target / "lxd.tar.xz.1").exists()


@pytest.mark.parametrize(
    ("path", "expect"),
    [
        ("..%2F..%2Fescape/1.0/amd64/default/20240101_1200/lxd.tar.xz", (400, 403, 404)),
        ("busybox/1.0/amd64/default/notaserial/lxd.tar.xz", (400,)),
        ("busybox/1.0/amd64/.hidden/20240101_1200/lxd.tar.xz", (400, 403)),
        ("busybox/1.0/amd64/default/20240101_1200/.lxd.tar.xz", (400, 403)),
        ("busybox/1.0/sparc9/default/20240101_1200/lxd.tar.xz", (400,)),
        ("busybox/1.0/amd64/default/20240101_1200/lxd.tar.xz%00", (400,)),
    ],
)
def test_bad_paths_write_nothing(
    server: Server, path: str, expect: tuple[int, ...], tmp_path: Path
) -> None:
    f = tmp_path / "payload"
    f.write_bytes(b"payload")
    before = server.files()
    code, body = curl("--path-as-is", "-T", f, f"{server.url}/images/{path}")
    assert code in expect, body
    assert server.files() == before
    assert not (server.root.parent / "escape").exists()


def test_tls_refuses_1_1_and_accepts_1_3(server: Server) -> None:
    def handshake(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-brief", *flags],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )

    # the client is made willing to speak TLS 1.1 (security level 0): only the server refuses
    old = handshake("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0
    assert "Protocol version: TLSv1.1" not in old.stderr
    new = handshake("-tls1_3")
    assert new.returncode == 0, new.stderr
    assert "Protocol version: TLSv1.3" in new.stderr


def test_run_creates_credentials_and_prints_them_once(pki: Pki, reachable: Path) -> None:
    tmp_path = reachable
    gen = start_server(tmp_path, pki, {}, make_htpasswd=False)
    server = next(gen)
    try:
        text = server.log.read_text()
        password = text.split("upload credentials created: user upload password ")[1].split()[0]
        f = tmp_path / "lxd.tar.xz"
        f.write_bytes(b"meta")
        d = "creds/1.0/amd64/default/20240101_1200"
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-u",
                f"upload:{password}",
                "-T",
                str(f),
                f"{server.url}/images/{d}/lxd.tar.xz",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout == "201"
    finally:
        gen.close()


def test_run_stops_everything_and_fails_when_a_part_dies(pki: Pki, reachable: Path) -> None:
    tmp_path = reachable
    gen = start_server(tmp_path, pki, {})
    server = next(gen)
    pid_files = (tmp_path / "state" / "run" / "nginx.pid", tmp_path / "state" / "watch.pid")
    deadline = time.monotonic() + DEADLINE
    while not all(p.exists() and p.read_text().strip() for p in pid_files):
        assert time.monotonic() < deadline, "nginx or the watcher never wrote its pid file"
        time.sleep(0.05)
    nginx_pid, watcher_pid = (int(p.read_text()) for p in pid_files)
    os.kill(nginx_pid, signal.SIGKILL)
    assert server.proc.wait(DEADLINE) == 1
    text = server.log.read_text()
    assert "nginx exited" in text and "stopping everything" in text
    assert not Path(f"/proc/{watcher_pid}").exists(), "the watcher outlived run"
    gen.close()


def test_large_uploads_pass_through_nginx(server: Server, tmp_path: Path) -> None:
    """nginx's default body limit (1 MiB) must not apply to uploads, POST or PUT."""
    big = tmp_path / "rootfs.squashfs"
    big.write_bytes(os.urandom(24 << 20))
    d = "large/1.0/amd64/default/20240101_1200"
    code, body = curl(f"-Fupload=@{big};filename={d}/rootfs.squashfs", f"{server.url}/images/")
    assert code == 201, body
    code, body = curl("-T", big, f"{server.url}/images/{d}/root.tar.xz")
    assert code == 201, body
    stored = server.root / "images" / d
    assert (stored / "rootfs.squashfs").read_bytes() == big.read_bytes()
    assert (stored / "root.tar.xz").stat().st_size == big.stat().st_size


def test_run_killed_leaves_no_orphans(reachable: Path) -> None:
    """Even SIGKILL of `run` takes nginx, gunicorn and the watcher down with it."""
    tmp_path = reachable
    port = free_port()
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [
                BIN,
                "--state-dir",
                tmp_path / "state",
                "run",
                "--root-dir",
                tmp_path / "root",
                "--listen",
                f"127.0.0.1:{port}",
                "--allow-anonymous-uploads",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    pid_files = (tmp_path / "state" / "run" / "nginx.pid", tmp_path / "state" / "watch.pid")
    deadline = time.monotonic() + DEADLINE
    while not all(p.exists() and p.read_text().strip() for p in pid_files):
        assert proc.poll() is None, (tmp_path / "log").read_text()
        assert time.monotonic() < deadline, "run never started nginx and the watcher"
        time.sleep(0.05)
    children = [int(p.read_text()) for p in pid_files]
    assert set(children) <= set(_processes_naming(tmp_path))
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + DEADLINE
    # every process `run` started names this tree in its arguments: nginx, the watcher, and
    # gunicorn's master and workers (which finish their graceful stop meanwhile)
    while left := _processes_naming(tmp_path):
        assert time.monotonic() < deadline, f"children of a killed run are still alive: {left}"
        time.sleep(0.05)


def _processes_naming(path: Path) -> list[int]:
    """The live (not zombie) processes with `path` in their arguments."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in argv and "Z" not in _state(int(entry.name)):
            found.append(int(entry.name))
    return found


def uid_of(pid: int) -> int:
    """The effective uid (/proc/PID itself is root's for a process that dropped root)."""
    line = next(
        ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:")
    )
    return int(line.split()[2])


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_https_upload_is_hashed_once(pki: Pki, reachable: Path, image) -> None:
    """The digests the upload app computed are the ones published: the watcher (debug log)
    takes them from the hand-over and reads neither file again (metadata first, as the seeds
    upload, so the combined fingerprint is computed by the upload too)."""
    meta, rootfs = image
    product, ser = "handover:1.0:amd64:default", "20240301_0000"
    d = f"handover/1.0/amd64/default/{ser}"
    for server in start_server(reachable, pki, {}, global_args=["--verbose"]):
        code, body = curl(
            f"-Fupload=@{meta};filename={d}/lxd.tar.xz",
            f"-Fupload=@{rootfs};filename={d}/rootfs.squashfs",
            f"{server.url}/images/",
        )
        assert code == 201, body
        wait_listed(server, product, ser)
        items = server.catalog()["products"][product]["versions"][ser]["items"]
        by_name = {Path(i["path"]).name: i for i in items.values()}
        assert by_name["rootfs.squashfs"]["sha256"] == sha256_file(rootfs)
        combined = hashlib.sha256(meta.read_bytes() + rootfs.read_bytes()).hexdigest()
        assert by_name["lxd.tar.xz"]["combined_squashfs_sha256"] == combined
        log = server.log.read_text()
        stored = server.root / "images" / d
        for name in ("lxd.tar.xz", "rootfs.squashfs"):
            assert f"sha256 of {stored / name} taken from its upload" in log, log
            assert f"reading {stored / name} to hash it" not in log
