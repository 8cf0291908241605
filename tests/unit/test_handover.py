"""The digests the upload app computed are the ones the catalog writer publishes, without it
reading the bytes again; and nothing an sftp uploader can do makes it publish a digest that
does not match the bytes (tree/handover.py, web/upload_seal.py)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import hashing
from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import Paths
from lxd_image_server.tree import handover
from lxd_image_server.tree.scan import FileStat
from lxd_image_server.web import upload_seal
from lxd_image_server.web.upload import UploadSettings, make_app

from .test_upload import call

VERSION = "busybox/1.35/amd64/default/20240101_12:00"
META, ROOT = b"m" * 3000, os.urandom(3 << 20)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    os.makedirs(p.state.upload_digests)
    return p


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the catalog writer reads to hash them."""
    seen: list[str] = []
    real, real_whole = hashing.hash_file, hashing.read_whole

    def counting(f: FileStat, *args: Any) -> None:
        seen.append(f.name)
        real(f, *args)

    def counting_whole(dir_fd: int, f: FileStat) -> bytes:
        seen.append(f.name)
        return real_whole(dir_fd, f)

    # big files are read by hash_file, small versions whole (read_whole)
    monkeypatch.setattr(hashing, "hash_file", counting)
    monkeypatch.setattr(hashing, "read_whole", counting_whole)
    return seen


def digest_dir(paths: Paths) -> Path:
    return Path(paths.state.upload_digests)


def put(paths: Paths, name: str, data: bytes, digests: bool = True, stream: Any = None) -> None:
    app = make_app(
        UploadSettings(
            img_dir=paths.img_dir,
            allow_anonymous=True,
            allow_overwrites=True,
            digest_dir=str(digest_dir(paths)) if digests else None,
        )
    )
    r = call(
        app, "PUT", f"/images/{VERSION}/{name}", stream=io.BytesIO(data), content_length=len(data)
    )
    assert r.status == 201, r.body


def publish(paths: Paths) -> dict[str, Any]:
    cache = HashCache(None)
    try:
        Pipeline(paths, cache).update_all()
    finally:
        cache.close()
    doc = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    (product,) = doc["products"].values()
    (version,) = product["versions"].values()
    items: dict[str, Any] = version["items"]
    return items


def check(items: dict[str, Any], meta: bytes, root: bytes) -> None:
    """The published digests are those of the bytes on disk."""
    by_name = {Path(i["path"]).name: i for i in items.values()}
    assert by_name["rootfs.squashfs"]["sha256"] == hashlib.sha256(root).hexdigest()
    assert by_name["lxd.tar.xz"]["sha256"] == hashlib.sha256(meta).hexdigest()
    combined = hashlib.sha256(meta + root).hexdigest()
    assert by_name["lxd.tar.xz"]["combined_squashfs_sha256"] == combined


def test_uploaded_digests_are_published_without_reading_the_files(paths, reads):
    put(paths, "lxd.tar.xz", META)
    put(paths, "rootfs.squashfs", ROOT)
    assert len(os.listdir(digest_dir(paths))) == 2
    check(publish(paths), META, ROOT)
    assert reads == [], "the catalog writer read an uploaded file again"
    assert os.listdir(digest_dir(paths)) == [], "used records are removed"


def test_root_before_metadata_is_read_again_for_the_combined(paths, reads):
    put(paths, "rootfs.squashfs", ROOT)
    put(paths, "lxd.tar.xz", META)
    check(publish(paths), META, ROOT)
    assert "rootfs.squashfs" in reads


def test_without_the_directory_nothing_is_handed_over(paths, reads):
    put(paths, "lxd.tar.xz", META, digests=False)
    put(paths, "rootfs.squashfs", ROOT, digests=False)
    assert os.listdir(digest_dir(paths)) == []
    check(publish(paths), META, ROOT)
    assert sorted(reads) == ["lxd.tar.xz", "rootfs.squashfs"]


@pytest.mark.parametrize("target", ["rootfs.squashfs", "lxd.tar.xz"])
def test_rewritten_after_upload_same_size_and_mtime(paths, reads, target):
    """What an sftp uploader can do: rewrite the file in place, keep its size, put its mtime
    back with utimes. The ctime moves, so the record no longer matches."""
    put(paths, "lxd.tar.xz", META)
    put(paths, "rootfs.squashfs", ROOT)
    path = Path(paths.img_dir, VERSION, target)
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(b"EVIL")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    meta = path.read_bytes() if target == "lxd.tar.xz" else META
    root = path.read_bytes() if target == "rootfs.squashfs" else ROOT
    check(publish(paths), meta, root)
    assert target in reads


class Meddler(io.BytesIO):
    """A body during which an sftp uploader rewrites every file it can find in the version
    directory (a named temporary file, in the old way of storing)."""

    def __init__(self, data: bytes, version_dir: Path) -> None:
        super().__init__(data)
        self.version_dir = version_dir
        self.meddled = False

    def read(self, n: int | None = -1) -> bytes:
        out = super().read(n)
        if self.tell() > len(ROOT) // 2 and not self.meddled and self.version_dir.is_dir():
            for p in self.version_dir.iterdir():
                if p.name.startswith(".") and p.is_file():
                    with open(p, "r+b") as f:
                        f.write(b"EVIL")
                    self.meddled = True
        return out


def test_rewritten_while_uploading(paths, reads):
    put(paths, "lxd.tar.xz", META)
    stream = Meddler(ROOT, Path(paths.img_dir, VERSION))
    put(paths, "rootfs.squashfs", ROOT, stream=stream)
    on_disk = Path(paths.img_dir, VERSION, "rootfs.squashfs").read_bytes()
    check(publish(paths), META, on_disk)


def test_rewritten_in_the_same_clock_tick_as_placed(paths, reads, monkeypatch):
    """An sftp uploader that opens the file right after it got its name and rewrites it
    before the ctime moves on: the inotify watch sees the open, nothing is handed over."""
    put(paths, "lxd.tar.xz", META)
    real = upload_seal.wait_past
    path = Path(paths.img_dir, VERSION, "rootfs.squashfs")

    def meddle(ns: int) -> None:
        if path.exists():
            st = path.stat()
            with open(path, "r+b") as f:
                f.write(b"EVIL")
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        real(ns)

    monkeypatch.setattr(upload_seal, "wait_past", meddle)
    put(paths, "rootfs.squashfs", ROOT)
    assert [n for n in os.listdir(digest_dir(paths))] == [
        handover.record_name(_key(Path(paths.img_dir, VERSION, "lxd.tar.xz")))
    ]
    check(publish(paths), META, path.read_bytes())
    assert "rootfs.squashfs" in reads


def _forge(paths: Paths, key: handover.Key, data: bytes) -> None:
    Path(digest_dir(paths), handover.record_name(key)).write_bytes(data)


def _key(path: Path) -> handover.Key:
    return handover.key_of(path.stat())


def _record(key: handover.Key, sha: str) -> dict[str, Any]:
    return {"format": 1, "key": list(key), "sha256": sha, "combined": []}


FORGED: dict[str, Callable[[handover.Key], bytes]] = {
    "garbage": lambda key: b"\x00\xffnot json",
    "huge": lambda key: b" " * (handover.MAX_RECORD + 1),
    "nested": lambda key: b"[" * 3000 + b"]" * 3000,
    "wrong key": lambda key: json.dumps(
        _record((key[0], key[1], key[2], key[3], key[4] + 1), "0" * 64)
    ).encode(),
    "bad digest": lambda key: json.dumps(_record(key, "x" * 64)).encode(),
    "extra field": lambda key: json.dumps({**_record(key, "0" * 64), "more": 1}).encode(),
    "bool in key": lambda key: json.dumps(
        {**_record(key, "0" * 64), "key": [True, *list(key)[1:]]}
    ).encode(),
}


@pytest.mark.parametrize("kind", sorted(FORGED))
def test_forged_record_is_ignored_with_one_log_line(paths, reads, caplog, kind):
    d = Path(paths.img_dir, VERSION)
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(META)
    (d / "rootfs.squashfs").write_bytes(ROOT)
    _forge(paths, _key(d / "rootfs.squashfs"), FORGED[kind](_key(d / "rootfs.squashfs")))
    with caplog.at_level(logging.WARNING, logger="lxd_image_server.tree.handover"):
        check(publish(paths), META, ROOT)
    lines = [r for r in caplog.records if r.name == "lxd_image_server.tree.handover"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "ignoring upload digest" in lines[0].getMessage()
    assert "rootfs.squashfs" in reads
    assert os.listdir(digest_dir(paths)) == []


def test_record_that_is_a_link_or_fifo_is_not_followed(paths, reads, tmp_path):
    d = Path(paths.img_dir, VERSION)
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(META)
    (d / "rootfs.squashfs").write_bytes(ROOT)
    lie = tmp_path / "lie.json"
    lie.write_text(json.dumps(_record(_key(d / "rootfs.squashfs"), "0" * 64)))
    os.symlink(lie, digest_dir(paths) / handover.record_name(_key(d / "rootfs.squashfs")))
    os.mkfifo(digest_dir(paths) / handover.record_name(_key(d / "lxd.tar.xz")))
    check(publish(paths), META, ROOT)
    assert sorted(reads) == ["lxd.tar.xz", "rootfs.squashfs"]


def test_a_valid_record_for_a_copied_file_is_trusted_only_by_identity(paths, reads):
    """The record names the file's identity; a record the upload app wrote for another file
    (other inode) does not apply."""
    put(paths, "lxd.tar.xz", META)
    put(paths, "rootfs.squashfs", ROOT)
    path = Path(paths.img_dir, VERSION, "rootfs.squashfs")
    replacement = os.urandom(len(ROOT))
    tmp = path.with_name(".swap")
    tmp.write_bytes(replacement)
    os.replace(tmp, path)
    check(publish(paths), META, replacement)
    assert "rootfs.squashfs" in reads


@pytest.fixture(autouse=True)
def _no_leftovers(paths: Paths) -> Iterator[None]:
    yield
    hidden = [p for p in Path(paths.img_dir).rglob(".*")]
    assert hidden == [], hidden


# -- issue 18, finding 7c: the metadata tarball read to prime a combined fingerprint -------------


def test_a_metadata_tarball_open_for_writing_is_not_primed(paths, reads):
    """An sftp uploader holds the tarball open for writing, mapped: a write through a page it
    already dirtied moves neither mtime nor ctime (nor does a write in progress after its
    start), so what the upload app read to prime the combined fingerprint is not what ends on
    disk, its identity unchanged. The upload app now primes nothing from a file open for
    writing; the catalog writer computes the combined fingerprint itself."""
    put(paths, "lxd.tar.xz", META)
    meta = Path(paths.img_dir, VERSION, "lxd.tar.xz")
    with open(meta, "r+b") as f, mmap.mmap(f.fileno(), len(META)) as mapped:
        mapped[:4] = b"ONE!"  # the page is dirty and writable from now on
        put(paths, "rootfs.squashfs", ROOT)
        mapped[:4] = b"TWO!"
    check(publish(paths), meta.read_bytes(), ROOT)
    assert "rootfs.squashfs" in reads, "a combined fingerprint was primed from a file being written"


def _lease_breaking(path: Path) -> bool:
    """/proc/locks lists a lease on `path` that an open is breaking."""
    inode = str(path.stat().st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        ours = any(f.count(":") == 2 and f.rsplit(":", 1)[1] == inode for f in fields)
        if ours and "LEASE" in fields and "BREAKING" in fields:
            return True
    return False


def test_a_metadata_tarball_opened_for_writing_while_read_is_not_primed(paths, reads, monkeypatch):
    """Opened for writing while the upload app reads it: its read lease breaks (the opener
    waits until it is let go), and nothing is primed."""
    put(paths, "lxd.tar.xz", META)
    meta = Path(paths.img_dir, VERSION, "lxd.tar.xz")
    real = upload_seal.wait_past
    openers: list[threading.Thread] = []

    def open_for_writing() -> None:
        with open(meta, "r+b"):
            pass

    def meddle(ns: int) -> None:
        if not openers:
            t = threading.Thread(target=open_for_writing)
            t.start()
            openers.append(t)
            deadline = time.monotonic() + 30
            while not _lease_breaking(meta):
                assert time.monotonic() < deadline, "the open never broke the lease"
                time.sleep(0.001)
        real(ns)

    monkeypatch.setattr(upload_seal, "wait_past", meddle)
    put(paths, "rootfs.squashfs", ROOT)
    for t in openers:
        t.join(60)
    assert openers
    check(publish(paths), META, ROOT)
    assert "rootfs.squashfs" in reads


def test_an_imports_digests_are_published_without_reading_the_files(
    paths: Paths, reads: list[str], tmp_path: Path
) -> None:
    """`import` hands over what it computed while copying (ops/import_handover.py): the
    catalog writer (here a pipeline of its own, as the watcher's) reads neither file, and the
    published digests are those of the bytes placed."""
    from lxd_image_server.ops.import_detect import plan_import
    from lxd_image_server.ops.import_handover import hand_over_placed
    from lxd_image_server.ops.import_place import place

    from .test_importer import split_export

    files = split_export(tmp_path / "export")
    placed = place(
        plan_import([str(f) for f in files]),
        paths.img_dir,
        on_filled=lambda fd, p: hand_over_placed(paths, fd, p),
    )
    assert len(os.listdir(digest_dir(paths))) == 2
    items = publish(paths)
    assert reads == []
    meta = Path(placed.version_dir, "lxd.tar.xz").read_bytes()
    root = Path(placed.version_dir, "rootfs.squashfs").read_bytes()
    check(items, meta, root)
    assert os.listdir(digest_dir(paths)) == []  # taken


def test_an_import_without_the_records_directory_makes_it(
    paths: Paths, reads: list[str], tmp_path: Path
) -> None:
    from lxd_image_server.ops.import_detect import plan_import
    from lxd_image_server.ops.import_handover import hand_over_placed
    from lxd_image_server.ops.import_place import place

    from .test_importer import split_export

    digest_dir(paths).rmdir()
    files = split_export(tmp_path / "export")
    place(
        plan_import([str(f) for f in files]),
        paths.img_dir,
        on_filled=lambda fd, p: hand_over_placed(paths, fd, p),
    )
    assert oct(digest_dir(paths).stat().st_mode & 0o777) == "0o700"
    publish(paths)
    assert reads == []
