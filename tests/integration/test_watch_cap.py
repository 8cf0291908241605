"""Issue 17: the watcher never unpublishes what is on disk, whatever the size of the tree.

A tree with more directories than the inotify watch cap is published by `update`, then the
watcher starts on it, as the package starts it at boot, at every upgrade and every restart. A
monitor reads images.json at every publish (an inotify watch on streams/v1: each rename of
images.json into place is read at once) from before the start until two periodic rescans
have passed, and checks that no catalog ever listed fewer versions than are on disk.

Every file's ctime is made fresh just before the watcher starts, as the package's postinst
does when it chowns the tree at an upgrade: today's watcher took such files in directories
without a watch for uploads in progress and left their versions out.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from inotify_simple import INotify, flags

from .test_watch import BIN, DEADLINE, move_in_version, start_watcher, stop_watcher

BASE = dt.datetime(2024, 1, 1, 0, 0)
#: the watcher's rescan interval in these tests (seconds): short, so two rescans pass quickly
INTERVAL = 3.0
#: debug logging: the watcher says when it rescans the whole tree
DEBUG = {"DEBUG": "1"}


def serial(n: int) -> str:
    return (BASE + dt.timedelta(hours=n)).strftime("%Y%m%d_%H%M")


def build_tree(img: Path, products: int, versions: int) -> set[str]:
    """products x versions tiny split versions (the same two files' contents in each)."""
    keys: set[str] = set()
    for p in range(products):
        for v in range(versions):
            key = f"busybox/1.35/amd64/v{p}/{serial(v)}"
            d = img / key
            d.mkdir(parents=True)
            (d / "lxd.tar.xz").write_bytes(b"meta %d %d" % (p, v))
            (d / "rootfs.squashfs").write_bytes(b"root %d %d" % (p, v))
            keys.add(key)
    return keys


def refresh_ctimes(img: Path) -> None:
    """What postinst's chown does to every file at an upgrade: a new ctime, same contents."""
    for dirpath, _, files in os.walk(img):
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)


def listed_versions(doc: dict[str, object]) -> set[str]:
    """The version directories (relative to images/) a catalog lists."""
    out: set[str] = set()
    products = doc.get("products", {})
    assert isinstance(products, dict)
    for product in products.values():
        for version in product["versions"].values():
            for item in version["items"].values():
                out.add(item["path"].removeprefix("images/").rpartition("/")[0])
    return out


class PublishMonitor:
    """Reads images.json at every rename into place (inotify on streams/v1) and remembers the
    version set each publish listed."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "streams" / "v1"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.inotify = INotify()
        self.inotify.add_watch(self.dir, flags.MOVED_TO | flags.CLOSE_WRITE)
        self.seen: list[set[str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> None:
        try:
            doc = json.loads((self.dir / "images.json").read_bytes())
        except FileNotFoundError:
            return
        except ValueError as e:
            self.errors.append(f"torn images.json: {e}")
            return
        self.seen.append(listed_versions(doc))

    def _run(self) -> None:
        while not self._stop.is_set():
            events = self.inotify.read(timeout=100)
            if any(e.name == "images.json" for e in events):
                self.read()

    def __enter__(self) -> PublishMonitor:
        self.read()  # the catalog as the watcher finds it
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.inotify.close()

    def assert_never_fewer(self, on_disk: set[str]) -> None:
        assert not self.errors, self.errors
        assert self.seen, "no catalog was read"
        for n, listed in enumerate(self.seen):
            missing = on_disk - listed
            assert not missing, (
                f"publish {n} of {len(self.seen)} listed {len(listed)} versions; "
                f"{len(missing)} on disk missing, e.g. {sorted(missing)[:3]}"
            )


def update(tmp_path: Path, root: Path, *extra: str, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(
        [BIN, "--state-dir", tmp_path / "state", "update", "--root-dir", root, *extra],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr


def wait_rescans(log: IO[str], count: int) -> None:
    """Waits until the watcher has rescanned the whole tree `count` times (its debug line)."""
    deadline = time.monotonic() + DEADLINE + count * INTERVAL
    while True:
        log.seek(0)
        if log.read().count("rescanning the whole tree (") >= count:
            return
        assert time.monotonic() < deadline, f"fewer than {count} rescans"
        time.sleep(0.1)


@pytest.fixture
def over_cap(tmp_path: Path) -> Iterator[tuple[Path, set[str]]]:
    root = tmp_path / "root"
    keys = build_tree(root / "images", products=20, versions=15)  # 300 versions, 324 dirs
    update(tmp_path, root)
    yield root, keys


def test_start_over_the_cap_never_lists_fewer_versions_than_on_disk(
    tmp_path: Path, over_cap: tuple[Path, set[str]]
) -> None:
    root, keys = over_cap
    refresh_ctimes(root / "images")
    with PublishMonitor(root) as monitor:
        root, proc, _, log = start_watcher(
            tmp_path, "--max-watches", "40", "--rescan-interval", str(INTERVAL), env=DEBUG
        )
        try:
            wait_rescans(log, 2)
            # a version moved in still appears (it takes the watch of a quiet one)
            new = f"busybox/1.35/amd64/v3/{serial(500)}"
            move_in_version(root, new)
            keys.add(new)
            deadline = time.monotonic() + DEADLINE
            while not monitor.seen or new not in monitor.seen[-1]:
                assert time.monotonic() < deadline, "the new version was never listed"
                time.sleep(0.05)
        finally:
            text = stop_watcher(proc, log)
    assert "Traceback" not in text
    # (the new version may be found by a rescan before its files are: it was never listed)
    held = [line for line in text.splitlines() if "has no files" in line and new not in line]
    assert not held, held[:3]
    monitor.assert_never_fewer(keys - {new})
    assert monitor.seen[-1] == keys


def test_a_file_added_to_an_unwatched_version_is_listed_after_rescans(
    tmp_path: Path, over_cap: tuple[Path, set[str]]
) -> None:
    """A new root under a version directory without a watch: published by a rescan once it has
    been quiet for a rescan interval (nothing tells the watcher it is complete before)."""
    root, _ = over_cap
    root, proc, catalog, log = start_watcher(
        tmp_path, "--max-watches", "40", "--rescan-interval", str(INTERVAL), env=DEBUG
    )
    try:
        old = f"busybox/1.35/amd64/v0/{serial(0)}"  # the oldest: never watched
        (root / "images" / old / "rootfs.tar.xz").write_bytes(b"a second root")
        start = time.monotonic()
        items = catalog.wait_for(
            lambda v: "root.tar.xz" in {i["ftype"] for i in v.get(old, {}).values()},
            "the root added to an unwatched version",
        )
        waited = time.monotonic() - start
        assert len(items) >= 3
        assert waited <= 2 * INTERVAL + DEADLINE
    finally:
        text = stop_watcher(proc, log)
    assert "Traceback" not in text


def test_default_cap_start_lists_every_version(tmp_path: Path) -> None:
    """The same at the default cap (4096 watches): 4,200 versions."""
    root = tmp_path / "root"
    keys = build_tree(root / "images", products=42, versions=100)
    update(tmp_path, root)
    refresh_ctimes(root / "images")
    with PublishMonitor(root) as monitor:
        root, proc, _, log = start_watcher(tmp_path, "--rescan-interval", str(INTERVAL), env=DEBUG)
        try:
            wait_rescans(log, 2)
        finally:
            text = stop_watcher(proc, log)
    assert "inotify watch cap (4096) reached" in text
    assert "has no files" not in text, text[-3000:]
    monitor.assert_never_fewer(keys)
    assert monitor.seen[-1] == keys


def test_junk_flood_during_start_unpublishes_nothing(
    tmp_path: Path, over_cap: tuple[Path, set[str]]
) -> None:
    """Issue 9's attack at the same time: thousands of directories with valid names (each
    would take a watch) and junk ones appear while the watcher starts."""
    root, keys = over_cap
    refresh_ctimes(root / "images")
    img = root / "images"
    with PublishMonitor(root) as monitor:

        def flood() -> None:
            for i in range(1500):
                os.makedirs(img / f"junk{i}" / "1.0", exist_ok=True)  # valid names
                os.makedirs(img / f"not a name {i}", exist_ok=True)

        flooder = threading.Thread(target=flood)
        flooder.start()
        root, proc, _, log = start_watcher(
            tmp_path, "--max-watches", "60", "--rescan-interval", str(INTERVAL), env=DEBUG
        )
        try:
            flooder.join()
            wait_rescans(log, 2)
        finally:
            text = stop_watcher(proc, log)
    assert "Traceback" not in text
    monitor.assert_never_fewer(keys)
    assert monitor.seen[-1] == keys


def test_watcher_killed_during_publishes_and_restarted_unpublishes_nothing(
    tmp_path: Path, over_cap: tuple[Path, set[str]]
) -> None:
    """SIGKILL at any moment of a publish (versions keep arriving), then a restart: every
    catalog any client could read lists everything that was on disk before."""
    root, keys = over_cap
    base = set(keys)
    added = 0
    with PublishMonitor(root) as monitor:
        for round_ in range(4):
            refresh_ctimes(root / "images")
            root, proc, _, log = start_watcher(
                tmp_path, "--max-watches", "40", "--rescan-interval", str(INTERVAL)
            )
            try:
                for _ in range(3):
                    added += 1
                    key = f"busybox/1.35/amd64/v{added % 20}/{serial(1000 + added)}"
                    move_in_version(root, key, seed=added)
                    keys.add(key)
                time.sleep(0.05 * round_)  # a different moment of the publish each round
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            finally:
                text = stop_watcher(proc, log)
            assert "Traceback" not in text
        root, proc, catalog, log = start_watcher(
            tmp_path, "--max-watches", "40", "--rescan-interval", str(INTERVAL)
        )
        try:
            catalog.wait_for(lambda v: keys <= set(v), "every version after the restarts")
        finally:
            stop_watcher(proc, log)
    monitor.assert_never_fewer(base)
    assert monitor.seen[-1] == keys


class MirrorGuard(threading.Thread):
    """Checks, as often as it can, that every file the mirror held at the start is still
    there, as the same file (same inode: not deleted and copied again)."""

    def __init__(self, root: Path, files: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.files = files
        self.violations: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.01):
            for rel, inode in self.files.items():
                try:
                    now = os.lstat(self.root / rel).st_ino
                except FileNotFoundError:
                    self.violations.append(f"deleted on the mirror: {rel}")
                    return
                if now != inode:
                    self.violations.append(f"copied to the mirror again: {rel}")
                    return


def mirror_files(root: Path) -> dict[str, int]:
    img = root / "images"
    return {str(p.relative_to(root)): p.lstat().st_ino for p in img.rglob("*") if p.is_file()}


def test_a_mirror_loses_and_receives_nothing_when_the_watcher_starts(
    tmp_path: Path, over_cap: tuple[Path, set[str]], label: str
) -> None:
    """The same start with a mirror attached over Debian's sshd and rsync: the mirror deletes
    whatever the catalog it receives does not list, so a shrunken catalog deleted images there
    (and the next push copied them all again)."""
    from .test_mirror import prepared_mirror

    root, keys = over_cap
    with prepared_mirror(f"lisw{label}", label) as (mroot, key, sshd):
        sshd.start()
        config = tmp_path / "config.toml"
        config.write_text(
            "[mirrors.m1]\n"
            'remote = "127.0.0.1"\n'
            f'user = "lisw{label}"\n'
            f'key_path = "{key}"\n'
            f"port = {sshd.port}\n"
            f'path = "{mroot}"\n'
        )
        env = {"LXD_IMAGE_SERVER_CONFIG": str(config)}
        update(tmp_path, root, env=env)  # publishes (nothing new) and pushes everything
        files = mirror_files(mroot)
        assert len(files) == 2 * len(keys)
        refresh_ctimes(root / "images")
        guard = MirrorGuard(mroot, files)
        guard.start()
        root, proc, _, log = start_watcher(
            tmp_path, "--max-watches", "40", "--rescan-interval", str(INTERVAL), env=env | DEBUG
        )
        try:
            wait_rescans(log, 2)
            new = f"busybox/1.35/amd64/v7/{serial(700)}"
            move_in_version(root, new)
            deadline = time.monotonic() + DEADLINE
            while not (mroot / "images" / new / "rootfs.squashfs").exists():
                assert time.monotonic() < deadline, "the new version never reached the mirror"
                time.sleep(0.05)
        finally:
            guard.stop_event.set()
            guard.join(10)
            text = stop_watcher(proc, log)
    assert "Traceback" not in text
    assert not guard.violations, guard.violations
