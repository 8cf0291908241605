"""`import` of one image: its root file system copied into the tree while the command starts.

Most of a small image's import is the copy and the two digests of its root (the file's sha256
and the fingerprint, sha256(metadata || root)), and neither depends on what the command works
out before it can place the image (its options, the configuration, what the files are, where
the version goes). So the console script (cli/early.py reads the command line first) starts
this copy before it loads anything else: the root, the larger of the two files given (or a
unified tarball, alone), is copied by import_copy.copy into a hidden directory of images/
(`.import-early-*`) with its digests, computed from the bytes that landed there, the metadata
tarball's bytes (read as they were then) in front of the fingerprint's.
The copy runs in a child process (forked while the command has no other thread: it shares no
interpreter lock with the command's start-up, whose imports would otherwise hold it most of
the time), which reports on a pipe; where the command has other threads already (as a library
call may), in a thread, with the interpreter's switch interval short while it runs: the
copying thread computes the root's sha256 itself and one more thread the fingerprint, and
once the command waits for the copy the root's sha256 gets a thread of its own too.

The import uses that copy (`take`) only if it is what the plan would have copied: the plan's
root is the same file (device, inode, size, modification time as when it was copied), and the
metadata tarball the import put into the tree has the digest of the bytes the fingerprint was
started with. The copy is then renamed into the version's staging directory (same file system,
else it is not used). In every other case (another file, a changed one, another file system, a
failed copy), the import copies the file itself as ever, and `close` removes what the early
copy made (the directories it made for images/ too, if they are still empty).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

#: typing.TYPE_CHECKING without importing typing (mypy reads any TYPE_CHECKING as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

    from lxd_image_server.catalog.hashread import Hasher

# (this module is imported before anything else: what only the copy needs (hashlib, fsutil,
# import_copy) is imported by `start`, when there is a copy to make)

#: a root smaller than this is not worth a thread (it is copied with its metadata: import_copy)
EARLY_FROM = 1 << 20
#: the metadata tarball is read into its digest whole, before the root: a few KiB; past this
#: it is not one
MAX_META = 64 << 20
STAGING_PREFIX = ".import-early-"
STAGING_MODE = 0o700
#: the copy's mode: import_place.FILE_MODE (not imported from there: it loads yaml and tarfile)
FILE_MODE = 0o644
PART_NAME = "root.part"
#: the copy's chunk: the root's sha256 is computed by the copying thread between its copies,
#: the fingerprint by a thread of its own (less CPU time than a thread for each, which counts
#: while the command's start-up runs beside them: bench/README.md)
COPY_CHUNK = 4 << 20
#: the interpreter's switch interval while the copy runs beside the command's start-up
#: (sys.setswitchinterval; the default is 5 ms): the copy's threads need the interpreter's lock
#: for a moment between their system calls and digests, and a start-up running Python code (its
#: imports) would otherwise keep it up to 5 ms each time; at the default, the copy did a fifth
#: of what it does alone before the command reached the root (bench/README.md)
SWITCH_INTERVAL = 0.0001
#: seconds between two progress reports while the import waits for the copy
POLL = 0.1


class _Cancelled(Exception):
    """The copy was stopped (the command ended without it)."""


class Copied:
    """The early copy's outcome (a plain class: dataclasses costs its import time here)."""

    __slots__ = ("combined", "meta_sha256", "sha256", "size")

    def __init__(self, size: int, sha256: str, combined: str | None, meta_sha256: str | None):
        self.size = size
        self.sha256 = sha256
        #: sha256(metadata || root); None for a unified tarball
        self.combined = combined
        #: the metadata tarball's sha256 (of the bytes read before the root's); None: unified
        self.meta_sha256 = meta_sha256


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class EarlyRoot:
    """The copy of one image's root, running in a thread from `start` (module docstring)."""

    def __init__(self, files: Sequence[str], img_dir: Callable[[], str]) -> None:
        """`files`: the one or two files given; `img_dir`: where images/ is (called by
        `start`: it may read the configuration)."""
        self.files = tuple(files)
        self._img_dir = img_dir
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        #: set once the command waits for the copy (`take`): nothing else to run beside it
        self._waited = threading.Event()
        #: bytes copied so far (written by the thread only)
        self.done = 0
        #: why there is no copy (for the debug log), once the thread has ended
        self.reason = ""
        self._root: tuple[int, int, int, int] | None = None
        self._copied: Copied | None = None
        #: images/ and the staging directory in it, while they are open
        self._img_fd = -1
        self._staging = ""
        self._staging_fd = -1
        #: the directories the copy made (the deepest last), removed again if still empty
        self._made: list[str] = []
        self._img_dir_path = ""
        #: the switch interval to restore once the copy is over (None: not changed)
        self._switch: float | None = None
        #: the child process copying (-1: none) and its reports
        self._pid = -1
        self._pipe: BinaryIO | None = None

    def start(self) -> EarlyRoot:
        """Opens the files, makes the hidden directory and starts the copy (a child process,
        or a thread: module docstring), if there is a root to copy. What the copy needs is
        loaded here first: loaded in a thread while the command loads its own modules, each
        waiting for the other's turn with the interpreter's lock, it would start the copy tens
        of milliseconds later."""
        if not 1 <= len(self.files) <= 2:
            raise ValueError("one image: one or two files")
        try:
            root_fd, meta_fd = self._prepare()
        except Exception as e:  # (any: the import opens the files itself and reports it)
            self.reason = f"{type(e).__name__}: {e}"
            return self
        if root_fd < 0:
            return self
        try:
            self._make_staging(self._img_dir_path)
        except Exception as e:
            self.reason = f"{type(e).__name__}: {e}"
            _close(root_fd, meta_fd)
            self._remove_staging()
            return self
        if _alone():
            try:
                self._fork(root_fd, meta_fd)
            except OSError as e:  # (no process to spare: the import copies the file itself)
                self.reason = f"{type(e).__name__}: {e}"
                _close(root_fd, meta_fd)
                self._remove_staging()
            return self
        self._thread = threading.Thread(
            target=self._run, args=(root_fd, meta_fd), name="import-early", daemon=True
        )
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        self._thread.start()
        return self

    # -- a process of its own (the command has no other thread yet) --------------------------

    def _fork(self, root_fd: int, meta_fd: int) -> None:
        """The copy in a child process: it shares no interpreter lock with the command's
        start-up. It reports on a pipe: `p BYTES` as it goes, then `d SIZE SHA256 COMBINED
        META` (`-` for none) or `e WHY`; it never touches anything but its copy."""
        r, w = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            _close(r, w)
            raise
        if pid == 0:  # the child
            os.close(r)
            self._child(root_fd, meta_fd, w)
        os.close(w)
        _close(root_fd, meta_fd)
        self._pid = pid
        self._pipe = os.fdopen(r, "rb")

    def _child(self, root_fd: int, meta_fd: int, w: int) -> None:
        status = 1
        try:
            meta = None
            if meta_fd >= 0:
                meta = _hash_all(meta_fd)
            if meta_fd >= 0 and meta is None:
                _write(w, b"e no metadata tarball among the files\n")
            else:
                copied = self._copy_root(root_fd, meta, lambda n: _write(w, b"p %d\n" % n), 0)
                fields = [copied.sha256, copied.combined or "-", copied.meta_sha256 or "-"]
                _write(w, f"d {copied.size} {' '.join(fields)}\n".encode())
                status = 0
        except BaseException as e:  # (everything: the child only ever ends by _exit)
            with contextlib.suppress(BaseException):
                _write(w, f"e {type(e).__name__}: {e}".replace("\n", " ").encode() + b"\n")
        finally:
            os._exit(status)

    def _wait_child(self, progress: Callable[[int], None]) -> None:
        """Reads the child's reports to its end (forwarding its progress), then reaps it."""
        assert self._pipe is not None
        for line in self._pipe:
            if not line.endswith(b"\n"):
                break  # (cut short: the child was killed while it wrote)
            kind, _, rest = line[:-1].partition(b" ")
            if kind == b"p" and rest.isdigit():
                n = int(rest)
                self.done += n
                progress(n)
            elif kind == b"d":
                self._copied = _parse_done(rest)
            elif kind == b"e":
                self.reason = rest.decode(errors="replace")
        self._reap()

    def _reap(self, kill: bool = False) -> None:
        if self._pid > 0:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = -1
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def _restore_switch(self) -> None:
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
            self._switch = None

    def _prepare(self) -> tuple[int, int]:
        """(root, metadata tarball) opened (-1: none), images/ found, the copy's modules
        loaded; the root's identity recorded."""
        import hashlib  # noqa: F401  (loaded for the thread: see `start`)

        from lxd_image_server.fsutil import open_regular_stat
        from lxd_image_server.ops import import_copy  # noqa: F401  (the same)

        opened: list[tuple[int, os.stat_result]] = []
        try:
            for f in self.files:
                opened.append(open_regular_stat(os.path.realpath(f)))
            opened.sort(key=lambda o: o[1].st_size)
            (root_fd, root_st), meta = opened[-1], opened[:-1]
            if root_st.st_size < EARLY_FROM:
                self.reason = "a small root"
            elif meta and meta[0][1].st_size > MAX_META:
                self.reason = "no metadata tarball among the files"
            else:
                self._img_dir_path = os.path.abspath(self._img_dir())
                self._root = _identity(root_st)
                return root_fd, meta[0][0] if meta else -1
        except BaseException:
            for fd, _ in opened:
                os.close(fd)
            raise
        for fd, _ in opened:
            os.close(fd)
        return -1, -1

    # -- the thread -------------------------------------------------------------------------

    def _run(self, root_fd: int, meta_fd: int) -> None:
        try:
            self._copy(root_fd, meta_fd)
        except _Cancelled:
            self.reason = "stopped"
        except Exception as e:  # (any: the import copies the file itself and reports it)
            self.reason = f"{type(e).__name__}: {e}"
        finally:
            _close(root_fd, meta_fd)
        if self._copied is None:
            self._remove_staging()

    def _copy(self, root_fd: int, meta_fd: int) -> None:
        meta = None
        if meta_fd >= 0:
            meta = _hash_all(meta_fd)
            if meta is None:
                self.reason = "no metadata tarball among the files"
                return
        self._copied = self._copy_root(root_fd, meta, self._progress, None)

    def _make_staging(self, img_dir: str) -> None:
        from lxd_image_server.fsutil import make_hidden_dir

        img_dir = os.path.abspath(img_dir)
        missing = []
        path = img_dir
        while not os.path.lexists(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue
            self._made.append(path)
        # (images/ itself may be a link, as for the import: import_place.stage)
        self._img_fd = os.open(img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._staging, self._staging_fd = make_hidden_dir(
            self._img_fd, STAGING_PREFIX, STAGING_MODE
        )

    def _copy_root(
        self, root_fd: int, meta: Hasher | None, progress: Callable[[int], None], mine: int | None
    ) -> Copied:
        """The copy and its digests (`mine`: sinks the copying thread feeds; None: all but
        one until the command waits for the copy)."""
        import hashlib

        from lxd_image_server.ops import import_copy

        plain = hashlib.sha256()
        sinks: list[Hasher] = [plain]
        combined = meta.copy() if meta is not None else None
        if combined is not None:
            sinks.append(combined)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(PART_NAME, flags, FILE_MODE, dir_fd=self._staging_fd)
        try:
            os.fchmod(out, FILE_MODE)
            # the copying thread feeds all sinks but one (the fingerprint's, or a unified
            # tarball's sha256: then the copy runs beside it), until the command waits for it
            # (then each has a thread)
            spread = None
            if mine is None:
                mine, spread = len(sinks) - 1, self._waited.is_set
            size = import_copy.copy(root_fd, out, sinks, progress, mine, COPY_CHUNK, spread)
            os.fsync(out)
        finally:
            os.close(out)
        return Copied(
            size=size,
            sha256=plain.hexdigest(),
            combined=combined.hexdigest() if combined is not None else None,
            meta_sha256=meta.hexdigest() if meta is not None else None,
        )

    def _progress(self, n: int) -> None:
        if self._cancel.is_set():
            raise _Cancelled()
        self.done += n

    # -- the import's side ------------------------------------------------------------------

    def take(
        self,
        path: str,
        meta_sha256: str | None,
        dir_fd: int,
        name: str,
        progress: Callable[[int], None],
    ) -> Copied | None:
        """The early copy of `path` as `name` in the directory `dir_fd`, if it is what the
        import would have copied (module docstring), once it is complete (reporting its
        progress meanwhile); None (nothing changed) if not."""
        if self._root is None and self._thread is not None and not self._thread.is_alive():
            return None
        try:
            st = os.stat(os.path.realpath(path))
        except OSError:
            return None
        if self._pid > 0:
            if self._root != _identity(st):
                return None
            self._wait_child(progress)
            return self._rename(path, st, meta_sha256, dir_fd, name, progress, self.done)
        reported = 0
        self._waited.set()
        while self._thread is not None and self._thread.is_alive():
            if self._root is not None and self._root != _identity(st):
                return None  # (not this file: let it run, `close` stops it)
            self._thread.join(POLL)
            done = self.done
            progress(done - reported)
            reported = done
        self._restore_switch()
        return self._rename(path, st, meta_sha256, dir_fd, name, progress, reported)

    def _rename(
        self,
        path: str,
        st: os.stat_result,
        meta_sha256: str | None,
        dir_fd: int,
        name: str,
        progress: Callable[[int], None],
        reported: int,
    ) -> Copied | None:
        """The finished copy given its place, if it is the one `take` wants."""
        copied = self._copied
        if copied is None or self._root != _identity(st):
            return None
        if copied.meta_sha256 != meta_sha256:
            return None  # the fingerprint started with other metadata bytes
        progress(copied.size - reported)
        try:
            os.rename(PART_NAME, name, src_dir_fd=self._staging_fd, dst_dir_fd=dir_fd)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            return None
        self._copied = None
        return copied

    def close(self) -> None:
        """Stops the copy if it still runs; removes what it made that the import did not
        take. Call before the process gives up its privileges (privileges.become_writer)."""
        if self._thread is not None:
            self._cancel.set()
            self._thread.join()
        self._reap(kill=True)
        self._restore_switch()
        self._remove_staging()

    def _remove_staging(self) -> None:
        """(never raises: what cannot be removed stays, hidden, as an import's staging
        directory a crash leaves)"""
        if self._staging_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(PART_NAME, dir_fd=self._staging_fd)
            os.close(self._staging_fd)
            self._staging_fd = -1
        if self._staging:
            with contextlib.suppress(OSError):
                os.rmdir(self._staging, dir_fd=self._img_fd)
            self._staging = ""
        if self._img_fd >= 0:
            os.close(self._img_fd)
            self._img_fd = -1
        while self._made:
            try:
                os.rmdir(self._made.pop())
            except OSError:
                break  # (not empty: the import placed its image there)
        self._copied = None


def _parse_done(rest: bytes) -> Copied | None:
    """`SIZE SHA256 COMBINED META` (`-` for none), or None if it is not that."""
    fields = rest.decode("ascii", errors="replace").split(" ")
    if len(fields) != 4 or not fields[0].isdigit():
        return None
    digests = [None if f == "-" else f for f in fields[1:]]
    if digests[0] is None or not all(d is None or _is_sha256(d) for d in digests):
        return None
    return Copied(int(fields[0]), digests[0], digests[1], digests[2])


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _alone() -> bool:
    """Whether this process runs no other thread (Python's or a library's): then it may fork
    safely."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hash_all(fd: int) -> Hasher | None:
    """The sha256 of the file `fd`, None past MAX_META bytes."""
    import hashlib

    h = hashlib.sha256()
    offset = 0
    while offset <= MAX_META:
        data = os.pread(fd, 1 << 20, offset)
        if not data:
            return h
        h.update(data)
        offset += len(data)
    return None
