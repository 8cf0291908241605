"""The WSGI upload app: puts image files under images/, nothing else.

Runs behind nginx (which authenticates) under gunicorn:

    gunicorn --worker-class gthread 'lxd_image_server.upload:app_from_env()'

(gthread, or a --timeout far above the longest upload: a sync worker busy with one request
cannot heartbeat, and gunicorn kills it after --timeout seconds, 30 by default.)
Settings come from the environment: LXD_IMAGE_SERVER_IMG_DIR, ALLOW_OVERWRITES,
ALLOW_DELETES, DEBUG (1/true/yes/on or 0/false/no/off), UPLOAD_MAX_SIZE (bytes per file).

Routes (paths are below images/: os/release/arch/variant/serial/file):
- POST /images/          multipart/form-data; every `upload` field's *filename* is the path:
      curl "-Fupload=@lxd.tar.xz;filename=busybox/1.35/amd64/default/20240101_12:00/lxd.tar.xz"
- PUT /images/<path>     the raw body (curl -T file), Content-Length or chunked.
- DELETE /images/<path>  a file or a whole version directory (only with ALLOW_DELETES).

Every body is streamed into a hidden temporary file in the target directory (the catalog
watcher ignores hidden names), hashed on the way, fsynced and renamed into place; on any
failure the temporary file is removed, so nothing partial is ever visible. The catalog JSON is
never touched here: the watcher publishes what appears.

An existing file is replaced when overwrites are allowed; otherwise the new file is stored
beside it as `<name>.1` (`.2`, ...), a name the catalog does not publish, and the response says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import unquote_to_bytes
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from . import logs
from . import settings as settings_module
from .fsutil import fsync_dir
from .layout import (
    OVERRIDES_NAME,
    LayoutError,
    parse_file_path,
    parse_version_dir,
)
from .multipart import MultipartError, MultipartReader, Part, boundary_from_content_type
from .overrides import parse_overrides

log = logging.getLogger(__name__)

DEFAULT_IMG_DIR = "/var/www/simplestreams/images"
CHUNK_SIZE = 1 << 20
#: Chunks received but not yet written and hashed, at most (memory: SINK_DEPTH + 2 chunks).
SINK_DEPTH = 2
#: metadata.json is read whole by the catalog; keep it small.
MAX_OVERRIDES_SIZE = 64 * 1024
#: After an error, at most this much of an unread body is read and discarded, so the client
#: gets the response instead of a reset connection. Larger rests are left unread.
DRAIN_LIMIT = 16 << 20
#: `<name>.1` ... `<name>.N` are tried when the name is taken and overwrites are off.
MAX_ALTERNATES = 1000
FILE_MODE = 0o644
DIR_MODE = 0o755
UPLOAD_FIELD = "upload"
_COLLECTION = "/images"
_FORM_HINT = "-F 'upload=@lxd.tar.xz;filename=os/release/arch/variant/serial/lxd.tar.xz'"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


@dataclass(frozen=True)
class UploadSettings:
    img_dir: str
    allow_overwrites: bool = False
    allow_deletes: bool = False
    #: Bytes per file; None: no limit.
    max_size: int | None = None
    #: Log every request (method, path, status, bytes, seconds).
    debug: bool = False


class HTTPError(Exception):
    """A request that cannot be served: status and a message for the client.

    `fatal`: the request body can no longer be trusted or read (stop a multipart upload);
    otherwise only the current file failed and the next parts can still be processed.
    """

    def __init__(
        self,
        status: int,
        message: str,
        fatal: bool = False,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fatal = fatal
        self.headers = headers


class ClientDisconnected(HTTPError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message, fatal=True)


_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    507: "Insufficient Storage",
}


# -- the request body ------------------------------------------------------------------------


class BodyReader:
    """wsgi.input limited to the request body.

    With a Content-Length, never reads past it, and a body that ends early (the client went
    away) raises ClientDisconnected. Without one (chunked; the server sets
    wsgi.input_terminated) reads until b"". Any error from the server's stream is taken as a
    disconnect.
    """

    def __init__(self, stream: BinaryIO | None, length: int | None, delimited: bool = True) -> None:
        self._stream = stream
        self.remaining = length
        self.received = 0
        self.finished = length == 0 or stream is None
        #: False: neither a Content-Length nor a server that marks the end of the body.
        self.delimited = delimited

    def read(self, n: int = CHUNK_SIZE) -> bytes:
        if self.finished or self._stream is None:
            return b""
        if self.remaining is not None:
            n = min(n, self.remaining)
        try:
            data = self._stream.read(n)
        except Exception as e:
            self.finished = True
            why = str(e) or type(e).__name__
            raise ClientDisconnected(f"reading the request body failed: {why}") from e
        if not data:
            self.finished = True
            if self.remaining:
                raise ClientDisconnected(
                    f"the request body ended {self.remaining} bytes short of its "
                    "Content-Length (client disconnected?)"
                )
            return b""
        data = data[:n]
        self.received += len(data)
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self.finished = True
        return data

    def drain(self, limit: int = DRAIN_LIMIT) -> None:
        """Reads and discards the rest, unless it is known to be larger than `limit`."""
        if self.finished or (self.remaining is not None and self.remaining > limit):
            return
        seen = 0
        with contextlib.suppress(HTTPError):
            while seen <= limit and (data := self.read()):
                seen += len(data)


def _body_reader(environ: WSGIEnvironment) -> BodyReader:
    stream = environ.get("wsgi.input")
    raw = str(environ.get("CONTENT_LENGTH") or "").strip()
    if raw:
        if not raw.isdigit():
            raise HTTPError(400, f"invalid Content-Length {raw!r}")
        return BodyReader(stream, int(raw))
    if environ.get("wsgi.input_terminated"):
        return BodyReader(stream, None)
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
        raw = text.encode("utf-8")
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


def _inside(root_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([root_real, real]) == root_real


# -- the app ---------------------------------------------------------------------------------


@dataclass
class _Stored:
    path: str
    stored_as: str
    size: int
    sha256: str
    replaced: bool = False
    warning: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.stored_as != self.path:
            doc["stored_as"] = self.stored_as
            doc["note"] = (
                f"{self.path} exists; stored as {self.stored_as}, which is not published; "
                "set ALLOW_OVERWRITES to replace it"
            )
        if self.replaced:
            doc["replaced"] = True
        if self.warning:
            doc["warning"] = f"metadata.json: {self.warning}"
        return doc


@dataclass
class _Outcome:
    status: int
    body: dict[str, Any]
    headers: list[tuple[str, str]] = field(default_factory=list)


class UploadApp:
    def __init__(self, settings: UploadSettings) -> None:
        self.settings = settings
        self.img_dir = os.path.abspath(settings.img_dir)

    # -- WSGI -------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        shown = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        body: BodyReader | None = None
        try:
            body = _body_reader(environ)
            outcome = self._dispatch(method, environ, body)
        except HTTPError as e:
            outcome = _Outcome(e.status, {"error": e.message}, list(e.headers))
        except Exception:
            log.exception("%s %s failed", method, shown)
            outcome = _Outcome(500, {"error": "internal error; see the server log"})
        if body is not None and outcome.status >= 400:
            body.drain()
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
                outcome.body.get("error"),
            )  # fmt: skip
        elif self.settings.debug:
            log.info(
                "%s %s -> %d (%d bytes, %.3f s)", method, shown, outcome.status, received, elapsed
            )
        return [payload]

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
        limit = self.settings.max_size
        if limit is not None and body.remaining is not None and body.remaining > limit:
            raise HTTPError(413, f"{body.remaining} bytes is more than the limit of {limit} bytes")
        stored = self._store(rel, body.read)
        return _Outcome(201, {"files": [stored.as_json()]})

    def _post(self, environ: WSGIEnvironment, body: BodyReader) -> _Outcome:
        _require_length(body)
        content_type = str(environ.get("CONTENT_TYPE", ""))
        try:
            boundary = boundary_from_content_type(content_type)
        except MultipartError as e:
            status = 415 if not content_type.lower().startswith("multipart/") else 400
            raise HTTPError(status, str(e)) from None
        reader = MultipartReader(body.read, boundary, CHUNK_SIZE)
        stored: list[_Stored] = []
        failed: list[dict[str, Any]] = []
        first_error: HTTPError | None = None
        while True:
            current: str | None = None
            try:
                part = reader.next_part()
                if part is None:
                    break
                if part.name != UPLOAD_FIELD:
                    continue  # other fields are ignored (their data is skipped)
                if not part.filename:
                    raise HTTPError(400, "an 'upload' field without a filename (the path)")
                current = _decode_filename(part.filename)
                stored.append(self._store(current, _part_reader(part)))
            except (HTTPError, MultipartError) as e:
                err = e if isinstance(e, HTTPError) else HTTPError(400, str(e), fatal=True)
                if err.status == 400 and err.message.startswith("invalid path"):
                    err.message += f" (the filename is the path below images/: {_FORM_HINT})"
                first_error = first_error or err
                failed.append({"path": current, "status": err.status, "error": err.message})
                if err.fatal:
                    break
        if first_error is None and not stored:
            raise HTTPError(400, f"no '{UPLOAD_FIELD}' file field in the form")
        doc: dict[str, Any] = {"files": [s.as_json() for s in stored]}
        if first_error is None:
            return _Outcome(201, doc)
        doc["failed"] = failed
        kept = f"; stored {len(stored)} file(s) before it" if stored else ""
        doc["error"] = first_error.message + kept
        return _Outcome(first_error.status, doc)

    def _delete(self, rel: str) -> _Outcome:
        rel = rel[:-1] if rel.endswith("/") else rel
        parts = rel.split("/")
        try:
            is_dir = len(parts) == 5
            if is_dir:
                parse_version_dir(parts)
            else:
                parse_file_path(rel)
        except LayoutError as e:
            raise HTTPError(400, f"invalid path {rel!r}: {e}") from None
        target = os.path.join(self.img_dir, rel)
        self._check_inside(target, rel)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise HTTPError(404, f"{rel} does not exist") from None
        parent = os.path.dirname(target)
        if is_dir:
            if not stat.S_ISDIR(st.st_mode):
                raise HTTPError(400, f"{rel} is not a version directory")
            # One rename makes the whole version vanish at once for the watcher.
            doomed = os.path.join(parent, f".deleting-{secrets.token_hex(8)}")
            os.rename(target, doomed)
            fsync_dir(parent)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            if stat.S_ISDIR(st.st_mode):
                raise HTTPError(400, f"{rel} is a directory, not a file")
            os.unlink(target)
            fsync_dir(parent)
        self._prune(parent)
        log.info("deleted %s", rel)
        return _Outcome(200, {"deleted": rel})

    # -- storing one file -------------------------------------------------------------------

    def _check_inside(self, target: str, rel: str) -> None:
        if not os.path.isdir(self.img_dir):
            raise HTTPError(500, f"the image directory {self.img_dir} does not exist")
        if not _inside(os.path.realpath(self.img_dir), target):
            raise HTTPError(403, f"{rel} leads outside the image directory (symlink)")

    def _store(self, rel: str, read: Callable[[int], bytes]) -> _Stored:
        """Streams one file to `rel` below images/; HTTPError (temp file removed) on failure."""
        try:
            key, name = parse_file_path(rel)
        except LayoutError as e:
            raise HTTPError(400, f"invalid path {rel!r}: {e}") from None
        target_dir = os.path.join(self.img_dir, key.relpath)
        self._check_inside(os.path.join(target_dir, name), rel)
        limit = self.settings.max_size
        keep: bytearray | None = None
        if name == OVERRIDES_NAME:
            limit = MAX_OVERRIDES_SIZE if limit is None else min(limit, MAX_OVERRIDES_SIZE)
            keep = bytearray()
        created: list[str] = []  # directories made for this file: removed again if it fails
        try:
            fd, tmp = self._open_temp(key.relpath, target_dir, created)
        except BaseException:
            _remove_empty(created)
            raise
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb", buffering=0, closefd=True) as f:
                os.fchmod(f.fileno(), FILE_MODE)
                sink = _Sink(f, digest)
                try:
                    while chunk := read(CHUNK_SIZE):
                        size += len(chunk)
                        if limit is not None and size > limit:
                            raise HTTPError(413, f"{rel} is larger than the limit of {limit} bytes")
                        sink.put(chunk)
                        if keep is not None:
                            keep += chunk
                finally:
                    sink.close()
                os.fsync(f.fileno())
            warning = None
            if keep is not None:
                _, problem = parse_overrides(bytes(keep))
                if problem and problem.startswith(("invalid JSON", "top level")):
                    raise HTTPError(400, f"{rel}: {problem.removesuffix('; using defaults')}")
                warning = problem
            final, replaced = self._place(tmp, target_dir, name)
            fsync_dir(target_dir)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            _remove_empty(created)
            if isinstance(e, OSError):
                raise _os_error(e, rel) from e
            raise
        stored_as = f"{key.relpath}/{final}"
        log.info("stored %s (%d bytes, sha256 %s)", stored_as, size, digest.hexdigest())
        return _Stored(rel, stored_as, size, digest.hexdigest(), replaced, warning)

    def _open_temp(self, relpath: str, target_dir: str, created: list[str]) -> tuple[int, str]:
        for attempt in range(3):
            try:
                self._makedirs(relpath, created)
                return tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=target_dir)
            except FileNotFoundError:
                # A concurrent DELETE pruned a directory we had just created; once more.
                if attempt == 2:
                    raise HTTPError(409, f"{relpath} kept disappearing; try again") from None
            except NotADirectoryError:
                raise HTTPError(409, f"a component of {relpath} is not a directory") from None
            except OSError as e:
                raise _os_error(e, relpath) from e
        raise AssertionError("unreachable")

    def _makedirs(self, relpath: str, created: list[str]) -> None:
        """mkdir -p below images/, each new directory 0755 whatever the umask (and listed
        in `created`)."""
        path = self.img_dir
        for component in relpath.split("/"):
            parent, path = path, os.path.join(path, component)
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
                continue
            created.append(path)
            os.chmod(path, DIR_MODE)
            fsync_dir(parent)

    def _place(self, tmp: str, target_dir: str, name: str) -> tuple[str, bool]:
        """Renames the finished temp file into place -> (final name, replaced an old file)."""
        target = os.path.join(target_dir, name)
        if self.settings.allow_overwrites:
            existed = os.path.lexists(target)
            try:
                os.replace(tmp, target)
            except IsADirectoryError:
                raise HTTPError(409, f"{name} is a directory") from None
            return name, existed
        # link() never replaces: two uploads racing for one name cannot clobber each other.
        # (An empty file is renamed instead: the watcher takes a new empty file as "being
        # written" until it is closed, which a link never is.)
        use_link = os.stat(tmp).st_size > 0
        for n in range(MAX_ALTERNATES + 1):
            candidate = name if n == 0 else f"{name}.{n}"
            path = os.path.join(target_dir, candidate)
            if use_link:
                try:
                    os.link(tmp, path, follow_symlinks=False)
                except FileExistsError:
                    continue
                except OSError as e:
                    if e.errno not in _NO_LINKS:
                        raise
                    use_link = False  # a file system without hard links
                else:
                    os.unlink(tmp)
                    return candidate, False
            if not os.path.lexists(path):
                os.rename(tmp, path)
                return candidate, False
        raise HTTPError(409, f"{name} and {MAX_ALTERNATES} alternate names are all taken")

    def _prune(self, directory: str) -> None:
        """Removes directories left empty by a delete, up to (not including) images/."""
        root = self.img_dir
        while directory != root and os.path.commonpath([root, directory]) == root:
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)
            fsync_dir(directory)


def _require_length(body: BodyReader) -> None:
    if not body.delimited:
        raise HTTPError(411, "a Content-Length (or a chunked body) is required")


def _part_reader(part: Part) -> Callable[[int], bytes]:
    def read(_n: int) -> bytes:
        try:
            return part.read()
        except MultipartError as e:
            raise HTTPError(400, f"malformed multipart body: {e}", fatal=True) from None

    return read


def _remove_empty(created: list[str]) -> None:
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            return


class _Sink:
    """Writes and hashes the chunks in a second thread, so that the request thread receives
    the next chunk meanwhile (os.write and hashlib release the GIL). At most SINK_DEPTH
    chunks wait in the queue, so memory stays flat."""

    def __init__(self, f: BinaryIO, digest: Any) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(SINK_DEPTH)
        self._f = f
        self._digest = digest
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="upload-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    _write_all(self._f, chunk)
                    self._digest.update(chunk)
                except BaseException as e:  # re-raised in the request thread
                    self._error = e

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        """Waits until every chunk is written; raises the writer's error, if any."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _write_all(f: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = f.write(view)
        view = view[written:]


def _os_error(e: OSError, rel: str) -> HTTPError:
    if e.errno in _NO_SPACE:
        return HTTPError(507, f"no space left for {rel}", fatal=True)
    return HTTPError(500, f"storing {rel} failed: {e.strerror or e}", fatal=True)


def _not_allowed(method: str, allowed: str, hint: str) -> HTTPError:
    return HTTPError(405, f"{method} is not allowed here; {hint}", headers=(("Allow", allowed),))


# -- construction ----------------------------------------------------------------------------


def make_app(settings: UploadSettings) -> WSGIApplication:
    return UploadApp(settings)


def settings_from_env(env: Mapping[str, str] | None = None) -> UploadSettings:
    """From the layered configuration (upload.* in config.toml) and the environment:
    LXD_IMAGE_SERVER_IMG_DIR, ALLOW_OVERWRITES, ALLOW_DELETES, DEBUG, UPLOAD_MAX_SIZE."""
    env = os.environ if env is None else env
    cfg = settings_module.load(env=env)
    return UploadSettings(
        img_dir=env.get("LXD_IMAGE_SERVER_IMG_DIR", "").strip()
        or os.path.join(cfg.root_dir, "images"),
        allow_overwrites=cfg.allow_overwrites,
        allow_deletes=cfg.allow_deletes,
        max_size=cfg.max_upload_size,
        debug=cfg.debug,
    )


def app_from_env(env: Mapping[str, str] | None = None) -> WSGIApplication:
    """The app for gunicorn: `gunicorn 'lxd_image_server.upload:app_from_env()'`."""
    settings = settings_from_env(env)
    if not logging.getLogger().handlers:
        logs.setup("STDERR", verbose=settings.debug)
    log.info(
        "uploads to %s (overwrites %s, deletes %s, max size %s)",
        settings.img_dir,
        "on" if settings.allow_overwrites else "off",
        "on" if settings.allow_deletes else "off",
        settings.max_size or "unlimited",
    )
    return make_app(settings)
