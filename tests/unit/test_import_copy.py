"""import_copy: the kernel's copy (or this process's, where the kernel refuses) hashed in the same
pass, every sink fed every byte in order, across chunk boundaries."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from lxd_image_server import fsutil
from lxd_image_server.ops import import_copy

CHUNK = import_copy.CHUNK
SMALL = import_copy.THREADED_FROM
SIZES = [0, 1, 4096, SMALL - 1, SMALL, SMALL + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 12345]


def _source(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    return src, data


def _copy(
    tmp_path: Path, src: Path, prefix: bytes, mine: int = 0, chunk: int = CHUNK
) -> tuple[int, str, str, bytes]:
    plain = hashlib.sha256()
    combined = hashlib.sha256(prefix)
    reported: list[int] = []
    out_path = tmp_path / "out"
    fin = os.open(src, os.O_RDONLY)
    out = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = import_copy.copy(fin, out, [plain, combined], reported.append, mine, chunk)
    finally:
        os.close(fin)
        os.close(out)
    assert sum(reported) == size
    return size, plain.hexdigest(), combined.hexdigest(), out_path.read_bytes()


@pytest.mark.parametrize("size", SIZES)
def test_copy_by_the_kernel_hashes_every_byte(tmp_path: Path, size: int) -> None:
    src, data = _source(tmp_path, size)
    got = _copy(tmp_path, src, b"meta")
    assert got == (
        size,
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"meta" + data).hexdigest(),
        data,
    )


@pytest.mark.parametrize("size", [0, 5, SMALL + 3, 3 * SMALL + 1, CHUNK + 1])
@pytest.mark.parametrize("mine", [1, 2])
def test_sinks_fed_by_the_copying_thread_get_every_byte(
    tmp_path: Path, size: int, mine: int
) -> None:
    """(import_early.py: the root's sha256 between the copies, the fingerprint in a thread)"""
    src, data = _source(tmp_path, size)
    got = _copy(tmp_path, src, b"meta", mine, chunk=2 * SMALL)
    assert got == (
        size,
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"meta" + data).hexdigest(),
        data,
    )


@pytest.mark.parametrize("after", [0, 1, 3, 100])
def test_sinks_spread_to_threads_midway_get_every_byte_in_order(tmp_path: Path, after: int) -> None:
    """`spread` turns true after `after` chunks: the caller's sinks go to threads from then."""
    src, data = _source(tmp_path, 7 * SMALL + 99)
    asked: list[int] = []

    def spread() -> bool:
        asked.append(1)
        return len(asked) > after

    plain, combined = hashlib.sha256(), hashlib.sha256(b"m")
    out = tmp_path / "out"
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = import_copy.copy(fin, fout, [plain, combined], lambda n: None, 1, SMALL, spread)
    finally:
        os.close(fin)
        os.close(fout)
    assert size == len(data) and out.read_bytes() == data
    assert plain.hexdigest() == hashlib.sha256(data).hexdigest()
    assert combined.hexdigest() == hashlib.sha256(b"m" + data).hexdigest()
    assert len(asked) == min(after + 1, 8)  # (asked at each chunk until it said yes)


@pytest.mark.parametrize("size", [0, 5, SMALL + 3, CHUNK + 1, 2 * CHUNK + 7])
@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS])
def test_copy_through_user_space_where_the_kernel_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, refusal: int
) -> None:
    calls: list[int] = []

    def refuse(*args: object) -> int:
        calls.append(1)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src, data = _source(tmp_path, size)
    got = _copy(tmp_path, src, b"m")
    assert calls == [1]  # asked once, then never again
    assert got == (
        size,
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"m" + data).hexdigest(),
        data,
    )


def test_a_source_grown_past_its_size_is_copied_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that looked small (copied in this thread, a small buffer at a time) and is
    larger by the time it is copied (an uploader still writing): every byte copied and
    hashed, as a large one would be."""
    src, data = _source(tmp_path, 3 * SMALL + 17)
    real = os.fstat

    def looks_small(fd: int) -> os.stat_result:
        st = real(fd)
        return os.stat_result((*st[:6], 10, *st[7:]))  # st_size: 10 bytes

    monkeypatch.setattr(os, "fstat", looks_small)
    assert _copy(tmp_path, src, b"m") == (
        len(data),
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"m" + data).hexdigest(),
        data,
    )


def test_a_failure_after_the_first_chunk_is_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a refusal of the first call means "copy another way"; an error later (a disk
    full, an I/O error) fails the import."""
    real = os.copy_file_range

    def fail_later(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        if offset_src:
            raise OSError(errno.ENOSPC, "no space")
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", fail_later)
    src, _ = _source(tmp_path, CHUNK + 10)
    with pytest.raises(OSError) as e:
        _copy(tmp_path, src, b"")
    assert e.value.errno == errno.ENOSPC


@pytest.mark.parametrize("size", [0, 3, CHUNK, 2 * CHUNK + 1])
def test_feed_hashes_a_file_in_place(tmp_path: Path, size: int) -> None:
    src, data = _source(tmp_path, size)
    a, b = hashlib.sha256(), hashlib.sha256(b"x")
    fd = os.open(src, os.O_RDONLY)
    try:
        assert import_copy.feed(fd, [a, b], lambda n: None) == size
    finally:
        os.close(fd)
    assert (a.hexdigest(), b.hexdigest()) == (
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"x" + data).hexdigest(),
    )


def test_start_writeback_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    assert fsutil._sync_file_range() is not None  # Linux's libc has it
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    fd = os.open(path, os.O_RDWR)
    try:
        fsutil.start_writeback(fd, 0, 3000)
        fsutil.start_writeback(fd, 10**12, 1)  # beyond the end: nothing to do
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc" * 1000
