"""A streaming multipart/form-data reader (RFC 7578 / RFC 2046) with flat memory use.

The body is pulled through a `read(n)` callable in chunks; a part's data is handed out as it
arrives, so a file of any size passes through a buffer of about two chunks. The delimiter
(CRLF "--" boundary) may be split across any number of reads.

    reader = MultipartReader(body.read, boundary_from_content_type(content_type))
    while (part := reader.next_part()) is not None:
        for chunk in part:
            ...

With `readinto` (fills a buffer from the body), `Part.fill` reads a part's data straight into
the caller's buffer and looks for the delimiter there: no copy through the reader's own buffer,
which only keeps what may begin a delimiter at the end of a read, and what follows one.

Only what an upload needs: part headers, the Content-Disposition `name` and `filename`
(`filename*=` per RFC 5987 too). Parts are not nested; preamble and epilogue are discarded.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from typing import TypeAlias, overload
from urllib.parse import unquote

from lxd_image_server.fsutil import CHUNK_SIZE

#: Upper bound of one part's header block (browsers and curl send a few hundred bytes).
MAX_HEADER_BYTES = 16 * 1024
_MAX_BOUNDARY = 70  # RFC 2046 5.1.1

#: A buffer `Part.fill` writes into and searches in place (both have find(sub, start, end)).
Target: TypeAlias = "mmap.mmap | bytearray"


class MultipartError(ValueError):
    """The body is not well-formed multipart; the message says what is wrong."""


def parse_options_header(value: str) -> tuple[str, dict[str, str]]:
    """'form-data; name="upload"; filename="a;b:c"' -> ('form-data', {name: ..., filename: ...}).

    Quoted strings may contain ';' and backslash escapes. Parameter names are lower-cased.
    `key*=charset'lang'percent-encoded` (RFC 5987) is decoded and stored under `key`, taking
    precedence over a plain `key=`.
    """
    pos = value.find(";")
    main = (value if pos < 0 else value[:pos]).strip().lower()
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    i = len(value) if pos < 0 else pos + 1
    n = len(value)
    while i < n:
        while i < n and value[i] in " \t;":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and value[i] not in "=;":
            i += 1
        key = value[start:i].strip().lower()
        if i >= n or value[i] == ";":
            if key:
                params.setdefault(key, "")
            continue
        i += 1  # '='
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            i += 1
            out: list[str] = []
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(value[i])
                i += 1
            if i >= n:
                raise MultipartError(f"unterminated quoted string in header parameter {_show(key)}")
            i += 1  # closing quote
            val = "".join(out)
            while i < n and value[i] not in ";":
                i += 1
        else:
            start = i
            while i < n and value[i] != ";":
                i += 1
            val = value[start:i].strip()
        if not key:
            continue
        if key.endswith("*"):
            extended[key[:-1]] = _decode_rfc5987(val)
        else:
            params[key] = val
    params.update(extended)
    return main, params


#: Charsets accepted in `key*=charset'lang'value` (RFC 8187 requires UTF-8 and ISO-8859-1).
_CHARSETS = {"utf-8": "utf-8", "iso-8859-1": "latin-1", "us-ascii": "ascii"}


def _decode_rfc5987(value: str) -> str:
    parts = value.split("'", 2)
    if len(parts) != 3:
        raise MultipartError(f"malformed extended parameter value {_show(value)}")
    charset = parts[0].strip().lower() or "utf-8"
    encoding = _CHARSETS.get(charset)
    if encoding is None:
        raise MultipartError(f"unsupported charset {_show(charset)} in an extended parameter")
    try:
        return unquote(parts[2], encoding=encoding, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise MultipartError(
            f"cannot decode extended parameter value {_show(value)} as {charset}"
        ) from None


def _show(text: str, limit: int = 60) -> str:
    """A short, one-line, ASCII quotation of client-supplied text."""
    shown = ascii(text[:limit])
    return shown + f"... ({len(text)} characters)" if len(text) > limit else shown


def boundary_from_content_type(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type, or MultipartError."""
    mime, params = parse_options_header(content_type)
    if mime != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {_show(mime or 'nothing')}")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= _MAX_BOUNDARY:
        raise MultipartError("multipart/form-data without a valid boundary parameter")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("the multipart boundary must be ASCII") from None


class Part:
    """One part of the body. Read its data with `read()` (b"" at the end) or iterate."""

    def __init__(self, reader: MultipartReader, number: int, headers: dict[str, str]) -> None:
        self._reader = reader
        self._number = number
        #: Header names lower-cased; a repeated header keeps its last value.
        self.headers = headers
        disposition, params = parse_options_header(headers.get("content-disposition", ""))
        self.disposition = disposition
        self.name: str | None = params.get("name")
        self.filename: str | None = params.get("filename")
        self.content_type: str | None = headers.get("content-type")

    def read(self) -> bytes:
        """The next piece of this part's data; b"" once it is complete."""
        return self._reader._read_body(self._number)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Copies the next bytes of this part's data into `buf` -> how many (0: complete)."""
        return self._reader._read_body(self._number, memoryview(buf))

    def fill(self, target: Target, start: int = 0, end: int | None = None) -> int:
        """Fills target[start:end] with this part's next bytes -> how many: all of it unless
        the part ends first (0: it is complete). Reads the body straight into `target`."""
        stop = len(target) if end is None else end
        if not 0 <= start <= stop <= len(target):
            raise ValueError(f"no room [{start}:{stop}] in a buffer of {len(target)} bytes")
        return self._reader._fill_part(self._number, target, start, stop)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read():
            yield chunk


class MultipartReader:
    """Pulls parts out of a multipart body. `read(n)` returns up to n bytes, b"" at the end.

    MultipartError for a malformed body, including one that ends before the closing boundary.
    Exceptions raised by `read` pass through unchanged.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        boundary: bytes,
        chunk_size: int = CHUNK_SIZE,
        readinto: Callable[[memoryview], int] | None = None,
    ) -> None:
        if not 1 <= len(boundary) <= _MAX_BOUNDARY:
            raise MultipartError("the multipart boundary must be 1 to 70 bytes long")
        self._read = read
        #: fills a buffer instead of returning new bytes (fewer copies), if given
        self._readinto = readinto
        self._scratch = bytearray(chunk_size) if readinto is not None else bytearray()
        self._delim = b"\r\n--" + boundary
        self._chunk_size = max(chunk_size, len(self._delim) + 4)
        # The first delimiter may open the body without a CRLF in front of it: pretend one.
        self._buf = bytearray(b"\r\n")
        self._eof = False
        #: preamble -> (delimiter) -> headers -> body -> (delimiter) -> headers ... -> done
        self._state = "preamble"
        self._part = 0

    # -- buffer -----------------------------------------------------------------------------

    def _fill(self) -> bool:
        """Appends one read to the buffer; False at the end of the body."""
        if self._eof:
            return False
        if self._readinto is not None:
            with memoryview(self._scratch) as view:
                n = self._readinto(view)
                self._buf += view[:n]
        else:
            data = self._read(self._chunk_size)
            n = len(data)
            self._buf += data
        if not n:
            self._eof = True
            return False
        return True

    def _need(self, n: int) -> bool:
        """Reads until the buffer holds at least n bytes; False if the body ends first."""
        while len(self._buf) < n:
            if not self._fill():
                return False
        return True

    # -- states -----------------------------------------------------------------------------

    def next_part(self) -> Part | None:
        """The next part (the rest of the current one is skipped), or None after the last."""
        if self._state == "body":
            while self._read_body(self._part):
                pass
        if self._state == "preamble":
            self._skip_preamble()
        if self._state == "done":
            return None
        # Just after a delimiter: "--" closes the body, else padding and CRLF start a part.
        if not self._need(2):
            raise MultipartError("body ended right after a boundary (no closing '--')")
        if self._buf[:2] == b"--":
            self._state = "done"
            self._buf.clear()
            while self._fill():  # the epilogue
                self._buf.clear()
            return None
        self._skip_delimiter_line()
        headers = self._read_headers()
        self._part += 1
        self._state = "body"
        return Part(self, self._part, headers)

    def _skip_preamble(self) -> None:
        keep = len(self._delim) - 1
        start = 0
        while True:
            idx = self._buf.find(self._delim, start)
            if idx >= 0:
                del self._buf[: idx + len(self._delim)]
                self._state = "delimiter"
                return
            if len(self._buf) > keep:
                del self._buf[:-keep]
            start = max(0, len(self._buf) - keep)
            if not self._fill():
                raise MultipartError("no multipart boundary found in the body")

    def _skip_delimiter_line(self) -> None:
        """Transport padding (spaces, tabs) then CRLF after a delimiter."""
        i = 0
        while True:
            if not self._need(i + 2):
                raise MultipartError("body ended inside a boundary line")
            c = self._buf[i]
            if c in b" \t":
                i += 1
                if i > 1024:
                    raise MultipartError("a boundary line is too long")
                continue
            if self._buf[i : i + 2] != b"\r\n":
                raise MultipartError("a boundary is followed by something other than CRLF")
            del self._buf[: i + 2]
            return

    def _read_headers(self) -> dict[str, str]:
        if not self._need(2):
            raise MultipartError("body ended before a part's headers")
        if self._buf[:2] == b"\r\n":
            del self._buf[:2]
            return {}
        start = 0
        while True:
            idx = self._buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                break
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MultipartError(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
            start = max(0, len(self._buf) - 3)
            if not self._fill():
                raise MultipartError("body ended inside a part's headers")
        if idx > MAX_HEADER_BYTES:
            raise MultipartError(f"a part's headers exceed {MAX_HEADER_BYTES} bytes")
        block = bytes(self._buf[:idx])
        del self._buf[: idx + 4]
        return _parse_header_block(block)

    @overload
    def _read_body(self, number: int) -> bytes: ...
    @overload
    def _read_body(self, number: int, into: memoryview) -> int: ...

    def _read_body(self, number: int, into: memoryview | None = None) -> bytes | int:
        """The next piece of part `number`'s data (b"" at its end), or with `into`: copies it
        there (at most len(into) bytes) and says how many (0 at its end)."""
        if number != self._part or self._state != "body":
            return b"" if into is None else 0
        delim = self._delim
        keep = len(delim) - 1
        start = 0
        while True:
            idx = self._buf.find(delim, start)
            if idx == 0:
                del self._buf[: len(delim)]
                self._state = "delimiter"
                return b"" if into is None else 0
            # Up to a delimiter, or all but the last `keep` bytes (a delimiter's possible start).
            end = idx if idx > 0 else len(self._buf) - keep
            if idx > 0 or end >= self._chunk_size or (into is not None and end >= len(into)):
                if into is None:
                    data = bytes(self._buf[:end])
                    del self._buf[:end]
                    return data
                end = min(end, len(into))
                with memoryview(self._buf) as view:
                    into[:end] = view[:end]
                del self._buf[:end]
                return end
            start = max(0, len(self._buf) - keep)
            if not self._fill():
                raise MultipartError("body ended before the closing boundary")

    def _fill_part(self, number: int, target: Target, start: int, end: int) -> int:
        """Part.fill: the body read into target[start:end] and searched there; the reader's
        own buffer is used (copied from) only for what it holds already."""
        delim = self._delim
        keep = len(delim) - 1
        pos = start
        with memoryview(target) as view:
            while pos < end:
                if number != self._part or self._state != "body":
                    break
                held = len(self._buf)
                if self._readinto is None or held + keep >= end - pos or delim in self._buf:
                    # from the reader's buffer (or its reads), copied
                    n = self._read_body(number, view[pos:end])
                    if n == 0:
                        break
                    pos += n
                    continue
                # what the reader holds (no delimiter) first, then the body straight after it
                view[pos : pos + held] = self._buf
                self._buf.clear()
                n = 0 if self._eof else self._readinto(view[pos + held : end])
                if n == 0:
                    self._eof = True
                    raise MultipartError("body ended before the closing boundary")
                last = pos + held + n
                idx = target.find(delim, pos, last)
                if idx >= 0:
                    # the part ends there: the delimiter and what follows go back to the reader
                    self._buf += view[idx:last]
                    pos = idx
                    continue
                # bytes at the end that may begin a delimiter are kept back for the next read
                cut = last - _delimiter_start(target, delim, max(pos, last - keep), last)
                self._buf += view[cut:last]
                pos = cut
        return pos - start


def _delimiter_start(target: Target, delim: bytes, lo: int, hi: int) -> int:
    """The length of the longest end of target[lo:hi] that begins `delim` (0 if none)."""
    first = delim[:1]
    i = target.find(first, lo, hi)
    while i >= 0:
        if target[i:hi] == delim[: hi - i]:
            return hi - i
        i = target.find(first, i + 1, hi)
    return 0


def _parse_header_block(block: bytes) -> dict[str, str]:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")
    lines: list[str] = []
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t") and lines:  # obsolete line folding
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise MultipartError(f"malformed part header line {_show(line)}")
        headers[name.lower()] = value.strip()
    return headers
