"""`push`'s client against a real HTTPS server on 127.0.0.1 (wsgiref + ssl in a thread) that
stands in for nginx: Basic auth and static reads in front of the real upload app.

The certificate is self-signed and trusted only through the context given to the client;
the default context (the system store) must refuse it.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from lxd_image_server.ops.import_detect import plan_import
from lxd_image_server.ops.import_naming import Naming
from lxd_image_server.ops.pushclient import (
    Client,
    PushError,
    Remote,
    parse_remote,
    push,
    read_password_file,
    uploads,
)
from lxd_image_server.progress import Progress, ProgressStart
from lxd_image_server.service import tls
from lxd_image_server.web.upload import UploadSettings, make_app

from .helpers import sha
from .test_importer import VERSION, split_export, unified_export

USER, PASSWORD = "upload", "s3cret"
App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeNginx:
    """Static GET/HEAD below `root`; writes (after Basic auth) go to the upload app."""

    def __init__(self, root: Path, upload: App | None = None) -> None:
        self.root = root
        self.upload = upload or make_app(
            # this stand-in checks the credentials, as nginx does; the app trusts it here
            UploadSettings(img_dir=str(root / "images"), allow_anonymous=True)
        )
        self.requests: list[tuple[str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        self.requests.append((method, path))
        if method in ("GET", "HEAD"):
            f = self.root / path.lstrip("/")
            if ".." in path.split("/") or not f.is_file():
                start_response("404 Not Found", [("Content-Length", "0")])
                return [b""]
            data = f.read_bytes()
            start_response("200 OK", [("Content-Length", str(len(data)))])
            return [b"" if method == "HEAD" else data]
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if environ.get("HTTP_AUTHORIZATION") != expected:
            start_response("401 Unauthorized", [("Content-Type", "text/html")])
            return [b"<html><title>401 Authorization Required</title></html>"]
        return self.upload(environ, start_response)


@dataclass
class Server:
    url: str
    remote: Remote
    context: ssl.SSLContext
    app: FakeNginx


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tls.CertResult:
    return tls.ensure_certificate(str(tmp_path_factory.mktemp("ssl")), ["127.0.0.1"])


def serve(app: App, cert: tls.CertResult) -> Iterator[tuple[int, ssl.SSLContext]]:
    httpd: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_path, cert.key_path)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], ssl.create_default_context(cafile=cert.cert_path)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def server(tmp_path: Path, cert: tls.CertResult) -> Iterator[Server]:
    (tmp_path / "root" / "images").mkdir(parents=True)
    app = FakeNginx(tmp_path / "root")
    for port, ctx in serve(app, cert):
        url = f"https://127.0.0.1:{port}"
        yield Server(url, parse_remote(url), ctx, app)


def client(server: Server, password: str | None = PASSWORD) -> Client:
    return Client(server.remote, USER, password, context=server.context, timeout=30)


def test_parse_remote() -> None:
    assert parse_remote("https://h.example:8443") == Remote("h.example", 8443, "")
    assert parse_remote("https://h.example/lxd/") == Remote("h.example", 443, "/lxd")
    assert parse_remote("https://[::1]:8443").url == "https://[::1]:8443"
    assert parse_remote("https://h:8443").path("a/b/c/d/20240101_12:00/lxd.tar.xz") == (
        "/images/a/b/c/d/20240101_12:00/lxd.tar.xz"
    )
    for bad in ("http://h:8443", "h:8443", "https://", "https://u:p@h", "https://h:99999"):
        with pytest.raises(ValueError):
            parse_remote(bad)


def test_push_split_image(server: Server, tmp_path: Path) -> None:
    meta, root = split_export(tmp_path / "export")
    plan = plan_import([str(root), str(meta)])
    progress: dict[str, int] = {}

    def progress_for(label: str) -> ProgressStart:
        def start(total: int) -> Progress:
            progress[label] = 0

            def advance(n: int) -> None:
                progress[label] += n

            return advance

        return start

    c = client(server)
    try:
        pushed = push(plan, c, progress_for)
    finally:
        c.close()
    assert [p.rel for p in pushed] == [f"{VERSION}/lxd.tar.xz", f"{VERSION}/rootfs.squashfs"]
    vdir = server.app.root / "images" / VERSION
    assert (vdir / "lxd.tar.xz").read_bytes() == meta.read_bytes()
    assert (vdir / "rootfs.squashfs").read_bytes() == root.read_bytes()
    assert pushed[1].sha256 == sha(root.read_bytes())
    assert progress == {"lxd.tar.xz": meta.stat().st_size, "rootfs.squashfs": root.stat().st_size}
    puts = [p for m, p in server.app.requests if m == "PUT" and "push-check" not in p]
    assert puts == [f"/images/{VERSION}/lxd.tar.xz", f"/images/{VERSION}/rootfs.squashfs"]


def test_push_unified_and_again_skips_identical_files(server: Server, tmp_path: Path) -> None:
    tarball = unified_export(tmp_path / "export")
    plan = plan_import([str(tarball)])
    assert uploads(plan) == [(str(tarball), f"{VERSION}/{tarball.name}")]
    c = client(server)
    try:
        assert not push(plan, c)[0].skipped
        again = push(plan, c)
    finally:
        c.close()
    assert again[0].skipped
    assert (server.app.root / "images" / VERSION / tarball.name).read_bytes() == (
        tarball.read_bytes()
    )


def test_unified_named_by_its_hash_when_renamed(tmp_path: Path) -> None:
    tarball = unified_export(tmp_path / "export")
    renamed = tarball.rename(tmp_path / "my-image.tar.gz")
    plan = plan_import([str(renamed)])
    assert uploads(plan)[0][1] == f"{VERSION}/{sha(renamed.read_bytes())}.tar.gz"


def test_other_content_on_the_server_is_not_overwritten(server: Server, tmp_path: Path) -> None:
    meta, root = split_export(tmp_path / "export")
    existing = server.app.root / "images" / VERSION / "lxd.tar.xz"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"something else")
    c = client(server)
    with pytest.raises(PushError, match="exists on the server with other content"):
        push(plan_import([str(meta), str(root)]), c)
    c.close()
    assert existing.read_bytes() == b"something else"
    assert not (existing.parent / "rootfs.squashfs").exists()


def test_wrong_password_is_refused_before_any_upload(server: Server, tmp_path: Path) -> None:
    meta, root = split_export(tmp_path / "export")
    for password, message in (
        ("wrong", r"refused the credentials of user 'upload' \(401\)"),
        (None, r"wants credentials \(401\) and no password was given"),
    ):
        c = client(server, password)
        with pytest.raises(PushError, match=message):
            push(plan_import([str(meta), str(root)]), c)
        c.close()
    assert not (server.app.root / "images" / "busybox").exists()
    assert [m for m, _ in server.app.requests] == ["PUT", "PUT"]  # only the empty checks


def test_untrusted_certificate_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    meta, root = split_export(tmp_path / "export")
    c = Client(server.remote, USER, PASSWORD)  # the system store: our test cert is not in it
    with pytest.raises(PushError, match=r"TLS certificate of 127\.0\.0\.1:\d+ is not trusted"):
        push(plan_import([str(meta), str(root)]), c)


def test_connection_refused_is_a_clear_error(tmp_path: Path, server: Server) -> None:
    meta, root = split_export(tmp_path / "export")
    c = Client(Remote("127.0.0.1", 1, ""), USER, PASSWORD, context=server.context)
    with pytest.raises(PushError, match=r"cannot talk to 127\.0\.0\.1:1"):
        push(plan_import([str(meta), str(root)]), c)


def status_app(status: str, body: dict[str, Any]) -> App:
    """An upload app that answers every write with `status` (after reading the body)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        environ["wsgi.input"].read(length)
        path = environ["PATH_INFO"]
        if "push-check" in path:
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [b'{"error": "invalid path"}']
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    return app


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        ("409 Conflict", {"error": "a component is not a directory"}, r"conflict .*409.*directory"),
        ("413 Content Too Large", {"error": "too big"}, r"too large .*413.*upload.max_size"),
        ("507 Insufficient Storage", {"error": "no space"}, r"no space left \(507\)"),
        ("502 Bad Gateway", {}, r"upload app does not answer \(502\)"),
        ("201 Created", {"files": [{"path": "x", "size": 1, "sha256": "00"}]}, "damaged"),
        (
            "201 Created",
            {"files": [{"path": "p", "stored_as": "p.1", "size": 1, "sha256": "0"}]},
            "not published",
        ),
        ("201 Created", {"nothing": True}, "not JSON as expected"),
    ],
)
def test_server_errors_are_explained(
    tmp_path: Path, cert: tls.CertResult, status: str, body: dict[str, Any], message: str
) -> None:
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    meta, rootfs = split_export(tmp_path / "export")
    app = FakeNginx(root, status_app(status, body))
    for port, ctx in serve(app, cert):
        c = Client(Remote("127.0.0.1", port, ""), USER, PASSWORD, context=ctx, timeout=30)
        with pytest.raises(PushError, match=message):
            push(plan_import([str(meta), str(rootfs)]), c)
        c.close()


def test_naming_options_apply_to_push(tmp_path: Path) -> None:
    meta, root = split_export(tmp_path / "export")
    plan = plan_import([str(meta), str(root)], Naming(variant="cloud", serial="20240202_0202"))
    assert [rel for _, rel in uploads(plan)] == [
        "busybox/1.35/amd64/cloud/20240202_0202/lxd.tar.xz",
        "busybox/1.35/amd64/cloud/20240202_0202/rootfs.squashfs",
    ]


def test_password_file(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("pa ss\nignored\n")
    assert read_password_file(str(f)) == "pa ss"
    f.write_text("\n")
    with pytest.raises(PushError, match="empty"):
        read_password_file(str(f))
    with pytest.raises(PushError, match="cannot read"):
        read_password_file(str(tmp_path / "missing"))
    os.unlink(f)


def raw_app(status: str, body: bytes) -> App:
    """An upload app that answers every write with `status` and exactly `body`."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if "push-check" in environ["PATH_INFO"]:
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [b'{"error": "invalid path"}']
        start_response(status, [("Content-Length", str(len(body)))])
        return [body]

    return app


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        ("201 Created", NESTED, "not JSON as expected"),
        ("500 Internal Server Error", NESTED, r"answered 500: \[\[\["),
        ("201 Created", b'{"files": [' + b" " * (4 << 20) + b"]}", "not JSON as expected"),
        ("418 I'm a teapot", b"x" * (4 << 20), "answered 418: xxx"),
    ],
)
def test_a_hostile_answer_is_a_push_error_in_bounded_memory(
    tmp_path: Path, cert: tls.CertResult, status: str, body: bytes, message: str
) -> None:
    """Nested deeper than Python's recursion limit, or larger than MAX_ANSWER: a clear
    PushError (never RecursionError), the message cut short."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    meta, rootfs = split_export(tmp_path / "export")
    for port, ctx in serve(FakeNginx(root, raw_app(status, body)), cert):
        c = Client(Remote("127.0.0.1", port, ""), USER, PASSWORD, context=ctx, timeout=30)
        with pytest.raises(PushError, match=message) as e:
            push(plan_import([str(meta), str(rootfs)]), c)
        assert len(str(e.value)) < 1000
        c.close()
