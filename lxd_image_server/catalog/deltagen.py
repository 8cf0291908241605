"""Making and checking deltas with Debian's xdelta3, bounded in time, memory and output.

Both inputs are an uploader's files. They are opened here below images/ without following a
link (scan.open_below), checked to be the very files scanned (same identity), and handed to
xdelta3 as open descriptors (/dev/fd/N and standard input): xdelta3 never opens a path an
uploader could swap. xdelta3 runs at nice 19 and in the idle I/O class as far as the sandbox
allows (the units' system call filter may refuse both: xdelta3 then runs at the unit's own
priority, never not at all), with SETTINGS (-3, no secondary compression, a source window of
the base's size up to MAX_WINDOW: its memory grows with it, to about 1.7 times the window,
which the units' MemoryMax allows for), a time limit, and its output read here: making stops
as soon as the delta outgrows `max_ratio` of the root, checking as soon as the rebuilt root
outgrows the real one. The environment is cleared (xdelta3 takes options from $XDELTA).

A check says WRONG only when xdelta3 ran to its end and refused the delta or rebuilt
something else; a run cut short (time limit, killed: the OOM killer at MemoryMax, a wrapper or
the system failing) is FAILED, which the watcher tries again later (deltawork.py).

A delta is made into a hidden temporary file in the version's directory (created with
O_EXCL|O_NOFOLLOW), checked by rebuilding the root from it and comparing the sha256, then
linked to its name (never replacing a file an uploader put there meanwhile).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lxd_image_server import __version__
from lxd_image_server.catalog.deltas import FAILED, OK, TOO_BIG, WRONG, Job, Record, ident
from lxd_image_server.fsutil import CHUNK_SIZE, open_dir_below
from lxd_image_server.tree.scan import FileStat, open_below

log = logging.getLogger(__name__)

#: largest xdelta3 source window: its memory use grows with it, to about 1.7 times the window
#: at -3 (440 MiB of RSS at 256 MiB; -9 took 830), within the units' MemoryHigh/MemoryMax. A
#: base larger than this is still diffed, with matches found within this distance of the
#: target's position (a new version of a squashfs keeps its files in much the same order)
MAX_WINDOW = 256 << 20
#: the smallest window xdelta3 takes. The window holds the whole base up to MAX_WINDOW, no
#: more: xdelta3 -9 sets up its tables for the window's size, so a 16 MiB window made a delta
#: of a 4 KiB root cost 10 times the time of one sized to it
MIN_WINDOW = 512 << 10


@dataclass(frozen=True)
class Settings:
    """How xdelta3 makes a delta, chosen by bench/bench_delta.py's figures (bench/README.md):
    -9 made deltas of real roots at most 0.2% smaller than -3, in about twice the time and
    memory; LZMA secondary compression (xdelta3's default in Debian) made them at most 0.5%
    smaller, in a third more time for the server and about twice the apply time for a client
    (and needs a client's xdelta3 built with liblzma)."""

    #: compression level (-0 to -9)
    level: int = 3
    #: the largest source window (-B); a smaller base gets a window of its own size
    max_window: int = MAX_WINDOW
    #: secondary compression (-S): lzma, djw, fgk or none; None leaves xdelta3's default
    #: (LZMA in Debian's build)
    secondary: str | None = "none"

    def window(self, base_size: int) -> int:
        return max(MIN_WINDOW, min(self.max_window, base_size))

    def encode_options(self, base_size: int) -> list[str]:
        """xdelta3's options to make a delta from a base of `base_size` bytes (to stdout)."""
        secondary = ["-S", self.secondary] if self.secondary is not None else []
        window = str(self.window(base_size))
        return ["-e", f"-{self.level}", *secondary, "-A", "-c", "-B", window]

    def decode_options(self, base_size: int) -> list[str]:
        """xdelta3's options to rebuild a root from a delta (to stdout)."""
        return ["-d", "-c", "-B", str(self.window(base_size))]


#: what this server makes its deltas with
SETTINGS = Settings()

TMP_PREFIX = ".vcdiff-"
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class Limits:
    #: a delta larger than this fraction of the root it rebuilds is not kept
    max_ratio: float = 0.5
    #: seconds one xdelta3 run may take
    timeout: float = 1800.0
    xdelta3: str = "xdelta3"


class _Stop(Exception):
    """xdelta3's output went over its bound."""


class _Changed(Exception):
    """An input is not (or no longer) the file scanned."""


def xdelta3_path(name: str = "xdelta3") -> str | None:
    return shutil.which(name, path=_ENV["PATH"]) if "/" not in name else name


def environment(xdelta3: str) -> str:
    """What a delta's result depends on besides its files: this program's version and the
    xdelta3 binary. A FAILED or WRONG record made by another is not trusted (deltas.due)."""
    try:
        st = os.stat(xdelta3)
        binary = f"{xdelta3}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        binary = xdelta3
    return f"{__version__} {binary}"


def _wrapped(argv: list[str]) -> list[str]:
    """`argv` at the lowest CPU priority and the idle I/O class, when nice/ionice exist and
    the sandbox lets them: the units refuse setpriority and ioprio_set unless they allow them
    (SystemCallFilter). Refused, coreutils' nice warns and runs the command anyway, and so
    does util-linux's ionice with -t (without it, it exits 1)."""
    out = argv
    ionice = shutil.which("ionice", path=_ENV["PATH"])
    if ionice:
        out = [ionice, "-t", "-c", "3", *out]
    nice = shutil.which("nice", path=_ENV["PATH"])
    if nice:
        out = [nice, "-n", "19", *out]
    return out


#: how much of xdelta3's standard error is kept (its end: the message is its last line)
_ERRORS_KEPT = 16 << 10


@dataclass(frozen=True)
class Failure:
    """Why an xdelta3 run failed."""

    why: str
    #: xdelta3 ran to its end and refused its input (it exited with a message of its own);
    #: else the run was cut short or never started: trying again may succeed
    refused: bool = False


def _run(
    argv: Sequence[str],
    stdin: int,
    pass_fds: Sequence[int],
    sink: Callable[[bytes], None],
    timeout: float,
) -> Failure | None:
    """Runs `argv`, feeding each chunk of its output to `sink` (which raises _Stop to end it).
    Returns None on success, else why it failed. Its standard output and error are read here
    as they come (a selector, no thread: one xdelta3 run per small root is cheap), until
    both are closed, or `timeout` seconds have passed: then it is killed."""
    os.lseek(stdin, 0, os.SEEK_SET)
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        _wrapped(list(argv)),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=tuple(pass_fds),
        env=_ENV,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    errors = b""
    fired = False
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(out, selectors.EVENT_READ)
            selector.register(err, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    fired = True
                    break
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, CHUNK_SIZE)
                    if not chunk:
                        selector.unregister(key.fd)
                    elif key.fd == out:
                        sink(chunk)
                    else:
                        errors = (errors + chunk)[-_ERRORS_KEPT:]
        if not fired:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                fired = True
    except BaseException:
        proc.kill()
        raise
    finally:
        if fired:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
        rc = proc.wait()
    if fired:
        return Failure(f"timed out after {timeout:.0f} s")
    if rc < 0:
        return Failure(f"xdelta3 was killed by {_signal_name(-rc)}")
    if rc != 0:
        lines = errors.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1][:200] if lines else "no message"
        return Failure(f"xdelta3 exited {rc}: {last}", refused=last.startswith("xdelta3:"))
    return None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _open_checked(f: FileStat) -> int:
    try:
        fd = open_below(f.base, f.rel)
    except OSError as e:
        raise _Changed(f"{f.path}: cannot open it ({e.strerror or e})") from e
    if _identity(fd) != f.identity[1:]:
        os.close(fd)
        raise _Changed(f"{f.path} changed since it was scanned")
    return fd


def _identity(fd: int) -> tuple[int, int, int, int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check(xdelta3: str, base_fd: int, delta_fd: int, job: Job, timeout: float) -> Failure | None:
    """None when the delta rebuilds the target root (by sha256), else why not."""
    h = hashlib.sha256()
    total = 0
    limit = job.target_root.size

    def sink(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)
        if total > limit:
            raise _Stop()
        h.update(chunk)

    argv = [xdelta3, *SETTINGS.decode_options(job.base_root.size), "-s", f"/dev/fd/{base_fd}"]
    try:
        problem = _run(argv, delta_fd, [base_fd], sink, timeout)
    except _Stop:
        return Failure("it rebuilds more bytes than the root has", refused=True)
    if problem:
        return problem
    if total != limit or h.hexdigest() != job.target_sha256:
        return Failure("it does not rebuild the root (sha256 differs)", refused=True)
    return None


def rebuild(
    base_fd: int,
    delta_fd: int,
    base_size: int,
    limit: int,
    sink: Callable[[bytes], None],
    limits: Limits,
) -> str | None:
    """Runs xdelta3 -d on the open base and delta, feeding the rebuilt bytes to `sink`; None
    when it went through (the caller checks what it got), else why not: an error, a timeout,
    or more than `limit` bytes (`sync`'s use of an upstream's delta)."""
    total = 0

    def bounded(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)
        if total > limit:
            raise _Stop()
        sink(chunk)

    argv = [limits.xdelta3, *SETTINGS.decode_options(base_size), "-s", f"/dev/fd/{base_fd}"]
    try:
        failure = _run(argv, delta_fd, [base_fd], bounded, limits.timeout)
    except _Stop:
        return f"it rebuilds more than {limit} bytes"
    return None if failure is None else failure.why


def check(job: Job, limits: Limits) -> Record:
    """Checks the delta `job.delta` (an uploader's, or ours from before): does it turn the
    base's root into the target's root?"""
    assert job.delta is not None
    rec = Record(WRONG, ident(job.base_root), ident(job.target_root), ident(job.delta))
    fds: list[int] = []
    try:
        try:
            for f in (job.base_root, job.target_root, job.delta):
                fds.append(_open_checked(f))
        except _Changed as e:
            return Record(FAILED, rec.base, rec.target, rec.delta, detail=str(e))
        try:
            problem = _check(limits.xdelta3, fds[0], fds[2], job, limits.timeout)
        except OSError as e:  # xdelta3 could not be started
            return Record(FAILED, rec.base, rec.target, rec.delta, detail=e.strerror or str(e))
        for fd, f in zip(fds, (job.base_root, job.target_root, job.delta), strict=True):
            if _identity(fd) != f.identity[1:]:
                return Record(FAILED, rec.base, rec.target, rec.delta, detail=f"{f.path} changed")
        if problem:
            result = WRONG if problem.refused else FAILED
            return Record(result, rec.base, rec.target, rec.delta, job.delta.size, problem.why)
        return Record(OK, rec.base, rec.target, rec.delta, job.delta.size)
    finally:
        for fd in fds:
            os.close(fd)


def _drop_stale(dir_fd: int) -> None:
    """Temporary files of an earlier run that was stopped (every run holds the deltas lock,
    so none is being written now)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(dir_fd):
            if name.startswith(TMP_PREFIX) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)


def make(job: Job, limits: Limits, img_dir: str) -> Record:
    """Makes the delta `job.name` in `job.target_dir`, checks it, and links it into place."""
    base_id, target_id = ident(job.base_root), ident(job.target_root)
    limit = int(job.target_root.size * limits.max_ratio)
    fds: list[int] = []
    dir_fd = tmp_fd = -1
    tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}.tmp"
    try:
        try:
            fds = [_open_checked(job.base_root)]
            fds.append(_open_checked(job.target_root))
            rel = os.path.relpath(job.target_dir, img_dir)
            dir_fd = open_dir_below(img_dir, rel)
        except (_Changed, OSError) as e:
            return Record(FAILED, base_id, target_id, detail=str(e))
        _drop_stale(dir_fd)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        tmp_fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
        written = 0

        def sink(chunk: bytes) -> None:
            nonlocal written
            written += len(chunk)
            if written > limit:
                raise _Stop()
            os.write(tmp_fd, chunk)

        options = SETTINGS.encode_options(job.base_root.size)
        argv = [limits.xdelta3, *options, "-s", f"/dev/fd/{fds[0]}"]
        try:
            problem = _run(argv, fds[1], [fds[0]], sink, limits.timeout)
        except _Stop:
            return Record(
                TOO_BIG,
                base_id,
                target_id,
                size=written,
                detail=f"over {limits.max_ratio:g} of the root ({job.target_root.size} bytes)",
            )
        if problem:
            return Record(FAILED, base_id, target_id, detail=problem.why)
        problem = _check(limits.xdelta3, fds[0], tmp_fd, job, limits.timeout)
        if problem:
            return Record(FAILED, base_id, target_id, detail=f"made, but {problem.why}")
        for fd, f in zip(fds, (job.base_root, job.target_root), strict=True):
            if _identity(fd) != f.identity[1:]:
                return Record(FAILED, base_id, target_id, detail=f"{f.path} changed meanwhile")
        os.fsync(tmp_fd)
        try:
            os.link(tmp, job.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return Record(FAILED, base_id, target_id, detail="a file of that name appeared")
        os.unlink(tmp, dir_fd=dir_fd)
        tmp = ""
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
        st = os.fstat(tmp_fd)
        delta = (job.path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return Record(OK, base_id, target_id, ":".join(map(str, delta)), st.st_size)
    except OSError as e:
        return Record(FAILED, base_id, target_id, detail=e.strerror or str(e))
    finally:
        if tmp and dir_fd >= 0 and tmp_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
        for fd in (*fds, tmp_fd, dir_fd):
            if fd >= 0:
                os.close(fd)


def run_job(job: Job, limits: Limits, img_dir: str) -> Record:
    rec = make(job, limits, img_dir) if job.delta is None else check(job, limits)
    what = "made" if job.delta is None else "checked"
    if rec.result == OK:
        share = 100.0 * rec.size / max(1, job.target_root.size)
        log.info("%s delta %s (%d bytes, %.1f%% of the root)", what, job.path, rec.size, share)
    elif rec.result == TOO_BIG:
        log.info("not keeping delta %s: %s", job.path, rec.detail)
    else:
        log.warning("delta %s: %s %s", job.path, rec.result, rec.detail)
    return rec
