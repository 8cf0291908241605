"""`import` with a running watcher (a real process): the watcher publishes what import placed,
once, at import's request over the publish-request socket; without a watcher (or with a dead
one) import publishes by itself, once for several images. The socket's hostile clients do not
stop the watcher. (The requests' parsing is attacked one by one in
tests/unit/test_publish_requests.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from inotify_simple import INotify, flags

from lxd_image_server.catalog import publish_requests as pr

from ..unit.test_importer import metadata_yaml, split_export, unified_export

BIN = Path(sys.executable).parent / "lxd-image-server"
DEADLINE = 30.0
PRODUCT_DIR = "busybox/1.35/amd64/default"
#: 2024-01-01 12:00 UTC; image n is n minutes later
CREATED = 1704110400


def serial(n: int) -> str:
    return f"20240101_12:{n:02d}"


def exports(directory: Path, count: int, first: int = 0) -> list[Path]:
    """`count` images as lxc exports them, into `directory`: split ones, and every third a
    unified tarball; image n has the serial serial(n)."""
    out: list[Path] = []
    for n in range(first, first + count):
        yaml = metadata_yaml(created=CREATED + 60 * n)
        if n % 3 == 2:
            out.append(unified_export(directory, yaml))
        else:
            out += split_export(directory, yaml=yaml)
    return out


class Publishes:
    """Counts the catalog's publishes: images.json renamed into streams/v1 (inotify)."""

    def __init__(self, streams: Path) -> None:
        streams.mkdir(parents=True, exist_ok=True)
        self.inotify = INotify()
        self.inotify.add_watch(str(streams), flags.MOVED_TO | flags.CREATE)

    def count(self) -> int:
        return sum(1 for e in self.inotify.read(timeout=0) if e.name == "images.json")

    def close(self) -> None:
        self.inotify.close()


def listed(root: Path) -> set[str]:
    """The version directories images.json lists, relative to images/."""
    try:
        doc = json.loads((root / "streams/v1/images.json").read_bytes())
    except FileNotFoundError:
        return set()
    out = set()
    for p in doc["products"].values():
        for s in p["versions"]:
            out.add(f"{p['os']}/{p['release']}/{p['arch']}/{p['variant']}/{s}")
    return out


def on_disk(root: Path) -> set[str]:
    img = root / "images"
    return {
        str(d.relative_to(img))
        for d in img.glob("*/*/*/*/*")
        if d.is_dir() and not d.name.startswith(".")
    }


@dataclass
class Watcher:
    root: Path
    state: Path
    proc: subprocess.Popen[bytes]
    log: IO[str]

    def text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "images").mkdir(parents=True)
    return root, state


@pytest.fixture
def watcher(tree: tuple[Path, Path], tmp_path: Path) -> Iterator[Watcher]:
    root, state = tree
    with running_watcher(root, state, tmp_path / "watch.log") as w:
        yield w


@contextmanager
def running_watcher(
    root: Path, state: Path, log_path: Path, config: Path | None = None
) -> Iterator[Watcher]:
    """`watch` on `root` (its first catalog published) for the block; no traceback in its log."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    options = ["--config", str(config)] if config is not None else []
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [BIN, "--state-dir", state, *options, "--verbose", "watch", "--root-dir", root],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        w = Watcher(root, state, proc, log)
        try:
            wait_for(
                lambda: (root / "streams/v1/images.json").exists() or not w.alive(),
                "the watcher's first catalog",
            )
            assert w.alive(), w.text()
            assert (state / "publish.sock").exists()
            yield w
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=DEADLINE)
            assert "Traceback" not in w.text()


def run_import(state: Path, root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN, "--state-dir", state, "import", "--root-dir", root, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_watcher_publishes_an_import_at_once(watcher: Watcher, tmp_path: Path) -> None:
    root, state = watcher.root, watcher.state
    files = exports(tmp_path / "export", 1)
    count = Publishes(root / "streams/v1")
    r = run_import(state, root, *files)
    assert r.returncode == 0, r.stderr
    assert "published in" in r.stdout and "by the running watcher" in r.stdout
    # listed when import returns, not later
    assert listed(root) == {f"{PRODUCT_DIR}/{serial(0)}"}
    assert count.count() == 1
    count.close()
    text = watcher.text()
    assert "publish request from pid" in text
    # its digests were handed over: the watcher did not read the files again
    assert "taken from its upload, not read again" in text
    assert not list((state / "upload-digests").iterdir())  # taken (and removed)
    assert watcher.alive()


def test_several_images_publish_once(watcher: Watcher, tmp_path: Path) -> None:
    root, state = watcher.root, watcher.state
    assert run_import(state, root, *exports(tmp_path / "first", 1)).returncode == 0
    batch = tmp_path / "batch"
    exports(batch, 5, first=1)
    count = Publishes(root / "streams/v1")
    r = run_import(state, root, batch)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("imported busybox:1.35:amd64:default") == 5
    assert count.count() == 1, "several images, one publish"
    count.close()
    assert listed(root) == on_disk(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in range(6)}


def test_without_a_watcher_import_publishes_once_by_itself(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    root, state = tree
    assert run_import(state, root, *exports(tmp_path / "first", 1)).returncode == 0
    files = exports(tmp_path / "batch", 4, first=1)  # given as files: split and unified
    count = Publishes(root / "streams/v1")
    r = run_import(state, root, *files)
    assert r.returncode == 0, r.stderr
    assert "published in" in r.stdout and "by the running watcher" not in r.stdout
    assert count.count() == 1
    count.close()
    assert listed(root) == on_disk(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in range(5)}


def test_a_dead_watcher_leaves_import_to_publish_by_itself(
    watcher: Watcher, tmp_path: Path
) -> None:
    root, state = watcher.root, watcher.state
    watcher.proc.kill()  # no clean-up: its pid file and socket stay
    watcher.proc.wait()
    assert (state / "watch.pid").exists() and (state / "publish.sock").exists()
    r = run_import(state, root, *exports(tmp_path / "e", 2))
    assert r.returncode == 0, r.stderr
    assert "published in" in r.stdout and "by the running watcher" not in r.stdout
    assert listed(root) == on_disk(root)


def test_a_live_process_that_is_no_watcher_is_not_asked(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    """A pid file naming a live process that is not the watcher, and a socket someone else
    listens on: import neither talks to it nor waits for it."""
    root, state = tree
    state.mkdir()
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(str(state / "publish.sock"))
    impostor.listen(1)
    (state / "watch.pid").write_text(f"{os.getpid()}\n")
    try:
        r = run_import(state, root, *exports(tmp_path / "e", 1))
    finally:
        impostor.close()
    assert r.returncode == 0, r.stderr
    assert "by the running watcher" not in r.stdout
    assert listed(root) == on_disk(root)


def test_hostile_clients_do_not_stop_the_watcher(watcher: Watcher, tmp_path: Path) -> None:
    root, state = watcher.root, watcher.state
    path = str(state / "publish.sock")
    images = json.dumps(os.path.realpath(root / "images")).encode()

    def raw(payload: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(DEADLINE)
            s.connect(path)
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass  # closed with what it sent unread (too much)
            return data

    # slow clients that never finish their request, holding connections open
    slow = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"publish": [')
        slow.append(s)
    for payload in (
        b"garbage\n",
        b'{"images": ' + images + b', "publish": ["../../../etc/passwd"]}\n',
        b'{"images": '
        + images
        + b', "publish": ["/'
        + PRODUCT_DIR.encode()
        + b'/20240101_12:00"]}\n',
        b'{"images": "/etc", "publish": ["' + PRODUCT_DIR.encode() + b'/20240101_12:00"]}\n',
        b"[" * (pr.MAX_REQUEST + 10),
        b'{"images": ' + images + b', "publish": ["' + PRODUCT_DIR.encode() + b'/.hidden"]}\n',
        b"",
    ):
        assert "error" in json.loads(raw(payload) or b'{"error": "closed"}')
    # a well-formed request for a version that is not there: answered, nothing listed
    request = {"images": json.loads(images), "publish": [f"{PRODUCT_DIR}/{serial(9)}"]}
    answer = json.loads(raw(json.dumps(request).encode()))
    assert answer["missing"] == {f"{PRODUCT_DIR}/{serial(9)}": "no such version directory"}
    # meanwhile, an import is still served by the watcher
    r = run_import(state, root, *exports(tmp_path / "e", 1))
    assert r.returncode == 0, r.stderr
    assert "by the running watcher" in r.stdout
    for s in slow:
        s.close()
    assert watcher.alive()
    assert "refused a publish request" in watcher.text()


#: a watcher that lists nothing: the real request server, answering every request with its
#: versions not listed (what a watcher says of a version it cannot publish)
UNLISTING_WATCHER = """
import os, select, sys
from lxd_image_server.catalog.publish_server import RequestServer
state, images = sys.argv[1], sys.argv[2]
srv = RequestServer(os.path.join(state, "publish.sock"), images)
with open(os.path.join(state, "watch.pid"), "w") as f:
    f.write(f"{os.getpid()}\\n")
while True:
    select.select([srv.fileno()], [], [], 1.0)
    srv.handle()
    srv.answer(set(), busy=False, img_dir=images)
"""


def test_a_version_the_watcher_does_not_list_fails_the_import(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    """The watcher answers that the version is not listed: import exits 1 naming it and why
    (and does not publish by itself: the watcher is the tree's writer)."""
    root, state = tree
    state.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", UNLISTING_WATCHER, str(state), str(root / "images"), "watch"]
    )
    try:
        wait_for(lambda: (state / "watch.pid").exists(), "the watcher's pid file")
        r = run_import(state, root, *exports(tmp_path / "e", 1))
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 1, r.stdout
    assert "is in the tree but not in the catalog: not listed" in r.stderr
    assert on_disk(root) == {f"{PRODUCT_DIR}/{serial(0)}"}
    assert listed(root) == set()


def test_a_watcher_of_another_tree_is_not_asked(watcher: Watcher, tmp_path: Path) -> None:
    """Two trees sharing a state directory: the watcher of one refuses to publish for the
    other, and import publishes that tree itself."""
    other = tmp_path / "other"
    r = run_import(watcher.state, other, *exports(tmp_path / "e", 1))
    assert r.returncode == 0, r.stderr
    assert "published in" in r.stdout and "by the running watcher" not in r.stdout
    assert listed(other) == on_disk(other) == {f"{PRODUCT_DIR}/{serial(0)}"}
    assert listed(watcher.root) == set()
    assert "is not the images directory of this watcher's tree" in watcher.text()
    assert watcher.alive()


def test_the_socket_refuses_other_users(watcher: Watcher) -> None:
    """Only root and the watcher's user may connect (mode 0600); another user cannot even
    reach it."""
    if os.geteuid() != 0:
        pytest.fail("run as root (make test does): it switches to another user")
    nobody = pwd.getpwnam("nobody")
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    os.chmod(watcher.state, 0o755)
    r = subprocess.run(
        [sys.executable, "-c", code, str(watcher.state / "publish.sock")],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        timeout=DEADLINE,
    )
    assert r.returncode == 3


def test_requests_while_the_watcher_is_busy(watcher: Watcher, tmp_path: Path) -> None:
    """Imports from several processes at once: each is answered after a publish that lists
    it, every one is listed at the end."""
    root, state = watcher.root, watcher.state
    dirs = []
    for i in range(3):
        d = tmp_path / f"e{i}"
        exports(d, 2, first=2 * i)
        dirs.append(d)
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda d=d: results.append(run_import(state, root, d)))
        for d in dirs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert listed(root) == on_disk(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in range(6)}


def run_cli(state: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN), "--state-dir", str(state), "--verbose", *args[:1], "--root-dir", str(root)]
    cmd += args[1:]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_remove_is_published_by_the_watcher(watcher: Watcher, tmp_path: Path) -> None:
    """`remove` with a watcher running: only the product is scanned, the watcher publishes
    (once) without the versions removed, and says none of them is listed."""
    root, state = watcher.root, watcher.state
    assert run_import(state, root, tmp_path / "e").returncode == 2  # (no such directory)
    exports(tmp_path / "e", 3)
    assert run_import(state, root, tmp_path / "e").returncode == 0
    product = "busybox:1.35:amd64:default"
    r = run_cli(state, root, "remove", product, serial(1), "--dry-run")
    assert r.returncode == 0 and f"would remove {product} {serial(1)}" in r.stdout, r.stderr
    assert len(listed(root)) == 3
    count = Publishes(root / "streams/v1")
    r = run_cli(state, root, "remove", product, serial(1))
    assert r.returncode == 0, r.stderr
    assert f"removed {product} {serial(1)} from the catalog" in r.stdout
    assert "pipeline" not in r.stderr and "catalog.publish: published" not in r.stderr
    assert listed(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in (0, 2)}
    assert count.count() == 1
    count.close()
    assert (root / "images" / PRODUCT_DIR / serial(1)).is_dir()  # the grace period
    r = run_cli(state, root, "remove", product)
    assert r.returncode == 0, r.stderr
    assert listed(root) == set()
    assert watcher.alive()


def test_remove_without_a_watcher_publishes_by_itself(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    root, state = tree
    exports(tmp_path / "e", 2)
    assert run_import(state, root, tmp_path / "e").returncode == 0
    r = run_cli(state, root, "remove", "busybox:1.35:amd64:default", serial(0))
    assert r.returncode == 0, r.stderr
    assert "catalog.publish: published" in r.stderr
    assert listed(root) == {f"{PRODUCT_DIR}/{serial(1)}"}


def test_force_replaces_a_listed_version_through_the_watcher(
    watcher: Watcher, tmp_path: Path
) -> None:
    """--force over a version the watcher lists: listed again with the new files' digests
    when import returns."""
    root, state = watcher.root, watcher.state
    assert run_import(state, root, *exports(tmp_path / "a", 1)).returncode == 0
    unified = unified_export(tmp_path / "b", metadata_yaml(created=CREATED))  # same version
    r = run_import(state, root, unified, "--force")
    assert r.returncode == 0, r.stderr
    assert "by the running watcher" in r.stdout
    doc = json.loads((root / "streams/v1/images.json").read_bytes())
    (product,) = doc["products"].values()
    items = product["versions"][serial(0)]["items"]
    digest = hashlib.sha256(unified.read_bytes()).hexdigest()
    assert {i["sha256"] for i in items.values()} == {digest}
