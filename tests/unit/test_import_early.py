"""`import` of one image starts its root's copy before the command line is parsed
(cli/early.py, ops/import_early.py): the copy is used only if it is the plan's root, every
digest published is of the bytes in the tree whatever happens to the sources meanwhile, and
nothing of an unused copy is left behind."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from lxd_image_server.cli import early as cli_early
from lxd_image_server.ops import import_early, import_place
from lxd_image_server.ops.import_detect import plan_import
from lxd_image_server.ops.import_early import EarlyRoot
from lxd_image_server.ops.import_place import Placed, place

from .helpers import sha
from .test_importer import VERSION, meta_tarball, metadata_yaml, unified_tarball

ROOT_SIZE = 3 * import_early.EARLY_FROM + 12345


def squashfs(path: Path, fill: int = 1) -> Path:
    path.write_bytes(b"hsqs" + os.urandom(ROOT_SIZE - 4 - 1) + bytes([fill]))
    return path


def split(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return meta_tarball(directory / "meta.tar.xz"), squashfs(directory / "root.squashfs")


Start = Callable[[tuple[Path, ...], Path], EarlyRoot]


@pytest.fixture(params=["process", "thread"])
def started(request: pytest.FixtureRequest) -> Start:
    """Starts the copy of `files` into `img`: in a child process (the command has no other
    thread), or in a thread (it has: here one waiting while the copy starts)."""

    def start(files: tuple[Path, ...], img: Path) -> EarlyRoot:
        early = EarlyRoot([str(f) for f in files], lambda: str(img))
        if request.param == "process":
            return early.start()
        release = threading.Event()
        other = threading.Thread(target=release.wait)
        other.start()
        try:
            return early.start()
        finally:
            release.set()
            other.join()

    return start


def finished(early: EarlyRoot) -> EarlyRoot:
    """The copy, complete (as when the command reaches the root after it), if it started."""
    if early._thread is not None:
        early._thread.join()
    if early._pid > 0:
        early._wait_child(lambda n: None)
    return early


def assert_of_the_tree(img: Path, placed: Placed) -> None:
    """Every digest recorded is of the bytes now in the tree."""
    d = img / VERSION
    for name, (size, digest) in placed.files.items():
        data = (d / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), name
    if "rootfs.squashfs" in placed.files:
        meta, root = (d / "lxd.tar.xz").read_bytes(), (d / "rootfs.squashfs").read_bytes()
        assert placed.fingerprint == sha(meta, root)


def hidden(img: Path) -> list[str]:
    return [p.name for p in img.rglob(".import*")] if img.exists() else []


def place_with(
    files: tuple[Path, ...], img: Path, early: EarlyRoot, caplog: pytest.LogCaptureFixture
) -> tuple[Placed, bool]:
    """(placed, whether the early copy was used)"""
    with caplog.at_level(logging.DEBUG, logger=import_place.__name__):
        placed = place(plan_import([str(f) for f in files]), str(img), early=early)
    early.close()
    return placed, "its copy started with the command is used" in caplog.text


def test_the_copy_is_used_and_its_digests_are_the_trees(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    files = split(tmp_path / "src")
    img = tmp_path / "tree" / "images"
    placed, used = place_with(files, img, started(files, img), caplog)
    assert used
    assert_of_the_tree(img, placed)
    root = img / VERSION / "rootfs.squashfs"
    assert root.read_bytes() == files[1].read_bytes()
    assert stat.S_IMODE(root.stat().st_mode) == import_place.FILE_MODE == import_early.FILE_MODE
    assert hidden(img) == []


def test_a_unified_tarball_is_copied_early_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tarball = unified_tarball(src / "u.tar.gz")
    with open(tarball, "ab") as f:  # (trailing bytes: past the early copy's threshold)
        f.write(os.urandom(ROOT_SIZE))
    img = tmp_path / "images"
    placed, used = place_with((tarball,), img, started((tarball,), img), caplog)
    assert used
    assert_of_the_tree(img, placed)
    (name,) = placed.files
    assert placed.fingerprint == placed.files[name][1] == sha(tarball.read_bytes())


def test_a_root_rewritten_after_its_copy_is_copied_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    """The attack: the root's bytes change (same size) once the early copy has them."""
    files = split(tmp_path / "src")
    img = tmp_path / "images"
    early = finished(started(files, img))
    files[1].write_bytes(files[1].read_bytes()[:-1] + b"\x02")
    placed, used = place_with(files, img, early, caplog)
    assert not used
    assert_of_the_tree(img, placed)
    assert (img / VERSION / "rootfs.squashfs").read_bytes() == files[1].read_bytes()


def test_a_rewrite_that_hides_its_time_still_publishes_the_trees_digests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    """Same size, the modification time put back: the copy is taken for the file's, and what
    is published is what the copy holds, with its digests (never the digest of other bytes)."""
    files = split(tmp_path / "src")
    img = tmp_path / "images"
    before = files[1].stat()
    early = finished(started(files, img))
    files[1].write_bytes(files[1].read_bytes()[:-1] + b"\x02")
    os.utime(files[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    placed, _ = place_with(files, img, early, caplog)
    assert_of_the_tree(img, placed)


def test_metadata_rewritten_after_the_copy_started_is_not_in_its_fingerprint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    files = split(tmp_path / "src")
    img = tmp_path / "images"
    early = finished(started(files, img))
    meta_tarball(files[0], metadata_yaml() + "# rewritten\n")
    placed, used = place_with(files, img, early, caplog)
    assert not used
    assert_of_the_tree(img, placed)


def test_a_copy_of_other_files_is_not_used_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    img = tmp_path / "tree" / "images"
    other = split(tmp_path / "other")
    early = finished(started(other, img))
    assert hidden(img) != []  # (the copy, in images/, hidden)
    files = split(tmp_path / "src")
    placed, used = place_with(files, img, early, caplog)
    assert not used
    assert_of_the_tree(img, placed)
    assert hidden(img) == []


def test_an_unused_copy_removes_the_directories_it_made(tmp_path: Path, started: Start) -> None:
    files = split(tmp_path / "src")
    img = tmp_path / "tree" / "images"
    finished(started(files, img)).close()
    assert not (tmp_path / "tree").exists()


def test_close_stops_a_running_copy(tmp_path: Path, started: Start) -> None:
    files = split(tmp_path / "src")
    img = tmp_path / "images"
    img.mkdir()
    early = started(files, img)
    assert early._thread is not None or early._pid > 0
    early.close()
    assert early._thread is None or not early._thread.is_alive()
    assert early._pid == -1
    assert os.listdir(img) == []


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing", "small"])
def test_what_is_no_root_to_copy_is_left_to_the_import(
    tmp_path: Path, kind: str, started: Start
) -> None:
    meta = meta_tarball(tmp_path / "meta.tar.xz")
    root = tmp_path / "root"
    if kind == "fifo":
        os.mkfifo(root)
    elif kind == "directory":
        root.mkdir()
    elif kind == "small":
        root.write_bytes(b"hsqs" + bytes(1000))
    img = tmp_path / "images"
    early = finished(started((meta, root), img))
    assert early.reason
    early.close()
    assert not img.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["import", "m", "r"], (("m", "r"), None, None, None)),
        (["import", "u.tar.gz"], (("u.tar.gz",), None, None, None)),
        (
            ["--config", "c.toml", "-v", "--state-dir=s", "import", "--root-dir", "R", "m", "r"],
            (("m", "r"), "c.toml", "R", None),
        ),
        (
            ["import", "m", "--img_dir=I", "--os", "x", "--force", "r", "--serial", "S"],
            (("m", "r"), None, None, "I"),
        ),
        (["import", "--", "-m", "r"], (("-m", "r"), None, None, None)),
    ],
)
def test_arguments_of_one_import_are_read(
    argv: list[str], expected: tuple[tuple[str, ...], str | None, str | None, str | None]
) -> None:
    got = cli_early.parse(argv)
    assert got is not None
    assert (got.files, got.config, got.root_dir, got.img_dir) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["update"],
        ["list", "import"],
        ["import"],
        ["import", "a", "b", "c"],
        ["import", "--move", "m", "r"],
        ["import", "--help"],
        ["import", "-h", "m", "r"],
        ["import", "--root-dir"],
        ["import", "--force=1", "m", "r"],
        ["import", "--unknown", "m", "r"],
        ["--version", "import", "m", "r"],
        ["-vv", "import", "m", "r"],
        ["--config", "import", "m", "r"],
    ],
)
def test_anything_else_starts_nothing(argv: list[str]) -> None:
    assert cli_early.parse(argv) is None


def test_without_a_directory_option_images_is_the_configurations(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[paths]\nroot = "{tmp_path}/served"\n')
    got = cli_early.parse(["--config", str(config), "import", "m", "r"])
    assert got is not None
    assert got.images_dir() == f"{tmp_path}/served/images"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "DEBUG": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lxd_image_server", "--state-dir", str(tmp_path / "s"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_the_console_script_imports_with_the_early_copy(tmp_path: Path) -> None:
    meta, root = split(tmp_path / "src")
    tree = tmp_path / "tree"
    proc = run(tmp_path, "import", "--root-dir", str(tree), str(meta), str(root))
    assert proc.returncode == 0, proc.stderr
    assert "its copy started with the command is used" in proc.stderr
    assert (tree / "images" / VERSION / "rootfs.squashfs").read_bytes() == root.read_bytes()
    assert hidden(tree / "images") == []
    assert sha(meta.read_bytes(), root.read_bytes()) in proc.stdout


def test_a_failed_import_leaves_nothing_of_the_early_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    not_meta = src / "meta.tar.xz"
    not_meta.write_bytes(b"not a tarball")
    root = squashfs(src / "root.squashfs")
    tree = tmp_path / "tree"
    proc = run(tmp_path, "import", "--root-dir", str(tree), str(not_meta), str(root))
    assert proc.returncode == 1, proc.stderr
    assert "not an image file" in proc.stderr
    assert not tree.exists()


def test_images_behind_a_link_gets_the_copy_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    """(images/ itself may be a link, as for every import; nothing below it is followed)"""
    files = split(tmp_path / "src")
    (tmp_path / "elsewhere").mkdir()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "images").symlink_to(tmp_path / "elsewhere")
    placed, used = place_with(files, tree / "images", started(files, tree / "images"), caplog)
    assert used
    assert_of_the_tree(tree / "images", placed)
    assert hidden(tmp_path / "elsewhere") == []


def test_force_replaces_a_version_with_the_copy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    img = tmp_path / "images"
    first = split(tmp_path / "first")
    place(plan_import([str(f) for f in first]), str(img))
    files = split(tmp_path / "src")
    early = started(files, img)
    with caplog.at_level(logging.DEBUG, logger=import_place.__name__):
        placed = place(plan_import([str(f) for f in files]), str(img), force=True, early=early)
    early.close()
    assert placed.replaced
    assert "its copy started with the command is used" in caplog.text
    assert_of_the_tree(img, placed)
    assert (img / VERSION / "rootfs.squashfs").read_bytes() == files[1].read_bytes()
    assert hidden(img) == []


def test_the_switch_interval_is_short_while_the_copy_runs_and_restored_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, started: Start
) -> None:
    before = sys.getswitchinterval()
    files = split(tmp_path / "src")
    img = tmp_path / "images"
    early = started(files, img)
    short = min(before, import_early.SWITCH_INTERVAL) if early._thread else before
    assert sys.getswitchinterval() == pytest.approx(short)
    _, used = place_with(files, img, early, caplog)
    assert used
    assert sys.getswitchinterval() == before
    stopped = started(split(tmp_path / "other"), tmp_path / "images2")
    stopped.close()
    assert sys.getswitchinterval() == before


KILLED = """
import os, signal, sys
from lxd_image_server.ops.import_detect import plan_import
from lxd_image_server.ops.import_early import EarlyRoot
from lxd_image_server.ops.import_place import place
meta, root, img = sys.argv[1:]
early = EarlyRoot([meta, root], lambda: img).start()
assert early._pid > 0, early.reason  # (no other thread here: a child process copies)
os.kill(early._pid, signal.SIGKILL)
placed = place(plan_import([meta, root]), img, early=early)
early.close()
print(early._pid, placed.version_dir)
"""


def test_a_copying_process_killed_midway_is_not_used(tmp_path: Path) -> None:
    """(OOM, a signal): the import copies the root itself; the child is reaped, nothing left.
    In a process of its own: pytest may run other threads (then the copy is a thread)."""
    meta, root = split(tmp_path / "src")
    img = tmp_path / "images"
    out = subprocess.run(
        [sys.executable, "-c", KILLED, str(meta), str(root), str(img)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["-1", str(img / VERSION)]
    assert (img / VERSION / "rootfs.squashfs").read_bytes() == root.read_bytes()
    assert hidden(img) == []


def test_no_process_to_spare_leaves_the_copy_to_the_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(import_early, "_alone", lambda: True)
    monkeypatch.setattr(os, "fork", refuse)
    files = split(tmp_path / "src")
    img = tmp_path / "images"
    early = EarlyRoot([str(f) for f in files], lambda: str(img)).start()
    assert "Resource temporarily unavailable" in early.reason
    assert hidden(img) == []
    placed, used = place_with(files, img, early, caplog)
    assert not used
    assert_of_the_tree(img, placed)


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        (b"5 " + b"a" * 64 + b" " + b"b" * 64 + b" " + b"c" * 64, True),
        (b"5 " + b"a" * 64 + b" - -", True),
        (b"5 " + b"a" * 63 + b" - -", False),
        (b"5 - - -", False),
        (b"x " + b"a" * 64 + b" - -", False),
        (b"5 " + b"a" * 64 + b" -", False),
        (b"5 " + b"A" * 64 + b" - -", False),
    ],
)
def test_the_childs_report_is_taken_only_whole(line: bytes, ok: bool) -> None:
    assert (import_early._parse_done(line) is not None) == ok
