"""Digests the upload app computed, handed to the catalog writer so it does not read the bytes
again: one small JSON record per uploaded file, in the state directory's upload-digests/
(config.StateDir.upload_digests; `run` hands the upload app another with envnames.DIGEST_DIR).

Shared by both sides (the upload app writes, the catalog writer reads); it imports neither.

The trust model: an sftp uploader (chrooted to the served tree) can write anything below
images/ but cannot reach this directory, and the upload app writes a record only for bytes no
one else could touch (upload_seal.py). A record names its file by (dev, inode, size, mtime_ns,
ctime_ns), taken by fstat after the file got its final name: a later write, truncation, chmod,
utimes or replacement changes the ctime (which no user can set), so the record no longer
matches and the file is hashed as before. The directory is writable by the upload app's user,
so the reader trusts nothing in a record beyond that: every record is read bounded, parsed
bounded and checked field by field, and anything else is ignored with one log line.

A record may also carry combined fingerprints, sha256(metadata bytes + these bytes), each with
the metadata file's name and identity when it was read: used only while that file is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass

from lxd_image_server.fsutil import (
    NotRegularFile,
    TooLarge,
    load_json_bounded,
    open_dir,
    open_regular,
    read_bounded,
)

log = logging.getLogger(__name__)

#: Bytes of one record, at most (a real one has a few hundred).
MAX_RECORD = 4096
MAX_DEPTH = 4
MAX_COMBINED = 4
#: records looked at in one pass, at most
MAX_WAITING = 100_000
#: seconds after which a record no file matches is removed
STALE_AFTER = 3600.0
FORMAT = 1
#: (dev, inode, size, mtime_ns, ctime_ns)
Key = tuple[int, int, int, int, int]

_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
_INT_MAX = 1 << 64


def key_of(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def record_name(key: Key) -> str:
    return f"{key[0]:x}-{key[1]:x}.json"


@dataclass(frozen=True)
class Combined:
    #: the metadata file's name (in the same version directory) and identity when it was read
    meta: str
    meta_key: Key
    sha256: str


@dataclass(frozen=True)
class Record:
    key: Key
    sha256: str
    combined: tuple[Combined, ...] = ()

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "key": list(self.key),
            "sha256": self.sha256,
            "combined": [
                {"meta": c.meta, "key": list(c.meta_key), "sha256": c.sha256} for c in self.combined
            ],
        }
        return json.dumps(doc, sort_keys=True).encode()


# -- the upload app's side --------------------------------------------------------------------


def write_record(dir_fd: int, record: Record, owner: tuple[int, int] | None = None) -> None:
    """Writes `record` under its name, atomically (temp name + rename); no fsync: a lost record
    only means the file is hashed again. `owner` (uid, gid): given to the record before it has
    its name (a command started as root writes the catalog writer's records)."""
    name = record_name(record.key)
    tmp = f".{name}.{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o640, dir_fd=dir_fd)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.write(fd, record.to_json())
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


# -- the catalog writer's side ----------------------------------------------------------------


class Records:
    """The records' directory, for the catalog writer: `take(key)` reads and removes one."""

    def __init__(self, path: str) -> None:
        self.path = path

    def names(self) -> set[str]:
        """The names of the records waiting (at most MAX_WAITING; none if the directory is
        missing)."""
        out: set[str] = set()
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    if len(out) >= MAX_WAITING:
                        log.warning(
                            "more than %d upload digests wait in %s", MAX_WAITING, self.path
                        )
                        break
                    out.add(entry.name)
        except OSError:
            pass
        return out

    def prune(self, names: set[str], older_than: float = STALE_AFTER) -> None:
        """Removes the records `names` (left over: their files are gone or changed) once they
        are older than `older_than` seconds."""
        try:
            dir_fd = open_dir(self.path)
        except OSError:
            return
        try:
            now = time.time()
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if now - st.st_mtime > older_than:
                        _unlink(dir_fd, name)
        finally:
            os.close(dir_fd)

    def take(self, key: Key) -> Record | None:
        """The valid record of the file with identity `key`, or None; the record is removed
        either way (used or not, it is never needed again)."""
        name = record_name(key)
        try:
            dir_fd = open_dir(self.path)
        except OSError:
            return None
        try:
            try:
                fd = open_regular(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                log.warning("ignoring upload digest %s/%s: %s", self.path, name, _why(e))
                _unlink(dir_fd, name)
                return None
            try:
                data = read_bounded(fd, MAX_RECORD)
            except (TooLarge, OSError) as e:
                log.warning("ignoring upload digest %s/%s: %s", self.path, name, _why(e))
                _unlink(dir_fd, name)
                return None
            finally:
                os.close(fd)
            _unlink(dir_fd, name)
        finally:
            os.close(dir_fd)
        try:
            record = parse_record(data)
        except ValueError as e:
            log.warning("ignoring upload digest %s/%s: %s", self.path, name, e)
            return None
        if record.key != key:
            log.warning(
                "ignoring upload digest %s/%s: it describes another state of the file "
                "(changed since the upload); hashing it",
                self.path,
                name,
            )
            return None
        return record


def _why(e: Exception) -> str:
    if isinstance(e, NotRegularFile):
        return "not a regular file"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.debug("cannot remove upload digest %s: %s", name, e.strerror or e)


def parse_record(data: bytes) -> Record:
    """A record from its bytes; ValueError (one line) for anything but a well-formed one."""
    doc = load_json_bounded(data, MAX_RECORD, MAX_DEPTH)
    if not isinstance(doc, dict) or set(doc) != {"format", "key", "sha256", "combined"}:
        raise ValueError("not a record (unexpected fields)")
    if doc["format"] != FORMAT or isinstance(doc["format"], bool):
        raise ValueError("unknown format")
    combined = doc["combined"]
    if not isinstance(combined, list) or len(combined) > MAX_COMBINED:
        raise ValueError("malformed combined list")
    out = []
    for c in combined:
        if not isinstance(c, dict) or set(c) != {"meta", "key", "sha256"}:
            raise ValueError("malformed combined entry")
        meta = c["meta"]
        if not isinstance(meta, str) or not _NAME.fullmatch(meta):
            raise ValueError("malformed metadata file name")
        out.append(Combined(meta, _key(c["key"]), _digest(c["sha256"])))
    return Record(_key(doc["key"]), _digest(doc["sha256"]), tuple(out))


def _key(value: object) -> Key:
    if (
        not isinstance(value, list)
        or len(value) != 5
        or not all(type(v) is int and 0 <= v < _INT_MAX for v in value)
    ):
        raise ValueError("malformed file identity")
    return (value[0], value[1], value[2], value[3], value[4])


def _digest(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError("malformed sha256")
    return value
