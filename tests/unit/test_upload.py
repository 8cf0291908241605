"""The upload app called directly as WSGI, against a real directory tree under tmp_path.

Every test ends by checking that nothing changed outside images/ and that no hidden
(temporary) file is left inside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from lxd_image_server.web.upload import (
    MAX_OVERRIDES_SIZE,
    UploadSettings,
    app_from_env,
    make_app,
    settings_from_env,
)
from lxd_image_server.web.upload_sink import BUFFER_SIZE

VERSION = "busybox/1.35/amd64/default/20240101_12:00"
META = f"{VERSION}/lxd.tar.xz"
ROOTFS = f"{VERSION}/rootfs.squashfs"
BOUNDARY = "------------------------d74496d66958873e"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(
    app: Callable[..., Any],
    method: str,
    path: str,
    body: bytes = b"",
    *,
    content_type: str | None = None,
    chunked: bool = False,
    stream: Any = None,
    content_length: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """One request. `path` is what the server puts in PATH_INFO (already %-decoded), given
    as text and turned into the WSGI latin-1 form here."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "wsgi.input": stream if stream is not None else io.BytesIO(body),
    }
    if chunked:
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(len(body) if content_length is None else content_length)
    if content_type:
        environ["CONTENT_TYPE"] = content_type
    environ.update(extra or {})
    setup_testing_defaults(environ)
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"] = status
        seen["headers"] = headers
        return lambda data: None

    out = b"".join(app(environ, start_response))
    headers = dict(seen["headers"])
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(out)
    return Response(int(seen["status"].split()[0]), headers, out)


def form(*fields: tuple[str, str | None, bytes]) -> tuple[bytes, str]:
    """multipart/form-data as curl sends it: (name, filename or None, data)."""
    out = bytearray()
    for name, filename, data in fields:
        out += f"--{BOUNDARY}\r\n".encode()
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += disposition.encode() + b"\r\n"
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={BOUNDARY}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(top: Path, skip: Path | None = None) -> dict[str, tuple[str, bytes]]:
    """Every entry below `top` (not following symlinks, leaving out `skip`)."""
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if skip is not None and here == skip:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            p = here / name
            rel = str(p.relative_to(top))
            if skip is not None and p == skip:
                continue
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p).encode())
            elif p.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", p.read_bytes())
    return out


@dataclass
class Tree:
    base: Path
    images: Path
    outside: Path
    before: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def app(self, **kw: Any) -> Callable[..., Any]:
        """The app, anonymous uploads allowed (credentials have their own tests)."""
        kw.setdefault("allow_anonymous", True)
        return make_app(UploadSettings(img_dir=str(self.images), **kw))

    def files(self) -> dict[str, bytes]:
        """Every regular file below images/ (hidden ones included) -> content."""
        out = {}
        for p in self.images.rglob("*"):
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(self.images))] = p.read_bytes()
        return out

    def empty(self) -> bool:
        """Nothing at all below images/ (no file, and no directory made for a failed one)."""
        return list(self.images.iterdir()) == []

    def check(self) -> None:
        """Nothing changed outside images/, nothing hidden (temporary) inside it."""
        assert _snapshot(self.base, skip=self.images) == self.before
        hidden = [str(p) for p in self.images.rglob(".*")]
        assert hidden == [], f"temporary files left behind: {hidden}"

    def start(self) -> Tree:
        self.before = _snapshot(self.base, skip=self.images)
        return self


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    root = tmp_path / "root"
    images = root / "images"
    images.mkdir(parents=True)
    (root / "streams" / "v1").mkdir(parents=True)
    (root / "streams" / "v1" / "index.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("do not touch")
    t = Tree(tmp_path, images, outside).start()
    yield t
    t.check()


# -- PUT ---------------------------------------------------------------------------------------


def test_put_stores_file_with_modes_independent_of_umask(tree: Tree) -> None:
    data = os.urandom(3 << 20) + b"\r\n--tail"
    old = os.umask(0o077)
    try:
        r = call(tree.app(), "PUT", f"/images/{META}", data)
    finally:
        os.umask(old)
    assert r.status == 201, r.body
    assert r.json == {"files": [{"path": META, "size": len(data), "sha256": sha(data)}]}
    target = tree.images / META
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    d = target.parent
    while d != tree.images:
        assert stat.S_IMODE(d.stat().st_mode) == 0o775, d  # group-writable: see upload_store
        d = d.parent
    tree.check()


def test_put_chunked_body(tree: Tree) -> None:
    data = b"squash" * 100_000
    r = call(tree.app(), "PUT", f"/images/{ROOTFS}", data, chunked=True)
    assert r.status == 201, r.body
    assert (tree.images / ROOTFS).read_bytes() == data
    assert r.json["files"][0]["sha256"] == sha(data)
    tree.check()


def test_put_empty_file(tree: Tree) -> None:
    r = call(tree.app(), "PUT", f"/images/{META}", b"")
    assert r.status == 201, r.body
    assert (tree.images / META).read_bytes() == b""
    assert r.json["files"][0]["sha256"] == sha(b"")


def test_put_without_length_is_refused(tree: Tree) -> None:
    environ_extra = {"CONTENT_LENGTH": ""}
    r = call(tree.app(), "PUT", f"/images/{META}", b"data", extra=environ_extra)
    assert r.status == 411
    assert tree.empty()
    tree.check()


def test_put_with_script_name_and_serial_variants(tree: Tree) -> None:
    app = tree.app()
    for serial in ("20240102_1300", "202401021400"):
        rel = f"busybox/1.35/arm64/default/{serial}/lxd.tar.xz"
        r = call(app, "PUT", f"/{rel}", b"x", extra={"SCRIPT_NAME": "/images"})
        assert r.status == 201, r.body
        assert (tree.images / rel).read_bytes() == b"x"
    tree.check()


@pytest.mark.parametrize(
    "path_info",
    [
        f"/images/{META}",
        "/images/busybox/1.35/amd64/default/20240101_12%3A00/lxd.tar.xz",  # encoded twice
        "/images/busybox/1.35/amd64/default/20240101_12%3a00/lxd.tar.xz",
    ],
)
def test_put_path_decoding(tree: Tree, path_info: str) -> None:
    r = call(tree.app(), "PUT", path_info, b"meta")
    assert r.status == 201, r.body
    assert r.json["files"][0]["path"] == META
    assert (tree.images / META).read_bytes() == b"meta"


@pytest.mark.parametrize(
    "rel",
    [
        "../outside/precious",
        f"{VERSION}/../../../../../../outside/x",
        "/etc/passwd",
        "/outside/evil",
        f"{VERSION}/.hidden",
        f"{VERSION}/lxd.tar.xz.part",
        ".git/1.35/amd64/default/20240101_12:00/lxd.tar.xz",
        "busybox/1.35/amd64/default/lxd.tar.xz",
        f"{VERSION}/sub/lxd.tar.xz",
        "busybox/1.35/amd64/default/2024_01/lxd.tar.xz",
        "busybox/1.35/amd64/default/20241301_12:00/lxd.tar.xz",
        "busybox/1.35/x86-64/default/20240101_12:00/lxd.tar.xz",
        f"{VERSION}/lxd%00.tar.xz",
        f"{VERSION}/",
        f"{VERSION}//lxd.tar.xz",
        f"{VERSION}/lxd%ff.tar.xz",
    ],
)
def test_put_refuses_bad_paths_before_writing(tree: Tree, rel: str) -> None:
    r = call(tree.app(), "PUT", f"/images/{rel}", b"payload")
    assert r.status == 400, r.body
    assert "error" in r.json
    assert list(tree.images.iterdir()) == []
    tree.check()


def test_put_latin1_garbage_in_path(tree: Tree) -> None:
    environ_path = "/images/busybox/1.35/amd64/default/20240101_12:00/\xff.tar.xz"
    r = call(tree.app(), "PUT", "/x", b"p", extra={"PATH_INFO": environ_path})
    assert r.status == 400
    assert list(tree.images.iterdir()) == []


def test_symlink_leading_outside_is_refused(tree: Tree) -> None:
    (tree.images / "busybox").symlink_to(tree.outside)
    tree.start()
    r = call(tree.app(), "PUT", f"/images/{META}", b"evil")
    assert r.status == 403, r.body
    body, ctype = form(("upload", META, b"evil"))
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 403, r.body
    assert r.json["failed"][0]["path"] == META
    r = call(tree.app(allow_deletes=True), "DELETE", f"/images/{VERSION}")
    assert r.status == 403
    assert sorted(p.name for p in tree.outside.iterdir()) == ["precious"]
    tree.check()


def test_symlinked_file_leading_outside_is_refused(tree: Tree) -> None:
    version = tree.images / VERSION
    version.mkdir(parents=True)
    (version / "lxd.tar.xz").symlink_to(tree.outside / "precious")
    tree.start()
    for kw in ({}, {"allow_overwrites": True}):
        r = call(tree.app(**kw), "PUT", f"/images/{META}", b"evil")
        assert r.status == 403, r.body
    r = call(tree.app(allow_deletes=True), "DELETE", f"/images/{META}")
    assert r.status == 403
    assert (tree.outside / "precious").read_text() == "do not touch"
    assert (version / "lxd.tar.xz").is_symlink()
    tree.check()


def test_component_that_is_a_file(tree: Tree) -> None:
    (tree.images / "busybox").write_bytes(b"not a dir")
    r = call(tree.app(), "PUT", f"/images/{META}", b"x")
    assert r.status == 409, r.body
    assert (tree.images / "busybox").read_bytes() == b"not a dir"
    tree.check()


# -- existing files ----------------------------------------------------------------------------


def test_overwrite_replaces_atomically(tree: Tree) -> None:
    app = tree.app(allow_overwrites=True)
    assert call(app, "PUT", f"/images/{META}", b"old").status == 201
    old_inode = (tree.images / META).stat().st_ino
    r = call(app, "PUT", f"/images/{META}", b"new!")
    assert r.status == 201
    assert r.json["files"][0] == {"path": META, "size": 4, "sha256": sha(b"new!"), "replaced": True}
    assert (tree.images / META).read_bytes() == b"new!"
    assert (tree.images / META).stat().st_ino != old_inode  # renamed over, not rewritten
    assert sorted(tree.files()) == [META]
    tree.check()


def test_without_overwrites_new_file_goes_beside_the_old(tree: Tree) -> None:
    app = tree.app()
    assert call(app, "PUT", f"/images/{META}", b"first").status == 201
    r = call(app, "PUT", f"/images/{META}", b"second")
    assert r.status == 201
    entry = r.json["files"][0]
    assert entry["path"] == META
    assert entry["stored_as"] == f"{META}.1"
    assert "ALLOW_OVERWRITES" in entry["note"]
    body, ctype = form(("upload", META, b"third"), ("upload", META, b""))
    r = call(app, "POST", "/images/", body, content_type=ctype)
    assert r.status == 201, r.body
    assert [f["stored_as"] for f in r.json["files"]] == [f"{META}.2", f"{META}.3"]
    assert tree.files() == {
        META: b"first",
        f"{META}.1": b"second",
        f"{META}.2": b"third",
        f"{META}.3": b"",
    }
    assert stat.S_IMODE((tree.images / f"{META}.1").stat().st_mode) == 0o644
    tree.check()


# -- POST multipart ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/images/", "/images"])
def test_post_several_files_and_ignored_fields(tree: Tree, path: str) -> None:
    meta, root = os.urandom(5000), os.urandom(3 << 20) + b"\r\n--" + BOUNDARY.encode()[:-1]
    body, ctype = form(
        ("comment", None, b"ignored"),
        ("upload", META, meta),
        ("other", "busybox/1.35/amd64/default/20240101_12:00/ignored", b"not stored"),
        ("upload", ROOTFS, root),
    )
    r = call(tree.app(), "POST", path, body, content_type=ctype)
    assert r.status == 201, r.body
    assert r.json == {
        "files": [
            {"path": META, "size": len(meta), "sha256": sha(meta)},
            {"path": ROOTFS, "size": len(root), "sha256": sha(root)},
        ]
    }
    assert tree.files() == {META: meta, ROOTFS: root}
    tree.check()


@pytest.mark.parametrize("cut", [1, 2, 5, len(BOUNDARY) + 3])
def test_post_delimiters_and_lookalikes_at_the_buffer_edges(tree: Tree, cut: int) -> None:
    """A part's data is read straight into the 2 MiB buffers it is written from: a delimiter,
    or bytes that begin like one, cut by a buffer's end at `cut` bytes still ends the part
    exactly where the body says (and only there)."""
    delim = f"\r\n--{BOUNDARY}".encode()
    edge = BUFFER_SIZE - cut
    # the real delimiter after the metadata starts `cut` bytes before the first buffer's end
    meta = os.urandom(edge)
    # in the root filesystem, lookalikes cut at the end of its first and second buffers
    root = os.urandom(edge) + delim[:cut] + b"x"
    root += os.urandom(2 * BUFFER_SIZE - len(root) - cut) + delim[:cut] + b"-" + os.urandom(99)
    body, ctype = form(("upload", META, meta), ("upload", ROOTFS, root))
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 201, r.body
    assert [f["sha256"] for f in r.json["files"]] == [sha(meta), sha(root)]
    assert tree.files() == {META: meta, ROOTFS: root}


def test_post_chunked(tree: Tree) -> None:
    body, ctype = form(("upload", META, b"m" * 10))
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype, chunked=True)
    assert r.status == 201, r.body
    assert tree.files() == {META: b"m" * 10}


def test_post_filename_percent_encoded(tree: Tree) -> None:
    body, ctype = form(("upload", META.replace(":", "%3A"), b"m"))
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 201, r.body
    assert tree.files() == {META: b"m"}


def test_post_bad_file_does_not_void_the_others(tree: Tree) -> None:
    body, ctype = form(
        ("upload", META, b"good"),
        ("upload", "../../outside/evil", b"bad"),
        ("upload", ROOTFS, b"also good"),
    )
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 400
    doc = r.json
    assert [f["path"] for f in doc["files"]] == [META, ROOTFS]
    assert doc["failed"] == [
        {"path": "../../outside/evil", "status": 400, "error": doc["failed"][0]["error"]}
    ]
    assert "stored 2 file(s)" in doc["error"]
    assert tree.files() == {META: b"good", ROOTFS: b"also good"}
    tree.check()


@pytest.mark.parametrize(
    ("ctype", "body", "status"),
    [
        ("application/octet-stream", b"x", 415),
        ("", b"x", 415),
        ("multipart/form-data", b"x", 400),
        (f"multipart/form-data; boundary={BOUNDARY}", b"no boundary in here", 400),
        (f"multipart/form-data; boundary={BOUNDARY}", f"--{BOUNDARY}--\r\n".encode(), 400),
        (
            f"multipart/form-data; boundary={BOUNDARY}",
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"\r\n\r\nx\r\n'
            f"--{BOUNDARY}--\r\n".encode(),
            400,
        ),
        (
            f"multipart/form-data; boundary={BOUNDARY}",
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"; filename="{META}"'
            f"\r\n\r\ndata without the closing boundary".encode(),
            400,
        ),
        (
            f"multipart/form-data; boundary={BOUNDARY}",
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"; filename="{META}'
            f"\r\n\r\nunterminated quote\r\n--{BOUNDARY}--".encode(),
            400,
        ),
        (
            f"multipart/form-data; boundary={BOUNDARY}",
            f"--{BOUNDARY}junk\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
            400,
        ),
    ],
)
def test_post_malformed(tree: Tree, ctype: str, body: bytes, status: int) -> None:
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == status, r.body
    assert "error" in r.json
    assert tree.empty()
    tree.check()


def test_post_truncated_after_first_file_keeps_it(tree: Tree) -> None:
    body, ctype = form(("upload", META, b"complete"), ("upload", ROOTFS, b"r" * 100_000))
    cut = body[: body.index(b"r" * 1000) + 50_000]
    r = call(tree.app(), "POST", "/images/", cut, content_type=ctype)
    assert r.status == 400
    assert [f["path"] for f in r.json["files"]] == [META]
    assert r.json["failed"][0]["path"] == ROOTFS
    assert tree.files() == {META: b"complete"}
    tree.check()


# -- client gone mid-body ----------------------------------------------------------------------


class DyingStream:
    """Hands out `data`, then fails like a dropped connection; records whether a temp file
    existed in the version directory while the body was being read."""

    def __init__(self, data: bytes, version_dir: Path, how: str) -> None:
        self.buf = io.BytesIO(data)
        self.version_dir = version_dir
        self.how = how
        self.saw_temp = False

    def read(self, n: int = -1) -> bytes:
        out = self.buf.read(min(n, 65536))
        if self.version_dir.is_dir() and list(self.version_dir.glob(".upload-*.part")):
            self.saw_temp = True
        if out:
            return out
        if self.how == "raise":
            raise ConnectionResetError(104, "Connection reset by peer")
        return b""


@pytest.mark.parametrize("how", ["short", "raise"])
def test_put_client_disconnect(tree: Tree, how: str) -> None:
    data = b"z" * 1_000_000
    stream = DyingStream(data[:600_000], tree.images / VERSION, how)
    r = call(tree.app(), "PUT", f"/images/{META}", stream=stream, content_length=len(data))
    assert r.status == 400
    assert stream.saw_temp, "the body was not streamed into a temporary file"
    assert tree.empty()
    tree.check()


def test_put_chunked_client_disconnect(tree: Tree) -> None:
    # A chunked body has no length to fall short of: the server raises when it breaks off.
    stream = DyingStream(b"z" * 300_000, tree.images / VERSION, "raise")
    r = call(tree.app(), "PUT", f"/images/{META}", stream=stream, chunked=True)
    assert r.status == 400
    assert tree.empty()
    tree.check()


@pytest.mark.parametrize("how", ["short", "raise"])
def test_post_client_disconnect(tree: Tree, how: str) -> None:
    body, ctype = form(("upload", META, b"done"), ("upload", ROOTFS, b"q" * 500_000))
    stream = DyingStream(body[:300_000], tree.images / VERSION, how)
    r = call(
        tree.app(), "POST", "/images/", stream=stream, content_type=ctype, content_length=len(body)
    )
    assert r.status == 400
    assert stream.saw_temp
    assert r.json["files"][0]["path"] == META
    assert tree.files() == {META: b"done"}
    tree.check()


# -- size limits -------------------------------------------------------------------------------


class CountingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: int | None = -1) -> bytes:
        out = super().read(n)
        self.bytes_read += len(out)
        return out


def test_max_size_from_content_length_refused_up_front(tree: Tree) -> None:
    stream = CountingStream(b"x" * 1000)
    r = call(
        tree.app(max_size=999), "PUT", f"/images/{META}", stream=stream, content_length=100 << 20
    )
    assert r.status == 413
    assert stream.bytes_read == 0  # refused before reading, and too big to drain
    assert list(tree.images.iterdir()) == []
    tree.check()


def test_max_size_while_streaming(tree: Tree) -> None:
    app = tree.app(max_size=100_000)
    r = call(app, "PUT", f"/images/{META}", b"x" * 100_001, chunked=True)
    assert r.status == 413
    assert tree.empty()
    r = call(app, "PUT", f"/images/{META}", b"x" * 100_000, chunked=True)
    assert r.status == 201
    tree.check()


def test_max_size_in_multipart_is_per_file(tree: Tree) -> None:
    body, ctype = form(
        ("upload", META, b"a" * 1000),
        ("upload", ROOTFS, b"b" * 1001),
        ("upload", f"{VERSION}/root.tar.xz", b"c" * 1000),
    )
    r = call(tree.app(max_size=1000), "POST", "/images/", body, content_type=ctype)
    assert r.status == 413
    assert [f["path"] for f in r.json["files"]] == [META, f"{VERSION}/root.tar.xz"]
    assert [(f["path"], f["status"]) for f in r.json["failed"]] == [(ROOTFS, 413)]
    assert sorted(tree.files()) == sorted([META, f"{VERSION}/root.tar.xz"])
    tree.check()


# -- metadata.json -----------------------------------------------------------------------------

OVERRIDES = f"{VERSION}/metadata.json"


@pytest.mark.parametrize("data", [b"{not json", b'["a list"]', b"\xff\xfe", b""])
def test_invalid_metadata_json_is_refused(tree: Tree, data: bytes) -> None:
    r = call(tree.app(), "PUT", f"/images/{OVERRIDES}", data)
    assert r.status == 400, r.body
    assert "metadata.json" in r.json["error"]
    assert tree.empty()
    body, ctype = form(("upload", META, b"m"), ("upload", OVERRIDES, data))
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 400
    assert tree.files() == {META: b"m"}
    tree.check()


def test_valid_metadata_json_and_warnings(tree: Tree) -> None:
    good = json.dumps({"aliases": ["bb"], "release_title": "1.35"}).encode()
    r = call(tree.app(allow_overwrites=True), "PUT", f"/images/{OVERRIDES}", good)
    assert r.status == 201, r.body
    assert "warning" not in r.json["files"][0]
    odd = json.dumps({"aliases": 5, "colour": "blue"}).encode()
    r = call(tree.app(allow_overwrites=True), "PUT", f"/images/{OVERRIDES}", odd)
    assert r.status == 201, r.body
    assert "aliases" in r.json["files"][0]["warning"]
    assert tree.files() == {OVERRIDES: odd}
    tree.check()


def test_metadata_json_size_limit(tree: Tree) -> None:
    big = b'{"os": "' + b"a" * MAX_OVERRIDES_SIZE + b'"}'
    r = call(tree.app(), "PUT", f"/images/{OVERRIDES}", big, chunked=True)
    assert r.status == 413
    assert tree.empty()
    tree.check()


# -- DELETE ------------------------------------------------------------------------------------


def _populate(tree: Tree) -> None:
    app = tree.app()
    for rel in (META, ROOTFS, "busybox/1.35/amd64/default/20240102_12:00/lxd.tar.xz"):
        assert call(app, "PUT", f"/images/{rel}", b"data").status == 201


def test_delete_disabled(tree: Tree) -> None:
    _populate(tree)
    before = tree.files()
    for path in (META, VERSION):
        r = call(tree.app(), "DELETE", f"/images/{path}")
        assert r.status == 405
        assert "ALLOW_DELETES" in r.json["error"]
        assert r.headers["Allow"] == "PUT"
    assert tree.files() == before
    tree.check()


def test_delete_file_and_version(tree: Tree) -> None:
    _populate(tree)
    app = tree.app(allow_deletes=True)
    r = call(app, "DELETE", f"/images/{META}")
    assert r.status == 200, r.body
    assert r.json == {"deleted": META}
    assert sorted(tree.files()) == sorted(
        [ROOTFS, "busybox/1.35/amd64/default/20240102_12:00/lxd.tar.xz"]
    )
    r = call(app, "DELETE", f"/images/{VERSION}/")
    assert r.status == 200, r.body
    assert not (tree.images / VERSION).exists()
    assert sorted(tree.files()) == ["busybox/1.35/amd64/default/20240102_12:00/lxd.tar.xz"]
    # the last file of the last version: empty directories go too, images/ stays
    r = call(app, "DELETE", "/images/busybox/1.35/amd64/default/20240102_12:00/lxd.tar.xz")
    assert r.status == 200
    assert tree.images.is_dir()
    assert list(tree.images.iterdir()) == []
    tree.check()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (META, 404),
        (VERSION, 404),
        ("busybox/1.35/amd64/default", 400),
        ("busybox", 400),
        ("../outside", 400),
        (f"{VERSION}/../../../../../../outside/precious", 400),
        ("busybox/1.35/amd64/default/..", 400),
        ("", 405),
    ],
)
def test_delete_bad_or_missing(tree: Tree, path: str, status: int) -> None:
    r = call(tree.app(allow_deletes=True), "DELETE", f"/images/{path}")
    assert r.status == status, r.body
    assert (tree.outside / "precious").exists()
    tree.check()


def test_delete_wrong_kind(tree: Tree) -> None:
    (tree.images / VERSION / "lxd.tar.xz").mkdir(parents=True)
    (tree.images / "busybox/1.35/amd64/default/20240102_12:00").parent.mkdir(
        parents=True, exist_ok=True
    )
    (tree.images / "busybox/1.35/amd64/default/20240102_12:00").write_bytes(b"file")
    app = tree.app(allow_deletes=True)
    assert call(app, "DELETE", f"/images/{META}").status == 400
    assert call(app, "DELETE", "/images/busybox/1.35/amd64/default/20240102_12:00").status == 400
    assert (tree.images / META).is_dir()
    tree.check()


# -- other requests ----------------------------------------------------------------------------


def test_methods_and_routes(tree: Tree) -> None:
    app = tree.app(allow_deletes=True)
    r = call(app, "GET", "/images/")
    assert (r.status, r.headers["Allow"]) == (405, "POST")
    r = call(app, "PUT", "/images/")
    assert (r.status, r.headers["Allow"]) == (405, "POST")
    r = call(app, "GET", f"/images/{META}")
    assert (r.status, r.headers["Allow"]) == (405, "PUT, DELETE")
    r = call(app, "POST", f"/images/{META}", b"x")
    assert r.status == 405
    r = call(app, "PUT", "/streams/v1/index.json", b"{}")
    assert r.status == 404
    r = call(app, "PUT", "/imagesx/a", b"{}")
    assert r.status == 404
    r = call(app, "PUT", f"/images/{META}", b"x", extra={"CONTENT_LENGTH": "12abc"})
    assert r.status == 400
    assert tree.empty()
    tree.check()


def test_missing_image_dir_is_a_server_error(tmp_path: Path) -> None:
    app = make_app(UploadSettings(img_dir=str(tmp_path / "nope"), allow_anonymous=True))
    r = call(app, "PUT", f"/images/{META}", b"x")
    assert r.status == 500
    assert "does not exist" in r.json["error"]
    assert not (tmp_path / "nope").exists()


def test_debug_logs_each_request(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lxd_image_server.web.upload")
    call(tree.app(debug=True), "PUT", f"/images/{META}", b"12345")
    call(tree.app(debug=True), "GET", "/nowhere")
    lines = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert lines[0].startswith(f"PUT /images/{META} by anonymous -> 201 (5 bytes, ")
    assert lines[0].endswith(" s)")
    assert lines[1].startswith("GET /nowhere by anonymous -> 404 (0 bytes")
    caplog.clear()
    call(tree.app(debug=False), "GET", "/nowhere")
    assert not [r for r in caplog.records if "->" in r.getMessage()]


# -- settings from the environment -------------------------------------------------------------


def test_settings_from_env(tmp_path: Path) -> None:
    """Hermetic: the system's configuration directory and state directory are the test's own,
    so a host where the server once ran (/etc/lxd-image-server, /var/lib/lxd-image-server with
    its upload-digests/) changes nothing here."""
    system, state = tmp_path / "etc", tmp_path / "state"
    system.mkdir()
    (system / "config.toml").write_text(f'[paths]\nstate_dir = "{state}"\n')

    def settings_from(env: dict[str, str]) -> UploadSettings:
        return settings_from_env(env, system_dir=str(system))

    s = settings_from({})
    assert s == UploadSettings(
        "/var/www/simplestreams/images",
        False,
        False,
        None,
        False,
        "/etc/lxd-image-server/htpasswd",
    )
    # the digests go to the configured state directory's upload-digests/, once it exists
    (state / "upload-digests").mkdir(parents=True)
    assert settings_from({}).digest_dir == str(state / "upload-digests")
    s = settings_from(
        {
            "LXD_IMAGE_SERVER_IMG_DIR": "/srv/images",
            "ALLOW_OVERWRITES": "Yes",
            "ALLOW_DELETES": "ON",
            "DEBUG": "1",
            "UPLOAD_MAX_SIZE": "1048576",
            "LXD_IMAGE_SERVER_HTPASSWD": "/srv/htpasswd",
            "UPLOAD_READ_TIMEOUT": "20",
            "LXD_IMAGE_SERVER_DIGEST_DIR": str(tmp_path / "none"),
        }
    )
    assert s == UploadSettings("/srv/images", True, True, 1048576, True, "/srv/htpasswd", False, 20)
    assert settings_from({"ALLOW_ANONYMOUS_UPLOADS": "yes"}).allow_anonymous
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="UPLOAD_READ_TIMEOUT"):
            settings_from({"UPLOAD_READ_TIMEOUT": bad})
    s = settings_from({"ALLOW_OVERWRITES": "false", "DEBUG": "off", "UPLOAD_MAX_SIZE": "0"})
    assert (s.allow_overwrites, s.debug, s.max_size) == (False, False, None)
    with pytest.raises(ValueError, match="ALLOW_DELETES"):
        settings_from({"ALLOW_DELETES": "sure"})
    assert settings_from({"UPLOAD_MAX_SIZE": "2G"}).max_size == 2 << 30
    with pytest.raises(ValueError, match="UPLOAD_MAX_SIZE"):
        settings_from({"UPLOAD_MAX_SIZE": "lots"})


def test_app_from_env(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LXD_IMAGE_SERVER_IMG_DIR", str(tree.images))
    monkeypatch.setenv("ALLOW_DELETES", "true")
    monkeypatch.setenv("ALLOW_ANONYMOUS_UPLOADS", "true")
    # never the host's state directory (a machine where the server once ran has one)
    monkeypatch.setenv("LXD_IMAGE_SERVER_DIGEST_DIR", str(tree.base / "no-digests"))
    app = app_from_env()
    assert call(app, "PUT", f"/images/{META}", b"x").status == 201
    assert call(app, "DELETE", f"/images/{META}").status == 200
    tree.check()
