"""File-system helpers: durable, atomic writes (readers see the old bytes or the new ones, never
a mix), whether another user can reach a directory, and safe, bounded reads of what an uploader
wrote (regular files only, no link followed)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

#: bytes per read or write when a file is streamed: hashing, uploads, imports, pushes
CHUNK_SIZE = 1 << 20


#: what write_atomic writes: bytes, or pieces of them written in order (never joined)
Data = bytes | memoryview | Sequence[bytes | memoryview]


def write_atomic(path: str, data: Data, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
    """Writes `path` through a hidden temporary file in the same directory, created with `mode`
    (whatever the umask) and owner `uid`/`gid` (-1: unchanged) before any byte is written,
    fsynced, then renamed over `path`. Does not fsync the directory: see fsync_dir. `data` may
    be a sequence of pieces: they are written in order, as many at a time as a writev takes."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, mode & 0o600)
    try:
        try:
            if (uid, gid) != (-1, -1):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: pieces per writev (the system's IOV_MAX, at most 1024)
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if "SC_IOV_MAX" in os.sysconf_names else 16


def write_all(fd: int, data: Data) -> None:
    """Writes all of `data` (bytes, or pieces in order) at `fd`'s offset."""
    pieces = [data] if isinstance(data, (bytes, memoryview)) else data
    for start in range(0, len(pieces), _IOV_MAX):
        batch = list(pieces[start : start + _IOV_MAX])
        while batch:
            written = os.writev(fd, batch)
            if written == sum(len(p) for p in batch):
                break
            # (a short write: go on from the first byte not written)
            first = 0
            while written >= len(batch[first]):
                written -= len(batch[first])
                first += 1
            batch = [memoryview(batch[first])[written:], *batch[first + 1 :]]


def holds(path: str, data: Sequence[bytes | memoryview]) -> bool:
    """Whether `path` is a regular file (no link followed) of exactly the bytes of the pieces
    `data`, compared a block at a time: neither the file nor the pieces are held whole. A
    link, a FIFO, another size, anything unreadable: False."""
    try:
        fd = open_regular(path)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != sum(len(p) for p in data):
            return False
        parts = iter(data)
        view = memoryview(b"")
        offset = 0
        while True:
            block = memoryview(os.pread(fd, CHUNK_SIZE, offset))
            if not block:
                return not view and all(not p for p in parts)
            offset += len(block)
            at = 0
            while at < len(block):
                while not view:
                    view = memoryview(next(parts, b"\0"))  # (past the end: no match)
                n = min(len(view), len(block) - at)
                if view[:n] != block[at : at + n]:
                    return False
                view, at = view[n:], at + n
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created 0644, its directory too, if missing) for the
    duration of the block: for the catalog writer's own state files, which no uploader reaches."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Makes renames and new names in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: sync_file_range(2): start writing the range's dirty pages back, do not wait
SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Python has none), loaded on first use; None where missing."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    call: Callable[[int, int, int, int], int] = fn
    return call


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing `length` bytes of `fd` from `offset` to the disk, without waiting (so a
    later fsync finds them written): for large files written once, where leaving it all to the
    final fsync would make the writer wait for the whole file at the end. Not a durability
    guarantee (only fsync is): where sync_file_range is missing or refuses, nothing happens."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)


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


# -- reading what an uploader may have written ---------------------------------------------------
#
# Everything below images/ may be a symlink, a FIFO, a device or a file swapped between a check
# and its use. These helpers act on what they checked: they open without following links and
# without blocking, and check the opened file itself.

#: open(2) flags for a file an uploader controls: no link followed, no FIFO waited on
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotRegularFile(OSError):
    """The name is not a regular file (a directory, FIFO, device, socket or symbolic link)."""


class TooLarge(ValueError):
    """More bytes than the caller allows."""


def open_regular(name: str, dir_fd: int | None = None) -> int:
    """Opens `name` (relative to `dir_fd` when given) for reading if, and only if, it is a
    regular file: a symbolic link is refused by the kernel (ELOOP), a FIFO or device is opened
    without blocking and refused after fstat. The returned descriptor blocks again."""
    return open_regular_stat(name, dir_fd)[0]


def open_regular_stat(
    name: str, dir_fd: int | None = None, blocking: bool = True
) -> tuple[int, os.stat_result]:
    """open_regular, and the fstat of the descriptor it checked (one system call less for a
    caller that checks the file's identity too). `blocking` False leaves the descriptor
    non-blocking, which changes nothing in reading a regular file and saves two system calls
    (what a caller reading thousands of small files wants)."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a symbolic link", name) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", name)
        if blocking:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """Opens the directory `name` (relative to `dir_fd` when given) without following a link:
    a link or anything else that is not a directory raises NotADirectoryError."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotADirectoryError(errno.ENOTDIR, "a symbolic link", name) from None
        raise


def exact_dir_mode(fd: int, mode: int) -> None:
    """Gives the directory `fd` just made exactly the permissions `mode`, only when a umask
    narrowed them: a chmod naming the setgid bit is refused by systemd's RestrictSUIDSGID, so
    an inherited setgid bit is kept as it is."""
    st_mode = os.fstat(fd).st_mode
    if stat.S_IMODE(st_mode) & 0o777 != mode:
        os.fchmod(fd, mode | (st_mode & stat.S_ISGID))


def make_hidden_dir(dir_fd: int, prefix: str, mode: int) -> tuple[str, int]:
    """A new directory `prefix` + random in `dir_fd`, of exactly `mode`: its name and its
    descriptor (the staging directories of `import` and `sync`)."""
    name = f"{prefix}{secrets.token_hex(6)}"
    os.mkdir(name, mode, dir_fd=dir_fd)
    fd = open_dir(name, dir_fd=dir_fd)
    try:
        exact_dir_mode(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return name, fd


def open_dir_below(base: str, rel: str) -> int:
    """Opens the directory `rel` (a relative path with '/', or "" for `base` itself) below the
    trusted directory `base`, each component relative to its parent's descriptor without
    following a link (open_dir). Raises OSError (NotADirectoryError for a link, ...)."""
    parts = rel.split("/") if rel else []
    if any(p in ("", ".", "..") for p in parts):
        raise NotADirectoryError(errno.EINVAL, "not a plain relative path", rel)
    base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_dirs(base_fd, parts)
    finally:
        os.close(base_fd)


def open_dirs(dir_fd: int, names: Iterable[str]) -> int:
    """The directory `names` (one name per level) below `dir_fd`, each step opened relative to
    the one before without following a link (open_dir); `dir_fd` stays open and the caller's.
    Raises OSError (NotADirectoryError for a link on the way)."""
    fd = os.dup(dir_fd)
    try:
        for name in names:
            sub = open_dir(name, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(fd: int, limit: int) -> bytes:
    """All bytes of `fd` from its current offset, or TooLarge when there are more than `limit`
    (the file may grow while it is read: the bound is on what is read, not on fstat)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(CHUNK_SIZE, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"more than {limit} bytes")
        chunks.append(chunk)


def read_regular(name: str, limit: int, dir_fd: int | None = None) -> bytes:
    """The bytes of the regular file `name`, at most `limit` of them (see open_regular)."""
    fd = open_regular(name, dir_fd=dir_fd)
    try:
        return read_bounded(fd, limit)
    finally:
        os.close(fd)


def load_json_bounded(data: bytes | str, max_bytes: int, max_depth: int) -> Any:
    """Parses JSON an uploader may have written: ValueError (one line, no traceback worth
    logging) when it has more than `max_bytes`, nests deeper than `max_depth`, or is not JSON."""
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if _depth(value) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), iteratively:
    one level at a time, keeping only the containers of the next (a catalog of 20,000
    versions has half a million values, nearly all scalars)."""
    if not isinstance(value, (dict, list)):
        return 0
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
    return depth


# -- directory trees, relative to a descriptor, never through a link ---------------------------


class DirectoryChanged(OSError):
    """A directory made or found on the way was removed or replaced meanwhile; try again."""


class DirChain:
    """Directory descriptors from a root down, each opened below the one before without
    following a link (open_dir), made with mkdir relative to its parent's descriptor when asked:
    a directory swapped for a link on the way leads nowhere (NotADirectoryError), never out of
    the tree. `fds[i + 1]` is `names[i]` in `fds[i]`; the chain owns every descriptor, the root's
    too, and closes them (`close`, or as a context manager)."""

    def __init__(self, root_fd: int) -> None:
        self.fds = [root_fd]
        self.names: list[str] = []
        #: indexes into `names` of the directories this chain made
        self.created: list[int] = []

    def __enter__(self) -> DirChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def down(self, name: str, mode: int | None = None) -> None:
        """Opens directory `name` in the current one, or, with a `mode`, makes it if missing
        (with exactly that mode, the setgid bit it inherits kept, and the parent fsynced).
        FileNotFoundError: missing (no `mode`); NotADirectoryError: a link or not a directory;
        DirectoryChanged: it kept being made and removed, or was swapped right after mkdir."""
        parent = self.fds[-1]
        for _ in range(3):
            try:
                fd = open_dir(name, dir_fd=parent)
            except FileNotFoundError:
                if mode is None:
                    raise
                try:
                    os.mkdir(name, mode, dir_fd=parent)
                except FileExistsError:
                    continue
                try:
                    fd = open_dir(name, dir_fd=parent)
                except (FileNotFoundError, NotADirectoryError):
                    raise DirectoryChanged(errno.EAGAIN, "a directory changed", name) from None
                self.created.append(len(self.names))
                self.names.append(name)
                self.fds.append(fd)
                exact_dir_mode(fd, mode)
                os.fsync(parent)
                return
            self.names.append(name)
            self.fds.append(fd)
            return
        raise DirectoryChanged(errno.EAGAIN, "a directory kept changing", name)

    def remove_created(self) -> None:
        """Removes the (empty) directories this chain made, deepest first."""
        for i in reversed(self.created):
            try:
                os.rmdir(self.names[i], dir_fd=self.fds[i])
            except OSError:
                return

    def prune(self) -> int:
        """Removes the directories of the chain left empty, deepest first, up to (not
        including) the root; returns the descriptor of the deepest directory changed."""
        changed = self.fds[-1]
        for i in reversed(range(len(self.names))):
            try:
                os.rmdir(self.names[i], dir_fd=self.fds[i])
            except OSError:
                break
            changed = self.fds[i]
        with contextlib.suppress(OSError):
            os.fsync(changed)
        return changed

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def delete_tree(name: str, dir_fd: int) -> None:
    """Deletes the directory `name` in `dir_fd`: one rename to a hidden name makes it vanish at
    once (for a scanner, a reader, a mirror push), the parent is fsynced, then its files go.
    Nothing is followed: shutil.rmtree with dir_fd opens each directory without following a
    link, and a link or file swapped in for the renamed directory is removed itself.
    OSError (FileNotFoundError: it is gone) when the rename fails; what is left after it (a
    file that cannot be removed) stays under the hidden name."""
    doomed = f".deleting-{secrets.token_hex(8)}"
    os.rename(name, doomed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
    shutil.rmtree(doomed, dir_fd=dir_fd, ignore_errors=True)
    with contextlib.suppress(OSError):  # a link or a file swapped in; rmtree left it
        os.unlink(doomed, dir_fd=dir_fd)
