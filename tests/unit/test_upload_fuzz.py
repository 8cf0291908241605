"""Fuzzing (hypothesis, a bounded number of examples) of what a hostile uploader controls: the
multipart parser, the path checks, and whole requests to the app. Nothing but the modules'
own error types may escape, and the app answers every request with a 4xx or a 201."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lxd_image_server.web.multipart import (
    MultipartError,
    MultipartReader,
    boundary_from_content_type,
    parse_options_header,
)
from lxd_image_server.web.upload import UploadSettings, make_app
from lxd_image_server.web.upload_errors import HTTPError
from lxd_image_server.web.upload_paths import check_file_path, check_version_path
from tests.unit.test_upload import VERSION, call

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
BOUNDARY = b"fuzzbound"

# Pieces a multipart body is made of, so that the fuzzer reaches past the first delimiter.
_ATOMS = st.sampled_from(
    [
        b"--fuzzbound",
        b"--fuzzbound--",
        b"\r\n",
        b"\r\n\r\n",
        b'Content-Disposition: form-data; name="upload"; filename="',
        b"Content-Disposition: form-data; name=\"upload\"; filename*=utf-8''",
        b"Content-Disposition: form-data; name=\"upload\"; filename*=utf\x00-8''%61",
        f"{VERSION}/lxd.tar.xz".encode(),
        b"../../etc/passwd",
        b'"',
        b"\\",
        b";",
        b"%ff",
        b"%00",
        b"\x00",
        b"\n",
        b" \t",
        b"x" * 300,
    ]
)
_HEADER_ATOMS = st.sampled_from(
    ["form-data", ";", " name=", '"upload"', "upload", " filename=", " filename*=", "utf-8",
     "; filename*=utf\x00-8''%61", "; filename*=rot13''%61",
     "utf\x00-8", "rot13", "iso-8859-1", "idna", "''", "'", "%61", "%ff", "%00", '"', "\\",
     "\x00", "\n", f"{VERSION}/lxd.tar.xz", "a" * 300]
)  # fmt: skip
_HEADER_VALUES = st.lists(st.one_of(_HEADER_ATOMS, st.text(max_size=5)), max_size=16).map("".join)


@st.composite
def _well_formed_bodies(draw: st.DrawFn) -> bytes:
    """Bodies that get past the delimiters, so the headers and file names are reached."""
    out = bytearray(draw(st.binary(max_size=10)))
    for _ in range(draw(st.integers(0, 4))):
        value = draw(_HEADER_VALUES).encode("utf-8", "surrogatepass")
        out += b"--fuzzbound\r\nContent-Disposition: " + value + b"\r\n\r\n"
        out += draw(st.binary(max_size=30)) + b"\r\n"
    out += b"--fuzzbound--\r\n"
    return bytes(out[: draw(st.integers(0, len(out)))]) if draw(st.booleans()) else bytes(out)


_BODIES = st.one_of(
    st.lists(st.one_of(_ATOMS, st.binary(max_size=40)), max_size=30).map(b"".join),
    _well_formed_bodies(),
)


def _reader(data: bytes, piece: int) -> Callable[[int], bytes]:
    pos = [0]

    def read(n: int) -> bytes:
        out = data[pos[0] : pos[0] + min(n, piece)]
        pos[0] += len(out)
        return out

    return read


@FUZZ
@given(_BODIES, st.integers(min_value=1, max_value=64))
def test_multipart_reader(data: bytes, piece: int) -> None:
    try:
        reader = MultipartReader(_reader(data, piece), BOUNDARY, chunk_size=16)
        while (part := reader.next_part()) is not None:
            assert part.filename is None or isinstance(part.filename, str)
            for _ in part:
                pass
    except MultipartError as e:
        assert "\n" not in str(e)


def _parts(
    reader: MultipartReader, target: bytearray | None
) -> list[tuple[str | None, bytes]] | str:
    """Every part's (filename, data), read with Part.read or with Part.fill into `target`;
    or the error."""
    out: list[tuple[str | None, bytes]] = []
    try:
        while (part := reader.next_part()) is not None:
            data = bytearray()
            if target is None:
                for chunk in part:
                    data += chunk
            else:
                while n := part.fill(target):
                    data += target[:n]
            out.append((part.filename, bytes(data)))
    except MultipartError as e:
        return type(e).__name__
    return out


@FUZZ
@given(_BODIES, st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=48))
def test_multipart_fill_reads_what_read_reads(data: bytes, piece: int, size: int) -> None:
    """The body read straight into the caller's buffer (Part.fill) yields exactly the parts,
    or the failure, that reading through the reader's own buffer does."""
    source = _reader(data, piece)

    def readinto(view: memoryview) -> int:
        got = source(len(view))
        view[: len(got)] = got
        return len(got)

    expected = _parts(MultipartReader(_reader(data, piece), BOUNDARY, chunk_size=16), None)
    filled = MultipartReader(source, BOUNDARY, chunk_size=16, readinto=readinto)
    assert _parts(filled, bytearray(size)) == expected


@FUZZ
@given(st.one_of(st.text(max_size=200), _HEADER_VALUES))
def test_options_header(value: str) -> None:
    try:
        parse_options_header(value)
        boundary_from_content_type(value)
    except MultipartError:
        pass


_PATH_ATOMS = st.sampled_from(
    ["busybox", "1.35", "amd64", "default", "20240101_12:00", "lxd.tar.xz", "/", "..", ".",
     "\n", "\x00", "\uff12", "%", ":", "a" * 250, "metadata.json", ".hidden", "~"]
)  # fmt: skip
_PATHS = st.one_of(
    st.text(max_size=100),
    st.lists(st.one_of(_PATH_ATOMS, st.text(max_size=5)), max_size=14).map("".join),
)


@FUZZ
@given(_PATHS)
def test_path_checks(rel: str) -> None:
    for check in (check_file_path, check_version_path):
        try:
            check(rel)
        except HTTPError as e:
            assert e.status == 400
            assert "\n" not in e.message and len(e.message) < 600


@FUZZ
@given(
    st.sampled_from(["PUT", "POST", "DELETE", "GET", "\x00"]),
    _PATHS,
    _BODIES,
    st.sampled_from(
        [
            "multipart/form-data; boundary=fuzzbound",
            "multipart/form-data; boundary*=utf-8''fuzzbound",
            'multipart/form-data; boundary="fuzz',
            "text/plain",
            "",
        ]
    ),
)
def test_app_requests(method: str, rel: str, body: bytes, ctype: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        images = Path(d) / "images"
        images.mkdir()
        outside = Path(d) / "outside"
        outside.mkdir()
        app = make_app(
            UploadSettings(img_dir=str(images), allow_anonymous=True, allow_deletes=True)
        )
        path = "/images/" + rel if method != "POST" else "/images/"
        r = call(app, method, path, body, content_type=ctype)
        assert r.status in (200, 201) or 400 <= r.status < 500, (r.status, r.body)
        assert os.listdir(outside) == []
