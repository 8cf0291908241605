"""The WSGI upload app: puts image files under images/, nothing else.

Runs behind nginx under gunicorn, with the settings of lxd_image_server.web.gunicorn_conf:

    python3 -m gunicorn -c python:lxd_image_server.web.gunicorn_conf --bind unix:SOCKET \\
        'lxd_image_server.web.upload:app_from_env()'

Its settings come from the environment and upload.* in config.toml (upload_settings.py).

Every request must carry Basic credentials of a user in the htpasswd file, checked here (nginx
checks them too, but the socket can be reached without nginx), unless anonymous uploads are
explicitly allowed. Nothing a proxy adds (X-Remote-User) is taken as a credential.

Routes (paths are below images/: os/release/arch/variant/serial/file):
- POST /images/          multipart/form-data; every `upload` field's *filename* is the path:
      curl "-Fupload=@lxd.tar.xz;filename=busybox/1.35/amd64/default/20240101_12:00/lxd.tar.xz"
- PUT /images/<path>     the raw body (curl -T file), Content-Length or chunked.
- DELETE /images/<path>  a file or a whole version directory (only with ALLOW_DELETES).

Files are stored by upload_store (hidden temporary file, fsync, rename; never through a link).
An existing file is replaced when overwrites are allowed; otherwise the new file is stored
beside it as `<name>.1` (`.2`, ...), a name the catalog does not publish, and the response says
so. Every refused request gets a 4xx status and a one-line reason; the answer stays small
whatever the body holds (at most MAX_PARTS parts, MAX_REPORTED failures listed).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from lxd_image_server import logs
from lxd_image_server.web.multipart import (
    MultipartError,
    MultipartReader,
    Part,
    boundary_from_content_type,
)
from lxd_image_server.web.upload_auth import Credentials, CredentialsUnavailable, challenge
from lxd_image_server.web.upload_body import READ_PIECE, BodyReader, StallGuard, raw_body
from lxd_image_server.web.upload_errors import HTTPError, clip, quote
from lxd_image_server.web.upload_paths import (
    check_file_path,
    check_new_file_path,
    check_version_path,
)
from lxd_image_server.web.upload_settings import UploadSettings, settings_from_env
from lxd_image_server.web.upload_sink import ReadInto
from lxd_image_server.web.upload_slots import UploadSlots
from lxd_image_server.web.upload_store import MAX_OVERRIDES_SIZE, Store, Stored

log = logging.getLogger(__name__)

__all__ = [
    "MAX_OVERRIDES_SIZE",
    "HTTPError",
    "UploadApp",
    "UploadSettings",
    "app_from_env",
    "make_app",
    "settings_from_env",
]

#: Bytes of a refused body still read before a 401 (a small upload's whole body).
UNAUTHORIZED_DRAIN = 64 * 1024
#: Parts of one multipart body, at most (any field counts); the rest is refused (413).
MAX_PARTS = 256
#: Failed parts listed in an answer, at most; the rest are only counted.
MAX_REPORTED = 10
UPLOAD_FIELD = "upload"
_COLLECTION = "/images"
_FORM_HINT = "-F 'upload=@lxd.tar.xz;filename=os/release/arch/variant/serial/lxd.tar.xz'"

_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    507: "Insufficient Storage",
}


# -- the request body ------------------------------------------------------------------------


def _client_socket(environ: WSGIEnvironment) -> socket.socket | None:
    sock = environ.get("gunicorn.socket")
    return sock if isinstance(sock, socket.socket) else None


def _body_reader(environ: WSGIEnvironment, guard: StallGuard) -> BodyReader:
    stream = environ.get("wsgi.input")
    sock = _client_socket(environ)
    raw = str(environ.get("CONTENT_LENGTH") or "").strip()
    if raw:
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
            raise HTTPError(400, f"invalid Content-Length {quote(raw)}")
        length = int(raw)
        fast = raw_body(stream, sock, length)
        return BodyReader(fast or stream, length, guard=guard, sock=sock)
    if environ.get("wsgi.input_terminated"):
        return BodyReader(stream, None, guard=guard, sock=sock)
    # Without either, the end of the body cannot be told: read nothing (fine for DELETE).
    return BodyReader(stream, 0, delimited=False)


# -- paths -----------------------------------------------------------------------------------


def _decode_path(text: str) -> str:
    """A WSGI path string (latin-1 carrying bytes) -> text, %-decoded once more if needed.

    Valid image paths never contain '%', so a '%' left after the server's decoding can only
    come from a client or proxy that encoded twice (':' as %253A); decode it the same way as
    a multipart filename.
    """
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the path is not valid UTF-8") from None


def _decode_filename(name: str) -> str:
    if "%" in name:
        try:
            return unquote_to_bytes(name).decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "the filename is not valid UTF-8") from None
    return name


# -- the app ---------------------------------------------------------------------------------


@dataclass
class _Outcome:
    status: int
    body: dict[str, Any]
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: For the log only: what went wrong inside (a 500).
    internal: str | None = None


class UploadApp:
    def __init__(self, settings: UploadSettings) -> None:
        self.settings = settings
        self.img_dir = os.path.abspath(settings.img_dir)
        self.store = Store(
            self.img_dir, settings.allow_overwrites, settings.max_size, settings.digest_dir
        )
        self.credentials = Credentials(settings.htpasswd) if settings.htpasswd else None
        self.guard = StallGuard(settings.read_timeout)
        self.slots = UploadSlots(settings.slots_dir, settings.max_parallel)

    # -- WSGI -------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        shown = clip(str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "")))
        body: BodyReader | None = None
        user = "-"
        try:
            body = _body_reader(environ, self.guard)
            user = self._authenticate(environ)
            with self.slots.hold(self._slot_key(user, environ)):
                outcome = self._dispatch(method, environ, body)
        except HTTPError as e:
            outcome = _Outcome(e.status, {"error": e.message}, list(e.headers))
        except Exception as e:
            outcome = _Outcome(
                500,
                {"error": "internal error; see the server log"},
                internal=f"{type(e).__name__}: {clip(str(e))}",
            )
            log.debug("%s %s failed", method, shown, exc_info=True)
        if body is not None and outcome.status in (401, 429):
            # a small rest is read, so that the client reads its 401 (or 429) instead of a
            # broken pipe; beyond that nothing more is read from a client without credentials
            # (or with too many uploads in progress)
            body.drain(UNAUTHORIZED_DRAIN)
            body.abandon()
        elif body is not None and outcome.status == 408:
            # nothing more is read from a client that stalled
            body.abandon()
        elif body is not None and outcome.status >= 400:
            body.drain()
        if body is not None and body.unread_on_socket:
            # gunicorn takes the body as read: the connection must not carry another request
            body.abandon()
        payload = json.dumps(outcome.body, sort_keys=True).encode() + b"\n"
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            *outcome.headers,
        ]
        start_response(f"{outcome.status} {_REASONS.get(outcome.status, 'Error')}", headers)
        received = body.received if body is not None else 0
        elapsed = time.monotonic() - started
        if outcome.status >= 500:
            log.error(
                "%s %s -> %d (%d bytes, %.3f s): %s",
                method, shown, outcome.status, received, elapsed,
                outcome.internal or outcome.body.get("error"),
            )  # fmt: skip
        elif self.settings.debug:
            log.info(
                "%s %s by %s -> %d (%d bytes, %.3f s)",
                method, shown, user, outcome.status, received, elapsed,
            )  # fmt: skip
        return [payload]

    def _authenticate(self, environ: WSGIEnvironment) -> str:
        """The user the request's credentials name, or "anonymous"; else 401."""
        if self.settings.allow_anonymous:
            return "anonymous"
        if self.credentials is None:
            raise HTTPError(
                401, "uploads need credentials, and none are configured", headers=challenge()
            )
        header = environ.get("HTTP_AUTHORIZATION")
        try:
            user = self.credentials.user_of(header if isinstance(header, str) else None)
        except CredentialsUnavailable as e:
            raise HTTPError(500, f"credentials cannot be checked: {clip(str(e))}") from None
        if user is None:
            why = "wrong credentials" if header else "credentials required"
            raise HTTPError(401, why, headers=challenge())
        return user

    def _slot_key(self, user: str, environ: WSGIEnvironment) -> str:
        """Whose uploads are counted together: the credential's, or with anonymous uploads the
        client address nginx saw (it sets X-Real-IP itself, whatever the client sent)."""
        if not self.settings.allow_anonymous:
            return f"credential:{user}"
        address = environ.get("HTTP_X_REAL_IP") or environ.get("REMOTE_ADDR") or "local"
        return f"address:{address}"

    def _dispatch(self, method: str, environ: WSGIEnvironment, body: BodyReader) -> _Outcome:
        path = _decode_path(str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "")))
        if path in (_COLLECTION, _COLLECTION + "/"):
            if method != "POST":
                raise _not_allowed(method, "POST", "upload with POST multipart/form-data here")
            return self._post(environ, body)
        if not path.startswith(_COLLECTION + "/"):
            raise HTTPError(404, "not found: uploads go to /images/")
        rel = path[len(_COLLECTION) + 1 :]
        if method == "PUT":
            return self._put(rel, body)
        if method == "DELETE":
            if not self.settings.allow_deletes:
                raise _not_allowed(method, "PUT", "deletes are disabled; set ALLOW_DELETES")
            return self._delete(rel)
        allowed = "PUT, DELETE" if self.settings.allow_deletes else "PUT"
        raise _not_allowed(method, allowed, "PUT a file here")

    # -- routes -----------------------------------------------------------------------------

    def _put(self, rel: str, body: BodyReader) -> _Outcome:
        _require_length(body)
        key, name = check_new_file_path(rel)
        limit = self.settings.max_size
        if limit is not None and body.remaining is not None and body.remaining > limit:
            raise HTTPError(413, f"{body.remaining} bytes is more than the limit of {limit} bytes")
        stored = self.store.store(key, name, body.readinto)
        return _Outcome(201, {"files": [stored.as_json()]})

    def _post(self, environ: WSGIEnvironment, body: BodyReader) -> _Outcome:
        _require_length(body)
        content_type = str(environ.get("CONTENT_TYPE", ""))
        try:
            boundary = boundary_from_content_type(content_type)
        except MultipartError as e:
            status = 415 if not content_type.lower().startswith("multipart/") else 400
            raise HTTPError(status, clip(str(e))) from None
        reader = MultipartReader(body.read, boundary, READ_PIECE, readinto=body.readinto)
        stored: list[Stored] = []
        failed: list[dict[str, Any]] = []
        failures = 0
        first_error: HTTPError | None = None
        parts = 0
        while True:
            current: str | None = None
            try:
                part = reader.next_part()
                if part is None:
                    break
                parts += 1
                if parts > MAX_PARTS:
                    raise HTTPError(413, f"more than {MAX_PARTS} parts in one request", fatal=True)
                if part.name != UPLOAD_FIELD:
                    continue  # other fields are ignored (their data is skipped)
                if not part.filename:
                    raise HTTPError(400, "an 'upload' field without a filename (the path)")
                current = part.filename
                rel = _decode_filename(part.filename)
                current = rel
                key, name = _with_hint(check_new_file_path, rel)
                stored.append(self.store.store(key, name, _part_reader(part)))
            except (HTTPError, MultipartError) as e:
                err = (
                    e
                    if isinstance(e, HTTPError)
                    else HTTPError(400, f"malformed multipart body: {clip(str(e))}", fatal=True)
                )
                first_error = first_error or err
                failures += 1
                if len(failed) < MAX_REPORTED:
                    failed.append(
                        {
                            "path": None if current is None else clip(current, 120),
                            "status": err.status,
                            "error": err.message,
                        }
                    )
                if err.fatal:
                    break
        if first_error is None and not stored:
            raise HTTPError(400, f"no '{UPLOAD_FIELD}' file field in the form")
        doc: dict[str, Any] = {"files": [s.as_json() for s in stored]}
        if first_error is None:
            return _Outcome(201, doc)
        doc["failed"] = failed
        if failures > len(failed):
            doc["failed_count"] = failures
        kept = f"; stored {len(stored)} file(s) before it" if stored else ""
        more = f" ({failures} parts failed)" if failures > 1 else ""
        doc["error"] = first_error.message + more + kept
        return _Outcome(first_error.status, doc)

    def _delete(self, rel: str) -> _Outcome:
        rel = rel[:-1] if rel.endswith("/") else rel
        parts = rel.split("/")
        if len(parts) == 5:
            check_version_path(rel)
            deleted = self.store.delete(parts[:4], parts[4], version=True)
        else:
            key, name = check_file_path(rel)
            deleted = self.store.delete(key.relpath.split("/"), name, version=False)
        return _Outcome(200, {"deleted": deleted})


def _with_hint(check: Any, rel: str) -> Any:
    try:
        return check(rel)
    except HTTPError as e:
        if e.status == 400 and e.message.startswith("invalid path"):
            e.message += f" (the filename is the path below images/: {_FORM_HINT})"
        raise


def _require_length(body: BodyReader) -> None:
    if not body.delimited:
        raise HTTPError(411, "a Content-Length (or a chunked body) is required")


def _part_reader(part: Part) -> ReadInto:
    """Fills a buffer with the part's next bytes. The store's buffers (whole mmaps) are
    filled with Part.fill, which reads the body straight into them; any other view through
    a copy."""

    def readinto(view: memoryview) -> int:
        total = 0
        base = view.obj
        try:
            if isinstance(base, mmap.mmap | bytearray) and view.nbytes == len(base):
                return part.fill(base, 0, len(base))  # the whole buffer: offsets are its own
            while total < len(view) and (n := part.readinto(view[total:])):
                total += n
        except MultipartError as e:
            msg = f"malformed multipart body: {clip(str(e))}"
            raise HTTPError(400, msg, fatal=True) from None
        return total

    return readinto


def _not_allowed(method: str, allowed: str, hint: str) -> HTTPError:
    return HTTPError(
        405, f"{clip(method, 20)} is not allowed here; {hint}", headers=(("Allow", allowed),)
    )


# -- construction ----------------------------------------------------------------------------


def make_app(settings: UploadSettings) -> WSGIApplication:
    return UploadApp(settings)


def app_from_env(env: Mapping[str, str] | None = None) -> WSGIApplication:
    """The app for gunicorn: `gunicorn 'lxd_image_server.web.upload:app_from_env()'`."""
    settings = settings_from_env(env)
    if not logging.getLogger().handlers:
        logs.setup("STDERR", verbose=settings.debug)
    if settings.allow_anonymous:
        log.warning("anonymous uploads are allowed: anyone who reaches the socket may upload")
    log.info(
        "uploads to %s (credentials %s, overwrites %s, deletes %s, max size %s)",
        settings.img_dir,
        "not needed" if settings.allow_anonymous else f"from {settings.htpasswd}",
        "on" if settings.allow_overwrites else "off",
        "on" if settings.allow_deletes else "off",
        settings.max_size or "unlimited",
    )
    return make_app(settings)
