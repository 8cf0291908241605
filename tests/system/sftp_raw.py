"""A minimal SFTP version 3 client that sends requests exactly as given, the way a hostile
uploader's own client would (OpenSSH's sftp masks modes with 0777 before sending them).

It speaks over the pipes of a subprocess: `ssh -s user@host sftp` for the real server, or a
local `sftp-server` for quick checks. Only what the attack tests need: open (with any mode),
write, close, setstat, mkdir, rename, symlink, hardlink.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

INIT, VERSION = 1, 2
OPEN, CLOSE, WRITE, SETSTAT, MKDIR, RENAME, SYMLINK, EXTENDED = 3, 4, 6, 9, 14, 18, 20, 200
STATUS, HANDLE = 101, 102
#: open flags (SSH2_FXF_*)
READ, WRITE_FLAG, CREAT, TRUNC = 0x01, 0x02, 0x08, 0x10
ATTR_PERMISSIONS = 0x04
OK = 0
MAX_PACKET = 1 << 20


class SftpError(Exception):
    """The server answered with a status other than OK; `code` is SSH2_FX_*."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"sftp status {code}: {message}")
        self.code = code


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _attrs(mode: int | None) -> bytes:
    if mode is None:
        return struct.pack(">I", 0)
    return struct.pack(">II", ATTR_PERMISSIONS, mode)


@dataclass
class _Reply:
    kind: int
    body: bytes


class RawSftp:
    """One session over a subprocess's stdin/stdout (started by the caller's argv)."""

    def __init__(self, argv: Sequence[str], timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.timeout = timeout
        self.next_id = 1
        self._send(INIT, struct.pack(">I", 3))
        reply = self._receive()
        if reply.kind != VERSION:
            raise SftpError(-1, f"expected VERSION, got packet type {reply.kind}")

    def __enter__(self) -> RawSftp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_session()

    def close_session(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    # -- the wire ----------------------------------------------------------------------------

    def _send(self, kind: int, payload: bytes) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(struct.pack(">IB", len(payload) + 1, kind) + payload)
        stdin.flush()

    def _read_exact(self, n: int) -> bytes:
        stdout = self.proc.stdout
        assert stdout is not None
        data = b""
        while len(data) < n:
            chunk = stdout.read(n - len(data))
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise SftpError(-1, f"the server closed the session: {err.strip()}")
            data += chunk
        return data

    def _receive(self) -> _Reply:
        (length,) = struct.unpack(">I", self._read_exact(4))
        if not 1 <= length <= MAX_PACKET:
            raise SftpError(-1, f"bad packet length {length}")
        packet = self._read_exact(length)
        return _Reply(packet[0], packet[1:])

    def _request(self, kind: int, payload: bytes) -> _Reply:
        rid = self.next_id
        self.next_id += 1
        self._send(kind, struct.pack(">I", rid) + payload)
        reply = self._receive()
        (got,) = struct.unpack(">I", reply.body[:4])
        if got != rid:
            raise SftpError(-1, f"answer to request {got}, expected {rid}")
        reply.body = reply.body[4:]
        if reply.kind == STATUS:
            (code,) = struct.unpack(">I", reply.body[:4])
            (mlen,) = struct.unpack(">I", reply.body[4:8])
            message = reply.body[8 : 8 + mlen].decode(errors="replace")
            if code != OK:
                raise SftpError(code, message)
        return reply

    # -- requests ----------------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int | None = None) -> bytes:
        payload = _string(path.encode()) + struct.pack(">I", flags) + _attrs(mode)
        reply = self._request(OPEN, payload)
        if reply.kind != HANDLE:
            raise SftpError(-1, f"expected HANDLE, got packet type {reply.kind}")
        (hlen,) = struct.unpack(">I", reply.body[:4])
        return reply.body[4 : 4 + hlen]

    def write(self, handle: bytes, offset: int, data: bytes) -> None:
        self._request(WRITE, _string(handle) + struct.pack(">Q", offset) + _string(data))

    def close(self, handle: bytes) -> None:
        self._request(CLOSE, _string(handle))

    def put(self, path: str, data: bytes, mode: int | None = None) -> None:
        """open(CREAT|TRUNC|WRITE) with `mode` as the client sends it, write, close."""
        handle = self.open(path, WRITE_FLAG | CREAT | TRUNC, mode)
        try:
            if data:
                self.write(handle, 0, data)
        finally:
            self.close(handle)

    def setstat(self, path: str, mode: int) -> None:
        self._request(SETSTAT, _string(path.encode()) + _attrs(mode))

    def mkdir(self, path: str, mode: int | None = None) -> None:
        self._request(MKDIR, _string(path.encode()) + _attrs(mode))

    def rename(self, old: str, new: str) -> None:
        self._request(RENAME, _string(old.encode()) + _string(new.encode()))

    def symlink(self, target: str, link: str) -> None:
        # OpenSSH's server reads (target, link): the reverse of the draft's order
        self._request(SYMLINK, _string(target.encode()) + _string(link.encode()))

    def hardlink(self, old: str, new: str) -> None:
        payload = _string(b"hardlink@openssh.com") + _string(old.encode()) + _string(new.encode())
        self._request(EXTENDED, payload)
