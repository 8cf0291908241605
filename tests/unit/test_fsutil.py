"""The safe-read primitives: what an uploader can plant is refused, never followed or waited on."""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path

import pytest

from lxd_image_server import fsutil
from lxd_image_server.fsutil import (
    NotRegularFile,
    TooLarge,
    load_json_bounded,
    open_dir,
    open_dir_below,
    open_dirs,
    open_regular,
    read_bounded,
    read_regular,
)


def test_open_regular_reads_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    dfd = open_dir(str(tmp_path))
    try:
        assert read_regular("f", 10, dir_fd=dfd) == b"abc"
    finally:
        os.close(dfd)


def test_symlink_to_a_secret_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("password")
    (tmp_path / "link").symlink_to(secret)
    with pytest.raises(NotRegularFile):
        open_regular(str(tmp_path / "link"))


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    result: list[BaseException] = []

    def attempt() -> None:
        try:
            open_regular(str(tmp_path / "fifo"))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "open_regular blocked on a FIFO"
    assert isinstance(result[0], NotRegularFile)


def test_directory_and_device_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotRegularFile):
        open_regular(str(tmp_path))
    with pytest.raises(NotRegularFile):
        open_regular("/dev/null")


def test_directory_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "d")
    with pytest.raises(NotADirectoryError):
        open_dir(str(tmp_path / "l"))
    with pytest.raises(NotADirectoryError):
        open_dir(str(tmp_path / "l"), dir_fd=None)
    os.close(open_dir(str(tmp_path / "d")))


def test_read_bounded_stops_at_the_limit(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "ok").write_bytes(b"x" * 100)
    assert read_regular(str(tmp_path / "ok"), 100) == b"x" * 100
    with pytest.raises(TooLarge):
        read_regular(str(tmp_path / "big"), 100)


def test_read_bounded_on_an_endless_source() -> None:
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        with pytest.raises(TooLarge):
            read_bounded(fd, 5 << 20)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 5000 + b"]" * 5000,
        b"[" * 200000,
        b'{"a":' * 40 + b"1" + b"}" * 40,
        b"not json",
        b"\xff\xfe",
        b"x" * 2000,
    ],
)
def test_load_json_bounded_refuses_with_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        load_json_bounded(data, max_bytes=1000 if len(data) == 2000 else 1 << 20, max_depth=32)


@pytest.mark.parametrize(
    ("value", "depth"),
    [
        (1, 0),
        ("[]", 0),
        ([], 1),
        ({}, 1),
        ([1, "a", None, [], {}], 2),
        ({"a": [1, {"b": [[{"c": 1}]]}], "d": 2}, 6),
        # the deepest branch is one among many shallow ones, last or first
        ([*([i] for i in range(1000)), [[[[1]]]]], 5),
        ([[[[[1]]]], *({"k": i} for i in range(1000))], 5),
    ],
)
def test_json_depth(value: object, depth: int) -> None:
    assert fsutil._depth(value) == depth
    data = json.dumps(value).encode()
    assert load_json_bounded(data, 1 << 20, depth) == value
    if depth:
        with pytest.raises(ValueError, match="nested deeper"):
            load_json_bounded(data, 1 << 20, depth - 1)


def test_load_json_bounded_accepts_what_fits() -> None:
    assert load_json_bounded(b'{"a": [1, {"b": 2}]}', 100, 3) == {"a": [1, {"b": 2}]}
    with pytest.raises(ValueError):
        load_json_bounded(b'{"a": [1, {"b": 2}]}', 100, 2)


def test_open_dirs_walks_down_and_never_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    (tmp_path / "secret").mkdir()
    (tmp_path / "a" / "l").symlink_to(tmp_path / "secret")
    base = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_dirs(base, ["a", "b"])
        try:
            assert os.listdir(fd) == ["f"]
        finally:
            os.close(fd)
        with pytest.raises(NotADirectoryError):
            open_dirs(base, ["a", "l"])
        os.fstat(base)  # the caller's descriptor stays open
        with pytest.raises(NotADirectoryError):
            open_dir_below(str(tmp_path), "a/../secret")
    finally:
        os.close(base)


def test_write_atomic_writes_pieces_in_order_through_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces (more than one writev takes, empty ones, views) are written in order, whole,
    even when the system writes fewer bytes than asked (as it may)."""
    pieces: list[bytes | memoryview] = [f"{i}:".encode() * (i % 5) for i in range(3000)]
    pieces[7] = memoryview(b"a view of some bytes")[2:9]
    expected = b"".join(pieces)
    calls: list[int] = []
    real = os.writev

    def short(fd: int, buffers: list[bytes | memoryview]) -> int:
        calls.append(len(buffers))
        assert len(buffers) <= 1024
        # at most 1000 bytes, and never to the end of a piece: a partial one is left over
        taken = b"".join(buffers)[: min(1000, sum(len(b) for b in buffers) - 1) or 1]
        return real(fd, [taken])

    monkeypatch.setattr(os, "writev", short)
    fsutil.write_atomic(str(tmp_path / "f"), pieces)
    assert (tmp_path / "f").read_bytes() == expected
    assert len(calls) > 3000 // 1024  # (short writes: far more than one call per batch)
    monkeypatch.setattr(os, "writev", real)
    fsutil.write_atomic(str(tmp_path / "g"), pieces)
    fsutil.write_atomic(str(tmp_path / "h"), expected)
    assert (tmp_path / "g").read_bytes() == (tmp_path / "h").read_bytes() == expected


def test_holds_compares_pieces_with_a_regular_file_only(tmp_path: Path) -> None:
    data = os.urandom(3 * fsutil.CHUNK_SIZE + 17)
    (tmp_path / "f").write_bytes(data)
    cuts = [0, 1, 5000, fsutil.CHUNK_SIZE, fsutil.CHUNK_SIZE + 1, len(data)]
    pieces: list[bytes | memoryview] = [data[a:b] for a, b in itertools.pairwise(cuts)]
    pieces.insert(2, b"")
    pieces[3] = memoryview(pieces[3])
    assert fsutil.holds(str(tmp_path / "f"), pieces)
    assert fsutil.holds(str(tmp_path / "f"), [data])
    changed = bytearray(data)
    changed[fsutil.CHUNK_SIZE + 3] ^= 1
    assert not fsutil.holds(str(tmp_path / "f"), [bytes(changed)])
    assert not fsutil.holds(str(tmp_path / "f"), [data, b"x"])
    assert not fsutil.holds(str(tmp_path / "f"), [data[:-1]])
    assert not fsutil.holds(str(tmp_path / "missing"), [b""])
    os.symlink(tmp_path / "f", tmp_path / "link")
    assert not fsutil.holds(str(tmp_path / "link"), [data])
