"""`sync`: the upstream's HTTPS side: its URL, its connections, its documents read bounded and
its files downloaded checked.

Only the standard library: http.client over an ssl context (the system store, or the CA file
given). HTTPS only: the index and the catalog name what is downloaded, so a plain-HTTP upstream
could be rewritten on the way. `https://USER:PASSWORD@HOST/...` sends basic authentication to
that host (never to another one a redirect leads to). Every socket operation has a timeout, so a
stalled server fails the file it was sending, not the whole sync.

A file is read to at most its catalog `size` and one byte more: a server that sends fewer bytes
(cut, or a size that lies upwards) or more (a size that lies downwards) fails that file. Its
bytes go to a file descriptor and to the hashers the caller gives (its sha256 and the combined
fingerprint), so nothing is read twice.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from lxd_image_server.catalog.hashread import Hasher
from lxd_image_server.fsutil import TooLarge, load_json_bounded, start_writeback
from lxd_image_server.ops.import_copy import Hashing

log = logging.getLogger(__name__)

#: seconds a connection, a request or one read may take before the file fails
DEFAULT_TIMEOUT = 60.0
#: index.json is a few hundred bytes; images.json of images.linuxcontainers.org is ~10 MB
MAX_INDEX_BYTES = 4 << 20
MAX_CATALOG_BYTES = 64 << 20
#: products -> product -> versions -> version -> items -> item -> field is 7 levels
MAX_DEPTH = 32
MAX_REDIRECTS = 5
#: an error page read for its message, at most
MAX_ERROR_BODY = 4096
#: bytes read (and hashed, in threads, while the next are read) at a time
CHUNK = 4 << 20
#: an item path: at most this long, ASCII printable, relative, no '.', '..' or empty component
MAX_PATH = 1024
_PATH_RE = re.compile(r"[A-Za-z0-9._~+@:,=-]+(?:/[A-Za-z0-9._~+@:,=-]+)*", re.ASCII)


class SyncError(Exception):
    """The sync cannot go on (a bad URL, an unusable upstream index or catalog); one line."""


class FetchFailed(Exception):
    """One download failed (HTTP error, timeout, cut, wrong size); one line, no item name (the
    caller adds it). `resumable`: the bytes received so far are good to keep (False when the
    server sends more or other than the catalog says)."""

    def __init__(self, message: str, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable


class RangeIgnored(FetchFailed):
    """A Range request was answered with the whole file (or another range)."""


def check_item_path(path: str) -> str:
    """`path` if it is a plain relative path below the upstream's root, else ValueError: no
    absolute path, no '.', '..' or empty component, no control character, no backslash, no
    query or fragment (the catalog says where a file is; nothing may lead elsewhere)."""
    if not path or len(path) > MAX_PATH:
        raise ValueError(f"path of {len(path)} characters")
    if path.startswith("/"):
        raise ValueError(f"absolute path {path[:80]!r}")
    if not _PATH_RE.fullmatch(path):
        raise ValueError(f"path {path[:80]!r} has characters outside [A-Za-z0-9._~+@:,=-/]")
    if any(p in (".", "..") for p in path.split("/")):
        raise ValueError(f"path {path[:80]!r} has a '.' or '..' component")
    return path


@dataclass(frozen=True)
class Upstream:
    """An upstream simplestreams remote: https://[USER:PASSWORD@]HOST[:PORT][/PREFIX]."""

    host: str
    port: int
    #: path prefix of the remote's root, without a trailing slash ('' at the top)
    base: str
    #: the Authorization header's value, or None
    auth: str | None = None

    @property
    def url(self) -> str:
        """The URL without credentials (for messages and logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{host}{port}{self.base}"

    def path(self, rel: str) -> str:
        """The request path of `rel` (checked with check_item_path)."""
        return f"{self.base}/{quote(rel, safe='/:~+@,=')}"


def parse_upstream(url: str) -> Upstream:
    """'https://[USER:PASSWORD@]HOST[:PORT][/PREFIX]' -> Upstream; SyncError otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme != "https":
        raise SyncError(
            f"{_no_password(url)!r}: expected https://HOST[/PATH] (the upstream's catalog says "
            "what is downloaded: it is only read over TLS)"
        )
    if not parts.hostname:
        raise SyncError(f"{_no_password(url)!r}: no host name")
    if parts.query or parts.fragment:
        raise SyncError(f"{_no_password(url)!r}: a query or fragment has no meaning here")
    try:
        port = parts.port or 443
    except ValueError as e:
        raise SyncError(f"{_no_password(url)!r}: {e}") from None
    auth = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    base = parts.path.rstrip("/")
    return Upstream(parts.hostname, port, base, auth)


def _no_password(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.password is None:
        return url.strip()
    return url.strip().replace(f":{parts.password}@", ":***@", 1)


def ssl_context(cafile: str | None) -> ssl.SSLContext:
    """The system store, or only the CA certificates in `cafile` (PEM)."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise SyncError(f"cannot use the CA file {cafile}: {e}") from None


class Connection:
    """One keep-alive HTTPS connection to the upstream (per thread), reopened when needed."""

    def __init__(self, upstream: Upstream, context: ssl.SSLContext, timeout: float) -> None:
        self.upstream = upstream
        self.context = context
        self.timeout = timeout
        self.conn: http.client.HTTPSConnection | None = None
        self.conn_host: tuple[str, int] | None = None
        #: requests sent (tests and the no-change check count them)
        self.requests = 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _connect(self, host: str, port: int) -> http.client.HTTPSConnection:
        if self.conn is None or self.conn_host != (host, port):
            self.close()
            self.conn = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=self.context
            )
            self.conn_host = (host, port)
        return self.conn

    def _send(
        self, host: str, port: int, path: str, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        for attempt in (0, 1):
            conn = self._connect(host, port)
            fresh = conn.sock is None
            try:
                self.requests += 1
                conn.request("GET", path, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # a kept-alive connection the server closed meanwhile: once more, anew
                self.close()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, rel: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """The response to GET `rel` (a checked item path), redirects followed (https only;
        the credentials go to the upstream's host only). FetchFailed on a network error, a
        TLS error or a status other than 200 and 206."""
        host, port = self.upstream.host, self.upstream.port
        path = self.upstream.path(rel)
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers or {})
            if self.upstream.auth and (host, port) == (self.upstream.host, self.upstream.port):
                sent["Authorization"] = self.upstream.auth
            try:
                resp = self._send(host, port, path, sent)
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise FetchFailed(f"TLS certificate not trusted: {e.verify_message}") from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise FetchFailed(_net_error(e)) from None
            if resp.status in (200, 206):
                return resp
            body = _drain(resp)
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                target = urlsplit(
                    urljoin(f"https://{host}:{port}{path}", resp.getheader("Location"))
                )
                if target.scheme != "https" or not target.hostname:
                    raise FetchFailed(f"redirected to a non-https URL ({target.scheme}://...)")
                host, port = target.hostname, target.port or 443
                path = target.path + (f"?{target.query}" if target.query else "")
                continue
            if resp.status in (401, 403):
                raise FetchFailed(f"HTTP {resp.status} {resp.reason}: check the credentials")
            raise FetchFailed(f"HTTP {resp.status} {resp.reason}{body}")
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    def document(self, rel: str, limit: int) -> Any:
        """The JSON document at `rel`, at most `limit` bytes and MAX_DEPTH levels deep."""
        resp = self.get(rel)
        try:
            data = _read_at_most(resp, limit)
        except TooLarge:
            self.close()
            raise FetchFailed(f"larger than {limit} bytes") from None
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise FetchFailed(_net_error(e)) from None
        if resp.will_close:
            self.close()
        try:
            return load_json_bounded(data, limit, MAX_DEPTH)
        except ValueError as e:
            raise FetchFailed(str(e)) from None

    def download(
        self,
        rel: str,
        size: int,
        fd: int,
        offset: int,
        sinks: Sequence[Hasher],
        progress: Callable[[int], None],
    ) -> None:
        """Writes the bytes of `rel` from `offset` (the bytes before it are in `fd` and the
        sinks already; a Range request asks for the rest) to `fd`, until `size` bytes are
        there, and feeds them to every sink. FetchFailed when the server sends fewer or more
        than `size` bytes in all, or fails; what was written stays (to be resumed)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.get(rel, headers)
        if offset and resp.status != 206:
            self.close()
            raise RangeIgnored("resuming: the server ignored the Range request")
        if resp.status == 206 and not _range_starts_at(resp, offset, size):
            self.close()
            raise RangeIgnored(
                f"resuming: the server answered range {resp.getheader('Content-Range')!r}"
            )
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) != size - offset:
            self.close()
            raise FetchFailed(
                f"the server sends {int(length) + offset} bytes, the catalog says {size}",
                resumable=False,
            )
        # the sinks hash each chunk in threads of their own while the next one is read
        hashing = Hashing(sinks, CHUNK)
        done = offset
        try:
            while done < size:
                buf = hashing.free_buffer()
                view = memoryview(buf)
                n = resp.readinto(view[: min(CHUNK, size - done)])
                if not n:
                    raise FetchFailed(f"cut short: {done} of {size} bytes")
                _write_all(fd, view[:n])
                start_writeback(fd, done, n)  # the fsync before placing finds it on disk
                hashing.feed(buf, n)
                done += n
                progress(n)
            hashing.wait()
            # one byte more: a server that has more than `size` to send lies about the size
            if resp.readinto(bytearray(1)):
                raise FetchFailed(f"longer than the {size} bytes the catalog says", resumable=False)
        except FetchFailed:
            self.close()
            hashing.wait()  # every byte written is hashed: a partial file resumes from there
            raise
        except (OSError, http.client.HTTPException) as e:
            self.close()
            hashing.wait()
            raise FetchFailed(f"{_net_error(e)} after {done} of {size} bytes") from None
        finally:
            hashing.close()
        if resp.will_close:
            self.close()


def _range_starts_at(resp: http.client.HTTPResponse, offset: int, size: int) -> bool:
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.getheader("Content-Range") or "")
    return m is not None and int(m[1]) == offset and int(m[2]) == size - 1


def _net_error(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out (the server stalled)"
    if isinstance(e, http.client.IncompleteRead):
        return "connection closed in the middle of the answer"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


def _drain(resp: http.client.HTTPResponse) -> str:
    """A short text of an error answer (its body read up to MAX_ERROR_BODY), for the message."""
    try:
        body = resp.read(MAX_ERROR_BODY)
    except (OSError, http.client.HTTPException):
        return ""
    text = body.decode("utf-8", errors="replace")
    if "<title>" in text:
        text = text.split("<title>", 1)[1].split("</title>", 1)[0]
    text = " ".join(text.split())[:120]
    return f": {text}" if text and text.isprintable() else ""


def _read_at_most(resp: http.client.HTTPResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = resp.read(min(CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"more than {limit} bytes")
        chunks.append(chunk)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]
