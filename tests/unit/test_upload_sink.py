"""upload_sink.Sink: the pipeline that writes and hashes an upload's buffers on its threads."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.web import upload_sink
from lxd_image_server.web.upload_sink import BUFFER_SIZE, SPARE, WRITEBACK, Sink


def _pour(sink: Sink, data: bytes, piece: int) -> None:
    """Hands `data` to the sink in buffers filled with at most `piece` bytes each."""
    for start in range(0, len(data), piece):
        buf = sink.buffer()
        chunk = data[start : start + piece]
        buf[: len(chunk)] = chunk
        sink.put(buf, len(chunk))


@pytest.mark.parametrize("piece", [1, 4096, BUFFER_SIZE - 1, BUFFER_SIZE])
def test_every_byte_is_written_and_hashed_in_order(tmp_path: Path, piece: int) -> None:
    data = os.urandom(3 * BUFFER_SIZE + 12345) if piece > 1 else os.urandom(3000)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    first, second = hashlib.sha256(), hashlib.sha256(b"prefix")
    try:
        sink = Sink(fd, [first, second])
        _pour(sink, data, piece)
        sink.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert first.hexdigest() == hashlib.sha256(data).hexdigest()
    assert second.hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()


def test_buffers_are_reused_so_memory_stays_flat(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    seen: set[int] = set()
    try:
        sink = Sink(fd, [hashlib.sha256(), hashlib.sha256()])
        for _ in range(50):
            buf = sink.buffer()
            seen.add(id(buf))
            sink.put(buf, 10)
        sink.close()
    finally:
        os.close(fd)
    # one per stage (writing, two digests) and the spares
    assert sink.depth == 3 + SPARE
    assert len(seen) <= sink.depth


def test_a_write_error_reaches_the_request_thread(tmp_path: Path) -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        sink = Sink(fd, [hashlib.sha256()])
        with pytest.raises(OSError) as caught:
            # the error surfaces on a later buffer() or, at the latest, on close()
            for _ in range(20):
                buf = sink.buffer()
                sink.put(buf, len(buf))
            sink.close()
        assert caught.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            sink.close()
    finally:
        os.close(fd)


class _Broken:
    def update(self, data: Any) -> None:
        raise RuntimeError("digest broke")


def test_a_digest_error_reaches_the_request_thread(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = Sink(fd, [_Broken()])
        with pytest.raises(RuntimeError, match="digest broke"):
            for _ in range(20):
                buf = sink.buffer()
                sink.put(buf, 1)
            sink.close()
        # close() waits for both threads, whatever failed: none touches the fd afterwards
        with pytest.raises(RuntimeError, match="digest broke"):
            sink.close()
    finally:
        os.close(fd)


def test_writing_and_hashing_run_on_two_threads(tmp_path: Path) -> None:
    """The writer does not wait for the digests: it writes the next buffer while the hasher
    is still busy with the previous one."""
    release = threading.Event()
    hashing = threading.Event()

    class Slow:
        def update(self, data: Any) -> None:
            hashing.set()
            assert release.wait(30)

    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = Sink(fd, [Slow()])
        for byte in (b"a", b"b"):
            buf = sink.buffer()
            buf[:1] = byte
            sink.put(buf, 1)
        assert hashing.wait(30)
        # the first buffer is stuck in the hasher; the second is written anyway
        for _ in range(3000):
            if os.fstat(fd).st_size == 2:
                break
            threading.Event().wait(0.01)
        assert path.read_bytes() == b"ab"
        release.set()
        sink.close()
    finally:
        release.set()
        os.close(fd)


def test_write_behind_starts_write_back_and_drops_clean_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((fd, offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    # a file system without O_DIRECT
    monkeypatch.setattr(upload_sink, "_set_direct", lambda fd, on: False)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = Sink(fd, [])
        _pour(sink, bytes(3 * WRITEBACK), BUFFER_SIZE)
        sink.close()
    finally:
        os.close(fd)
    # the whole file (offset 0, length 0: to its end) each time, never only the new range
    assert calls == [(fd, 0, 0, os.POSIX_FADV_DONTNEED)] * 3


def test_each_digest_runs_on_its_own_thread(tmp_path: Path) -> None:
    """The second digest hashes one buffer while the first hashes the next one (a file's
    sha256 and the combined fingerprint: each on its own core)."""
    a_on_second = threading.Event()
    b_on_first = threading.Event()

    class A:
        calls = 0

        def update(self, data: Any) -> None:
            A.calls += 1
            if A.calls == 2:
                a_on_second.set()
                assert b_on_first.wait(10), "the digests never ran at the same time"

    class B:
        calls = 0

        def update(self, data: Any) -> None:
            B.calls += 1
            if B.calls == 1:
                b_on_first.set()
                assert a_on_second.wait(10), "the digests never ran at the same time"

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = Sink(fd, [A(), B()])
        _pour(sink, b"xy", 1)
        sink.close()
    finally:
        os.close(fd)
    assert (A.calls, B.calls) == (2, 2)


def _takes_direct_io(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def _spy_writes(
    monkeypatch: pytest.MonkeyPatch, path: Path, refuse: bool = False
) -> list[tuple[int, bool]]:
    """Records each os.write to the file at `path`: (bytes, O_DIRECT on); `refuse`: EINVAL
    for every O_DIRECT write (a file system that takes the flag but not the writes)."""
    seen: list[tuple[int, bool]] = []
    real = os.write

    def write(fd: int, data: Any) -> int:
        st = os.fstat(fd)
        if not (path.exists() and os.path.samestat(st, path.stat())):
            return real(fd, data)
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        seen.append((len(data), direct))
        if refuse and direct:
            raise OSError(errno.EINVAL, "refused")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return seen


def test_whole_buffers_go_to_disk_directly_and_the_tail_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * BUFFER_SIZE + 100)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    seen = _spy_writes(monkeypatch, tmp_path / "f")
    try:
        sink = Sink(fd, [hashlib.sha256()])
        _pour(sink, data, BUFFER_SIZE)
        sink.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data
    if _takes_direct_io(tmp_path):
        assert seen == [(BUFFER_SIZE, True)] * 3 + [(100, False)]
    else:
        assert not sink.direct
        assert seen == [(BUFFER_SIZE, False)] * 3 + [(100, False)]


def test_a_refused_direct_write_goes_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * BUFFER_SIZE)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    seen = _spy_writes(monkeypatch, tmp_path / "f", refuse=True)
    try:
        sink = Sink(fd, [])
        _pour(sink, data, BUFFER_SIZE)
        sink.close()
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data
    assert not sink.direct
    assert [direct for _, direct in seen].count(True) <= 1
    assert seen[-3:] == [(BUFFER_SIZE, False)] * 3
