"""The upload app against a hostile uploader (issue 9, findings 5, 7, 8, 11, 12, 13, 15):
called directly as WSGI on a real tree, with real sockets where the server's matter."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server import htpasswd
from lxd_image_server.web.upload import UploadSettings, make_app
from tests.unit.test_upload import BOUNDARY, META, VERSION, Tree, call, form, tree

__all__ = ["tree"]  # the fixture, imported for pytest


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert bad == [], f"a malformed request reached the catch-all: {bad}"


def _one_line(reason: str) -> None:
    assert "\n" not in reason and "\r" not in reason, reason
    assert len(reason) < 400, f"reason too long ({len(reason)} characters)"


# -- 13/15: names ------------------------------------------------------------------------------

LONG = "a" * 5000
BAD_NAMES = [
    "x\n/1.35/amd64/default/20240101_12:00/lxd.tar.xz",  # trailing newline in a component
    f"{VERSION}/lxd.tar.xz\n",
    "busybox/1.35/amd64/default/\uff12\uff10\uff12\uff14\uff10\uff11\uff10\uff11_12:00/lxd.tar.xz",
    "busybox/1.35/amd64/default/20240101_12:00/lxd\x00.tar.xz",
    f"busybox/../../../{VERSION}/lxd.tar.xz",
    f"/{VERSION}/lxd.tar.xz",
    f"{LONG}/1.35/amd64/default/20240101_12:00/lxd.tar.xz",
    f"{VERSION}/{LONG}.tar.gz",
    f"{VERSION}/lxd\t.tar.xz",
    f"{VERSION}/lxd\x7f.tar.xz",
    "bus\u00e9box/1.35/amd64/default/20240101_12:00/lxd.tar.xz",
]


@pytest.mark.parametrize("rel", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_put_strict_names(tree: Tree, rel: str, caplog: pytest.LogCaptureFixture) -> None:
    r = call(tree.app(), "PUT", f"/images/{rel}", b"payload")
    assert r.status == 400, r.body
    _one_line(r.json["error"])
    assert tree.empty()
    _no_errors_logged(caplog)
    tree.check()


@pytest.mark.parametrize("rel", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_post_strict_names(tree: Tree, rel: str, caplog: pytest.LogCaptureFixture) -> None:
    body, ctype = form(("upload", rel.replace("\n", "%0A").replace("\x00", "%00"), b"payload"))
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 400, r.body
    _one_line(r.json["error"])
    assert tree.empty()
    _no_errors_logged(caplog)
    tree.check()


@pytest.mark.parametrize(
    "path_info",
    [
        "/images/busybox/1.35/amd64/default/20240101_12%3A00/lxd%ff%fe.tar.xz",
        "/images/busybox/1.35/amd64/default/20240101_12%3A00/lxd%C0%AF.tar.xz",
        "/images/busybox/1.35/amd64/default/20240101_12:00/lxd%0a",
    ],
)
def test_put_bad_percent_encoding(
    tree: Tree, path_info: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = call(tree.app(), "PUT", path_info, b"payload")
    assert r.status == 400, r.body
    _one_line(r.json["error"])
    assert tree.empty()
    _no_errors_logged(caplog)


def _disposition_form(disposition: str) -> tuple[bytes, str]:
    body = (
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\npayload\r\n--{BOUNDARY}--\r\n"
    ).encode("utf-8", "surrogateescape")
    return body, f"multipart/form-data; boundary={BOUNDARY}"


@pytest.mark.parametrize(
    "disposition",
    [
        "form-data; name=\"upload\"; filename*=utf\x00-8''busybox%2Fx",
        "form-data; name=\"upload\"; filename*=rot13''%61",
        "form-data; name=\"upload\"; filename*=utf-8''%ff%fe",
        f"form-data; name=\"upload\"; filename*=utf-8''{META.replace(':', '%3A')}%00",
        f"form-data; name=\"upload\"; filename*=utf-8''{'%41' * 3000}",
        "form-data; name=\"upload\"; filename*=''",
        'form-data; name="upload"; filename*=utf-8\'',
        f'form-data; name="upload"; filename="{LONG}"',
        'form-data; name="upload"; filename="\\',
    ],
)
def test_post_malformed_disposition(
    tree: Tree, disposition: str, caplog: pytest.LogCaptureFixture
) -> None:
    body, ctype = _disposition_form(disposition)
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert 400 <= r.status < 500, r.body
    _one_line(r.json["error"])
    assert tree.empty()
    _no_errors_logged(caplog)
    tree.check()


def test_deeply_nested_metadata_json(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    nested = b"[" * 5000 + b"]" * 5000
    for data in (nested, b'{"os": ' + nested + b"}"):
        r = call(tree.app(), "PUT", f"/images/{VERSION}/metadata.json", data)
        assert r.status == 400, r.body
        _one_line(r.json["error"])
    assert tree.empty()
    _no_errors_logged(caplog)


def test_unexpected_exception_is_a_one_line_500(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    class Exploding:
        def read(self, n: int = -1) -> bytes:
            raise AssertionError("a bug\nover two lines")

    caplog.set_level(logging.DEBUG)
    r = call(tree.app(), "PUT", f"/images/{META}", stream=Exploding(), content_length=10)
    # a failing wsgi.input is the client's problem (400); a bug elsewhere is ours:
    assert r.status == 400
    app = tree.app()

    def bug(*_args: Any) -> Any:
        raise KeyError("a bug\nover two lines")

    app._dispatch = bug  # type: ignore[attr-defined]
    r = call(app, "PUT", f"/images/{META}", b"x")
    assert r.status == 500
    assert r.json == {"error": "internal error; see the server log"}
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert errors[0].exc_info is None


# -- 7: multipart memory and the answer --------------------------------------------------------


def test_many_refused_parts_give_a_small_answer(tree: Tree) -> None:
    parts = [("upload", f"../refused-{i:06d}/{'x' * 100}", b"") for i in range(20_000)]
    body, ctype = form(*parts)
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert 400 <= r.status < 500, r.status
    assert len(r.body) < 16 * 1024, len(r.body)
    doc = r.json
    assert len(doc["failed"]) <= 20
    _one_line(doc["error"])
    assert tree.empty()
    tree.check()


def test_many_stored_parts_give_a_small_answer(tree: Tree) -> None:
    parts = [("upload", META, b"") for _ in range(5000)]
    body, ctype = form(*parts)
    r = call(tree.app(allow_overwrites=True), "POST", "/images/", body, content_type=ctype)
    assert r.status == 413, r.status
    assert len(r.body) < 64 * 1024, len(r.body)
    assert "parts" in r.json["error"]
    tree.check()


# -- 8: credentials ----------------------------------------------------------------------------


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"HTTP_AUTHORIZATION": f"Basic {token}"}


@pytest.fixture
def passwords(tree: Tree) -> Path:
    path = tree.base / "htpasswd"
    htpasswd.set_password(str(path), "alice", "s3cret")
    htpasswd.set_password(str(path), "bob", "hunter2")
    tree.start()
    return path


def test_credentials_are_checked_by_the_app(tree: Tree, passwords: Path) -> None:
    app = make_app(UploadSettings(img_dir=str(tree.images), htpasswd=str(passwords)))
    for extra in (
        {},
        {"HTTP_X_REMOTE_USER": "alice"},  # what nginx passes: not a credential
        _basic("alice", "wrong"),
        _basic("mallory", "s3cret"),
        _basic("alice", ""),
        _basic("alice", "s3cret" + "x" * 5000),
        {"HTTP_AUTHORIZATION": "Basic !!!notbase64"},
        {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"no colon").decode()},
        {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"alice:\xff\xfe").decode()},
        {"HTTP_AUTHORIZATION": "Bearer s3cret"},
        {"HTTP_AUTHORIZATION": "Basic " + "A" * 100_000},
    ):
        for method, path in (("PUT", f"/images/{META}"), ("POST", "/images/")):
            r = call(app, method, path, b"evil", extra=extra)
            assert r.status == 401, (extra, r.body)
            assert r.headers["WWW-Authenticate"].startswith("Basic ")
    r = call(app, "DELETE", f"/images/{META}", extra={})
    assert r.status == 401
    assert tree.empty()
    r = call(app, "PUT", f"/images/{META}", b"good", extra=_basic("alice", "s3cret"))
    assert r.status == 201, r.body
    r = call(app, "PUT", f"/images/{VERSION}/rootfs.squashfs", b"r", extra=_basic("bob", "hunter2"))
    assert r.status == 201, r.body
    tree.check()


def test_password_change_is_seen_without_restart(tree: Tree, passwords: Path) -> None:
    app = make_app(UploadSettings(img_dir=str(tree.images), htpasswd=str(passwords)))
    assert call(app, "PUT", f"/images/{META}", b"1", extra=_basic("alice", "s3cret")).status == 201
    htpasswd.set_password(str(passwords), "alice", "new one")
    r = call(app, "PUT", f"/images/{META}", b"2", extra=_basic("alice", "s3cret"))
    assert r.status == 401
    r = call(app, "PUT", f"/images/{META}", b"3", extra=_basic("alice", "new one"))
    assert r.status == 201
    passwords.unlink()
    r = call(app, "PUT", f"/images/{META}", b"4", extra=_basic("alice", "new one"))
    assert r.status == 401
    htpasswd.set_password(str(passwords), "alice", "s3cret")
    tree.start()


def test_nothing_is_read_from_a_client_without_credentials(
    tree: Tree, passwords: Path, sockets: SocketServer
) -> None:
    app = make_app(UploadSettings(img_dir=str(tree.images), htpasswd=str(passwords)))
    sockets.client.sendall(b"x" * 1000)
    r = call(
        app,
        "PUT",
        f"/images/{META}",
        content_length=100 << 20,
        extra=sockets.environ(),
        stream=sockets.stream(),
    )
    assert r.status == 401
    # shut for reading: what was sent can still be read, then the end, without waiting for
    # the 100 MiB announced (a server draining the body would wait for them)
    sockets.server.settimeout(30)
    rest = b""
    while chunk := sockets.server.recv(65536):
        rest += chunk
    assert len(rest) <= 1000
    assert tree.empty()


def test_no_credentials_configured_refuses_everyone(tree: Tree, tmp_path: Path) -> None:
    for settings in (
        UploadSettings(img_dir=str(tree.images)),
        UploadSettings(img_dir=str(tree.images), htpasswd=str(tmp_path / "missing")),
    ):
        r = call(make_app(settings), "PUT", f"/images/{META}", b"x", extra=_basic("a", "b"))
        assert r.status == 401, r.body
    assert tree.empty()
    app = make_app(UploadSettings(img_dir=str(tree.images), allow_anonymous=True))
    assert call(app, "PUT", f"/images/{META}", b"x").status == 201


# -- 12: check-then-use races ------------------------------------------------------------------


def _swapper(images: Path, outside: Path, rel: str, stop: threading.Event) -> Callable[[], int]:
    """Swaps images/<rel> for a symlink to `outside` and back, as fast as it can."""
    target = images / rel
    aside = target.parent / ".aside"
    swaps = {"n": 0}

    def run() -> None:
        while not stop.is_set():
            try:
                os.rename(target, aside)
            except OSError:
                continue
            try:
                os.symlink(outside, target)
                swaps["n"] += 1
                if swaps["n"] % 2:
                    stop.wait(0.0005)  # long enough for a check-then-use to fall into
                os.unlink(target)
            except OSError:
                pass
            try:
                os.rename(aside, target)
            except OSError:  # the app made a new one meanwhile: drop ours
                shutil.rmtree(aside, ignore_errors=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def finish() -> int:
        stop.set()
        thread.join()
        shutil.rmtree(aside, ignore_errors=True)
        return swaps["n"]

    return finish


@pytest.mark.parametrize(("overwrites", "rel"), [(False, VERSION), (True, "busybox/1.35/amd64")])
def test_directory_swapped_for_a_symlink_during_uploads(
    tree: Tree, overwrites: bool, rel: str
) -> None:
    (tree.images / VERSION).mkdir(parents=True)
    tree.start()
    app = tree.app(allow_overwrites=True) if overwrites else tree.app()
    finish = _swapper(tree.images, tree.outside, rel, threading.Event())
    statuses: set[int] = set()
    try:
        for i in range(300):
            r = call(app, "PUT", f"/images/{VERSION}/f{i % 7}.tar.gz", b"payload %d" % i)
            statuses.add(r.status)
            assert r.status != 500, r.body
    finally:
        swaps = finish()
    assert swaps > 0
    assert statuses <= {201, 403, 409}, statuses
    r = call(app, "PUT", f"/images/{VERSION}/after.tar.gz", b"after the race")
    assert r.status == 201, r.body
    assert sorted(p.name for p in tree.outside.iterdir()) == ["precious"], statuses
    assert (tree.outside / "precious").read_text() == "do not touch"
    tree.check()


def test_symlinked_component_is_never_followed(tree: Tree) -> None:
    (tree.images / "real-busybox").mkdir()
    (tree.images / "busybox").symlink_to("real-busybox")
    r = call(tree.app(), "PUT", f"/images/{META}", b"x")
    assert r.status == 403, r.body
    assert "symbolic link" in r.json["error"]
    assert list((tree.images / "real-busybox").iterdir()) == []
    tree.check()


def test_modes_group_writable_dirs_no_exec_bits(tree: Tree) -> None:
    os.chmod(tree.images, 0o2775)
    old = os.umask(0o077)
    try:
        r = call(tree.app(), "PUT", f"/images/{META}", b"x")
    finally:
        os.umask(old)
    assert r.status == 201, r.body
    assert stat.S_IMODE((tree.images / META).stat().st_mode) == 0o644
    d = (tree.images / META).parent
    while d != tree.images:
        assert stat.S_IMODE(d.stat().st_mode) == 0o2775, d
        d = d.parent


# -- 11: stalled clients -----------------------------------------------------------------------


class SocketServer:
    """What gunicorn hands the app: a connected socket and a stream on it."""

    def __init__(self) -> None:
        self.server, self.client = socket.socketpair()

    def environ(self) -> dict[str, Any]:
        return {"gunicorn.socket": self.server}

    def stream(self) -> Any:
        return self.server.makefile("rb")

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture
def sockets() -> Iterator[SocketServer]:
    s = SocketServer()
    yield s
    s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["silent", "trickle"])
def test_stalled_body_is_cut_off(tree: Tree, sockets: SocketServer, how: str) -> None:
    app = tree.app(read_timeout=0.5)
    stop = threading.Event()
    sockets.client.sendall(b"x" * 1000)

    def trickle() -> None:
        while not stop.wait(0.05):
            try:
                sockets.client.sendall(b"x")
            except OSError:
                return

    feeder = threading.Thread(target=trickle, daemon=True)
    if how == "trickle":
        feeder.start()
    try:
        r = call(
            app,
            "PUT",
            f"/images/{META}",
            content_length=100 << 20,
            extra=sockets.environ(),
            stream=sockets.stream(),
        )
    finally:
        stop.set()
    assert r.status == 408, r.body
    _one_line(r.json["error"])
    assert tree.empty()
    tree.check()


def test_answer_is_json(tree: Tree) -> None:
    r = call(tree.app(), "PUT", f"/images/{META}", b"x")
    assert json.loads(r.body)["files"][0]["path"] == META


# -- issue 18, finding 5: a serial far ahead of the clock ---------------------------------------

FAR_AHEAD = "busybox/1.35/amd64/default/99991231_2359"


def test_put_a_serial_far_ahead_of_the_clock_is_refused(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    """99991231_2359 would be the newest version for good: its alias pinned, and with
    [retention] keep = N every real version pushed out of the catalog and off the disk."""
    r = call(tree.app(), "PUT", f"/images/{FAR_AHEAD}/lxd.tar.xz", b"payload")
    assert r.status == 400, r.body
    _one_line(r.json["error"])
    assert "ahead of this server's clock" in r.json["error"]
    assert tree.empty()
    _no_errors_logged(caplog)
    tree.check()


def test_post_a_serial_far_ahead_of_the_clock_is_refused(tree: Tree) -> None:
    body, ctype = form(("upload", f"{FAR_AHEAD}/lxd.tar.xz", b"payload"))
    r = call(tree.app(), "POST", "/images/", body, content_type=ctype)
    assert r.status == 400, r.body
    _one_line(r.json["error"])
    assert "ahead of this server's clock" in r.json["error"]
    assert tree.empty()
    tree.check()


def test_a_serial_far_ahead_can_still_be_deleted(tree: Tree) -> None:
    """One placed before such serials were refused must be removable over HTTPS."""
    version = tree.images / FAR_AHEAD
    version.mkdir(parents=True)
    (version / "lxd.tar.xz").write_bytes(b"old")
    app = tree.app(allow_deletes=True)
    assert call(app, "DELETE", f"/images/{FAR_AHEAD}/lxd.tar.xz").status == 200
    assert not (version / "lxd.tar.xz").exists()


# -- issue 18, finding 6: uploads in progress, counted per credential ----------------------------


class GatedStream:
    """A request body that says when the app starts reading it, then waits to be let go: an
    upload in progress (a slow or stalled client)."""

    def __init__(self, data: bytes, release: threading.Event) -> None:
        self.data = data
        self.started = threading.Event()
        self.release = release

    def read(self, n: int = -1) -> bytes:
        self.started.set()
        assert self.release.wait(30), "never released"
        out, self.data = self.data[: n if n >= 0 else None], self.data[n if n >= 0 else 0 :]
        return out if n >= 0 else out + self.data


def _in_progress(
    app: Callable[..., Any], n: int, extra: dict[str, str], release: threading.Event, tag: str
) -> tuple[list[threading.Thread], list[int]]:
    """`n` uploads that hold their slot until `release`; returns once all are inside the app."""
    statuses: list[int] = []
    threads, streams = [], []
    for i in range(n):
        data = f"{tag}-{i}".encode()
        stream = GatedStream(data, release)
        path = f"/images/{VERSION}/part-{tag}-{i}.tar.gz"

        def run(path: str = path, stream: GatedStream = stream, size: int = len(data)) -> None:
            r = call(app, "PUT", path, stream=stream, content_length=size, extra=extra)
            statuses.append(r.status)

        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        streams.append(stream)
    for s in streams:
        assert s.started.wait(30), "an upload never started"
    return threads, statuses


@pytest.mark.parametrize("shared", [False, True], ids=["per-process", "across-workers"])
def test_one_credential_runs_8_uploads_at_once_and_cannot_starve_another(
    tree: Tree, passwords: Path, tmp_path_factory: pytest.TempPathFactory, shared: bool
) -> None:
    """A CI job runs `xargs -P8 curl`; a ninth upload of the same credential is told to come
    back (429, Retry-After), while another credential's upload goes through. With a slots
    directory, gunicorn's worker processes count together (two apps here: two workers)."""
    slots = tmp_path_factory.mktemp("slots")  # outside the tree (tree.check looks there)
    settings = UploadSettings(
        img_dir=str(tree.images), htpasswd=str(passwords), slots_dir=str(slots) if shared else None
    )
    first, second = make_app(settings), make_app(settings)
    release = threading.Event()
    try:
        threads, statuses = _in_progress(first, 8, _basic("alice", "s3cret"), release, "a")
        ninth_app = second if shared else first
        r = call(
            ninth_app,
            "PUT",
            f"/images/{VERSION}/ninth.tar.gz",
            b"x",
            extra=_basic("alice", "s3cret"),
        )
        assert r.status == 429, r.body
        assert r.headers["Retry-After"].isdigit()
        _one_line(r.json["error"])
        r = call(
            ninth_app, "PUT", f"/images/{VERSION}/bob.tar.gz", b"b", extra=_basic("bob", "hunter2")
        )
        assert r.status == 201, r.body
    finally:
        release.set()
    for t in threads:
        t.join(30)
    assert statuses == [201] * 8
    assert not (tree.images / VERSION / "ninth.tar.gz").exists()
    # the slots are free again
    r = call(
        second, "PUT", f"/images/{VERSION}/ninth.tar.gz", b"x", extra=_basic("alice", "s3cret")
    )
    assert r.status == 201, r.body
    tree.check()


def test_anonymous_uploads_are_counted_per_client_address(tree: Tree) -> None:
    """Without credentials, the address nginx saw (it sets X-Real-IP itself) is the key."""
    app = make_app(UploadSettings(img_dir=str(tree.images), allow_anonymous=True, max_parallel=2))
    release = threading.Event()
    here = {"HTTP_X_REAL_IP": "192.0.2.1"}
    try:
        threads, statuses = _in_progress(app, 2, here, release, "anon")
        r = call(app, "PUT", f"/images/{VERSION}/third.tar.gz", b"x", extra=here)
        assert r.status == 429, r.body
        there = {"HTTP_X_REAL_IP": "192.0.2.2"}
        assert call(app, "PUT", f"/images/{VERSION}/other.tar.gz", b"y", extra=there).status == 201
    finally:
        release.set()
    for t in threads:
        t.join(30)
    assert statuses == [201, 201]
    tree.check()
