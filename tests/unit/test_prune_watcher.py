"""`prune` with a watcher running: it chooses from the record of the last publish
(catalog/published.py), checked against the disk product by product, and hands the versions
chosen to the watcher (ops/pruning.py prune_by_watcher). The dangerous cases first: a record
that no longer says what is on disk, a damaged record, a peer on the socket that is not the
watcher. Each must end in the whole-tree path (`prune` with a pipeline of its own) or in a
publish of its own, never in a wrong version pruned.

The watcher here is the real request server in a thread, publishing with a real Pipeline
(`FakeWatcher`); the watcher process itself: tests/integration/test_import_watch.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lxd_image_server.catalog import publish_requests as pr
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.listed import listed_among
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.publish_server import RequestServer
from lxd_image_server.catalog.retention import load, state_path
from lxd_image_server.config import Paths
from lxd_image_server.ops.pruning import Outcome, WatcherListsThem, prune, prune_by_watcher

from .helpers import blob, version_dir, write

HOUR = 3600
NOW = 1_800_000_000.0
P1 = "busybox:1.35:amd64:default"
P2 = "busybox:1.35:amd64:other"
P3 = "alpine:3.19:amd64:default"
SERIALS = ["20240101_1200", "20240102_1200", "20240103_1200", "20240104_1200"]


def add_version(img: Path, product: str, serial: str, complete: bool = True) -> Path:
    os_, release, arch, variant = product.split(":")
    d = version_dir(img, os_, release, arch, variant, serial)
    seed = sum(map(ord, product + serial))
    write(d / "lxd.tar.xz", blob(100, seed))
    if complete:
        write(d / "rootfs.squashfs", blob(300, seed + 1))
    return d


def rel(product: str, serial: str) -> str:
    return f"{product.replace(':', '/')}/{serial}"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    os.makedirs(p.state_dir)
    return p


@pytest.fixture
def pipeline(paths: Paths) -> Iterator[Pipeline]:
    cache = HashCache(None)
    yield Pipeline(paths, cache)
    cache.close()


@pytest.fixture
def tree(paths: Paths, pipeline: Pipeline) -> Paths:
    """P1 with 4 versions, P2 with 1, P3 with 3; published once (the record written)."""
    img = Path(paths.img_dir)
    for s in SERIALS:
        add_version(img, P1, s)
    add_version(img, P2, SERIALS[0])
    for s in SERIALS[:3]:
        add_version(img, P3, s)
    pipeline.update_all()
    assert os.path.exists(paths.state.published)
    return paths


def published(paths: Paths) -> dict[str, list[str]]:
    doc = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    return {k: sorted(p["versions"]) for k, p in doc["products"].items()}


def _hidden(pid: int) -> bytes:
    raise FileNotFoundError(f"/proc/{pid}/cmdline")


class FakeWatcher:
    """The watcher's side, in a thread of this process: the real request server; each request
    is published with a real Pipeline (its versions rescanned), then answered with what the
    catalog lists, or (`lying`) with every version listed. /proc is made to hide this process
    (as another unit's sandbox does), so the pid file may name it."""

    def __init__(self, paths: Paths, pipeline: Pipeline, lying: bool = False) -> None:
        self.paths, self.pipeline, self.lying = paths, pipeline, lying
        self.requests: list[list[str]] = []
        self.server = RequestServer(paths.state.publish_socket, paths.img_dir)
        Path(paths.state.watch_pid).write_text(f"{os.getpid()}\n")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.server.fileno()], [], [], 0.05)
            if not ready:
                continue
            wanted = self.server.handle()
            if not wanted:
                continue
            self.requests.append(wanted)
            if self.lying:
                self.server.answer(set(wanted), busy=False, img_dir=self.paths.img_dir)
                continue
            self.pipeline.refresh(wanted)
            listed = listed_among(self.pipeline.products, self.server.wanted())
            self.server.answer(listed, busy=False, img_dir=self.paths.img_dir)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


@pytest.fixture
def watcher(
    tree: Paths, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeWatcher]:
    monkeypatch.setattr(pr, "_cmdline", _hidden)
    w = FakeWatcher(tree, pipeline)
    try:
        yield w
    finally:
        w.close()


def never(*_: object) -> None:
    raise AssertionError("published by itself although the watcher took the request")


def full_choice(paths: Paths, keep: int) -> list[tuple[str, str]]:
    """What `prune` over the whole tree (a pipeline of its own) would choose."""
    cache = HashCache(None)
    try:
        return prune(Pipeline(paths, cache), keep, HOUR, dry_run=True).would
    finally:
        cache.close()


def by_record(paths: Paths, keep: int, **kw: object) -> Outcome | None:
    publish_here: Callable[[], object] = kw.pop("publish_here", never)  # type: ignore[assignment]
    return prune_by_watcher(paths, keep, HOUR, publish_here, now=NOW, **kw)  # type: ignore[arg-type]


# -- the record path ----------------------------------------------------------------------------


def test_the_watcher_publishes_what_the_record_path_chooses(
    tree: Paths, watcher: FakeWatcher
) -> None:
    expected = full_choice(tree, 2)
    assert expected == [(P3, SERIALS[0]), (P1, SERIALS[0]), (P1, SERIALS[1])]
    outcome = by_record(tree, 2)
    assert outcome is not None and outcome.by_watcher
    assert sorted((p.product, p.serial) for p in outcome.scheduled) == sorted(expected)
    # one request, naming exactly the versions chosen
    assert [sorted(r) for r in watcher.requests] == [sorted(rel(p, s) for p, s in expected)]
    assert published(tree) == {P1: SERIALS[2:], P2: SERIALS[:1], P3: SERIALS[1:3]}
    assert {e.path for e in load(tree.state_dir)} == {
        os.path.join(tree.img_dir, rel(p, s)) for p, s in expected
    }
    # pruned once: the next prune finds nothing, and sends nothing
    again = by_record(tree, 2)
    assert again is not None and again.scheduled == [] and again.already == []
    assert len(watcher.requests) == 1


def test_dry_run_asks_nothing_and_records_nothing(tree: Paths, watcher: FakeWatcher) -> None:
    outcome = by_record(tree, 1, dry_run=True)
    assert outcome is not None
    assert sorted(outcome.would) == sorted(full_choice(tree, 1))
    assert watcher.requests == []
    assert not os.path.exists(state_path(tree.state_dir))


def test_without_a_watcher_the_full_path_is_taken(tree: Paths) -> None:
    assert by_record(tree, 1) is None
    assert not os.path.exists(state_path(tree.state_dir))


def test_grace_zero_deletes_through_the_watcher(tree: Paths, watcher: FakeWatcher) -> None:
    old = Path(tree.img_dir, rel(P1, SERIALS[0]))
    outcome = prune_by_watcher(tree, 3, 0, never, now=NOW)
    assert outcome is not None
    assert [p.path for p in outcome.deleted] == [str(old)]
    assert not old.exists()
    assert published(tree)[P1] == SERIALS[1:]


def test_a_version_published_after_the_newest_stays(
    paths: Paths,
    pipeline: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The arrivals rule, as `prune` over the whole tree applies it: an old serial published
    after the newest one is not pushed out by it (and the operator is told)."""
    img = Path(paths.img_dir)
    add_version(img, P1, SERIALS[3])
    add_version(img, P1, SERIALS[2])
    os.utime(img / rel(P1, SERIALS[2]) / "lxd.tar.xz")  # (ctime moves on: later than the newest)
    pipeline.update_all()
    monkeypatch.setattr(pr, "_cmdline", _hidden)
    w = FakeWatcher(paths, pipeline)
    try:
        caplog.set_level(logging.WARNING)
        outcome = by_record(paths, 1)
    finally:
        w.close()
    assert outcome is not None and outcome.scheduled == []
    assert f"{P1} {SERIALS[2]} stays: it was published after {SERIALS[3]}" in caplog.text
    assert w.requests == []


# -- the record cannot be trusted: the whole tree decides ---------------------------------------


def test_a_record_naming_versions_gone_from_disk_is_not_used(
    tree: Paths, watcher: FakeWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """The newest version of P1 deleted, the watcher not yet told: choosing from the record
    (4 versions, keep 3) would prune the oldest, which the tree (3 versions) keeps."""
    shutil.rmtree(Path(tree.img_dir, rel(P1, SERIALS[3])))
    caplog.set_level(logging.INFO)
    assert by_record(tree, 3) is None
    assert "the record of the last publish" in caplog.text and "whole tree" in caplog.text
    assert not os.path.exists(state_path(tree.state_dir))
    assert watcher.requests == []
    assert full_choice(tree, 3) == []


@pytest.mark.parametrize(
    "change",
    ["a file rewritten", "a file deleted", "a version not yet published", "another tree's record"],
)
def test_a_stale_record_is_not_used(
    tree: Paths,
    watcher: FakeWatcher,
    tmp_path: Path,
    change: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    img = Path(tree.img_dir)
    if change == "a file rewritten":  # (its size changed)
        write(img / rel(P1, SERIALS[3]) / "rootfs.squashfs", blob(50, 1))
    elif change == "a file deleted":  # the newest no longer complete: it will leave
        os.unlink(img / rel(P1, SERIALS[3]) / "rootfs.squashfs")
    elif change == "a version not yet published":
        add_version(img, P1, "20240105_1200")
    else:  # two trees sharing a state directory: the other tree published last
        other = Paths.resolve(str(tmp_path / "other"), state_dir=tree.state_dir)
        for s in ["20230101_1200", *SERIALS]:
            add_version(Path(other.img_dir), P1, s)
        cache = HashCache(None)
        Pipeline(other, cache).update_all()
        cache.close()
        shutil.rmtree(img / rel(P1, SERIALS[3]))
    caplog.set_level(logging.INFO, logger="lxd_image_server")
    assert by_record(tree, 3) is None
    # (said once; not a warning: the watcher publishes such a change a moment later)
    said = [r for r in caplog.records if "the record of the last publish" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO], caplog.text
    assert "is not the tree" in said[0].getMessage() and "whole tree" in said[0].getMessage()
    assert not os.path.exists(state_path(tree.state_dir))
    assert watcher.requests == []


@pytest.mark.parametrize(
    "record",
    [
        b"garbage",
        b"",
        b'{"format": 2, "updated": "Mon, 01 Jan 2024 12:00:00 +0000"}\n',
        b'{"format": 1, "updated": "x"}\n["images/../../etc", {"passwd": 1}]\n',
        b'{"format": 1, "updated": "x"}\n["images/busybox/1.35/amd64/default", {"a": 1}]\n',
        b'{"format": 1, "updated": "x"}\n["elsewhere/busybox/1.35/amd64/default/20240101_1200",'
        b' {"lxd.tar.xz": 100}]\n',
        b'{"format": 1, "updated": "x"}\n["images/busybox/1.35/amd64/default/20240101_1200", '
        b'{"lxd.tar.xz": -1}]\n["images/busybox/1.35/amd64/default/20240102_1200", '
        b'{"lxd.tar.xz": 1}]\n',
        b'{"format": 1, "updated": "x"}\n["images/busybox/1.35/amd64/default/20240101_1200", '
        b'{"lxd.tar.xz": 100}]\n["images/busybox/1.35/amd64/default/29991301_1200", '
        b'{"lxd.tar.xz": 1}]\n',
        b'{"format": 1, "updated": "x"}\n["images/busybox/1.35/amd64/default/20240101_1200", '
        b'{"lxd.tar.xz": 100}]\n["images/busybox/1.35/amd64/default/20240102_1200", '
        b'{"lxd.tar.xz": 1}',
        b'{"format": 1, "updated": "x"}\n' + b"[" * 100_000 + b"\n",
    ],
    ids=[
        "garbage",
        "empty",
        "format",
        "dot-dot",
        "not-a-version",
        "outside-images",
        "negative-size",
        "bad-serial",
        "truncated",
        "deep",
    ],
)
def test_a_damaged_record_is_not_used(
    tree: Paths, watcher: FakeWatcher, caplog: pytest.LogCaptureFixture, record: bytes
) -> None:
    Path(tree.state.published).write_bytes(record)
    caplog.set_level(logging.INFO, logger="lxd_image_server")
    assert by_record(tree, 1) is None
    said = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, caplog.text
    assert not os.path.exists(state_path(tree.state_dir))
    assert watcher.requests == []


def test_a_record_that_is_a_link_is_not_followed(tree: Paths, watcher: FakeWatcher) -> None:
    real = Path(tree.state_dir, "elsewhere.json")
    os.rename(tree.state.published, real)
    os.symlink(real, tree.state.published)
    assert by_record(tree, 1) is None
    assert watcher.requests == []


def test_a_record_too_large_is_not_read(
    tree: Paths, watcher: FakeWatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lxd_image_server.catalog import published as published_record

    monkeypatch.setattr(published_record, "MAX_RECORD_BYTES", 100)
    assert by_record(tree, 1) is None
    assert watcher.requests == []


# -- the channel ---------------------------------------------------------------------------------


class Published:
    """publish_here: the whole tree published, by a pipeline of our own."""

    def __init__(self, paths: Paths) -> None:
        self.paths, self.calls = paths, 0

    def __call__(self) -> None:
        self.calls += 1
        cache = HashCache(None)
        Pipeline(self.paths, cache).update_all()
        cache.close()


def test_a_listener_that_is_not_the_watcher_is_not_asked(tree: Paths, pipeline: Pipeline) -> None:
    """The pid file names a live process that is not the socket's listener: the versions are
    recorded, and the command publishes them out by itself."""
    srv = RequestServer(tree.state.publish_socket, tree.img_dir)
    # a live process that is not the listener, with "watch" in its argv
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "watch"])
    try:
        while not Path(f"/proc/{child.pid}/cmdline").read_bytes():
            time.sleep(0.01)  # (its exec not complete yet)
        Path(tree.state.watch_pid).write_text(f"{child.pid}\n")
        assert pr.running_watcher(tree.state.watch_pid) == child.pid
        here = Published(tree)
        outcome = by_record(tree, 2, publish_here=here)
    finally:
        child.kill()
        child.wait()
        srv.close()
    assert outcome is not None and here.calls == 1 and not outcome.by_watcher
    assert published(tree) == {P1: SERIALS[2:], P2: SERIALS[:1], P3: SERIALS[1:3]}


@pytest.mark.parametrize(
    "answer",
    [b"garbage\n", b'{"error": "busy"}\n', b"[" * 300_000, b'{"listed": [], "missing": 5}\n'],
)
def test_a_peer_answering_nonsense_leaves_the_publish_to_us(
    tree: Paths, monkeypatch: pytest.MonkeyPatch, answer: bytes
) -> None:
    monkeypatch.setattr(pr, "_cmdline", _hidden)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(tree.state.publish_socket)
    listener.listen(1)
    Path(tree.state.watch_pid).write_text(f"{os.getpid()}\n")

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):  # (it stopped reading: too much)
                conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    here = Published(tree)
    try:
        outcome = by_record(tree, 2, publish_here=here)
    finally:
        t.join(10)
        listener.close()
    assert outcome is not None and here.calls == 1 and not outcome.by_watcher
    assert published(tree) == {P1: SERIALS[2:], P2: SERIALS[:1], P3: SERIALS[1:3]}


def test_a_watcher_that_still_lists_them_is_an_error(
    tree: Paths, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pr, "_cmdline", _hidden)
    w = FakeWatcher(tree, pipeline, lying=True)
    try:
        with pytest.raises(WatcherListsThem, match=rel(P1, SERIALS[0])):
            by_record(tree, 3)
    finally:
        w.close()


def test_more_versions_than_a_request_takes_are_published_here(
    tree: Paths, watcher: FakeWatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pr, "MAX_VERSIONS", 2)
    here = Published(tree)
    outcome = by_record(tree, 2, publish_here=here)
    assert outcome is not None and len(outcome.scheduled) == 3
    assert here.calls == 1 and watcher.requests == []
    assert published(tree) == {P1: SERIALS[2:], P2: SERIALS[:1], P3: SERIALS[1:3]}
