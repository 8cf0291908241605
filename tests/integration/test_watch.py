"""The watcher as a real process on a real tree, driven the way users change it."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from .verified import assert_keeps_rules

BIN = Path(sys.executable).parent / "lxd-image-server"
DEADLINE = 30.0
V = "busybox/1.35/amd64/default"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Catalog:
    """Reads images.json as a client would, and remembers everything it ever saw."""

    def __init__(self, root: Path):
        self.path = root / "streams" / "v1" / "images.json"
        self.seen_paths: set[str] = set()
        self.torn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def read(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            self.torn += 1
            return {}
        for product in doc.get("products", {}).values():
            for version in product["versions"].values():
                for item in version["items"].values():
                    self.seen_paths.add(item["path"])
        return doc

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.read()
            time.sleep(0.005)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def versions(self) -> dict[str, dict[str, Any]]:
        """'os/release/arch/variant/serial' -> items."""
        out: dict[str, dict[str, Any]] = {}
        for product in self.read().get("products", {}).values():
            base = f"{product['os']}/{product['release']}/{product['arch']}/{product['variant']}"
            for serial, version in product["versions"].items():
                out[f"{base}/{serial}"] = version["items"]
        return out

    def wait_for(
        self, predicate: Callable[[dict[str, dict[str, Any]]], bool], what: str
    ) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            versions = self.versions()
            if predicate(versions):
                assert_keeps_rules(self.read(), allow_empty=True)
                return versions
            time.sleep(0.02)
        raise AssertionError(f"catalog never showed {what}; last: {sorted(self.versions())}")


@pytest.fixture
def watcher(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    with open(tmp_path / "watch.log", "w+") as log:
        proc = subprocess.Popen(
            [str(BIN), "--state-dir", str(tmp_path / "state"), "watch", "--root-dir", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        catalog = Catalog(root)
        try:
            deadline = time.monotonic() + DEADLINE
            while not catalog.path.exists():
                assert proc.poll() is None, "watcher died at start"
                assert time.monotonic() < deadline, "watcher never published its first catalog"
                time.sleep(0.02)
            catalog.start()
            yield root, proc, catalog, log
        finally:
            catalog.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def write_slowly(path: Path, data: bytes, pieces: int = 6, pause: float = 0.25):
    step = len(data) // pieces + 1
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(pause)


def test_watcher_follows_the_tree(watcher):
    root, proc, catalog, log = watcher
    img = root / "images"
    meta, squash = os.urandom(3000), os.urandom(2_000_000)

    # 1. files copied in slowly (as scp/sftp do): never published half-written
    d1 = img / V / "20240101_12:00"
    d1.mkdir(parents=True)
    (d1 / "lxd.tar.xz").write_bytes(meta)
    write_slowly(d1 / "rootfs.squashfs", squash)
    key1 = f"{V}/20240101_12:00"
    versions = catalog.wait_for(lambda v: key1 in v, "the slowly copied version")
    assert versions[key1]["squashfs"]["sha256"] == sha(squash)
    assert versions[key1]["squashfs"]["size"] == len(squash)
    assert versions[key1]["lxd.tar.xz"]["combined_squashfs_sha256"] == sha(meta + squash)

    # 2. a hidden staging directory, filled, then moved in whole under its final name
    staging = img / "busybox/1.35/amd64/default/.staging"
    staging.mkdir()
    meta2, rootxz = os.urandom(2000), os.urandom(1_500_000)
    (staging / "lxd.tar.xz").write_bytes(meta2)
    (staging / "root.tar.xz").write_bytes(rootxz)
    time.sleep(1.5)  # give the watcher every chance to (wrongly) publish the staging dir
    assert not any(".staging" in p for p in catalog.seen_paths)
    staging.rename(img / V / "20240102_1200")
    key2 = f"{V}/20240102_1200"
    versions = catalog.wait_for(lambda v: key2 in v, "the moved-in version")
    assert versions[key2]["root.tar.xz"]["sha256"] == sha(rootxz)

    # 3. a whole product tree moved in at once (directories created before any watch existed)
    outside = root.parent / "incoming" / "alpine"
    nested = outside / "3.19/arm64/cloud/202402011200"
    nested.mkdir(parents=True)
    (nested / "lxd.tar.xz").write_bytes(meta)
    (nested / "rootfs.squashfs").write_bytes(squash)
    outside.rename(img / "alpine")
    catalog.wait_for(lambda v: "alpine/3.19/arm64/cloud/202402011200" in v, "a moved-in tree")

    # 4. metadata.json: applied when valid; when malformed, defaults, and the watcher lives on
    def aliases() -> list[str]:
        product = catalog.read().get("products", {}).get("busybox:1.35:amd64:default", {})
        aliases: str = product.get("aliases", "")
        return aliases.split(",")

    def wait_aliases(predicate: Callable[[list[str]], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not predicate(aliases()):
            assert time.monotonic() < deadline, f"never saw {what}: {aliases()}"
            time.sleep(0.02)

    newest = img / V / "20240102_1200"
    (newest / "metadata.json").write_text('{"aliases": ["bb"]}')
    wait_aliases(lambda a: "bb" in a, "the metadata.json alias")
    (newest / "metadata.json").write_text("{not json")
    wait_aliases(lambda a: "bb" not in a and "busybox/1.35" in a, "defaults after bad JSON")
    assert key2 in catalog.versions()

    # 5. a deletion unpublishes
    shutil.rmtree(img / V / "20240102_1200")
    catalog.wait_for(lambda v: key2 not in v and key1 in v, "the deletion")

    # 6. a moved-out version unpublishes
    (img / V / "20240101_12:00").rename(root.parent / "moved-away")
    catalog.wait_for(lambda v: key1 not in v, "the move out")

    # nothing half-written or hidden was ever listed, and no torn JSON was read
    assert not any(".staging" in p or p.endswith((".part", ".tmp")) for p in catalog.seen_paths)
    assert catalog.torn == 0
    assert proc.poll() is None, "the watcher died"
    log.seek(0)
    text = log.read()
    assert "invalid JSON" in text
    assert "Traceback" not in text

    # SIGTERM: finishes and exits 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0


def test_half_copied_file_never_listed(watcher):
    """The catalog must never list a root whose bytes are not all there yet."""
    root, proc, catalog, _ = watcher
    d = root / "images" / V / "20240301_1200"
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(os.urandom(1000))
    data = os.urandom(3_000_000)
    sizes_seen = set()

    def record() -> None:
        for items in catalog.versions().values():
            if "squashfs" in items:
                sizes_seen.add(items["squashfs"]["size"])

    step = len(data) // 10
    with open(d / "rootfs.squashfs", "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(0.15)
            record()
    catalog.wait_for(lambda v: f"{V}/20240301_1200" in v, "the completed file")
    record()
    assert sizes_seen == {len(data)}
    assert proc.poll() is None


def test_reload_keeps_old_configuration_when_malformed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    conf = tmp_path / "extra.toml"
    conf.write_text("[upload]\nallow_deletes = true\n")
    env = {**os.environ, "LXD_IMAGE_SERVER_CONFIG": str(conf)}
    state = tmp_path / "state"
    log_path = tmp_path / "watch.log"

    def log_text() -> str:
        return log_path.read_text()

    def wait_log(needle: str, count: int = 1) -> None:
        deadline = time.monotonic() + DEADLINE
        while log_text().count(needle) < count:
            assert time.monotonic() < deadline, f"never logged {needle!r}:\n{log_text()}"
            time.sleep(0.05)

    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN), "--state-dir", str(state), "watch", "--root-dir", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_log("watching")
        reload = [str(BIN), "--state-dir", str(state), "reload"]
        r = subprocess.run(reload, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_log("configuration reloaded")
        conf.write_text("[upload]\nallow_deletes = maybe\n")
        # `reload` checks the file first and refuses, naming file and line
        r = subprocess.run(reload, env=env, capture_output=True, text=True)
        assert r.returncode == 2  # a configuration error is a usage error
        assert str(conf) in r.stderr and "line 2" in r.stderr
        # a SIGHUP anyway: the watcher keeps its configuration and goes on
        proc.send_signal(signal.SIGHUP)
        wait_log("keeping the previous configuration")
        assert proc.poll() is None
        conf.write_text("[upload]\nallow_deletes = false\n")
        proc.send_signal(signal.SIGHUP)
        wait_log("configuration reloaded", 2)
        assert "Traceback" not in log_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    assert not (state / "watch.pid").exists()
    r = subprocess.run(
        [str(BIN), "--state-dir", str(state), "reload"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1 and "no running watcher" in r.stderr


# -- issue 9: what an uploader can do to the watcher ---------------------------------------------

#: the real watcher, with hashing of any file below a `slow` variant held while GATE exists
GATED_WATCHER = """
import os, sys, time
from lxd_image_server.catalog import hashread
real, real_whole, gate = hashread.feed_file, hashread.read_whole, os.environ["TEST_HASH_GATE"]
def wait(f):
    while "/slow/" in f.path and os.path.exists(gate):
        time.sleep(0.05)
def gated(f, *args, **kwargs):
    wait(f)
    return real(f, *args, **kwargs)
def gated_whole(dir_fd, f):
    wait(f)
    return real_whole(dir_fd, f)
hashread.feed_file, hashread.read_whole = gated, gated_whole
from lxd_image_server.cli.root import main
sys.argv[0] = "lxd-image-server"
main()
"""


def start_watcher(tmp_path: Path, *extra: str, env=None, script: str | None = None):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True, exist_ok=True)
    log = open(tmp_path / "watch.log", "w+")  # noqa: SIM115 (closed by stop_watcher)
    prefix = [sys.executable, "-c", script] if script else [str(BIN)]
    proc = subprocess.Popen(
        [*prefix, "--state-dir", str(tmp_path / "state"), "watch", "--root-dir", str(root), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    catalog = Catalog(root)
    deadline = time.monotonic() + DEADLINE
    while not catalog.path.exists():
        assert proc.poll() is None, "watcher died at start"
        assert time.monotonic() < deadline, "watcher never published its first catalog"
        time.sleep(0.02)
    return root, proc, catalog, log


def stop_watcher(proc: subprocess.Popen[bytes], log: IO[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    log.close()
    return text


def move_in_version(root: Path, key: str, seed: int = 0) -> tuple[bytes, bytes]:
    """A complete version, written aside then moved in whole (as the upload app does)."""
    staging = root / "images" / f".staging-{seed}"
    staging.mkdir()
    meta, squash = os.urandom(500 + seed), os.urandom(20_000 + seed)
    (staging / "lxd.tar.xz").write_bytes(meta)
    (staging / "rootfs.squashfs").write_bytes(squash)
    target = root / "images" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return meta, squash


def test_a_version_slow_to_hash_does_not_delay_one_uploaded_after_it(tmp_path):
    """Finding 6: the slow version is hashed outside the lock; the fast one, uploaded later, is
    published first, and the slow one follows once its digests are done."""
    gate = tmp_path / "gate"
    gate.write_text("closed")
    root, proc, catalog, log = start_watcher(
        tmp_path, script=GATED_WATCHER, env={"TEST_HASH_GATE": str(gate)}
    )
    try:
        slow = "busybox/1.35/amd64/slow/20240101_1200"
        fast = "busybox/1.35/amd64/default/20240102_1200"
        move_in_version(root, slow, 1)
        # the watcher has started hashing the slow one (or is about to) ...
        time.sleep(0.5)
        move_in_version(root, fast, 2)
        versions = catalog.wait_for(lambda v: fast in v, "the version uploaded second")
        assert slow not in versions
        gate.unlink()
        catalog.wait_for(lambda v: slow in v and fast in v, "the slow version, once hashed")
        assert proc.poll() is None
    finally:
        text = stop_watcher(proc, log)
    assert "Traceback" not in text


def inotify_watches(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def wait_log(log: IO[str], needle: str, count: int = 1) -> str:
    deadline = time.monotonic() + DEADLINE
    while True:
        log.seek(0)
        text = log.read()
        if text.count(needle) >= count:
            return text
        assert time.monotonic() < deadline, f"never logged {needle!r} {count}x:\n{text[-3000:]}"
        time.sleep(0.05)


def test_junk_directories_cannot_exhaust_watches_flood_the_log_or_grow_memory(tmp_path):
    """Finding 14: thousands of directories that do not fit the layout get no watch and one log
    line each at most; thousands that do fit stop at the watch cap, with one warning; past it,
    periodic rescans still publish (a short interval here)."""
    root, proc, catalog, log = start_watcher(tmp_path, "--rescan-interval", "2")
    img = root / "images"
    try:
        (img / "busybox/1.35/amd64/default").mkdir(parents=True)
        junk = 0
        for i in range(2000):
            os.mkdir(img / f"not a name {i}")  # not a valid os name
            junk += 1
        deep = img / "busybox/1.35/amd64/default/20240101_1200"
        for i in range(200):
            (deep / f"d{i}" / "x" / "y").mkdir(parents=True)  # below a version: never watched
        for i in range(1000):
            os.mkdir(img / "busybox/1.35" / f"arch{i}")  # not an architecture
        for i in range(5000):
            os.mkdir(img / f"os{i}")  # valid names: watched up to the cap
        # two full rescans (SIGHUP), the junk still there
        for n in (1, 2):
            proc.send_signal(signal.SIGHUP)
            wait_log(log, "reloading", n)
        key = "busybox/1.35/amd64/default/20240301_1200"
        move_in_version(root, key)
        catalog.wait_for(lambda v: key in v, "a good version after the junk")
        watches = inotify_watches(proc.pid)
        assert watches <= 4096, watches
        peak = peak_rss_kib(proc.pid)
        assert peak < 150 * 1024, f"peak RSS {peak} KiB"
        assert proc.poll() is None
    finally:
        text = stop_watcher(proc, log)
    lines = text.splitlines()
    assert "Traceback" not in text
    # at most one line per junk directory over three full scans, and one cap warning
    assert len(lines) < junk + 1200 + 100, f"{len(lines)} log lines"
    assert sum("inotify watch" in line and "cap" in line for line in lines) == 1, "\n".join(
        line for line in lines if "cap" in line
    )


def _fifo(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(b"meta")
    os.mkfifo(d / "rootfs.squashfs")


def _socket(d: Path) -> None:
    import socket

    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(b"meta")
    for where, name in ((d, "rootfs.squashfs"), (d.parent, "sock")):
        with contextlib.chdir(where), socket.socket(socket.AF_UNIX) as s:
            s.bind(name)  # relative: the tmp path is longer than a socket address


def _symlinks(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(b"meta")
    (d / "rootfs.squashfs").symlink_to("/etc/passwd")
    (d.parent / "20240505_1200").symlink_to("/etc")
    (d.parent.parent / "loop").symlink_to("loop")
    (d.parent.parent / "cycle").symlink_to(".")
    (d.parent.parent / "dangling").symlink_to("/nonexistent")
    (d.parent.parent.parent.parent / "etc").symlink_to("/etc")


def _unreadable(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(b"meta")
    (d / "rootfs.squashfs").write_bytes(b"root")
    os.chmod(d / "rootfs.squashfs", 0)
    os.chmod(d, 0)
    os.chmod(d.parent, 0)


def _replaced_by_file(d: Path) -> None:
    d.mkdir(parents=True)
    time.sleep(0.5)
    os.rmdir(d)
    os.rmdir(d.parent)
    d.parent.write_bytes(b"now a file")


def _bad_names(d: Path) -> None:
    base = os.fsencode(d.parent.parent)
    for name in (b"ctl\x1b[31m", b"new\nline", b"\xff\xfe", b"caf\xc3\xa9", b"x" * 255):
        os.makedirs(os.path.join(base, name, b"20240101_1200"))
        with open(os.path.join(base, name, b"20240101_1200", b"lxd.tar.xz"), "wb") as f:
            f.write(b"m")
    os.makedirs(os.path.join(os.fsencode(d.parent), b"2024\xff_1200"))
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(b"meta")
    (d / "root\xff.squashfs".encode("utf-8", "surrogateescape").decode()).write_bytes(b"?")
    os.mkdir(os.path.join(os.fsencode(d), b"\xc0\xaf"))


def _churn(d: Path) -> None:
    """Directories created and removed while the watcher scans them."""
    stop = time.monotonic() + 3
    i = 0
    while time.monotonic() < stop:
        v = d.parent / f"2024010{i % 9 + 1}_1200"
        v.mkdir(parents=True, exist_ok=True)
        (v / "lxd.tar.xz").write_bytes(b"m")
        (v / "rootfs.squashfs").write_bytes(b"r")
        shutil.rmtree(v)
        if i % 50 == 0:
            shutil.rmtree(d.parent.parent)
        i += 1


def _overflow(d: Path, proc) -> None:
    """More events than the kernel queues while the watcher cannot read them."""
    d.mkdir(parents=True)
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(limit // 2 + 100):
            p = d / f"f{i}"
            p.write_bytes(b"")
            p.unlink()
    finally:
        proc.send_signal(signal.SIGCONT)


HOSTILE: dict[str, Callable[..., None]] = {
    "fifo": _fifo,
    "socket": _socket,
    "symlinks": _symlinks,
    "unreadable": _unreadable,
    "replaced_by_file": _replaced_by_file,
    "bad_names": _bad_names,
    "churn": _churn,
    "overflow": _overflow,
}


@pytest.mark.parametrize("scenario", sorted(HOSTILE))
def test_nothing_on_disk_stops_the_watcher(tmp_path, scenario):
    """Finding 10: whatever lies in the tree, the watcher keeps running and publishing."""
    root, proc, catalog, log = start_watcher(tmp_path)
    try:
        d = root / "images" / "evil/1/amd64/default/20240101_1200"
        if scenario == "overflow":
            _overflow(d, proc)
        else:
            HOSTILE[scenario](d)
        time.sleep(1)
        key = "busybox/1.35/amd64/default/20240301_1200"
        _, squash = move_in_version(root, key)
        versions = catalog.wait_for(lambda v: key in v, f"a good version after {scenario}")
        assert versions[key]["squashfs"]["sha256"] == sha(squash)
        if scenario != "unreadable" or os.geteuid() != 0:  # root reads mode 000 anyway
            assert not any("evil" in p for p in catalog.seen_paths)
        assert proc.poll() is None, "the watcher died"
    finally:
        for dirpath, dirnames, _ in os.walk(root / "images"):
            for n in dirnames:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(dirpath, n), 0o755)
        text = stop_watcher(proc, log)
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_at_the_watch_cap_a_new_version_takes_the_watch_of_a_quiet_one(tmp_path):
    """Issue 13: a tree of more versions than --max-watches. The directories above the versions
    are watched first, and a version created or moved in takes the watch of the version quiet
    the longest: it is published as soon as it is complete, not once unchanged for a rescan
    interval (an hour here), and the watches stay within the cap."""
    root, proc, catalog, log = start_watcher(
        tmp_path, "--max-watches", "20", "--rescan-interval", "3600"
    )
    img = root / "images"
    try:
        keys = [f"{V}/202401{i // 24 + 1:02d}_{i % 24:02d}00" for i in range(40)]
        for n, key in enumerate(keys):
            move_in_version(root, key, seed=n)
        catalog.wait_for(lambda v: set(keys) <= set(v), "40 versions moved in, past the cap")
        # a version written in place, file by file: its half-written file is never listed
        key = f"{V}/20240303_1200"
        (img / key).mkdir()
        (img / key / "lxd.tar.xz").write_bytes(b"meta")
        write_slowly(img / key / "rootfs.squashfs", os.urandom(60_000))
        versions = catalog.wait_for(lambda v: key in v, f"{key}, written at the cap")
        assert versions[key]["squashfs"]["size"] == 60_000
        assert inotify_watches(proc.pid) <= 20
        assert proc.poll() is None
    finally:
        text = stop_watcher(proc, log)
    assert "Traceback" not in text
