"""The streaming multipart/form-data reader on crafted bodies, fed in awkward pieces."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable

import pytest

from lxd_image_server.web.multipart import (
    MAX_HEADER_BYTES,
    MultipartError,
    MultipartReader,
    boundary_from_content_type,
    parse_options_header,
)

BOUNDARY = b"----------XyZ123boundary"
DELIM = b"\r\n--" + BOUNDARY

Parsed = list[tuple[dict[str, str], str | None, str | None, bytes]]


def body_of(
    parts: Iterable[tuple[bytes, bytes]],
    boundary: bytes = BOUNDARY,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    close: bool = True,
) -> bytes:
    """parts: (raw header block, data)."""
    out = bytearray(preamble)
    for headers, data in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n" + data + b"\r\n"
    if close:
        out += b"--" + boundary + b"--\r\n" + epilogue
    return bytes(out)


def file_part(filename: str, data: bytes, name: str = "upload") -> tuple[bytes, bytes]:
    headers = (
        f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n"
    ).encode()
    return headers, data


def pieces_reader(pieces: list[bytes]) -> Callable[[int], bytes]:
    """read(n) that hands out the given pieces (each cut to n if needed) in order."""
    queue = [p for p in pieces if p]
    calls = {"n": 0}

    def read(n: int) -> bytes:
        assert n > 0
        calls["n"] += 1
        if not queue:
            return b""
        head = queue[0]
        if len(head) <= n:
            queue.pop(0)
            return head
        queue[0] = head[n:]
        return head[:n]

    return read


def sized_reader(data: bytes, size: int) -> Callable[[int], bytes]:
    return pieces_reader([data[i : i + size] for i in range(0, len(data), size)])


def parse(read: Callable[[int], bytes], chunk_size: int = 1 << 20, boundary: bytes = BOUNDARY):
    reader = MultipartReader(read, boundary, chunk_size=chunk_size)
    out: Parsed = []
    while (part := reader.next_part()) is not None:
        out.append((part.headers, part.name, part.filename, b"".join(part)))
    return out


TRICKY_DATA = (
    b"line one\r\nline two\r\n\r\n"
    + b"\r\n--"  # a delimiter's start ...
    + BOUNDARY[:-1]  # ... that stops one byte short
    + b"\r\n-\r\n--\r"
    + b"--"
    + BOUNDARY  # the boundary, but not after CRLF: data
    + b"\r\n--"
    + BOUNDARY[:5]
    + b"x"
    + bytes(range(256))
    + b"\r"
)
BODY = body_of(
    [
        file_part("busybox/1.35/amd64/default/20240101_12:00/lxd.tar.xz", TRICKY_DATA),
        (b'Content-Disposition: form-data; name="note"\r\n', b"just a field"),
        file_part("busybox/1.35/amd64/default/20240101_12:00/rootfs.squashfs", b"\r\n"),
        file_part("empty", b""),
    ],
    preamble=b"This is the preamble.\r\nIt is ignored.\r\n",
    epilogue=b"and an epilogue\r\n--" + BOUNDARY + b"\r\nstill epilogue",
)
EXPECTED = [
    ("upload", "busybox/1.35/amd64/default/20240101_12:00/lxd.tar.xz", TRICKY_DATA),
    ("note", None, b"just a field"),
    ("upload", "busybox/1.35/amd64/default/20240101_12:00/rootfs.squashfs", b"\r\n"),
    ("upload", "empty", b""),
]


def simplified(parsed: Parsed) -> list[tuple[str | None, str | None, bytes]]:
    return [(name, filename, data) for _, name, filename, data in parsed]


@pytest.mark.parametrize(
    "size",
    [1, 2, 3, 7, len(DELIM) - 1, len(DELIM), len(DELIM) + 1, 2 * len(DELIM) + 1, 64, 1000, 1 << 20],
)
@pytest.mark.parametrize("chunk_size", [len(DELIM) + 4, 100, 1 << 20])
def test_any_read_size(size: int, chunk_size: int) -> None:
    assert simplified(parse(sized_reader(BODY, size), chunk_size)) == EXPECTED


@pytest.mark.parametrize("chunk_size", [len(DELIM) + 4, 1 << 20])
def test_split_at_every_offset(chunk_size: int) -> None:
    for cut in range(1, len(BODY)):
        parsed = parse(pieces_reader([BODY[:cut], BODY[cut:]]), chunk_size)
        assert simplified(parsed) == EXPECTED, f"split at {cut}"


def test_three_way_splits_around_each_delimiter() -> None:
    starts = [i for i in range(len(BODY)) if BODY.startswith(b"--" + BOUNDARY, i)]
    assert len(starts) >= 5
    for start in starts:
        for a in range(max(1, start - 3), start + len(DELIM) + 3):
            for b in range(a + 1, min(len(BODY), a + len(DELIM) + 4)):
                parsed = parse(pieces_reader([BODY[:a], BODY[a:b], BODY[b:]]), 100)
                assert simplified(parsed) == EXPECTED, (a, b)


def test_headers_are_parsed() -> None:
    parsed = parse(sized_reader(BODY, 5))
    headers = parsed[0][0]
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith("form-data;")


def test_large_part_comes_out_in_bounded_pieces() -> None:
    data = bytes(range(256)) * 4096 + b"\r\n" * 1000  # 1 MiB + 2 KB
    body = body_of([file_part("big", data)])
    reader = MultipartReader(sized_reader(body, 10_000), BOUNDARY, chunk_size=64 * 1024)
    part = reader.next_part()
    assert part is not None
    pieces = list(part)
    assert b"".join(pieces) == data
    assert max(len(p) for p in pieces) <= 64 * 1024 + len(DELIM) + 10_000
    assert reader.next_part() is None


def test_unread_parts_are_skipped() -> None:
    reader = MultipartReader(sized_reader(BODY, 13), BOUNDARY, chunk_size=100)
    names = []
    while (part := reader.next_part()) is not None:
        names.append(part.filename)
        if part.filename == "empty":
            assert part.read() == b""
    assert len(names) == 4
    assert names[-1] == "empty"


def test_stale_part_reads_nothing() -> None:
    reader = MultipartReader(sized_reader(BODY, 50), BOUNDARY)
    first = reader.next_part()
    second = reader.next_part()
    assert first is not None and second is not None
    assert first.read() == b""
    assert b"".join(second) == b"just a field"


def test_body_starting_directly_with_boundary_and_padding() -> None:
    body = b"--" + BOUNDARY + b"  \t\r\n" + b'Content-Disposition: form-data; name="a"\r\n\r\nx'
    body += b"\r\n--" + BOUNDARY + b"--"
    assert simplified(parse(sized_reader(body, 3))) == [("a", None, b"x")]


def test_part_without_headers() -> None:
    body = b"--" + BOUNDARY + b"\r\n\r\ndata\r\n--" + BOUNDARY + b"--\r\n"
    parsed = parse(sized_reader(body, 1))
    assert parsed == [({}, None, None, b"data")]


def test_no_parts() -> None:
    assert parse(sized_reader(b"--" + BOUNDARY + b"--\r\n", 2)) == []


@pytest.mark.parametrize(
    ("header", "filename"),
    [
        ('filename="a;b:c.txt"', "a;b:c.txt"),
        ('filename="busybox/1.35/amd64/default/20240101_12:00/lxd.tar.xz"',
         "busybox/1.35/amd64/default/20240101_12:00/lxd.tar.xz"),
        ('filename="with \\"quotes\\" and \\\\"', 'with "quotes" and \\'),
        ('filename="ünïcødé ✓.txt"', "ünïcødé ✓.txt"),
        ("filename=plain.txt", "plain.txt"),
        ('filename="old"; filename*=UTF-8\'\'n%C3%A9w%20name', "néw name"),
        ("filename*=utf-8''%E2%9C%93;name=upload", "✓"),
        ('filename=""', ""),
    ],
)  # fmt: skip
def test_filenames(header: str, filename: str) -> None:
    raw = f'Content-Disposition: form-data; name="upload"; {header}\r\n'.encode()
    body = body_of([(raw, b"x")])
    [(_, name, got, data)] = parse(sized_reader(body, 7))
    assert (name, got, data) == ("upload", filename, b"x")


def test_parse_options_header() -> None:
    assert parse_options_header('form-data; name="up;load"; filename="x:y"') == (
        "form-data",
        {"name": "up;load", "filename": "x:y"},
    )
    assert parse_options_header("Multipart/Form-Data; Boundary=abc ; charset=utf-8") == (
        "multipart/form-data",
        {"boundary": "abc", "charset": "utf-8"},
    )
    assert parse_options_header("attachment") == ("attachment", {})
    with pytest.raises(MultipartError, match="unterminated"):
        parse_options_header('form-data; filename="open')


def test_boundary_from_content_type() -> None:
    assert boundary_from_content_type("multipart/form-data; boundary=abc") == b"abc"
    assert boundary_from_content_type('multipart/form-data; boundary="a b:c"') == b"a b:c"
    for bad in (
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=" + "x" * 71,
        "application/octet-stream; boundary=abc",
        "",
        "multipart/form-data; boundary=ü",
    ):
        with pytest.raises(MultipartError):
            boundary_from_content_type(bad)


def _all_errors(body: bytes, size: int) -> None:
    with pytest.raises(MultipartError):
        parse(sized_reader(body, size), chunk_size=100)


@pytest.mark.parametrize("size", [1, 7, len(DELIM) - 1, len(DELIM) + 1, 1 << 20])
def test_missing_final_boundary(size: int) -> None:
    whole = body_of([file_part("f", b"data\r\nmore")])
    without_close = body_of([file_part("f", b"data\r\nmore")], close=False)
    _all_errors(without_close, size)
    # cut anywhere before the closing "--": never a silent success
    close_at = whole.rindex(b"--" + BOUNDARY + b"--") + 2 + len(BOUNDARY)
    for cut in range(close_at + 1):
        with pytest.raises(MultipartError):
            parse(pieces_reader([whole[:cut]]), chunk_size=100)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no boundary anywhere in here",
        b"--" + BOUNDARY + b"garbage\r\n\r\nx\r\n--" + BOUNDARY + b"--",
        b"--" + BOUNDARY + b"\r\nContent-Disposition form-data\r\n\r\nx\r\n--" + BOUNDARY + b"--",
        b"--" + BOUNDARY + b"\r\n Content-Type: x\r\n\r\nx\r\n--" + BOUNDARY + b"--",
        b"--" + BOUNDARY + b"\r\nX-Long: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\nx",
        b"--" + BOUNDARY + b"\r\nContent-Type: x\r\n",
    ],
)
def test_malformed(body: bytes) -> None:
    _all_errors(body, 5)


def test_read_errors_pass_through() -> None:
    def read(n: int) -> bytes:
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        parse(read)


def test_bad_boundary_length() -> None:
    with pytest.raises(MultipartError):
        MultipartReader(sized_reader(b"", 1), b"")
    with pytest.raises(MultipartError):
        MultipartReader(sized_reader(b"", 1), b"x" * 71)


# -- Part.fill: the body read straight into the caller's buffer ---------------------------------
#
# With `readinto`, a part's data is read from the body straight into the caller's buffer and
# the delimiter searched for there; only what may begin a delimiter at the end of a read (and
# whatever follows a delimiter) is kept back. A hostile body puts delimiters, and bytes that
# start like one, exactly where those reads end.


class PiecesBody:
    """A body handed out in the given pieces (each cut to what is asked), through read(n)
    and readinto."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.read = pieces_reader(pieces)

    @classmethod
    def sized(cls, data: bytes, piece: int) -> PiecesBody:
        return cls([data[i : i + piece] for i in range(0, len(data), piece)])

    def readinto(self, view: memoryview) -> int:
        assert len(view) > 0
        out = self.read(len(view))
        view[: len(out)] = out
        return len(out)


def _target(kind: str, size: int) -> mmap.mmap | bytearray:
    return mmap.mmap(-1, size) if kind == "mmap" else bytearray(size)


def parse_filled(
    body: PiecesBody, target_size: int, kind: str = "bytearray", start: int = 0, chunk: int = 100
) -> Parsed:
    """Every part's data through Part.fill into target[start:]; checks that each fill is
    complete unless the part ends with it."""
    reader = MultipartReader(body.read, BOUNDARY, chunk_size=chunk, readinto=body.readinto)
    target = _target(kind, start + target_size)
    out: Parsed = []
    while (part := reader.next_part()) is not None:
        data = bytearray()
        ended = False
        while n := part.fill(target, start):
            assert not ended, "a fill after a short one (the part had ended)"
            assert 0 < n <= target_size
            ended = n < target_size
            data += target[start : start + n]
        out.append((part.headers, part.name, part.filename, bytes(data)))
    return out


@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
@pytest.mark.parametrize(
    "target_size", [1, 2, len(DELIM) - 1, len(DELIM), len(DELIM) + 1, 2 * len(DELIM) + 1, 100, 4096]
)
@pytest.mark.parametrize("piece", [1, 7, len(DELIM) - 1, len(DELIM) + 1, 64, 1000, 1 << 20])
def test_fill_any_read_and_target_size(kind: str, target_size: int, piece: int) -> None:
    parsed = parse_filled(PiecesBody.sized(BODY, piece), target_size, kind)
    assert simplified(parsed) == EXPECTED


@pytest.mark.parametrize("target_size", [len(DELIM) + 1, 100, 4096])
def test_fill_split_at_every_offset(target_size: int) -> None:
    for cut in range(1, len(BODY)):
        parsed = parse_filled(PiecesBody([BODY[:cut], BODY[cut:]]), target_size, start=3)
        assert simplified(parsed) == EXPECTED, f"split at {cut}"


@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
@pytest.mark.parametrize("real", [True, False])
def test_fill_a_delimiter_or_its_beginning_across_the_end_of_the_buffer(
    kind: str, real: bool
) -> None:
    """The part's data fills the caller's buffer up to a delimiter (or bytes that begin like
    one) cut at every length by the buffer's end: reads end there too."""
    size = 256
    for j in range(1, len(DELIM)):
        lead = bytes(range(256))[: size - j]
        tail = b"" if real else DELIM[:j] + b"!" + DELIM[j:]
        body = body_of([file_part("f", lead + tail), (b"", b"second")])
        # the delimiter (or its lookalike) starts j bytes before the buffer's end
        parsed = parse_filled(PiecesBody([body]), size, kind, chunk=64)
        assert [d for *_, d in parsed] == [lead + tail, b"second"], (j, real)


@pytest.mark.parametrize("target_size", [5, 100, 4096])
def test_fill_missing_final_boundary(target_size: int) -> None:
    whole = body_of([file_part("f", b"data\r\nmore" * 50)])
    close_at = whole.rindex(b"--" + BOUNDARY + b"--") + 2 + len(BOUNDARY)
    for cut in range(close_at + 1):
        with pytest.raises(MultipartError):
            parse_filled(PiecesBody([whole[:cut]]), target_size)
    without_close = body_of([file_part("f", b"data\r\nmore")], close=False)
    with pytest.raises(MultipartError):
        parse_filled(PiecesBody([without_close]), target_size)


def test_fill_reads_the_body_straight_into_the_buffer() -> None:
    """Large parts are not copied through the reader's own buffer: the reads go to the
    caller's buffer, in the caller's size."""
    data = bytes(range(256)) * 4096  # 1 MiB
    body = body_of([file_part("big", data)])
    sizes: list[int] = []
    source = PiecesBody([body])

    def readinto(view: memoryview) -> int:
        sizes.append(len(view))
        return source.readinto(view)

    reader = MultipartReader(source.read, BOUNDARY, chunk_size=1024, readinto=readinto)
    target = mmap.mmap(-1, 64 * 1024)
    part = reader.next_part()
    assert part is not None
    got = bytearray()
    while n := part.fill(target):
        got += target[:n]
    assert got == data
    assert reader.next_part() is None
    # after the reads that found the headers, one read per buffer, nearly the whole buffer
    big = [s for s in sizes if s > 1024]
    assert len(big) >= len(data) // len(target) - 1
    assert min(big) >= len(target) - 1024 - len(DELIM)


def test_fill_of_a_finished_or_stale_part_is_zero() -> None:
    source = PiecesBody([BODY])
    reader = MultipartReader(source.read, BOUNDARY, chunk_size=100, readinto=source.readinto)
    first = reader.next_part()
    second = reader.next_part()
    assert first is not None and second is not None
    target = bytearray(64)
    assert first.fill(target) == 0
    assert second.fill(target, 0, 3) == 3
    assert target[:3] == b"jus"


def test_fill_without_readinto_copies() -> None:
    """A reader given only read(n) fills the buffer all the same."""
    reader = MultipartReader(sized_reader(BODY, 9), BOUNDARY, chunk_size=100)
    out = []
    target = bytearray(17)
    while (part := reader.next_part()) is not None:
        data = bytearray()
        while n := part.fill(target):
            data += target[:n]
        out.append((part.name, part.filename, bytes(data)))
    assert out == EXPECTED
