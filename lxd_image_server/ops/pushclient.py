"""`push`: send an exported image from a workstation to a server's upload app over HTTPS.

The files are named exactly as `import` would name them (import_detect.plan_import reads the same
metadata.yaml), then sent one PUT per file, metadata tarball first, to
<remote>/images/<os>/<release>/<arch>/<variant>/<serial>/<name>. The server answers 201 with
{"files": [{"path", "size", "sha256"}]}; the sha256 computed here while sending must match.

Only the standard library: http.client over ssl.create_default_context(), so the server's
certificate must chain to a CA in this machine's system store (as for `lxc remote add`).
Before any large body is sent, one empty request checks the credentials, and a HEAD per file
checks that it is not on the server already (an identical file is skipped).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

from lxd_image_server import envnames
from lxd_image_server.fsutil import CHUNK_SIZE, load_json_bounded
from lxd_image_server.ops.import_detect import ImagePlan
from lxd_image_server.progress import Progress, ProgressStart, no_progress

log = logging.getLogger(__name__)

DEFAULT_USER = "upload"
PASSWORD_ENV = envnames.PASSWORD
TIMEOUT = 300.0
#: the most of a server's answer read (the rest is dropped with the connection), and how deeply
#: its JSON may nest: a broken or hostile server cannot exhaust this process
MAX_ANSWER = 1 << 20
MAX_ANSWER_DEPTH = 32

#: label -> a progress callback factory (called with the total bytes), or None
ProgressFor = Callable[[str], ProgressStart | None]


class PushError(Exception):
    """The push failed; the message says why and what to do."""


@dataclass(frozen=True)
class Remote:
    host: str
    port: int
    #: path prefix of the server's root, without a trailing slash ('' at the top)
    base: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}{self.base}"

    def path(self, rel: str) -> str:
        return f"{self.base}/images/{quote(rel, safe='/:~+')}"


def parse_remote(url: str) -> Remote:
    """'https://HOST[:PORT][/prefix]' -> Remote. Raises ValueError."""
    parts = urlsplit(url.strip())
    if parts.scheme != "https":
        raise ValueError(f"{url!r}: expected https://HOST[:PORT] (uploads only go over TLS)")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host name")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r}: give only https://HOST[:PORT][/PATH]; the user is --user")
    try:
        port = parts.port or 443
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    return Remote(parts.hostname, port, parts.path.rstrip("/"))


@dataclass(frozen=True)
class Pushed:
    rel: str
    size: int
    sha256: str
    #: True: an identical file was on the server already; nothing was sent
    skipped: bool = False


def _server_message(body: bytes) -> str:
    try:
        doc = load_json_bounded(body, MAX_ANSWER, MAX_ANSWER_DEPTH)
    except ValueError:
        text = body.decode("utf-8", errors="replace").strip()
        # nginx's error pages are HTML: their <title> is the useful part
        if "<title>" in text:
            return text.split("<title>", 1)[1].split("</title>", 1)[0].strip()
        return text[:200]
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return json.dumps(doc)[:200]


class Client:
    """One HTTPS connection to the server, reopened after errors."""

    def __init__(
        self,
        remote: Remote,
        user: str,
        password: str | None,
        context: ssl.SSLContext | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.remote = remote
        self.user = user
        self.context = context or ssl.create_default_context()
        self.timeout = timeout
        self.auth = (
            "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            if password is not None
            else None
        )
        self._conn: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(
                self.remote.host, self.remote.port, timeout=self.timeout, context=self.context
            )
        return self._conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        where = f"{self.remote.host}:{self.remote.port}"
        try:
            yield
        except ssl.SSLCertVerificationError as e:
            self.close()
            raise PushError(
                f"the TLS certificate of {where} is not trusted ({e.verify_message}): it must "
                "chain to a CA in this machine's store (copy the CA certificate to "
                "/usr/local/share/ca-certificates/ and run update-ca-certificates), and name "
                "the host you gave"
            ) from None
        except ssl.SSLError as e:
            self.close()
            raise PushError(f"TLS with {where} failed: {e.reason or e}") from None
        except (http.client.HTTPException, OSError) as e:
            self.close()
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise PushError(f"cannot talk to {where}: {reason}") from None

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": "lxd-image-server-push"}
        if self.auth:
            headers["Authorization"] = self.auth
        headers.update(extra or {})
        return headers

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        with self._errors():
            conn = self._connection()
            conn.request(method, path, headers=self._headers(headers))
            resp = conn.getresponse()
            body = self._read_answer(resp)
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def _read_answer(self, resp: http.client.HTTPResponse) -> bytes:
        """At most MAX_ANSWER bytes of the answer; a longer one is cut and the connection
        closed (the rest is never read)."""
        body = resp.read(MAX_ANSWER + 1)
        if len(body) > MAX_ANSWER:
            self.close()
            return body[:MAX_ANSWER]
        return body

    def check_credentials(self) -> None:
        """An empty PUT to a path the upload app refuses: 400 means we got through nginx."""
        status, _, body = self.request(
            "PUT", self.remote.path("lxd-image-server-push-check"), {"Content-Length": "0"}
        )
        if status in (400, 409):
            return
        self._fail(status, body, "checking the credentials")

    def remote_size(self, rel: str) -> int | None:
        """The size of images/<rel> on the server, None if it has no such file."""
        status, headers, body = self.request("HEAD", self.remote.path(rel))
        if status == 404:
            return None
        if status == 200:
            return int(headers.get("content-length", "-1"))
        self._fail(status, body, f"looking for {rel}")

    def remote_sha256(self, rel: str) -> str:
        with self._errors():
            conn = self._connection()
            conn.request("GET", self.remote.path(rel), headers=self._headers())
            resp = conn.getresponse()
            if resp.status != 200:
                body = self._read_answer(resp)
                self._fail(resp.status, body, f"reading {rel}")
            h = hashlib.sha256()
            while chunk := resp.read(CHUNK_SIZE):
                h.update(chunk)
            return h.hexdigest()

    def put(self, src: str, rel: str, progress: Progress) -> Pushed:
        size = os.path.getsize(src)
        digest = hashlib.sha256()
        path = self.remote.path(rel)
        with self._errors():
            conn = self._connection()
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            for k, v in self._headers(
                {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
            ).items():
                conn.putheader(k, v)
            conn.endheaders()
            sent_error: OSError | None = None
            with open(src, "rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    digest.update(chunk)
                    try:
                        conn.send(chunk)
                    except OSError as e:  # the server answered early and closed
                        sent_error = e
                        break
                    progress(len(chunk))
            try:
                resp = conn.getresponse()
            except (http.client.HTTPException, OSError):
                if sent_error is not None:
                    raise sent_error from None
                raise
            body = self._read_answer(resp)
            status = resp.status
        if status != 201:
            self._fail(status, body, f"uploading {rel}")
        return self._check_stored(rel, size, digest.hexdigest(), body)

    def _check_stored(self, rel: str, size: int, sha256: str, body: bytes) -> Pushed:
        try:
            doc: Any = load_json_bounded(body, MAX_ANSWER, MAX_ANSWER_DEPTH)
            stored = doc["files"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PushError(
                f"uploading {rel}: the server's answer is not JSON as expected"
            ) from None
        if stored.get("stored_as", rel) != rel:
            raise PushError(
                f"{rel} already exists on the server; it stored this upload as "
                f"{stored['stored_as']}, which is not published (remove that file on the server)"
            )
        if stored.get("size") != size or stored.get("sha256") != sha256:
            raise PushError(
                f"{rel}: the server stored {stored.get('size')} bytes with sha256 "
                f"{stored.get('sha256')}, but {size} bytes with sha256 {sha256} were sent: "
                "the upload was damaged on the way; push again"
            )
        return Pushed(rel, size, sha256)

    def _fail(self, status: int, body: bytes, doing: str) -> NoReturn:
        message = _server_message(body)
        where = self.remote.url
        if status == 401 and self.auth is None:
            raise PushError(
                f"{where} wants credentials (401) and no password was given: use "
                f"--password-file or ${PASSWORD_ENV}, or run on a terminal to be asked"
            )
        if status == 401:
            raise PushError(
                f"{where} refused the credentials of user {self.user!r} (401): check --user and "
                f"the password (--password-file, ${PASSWORD_ENV} or the prompt)"
            )
        if status == 409:
            raise PushError(f"{doing}: conflict on the server (409): {message}")
        if status == 413:
            raise PushError(
                f"{doing}: too large for the server (413: {message}); the limit is upload.max_size "
                "in the server's configuration"
            )
        if status == 507:
            raise PushError(f"{doing}: the server has no space left (507): {message}")
        if status in (404, 405) and doing == "checking the credentials":
            raise PushError(
                f"{where} does not take uploads ({status}: {message}): is it an "
                "lxd-image-server with its upload app (`lxd-image-server run`, or init's site)?"
            )
        if status in (502, 503, 504):
            raise PushError(
                f"{doing}: the server's upload app does not answer ({status}); is it running?"
            )
        raise PushError(f"{doing}: the server answered {status}: {message}")


def uploads(plan: ImagePlan) -> list[tuple[str, str]]:
    """(local file, path below images/) in upload order: metadata tarball first.

    A unified tarball is named by its sha256: from lxc's export name when it carries one,
    otherwise by hashing it here.
    """
    out = []
    for src in plan.sources:
        name = src.target
        if name is None:
            fingerprint = plan.export_fingerprint or _sha256(src.path)
            name = f"{fingerprint}.tar.gz"
        out.append((src.path, f"{plan.key.relpath}/{name}"))
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
    return h.hexdigest()


def push(plan: ImagePlan, client: Client, progress_for: ProgressFor | None = None) -> list[Pushed]:
    """Uploads the plan's files; an identical file already on the server is skipped."""
    client.check_credentials()
    todo = uploads(plan)
    done: list[Pushed] = []
    for src, rel in todo:
        size = os.path.getsize(src)
        there = client.remote_size(rel)
        if there is not None:
            if there == size:
                local = _sha256(src)
                if client.remote_sha256(rel) == local:
                    log.info("%s is on the server already (same sha256): skipped", rel)
                    done.append(Pushed(rel, size, local, skipped=True))
                    continue
            raise PushError(
                f"{rel} exists on the server with other content: remove that version there "
                "first, or push under another --serial"
            )
        start = progress_for(os.path.basename(rel)) if progress_for else None
        progress = start(size) if start else no_progress
        pushed = client.put(src, rel, progress)
        log.info("uploaded %s (%d bytes, sha256 %s)", rel, pushed.size, pushed.sha256)
        done.append(pushed)
    return done


def read_password_file(path: str) -> str:
    """The first line of `path`, without its line end."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as e:
        raise PushError(f"cannot read the password file {path}: {e.strerror or e}") from e
    password = line.rstrip("\r\n")
    if not password:
        raise PushError(f"the password file {path} is empty")
    return password
