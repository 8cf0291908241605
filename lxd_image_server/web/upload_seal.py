"""Files no one else can touch while they are written, so that their digest can be handed to
the catalog writer (tree/handover.py) without it reading the bytes again.

An sftp uploader runs as the same user as the upload app, so a named temporary file in images/
could be opened and rewritten by it during the upload, and the digest computed on the way would
not match the bytes. Instead:

- the file is created without a name (O_TMPFILE) and gets one (a link through /proc/self/fd)
  only once every byte is written and fsynced;
- from just before that link, an inotify watch on the file reports any open or modification;
  after the final rename, fstat gives the identity the record names, and the watch is read
  only once the clock has moved past that ctime: a change made later gets a later ctime, a
  change made earlier shows in the watch, and then no record is written.
- A metadata tarball read to prime the combined fingerprint is not fresh from this app, so no
  watch has seen it since it was made: it is read under a read lease (granted only while no
  one has it open for writing, broken by anyone who opens it so), with the clock past its
  ctime before, and fstat before and after the read must agree.

Where O_TMPFILE or /proc is missing, a hidden named temporary file is used and nothing is
recorded: the catalog writer hashes the file as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any

from inotify_simple import INotify, flags

from lxd_image_server.fsutil import open_regular
from lxd_image_server.tree.handover import Combined, Key, Record, key_of, write_record
from lxd_image_server.tree.layout import Role, classify

log = logging.getLogger(__name__)

#: the coarse real-time clock, the one file timestamps come from (Linux: 5)
_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)
#: metadata tarballs larger than this are not read to prime a combined fingerprint
MAX_PRIME = 256 << 20
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_UNNAMED_FLAGS = os.O_WRONLY | os.O_CLOEXEC | getattr(os, "O_TMPFILE", 0)
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
_SELF_FD = "/proc/self/fd"


def wait_past(ns: int) -> None:
    """Returns once the coarse clock is past `ns` (at most one clock tick later)."""
    while True:
        now = time.clock_gettime_ns(_COARSE)
        if now > ns:
            return
        time.sleep(max((ns - now) / 1e9, 0.0005))


@dataclass
class Temp:
    """The file being written: unnamed (`name` None until `name_it`) or a hidden temp name."""

    fd: int
    name: str | None
    unnamed: bool
    guard: INotify | None = None

    def name_it(self, dir_fd: int) -> str:
        """Gives an unnamed file its hidden temporary name (watching it from now on)."""
        if self.name is not None:
            return self.name
        try:
            self.guard = INotify()
            self.guard.add_watch(f"{_SELF_FD}/{self.fd}", flags.OPEN | flags.MODIFY)
        except OSError as e:
            log.debug("no inotify watch on an upload (%s); no digest handed over", e)
            self._close_guard()
        name = f".upload-{secrets.token_hex(8)}.part"
        os.link(f"{_SELF_FD}/{self.fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        self.name = name
        return name

    def sealed_key(self) -> Key | None:
        """The identity of the placed file, if no one opened or changed it since `name_it`."""
        if self.guard is None:
            return None
        key = key_of(os.fstat(self.fd))
        wait_past(key[4])
        try:
            touched = self.guard.read(timeout=0)
        except OSError:
            return None
        finally:
            self._close_guard()
        if touched:
            log.info("an upload was opened by someone else while it was placed; not handed over")
            return None
        return key

    def _close_guard(self) -> None:
        if self.guard is not None:
            with contextlib.suppress(OSError):
                self.guard.close()
            self.guard = None

    def close(self) -> None:
        self._close_guard()
        os.close(self.fd)


def open_temp(dir_fd: int, unnamed: bool) -> Temp:
    """A new file in the directory `dir_fd`, unnamed when `unnamed` and the file system can."""
    if unnamed and _UNNAMED_FLAGS != os.O_WRONLY | os.O_CLOEXEC:
        try:
            return Temp(os.open(".", _UNNAMED_FLAGS, 0o600, dir_fd=dir_fd), None, True)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
    name = f".upload-{secrets.token_hex(8)}.part"
    return Temp(os.open(name, _TEMP_FLAGS, 0o600, dir_fd=dir_fd), name, False)


def can_name_unnamed() -> bool:
    return os.path.isdir(_SELF_FD)


# -- combined fingerprints ------------------------------------------------------------------------


@dataclass
class Primed:
    """sha256 fed with a metadata tarball's bytes, to be fed the root's bytes next."""

    meta: str
    key: Key
    hasher: Any


def prime_combined(dir_fd: int, name: str) -> list[Primed]:
    """For a root filesystem `name`: a sha256 primed with each metadata tarball already in the
    version directory `dir_fd` (regular files only, no link followed, unchanged while read)."""
    role = classify(name)
    if role is None or role.role is not Role.ROOT:
        return []
    out = []
    for meta in ("lxd.tar.xz", "incus.tar.xz"):
        primed = _prime(dir_fd, meta)
        if primed is not None:
            out.append(primed)
    return out


def _take_read_lease(fd: int) -> bool:
    """A read lease on the open file: the kernel grants it only while no one has the file open
    for writing (a write in progress, a shared writable mapping, whose writes change neither
    mtime nor ctime), and breaks it when anyone opens it for writing or truncates it. Only the
    file's owner gets one (the upload app runs as the uploader, who owns what it uploads).
    A break is noticed by asking (F_GETLEASE), never by a signal: SIGIO would end the worker,
    SIGURG is ignored unless handled."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        log.debug("no read lease on a metadata tarball (%s); not primed", e.strerror or e)
        return False
    return True


def _lease_held(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK)
    except OSError:
        return False


def _prime(dir_fd: int, meta: str) -> Primed | None:
    """The tarball's bytes are taken only if they cannot have changed while read: its identity
    (device, inode, size, mtime and ctime, read with the clock past its ctime) is the same
    before and after, and a read lease held throughout says no one had it open for writing
    (timestamps alone miss a write in progress and writes through a mapping)."""
    try:
        fd = open_regular(meta, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        before = key_of(os.fstat(fd))
        if before[2] > MAX_PRIME or not _take_read_lease(fd):
            return None
        wait_past(before[4])
        before = key_of(os.fstat(fd))
        h = hashlib.sha256()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
        if key_of(os.fstat(fd)) != before or not _lease_held(fd):
            log.info("%s changed while it was read; the catalog writer hashes it itself", meta)
            return None
        return Primed(meta, before, h)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)


def record(
    digest_dir: str | None, key: Key, sha256: str, combined: list[tuple[Primed, str]]
) -> None:
    """Hands the digests of the file with identity `key` over (never fails the upload)."""
    if digest_dir is None:
        return
    rec = Record(key, sha256, tuple(Combined(p.meta, p.key, d) for p, d in combined))
    try:
        dir_fd = os.open(digest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.debug("no digest handed over: %s: %s", digest_dir, e.strerror or e)
        return
    try:
        write_record(dir_fd, rec)
    except OSError as e:
        log.warning("cannot hand the digest over in %s: %s", digest_dir, e.strerror or e)
    finally:
        os.close(dir_fd)
