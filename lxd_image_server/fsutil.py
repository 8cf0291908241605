"""File-system helpers: durable, atomic writes (readers see the old bytes or the new ones, never
a mix), and whether another user can reach a directory."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat


def write_atomic(path: str, data: bytes, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
    """Writes `path` through a hidden temporary file in the same directory, created with `mode`
    (whatever the umask) and owner `uid`/`gid` (-1: unchanged) before any byte is written,
    fsynced, then renamed over `path`. Does not fsync the directory: see fsync_dir."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, mode & 0o600)
    try:
        try:
            if (uid, gid) != (-1, -1):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(directory: str) -> None:
    """Makes renames and new names in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def can_traverse(path: str, uid: int, gids: set[int]) -> bool:
    """Whether a process with `uid`/`gids` may traverse every directory down to `path` (which
    must exist: a missing one counts as not reachable)."""
    current = os.path.realpath(path)
    chain = [current]
    while current != "/":
        current = os.path.dirname(current)
        chain.append(current)
    for d in chain:
        try:
            st = os.stat(d)
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True
