"""Helpers shared by the benchmarks: scratch directories, random image versions, the
single-thread hashing baseline, running the CLI, reading the catalog, printing results.

Every benchmark compares against a baseline measured in the same run, on the same files, with
the same (warm) page cache, so the printed ratios stay meaningful on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
CHUNK = MiB
#: Where the benchmark versions live, relative to the served root.
VARIANT_REL = Path("images/bench/1.0/amd64/default")
META_NAME = "lxd.tar.xz"
ROOT_NAME = "rootfs.squashfs"
META_SIZE = 4 * 1024
#: mkdtemp() makes a private directory below it; /var/tmp is on disk (/tmp may be a tmpfs).
DEFAULT_WORKDIR = "/var/tmp"  # noqa: S108
#: Serials count minutes from here: YYYYMMDD_HH:MM, the spelling the build seeds use.
SERIAL_EPOCH = dt.datetime(2024, 1, 1)


#: seconds a watcher has to stop after SIGTERM before it is killed
STOP_TIMEOUT = 60.0


class BenchError(Exception):
    """The benchmark cannot go on (a command failed, a deadline passed); the message says why."""


# -- command line -------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        help="timed repetitions; the median is reported (default: 3)",
    )
    parser.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help="scratch data goes in a new temporary directory under this one, removed "
        "afterwards; keep it on the same file system as the real tree "
        f"(default: {DEFAULT_WORKDIR})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="do not remove the scratch directory at the end"
    )
    parser.add_argument(
        "--exe",
        default=None,
        help="the lxd-image-server executable (default: the repository's .venv)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds after which one step counts as failed (default: 900)",
    )


def server_exe(explicit: str | None) -> str:
    """The lxd-image-server to benchmark: --exe, else the repository's venv, else $PATH."""
    candidates = [explicit] if explicit else []
    candidates += [
        str(REPO / ".venv" / "bin" / "lxd-image-server"),
        str(Path(sys.executable).with_name("lxd-image-server")),
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK) and os.path.isfile(c):
            return c
    found = shutil.which("lxd-image-server")
    if found and not explicit:
        return found
    raise BenchError(
        f"lxd-image-server not found (tried {', '.join(c for c in candidates if c)} and $PATH); "
        "install the package in the venv or pass --exe"
    )


def main_wrapper(run: Callable[[], int]) -> None:
    """Runs a benchmark's body; a BenchError becomes a message and exit status 1."""
    try:
        status = run()
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    sys.exit(status)


# -- scratch space and image files --------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(parent: str, keep: bool, prefix: str) -> Iterator[Path]:
    """A new directory under `parent`, removed afterwards unless `keep`."""
    os.makedirs(parent, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    print(f"scratch directory: {path}")
    try:
        yield path
    finally:
        if keep:
            print(f"kept scratch directory {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def write_random(path: Path, size: int) -> None:
    """`size` random bytes (incompressible, like a squashfs), written 1 MiB at a time."""
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def build_version(directory: Path, root_size: int) -> list[Path]:
    """lxd.tar.xz (a few KiB) and rootfs.squashfs (`root_size` bytes) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = directory / META_NAME
    root = directory / ROOT_NAME
    write_random(meta, META_SIZE)
    write_random(root, root_size)
    return [meta, root]


def serial(n: int) -> str:
    """The n-th serial: 20240101_00:00, 20240101_00:01, ..."""
    return (SERIAL_EPOCH + dt.timedelta(minutes=n)).strftime("%Y%m%d_%H:%M")


def settle() -> None:
    """Flushes dirty pages so that write-back does not run during a timed step."""
    os.sync()


# -- the baseline -------------------------------------------------------------------------------


def warm(paths: Sequence[Path]) -> None:
    """Reads every byte once (untimed), so the timed reader finds them in the page cache."""
    buf = bytearray(CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def sha256_seconds(paths: Sequence[Path]) -> float:
    """Seconds one thread needs to read and sha256 every byte of `paths` (1 MiB reads)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        h.hexdigest()
    return time.perf_counter() - start


def parallel_sha256_seconds(jobs: Sequence[Path], threads: int) -> float:
    """Seconds `threads` threads need to sha256 every file of `jobs` (a file may appear more
    than once: each occurrence is read and hashed on its own)."""

    def one(p: Path) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        h.hexdigest()

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, jobs))
    return time.perf_counter() - start


def total_size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


# -- the program under test ---------------------------------------------------------------------


def run_timed(cmd: Sequence[str], log_path: Path, timeout: float) -> float:
    """Wall-clock seconds of `cmd`; its output goes to `log_path`. A failure is a BenchError."""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        # Popen.wait() with a timeout polls with sleeps of up to 50 ms, which would round every
        # figure up to the next 50 ms: wait without one, and let a timer enforce the deadline.
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - start
        if elapsed >= timeout:
            raise BenchError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s")
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd)} exited with status {proc.returncode}; its output:\n" + tail(log_path)
        )
    return elapsed


#: how often wait_for looks
POLL_INTERVAL = 0.01


def wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> float:
    """Polls `check` every 10 ms; returns the perf_counter() time it first held."""
    deadline = time.perf_counter() + timeout
    while True:
        if check():
            return time.perf_counter()
        if proc.poll() is not None:
            raise BenchError(
                f"the watcher exited with status {proc.returncode} while waiting for {what}; "
                f"its log:\n{tail(log)}"
            )
        if time.perf_counter() > deadline:
            raise BenchError(f"no {what} after {timeout:.0f} s; the watcher's log:\n{tail(log)}")
        time.sleep(POLL_INTERVAL)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def read_catalog(root: Path) -> dict[str, Any] | None:
    """images.json below `root`, or None while it does not exist (or is not JSON)."""
    try:
        with open(root / "streams" / "v1" / "images.json", "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def catalog_versions(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(product, serial) of every version the catalog lists."""
    out: set[tuple[str, str]] = set()
    products = doc.get("products")
    if not isinstance(products, dict):
        return out
    for name, product in products.items():
        versions = product.get("versions") if isinstance(product, dict) else None
        if isinstance(versions, dict):
            out.update((name, s) for s in versions)
    return out


# -- reporting ----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def runs(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip())


def machine_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs (load {load}), Python {sys.version.split()[0]}"


# -- the tree and the programs run on it -----------------------------------------------------------


def syncfs(path: Path) -> None:
    """Writes back what is dirty on `path`'s file system (what the tool left in the cache).

    syncfs(2) through libc (Python has no os.syncfs): only that file system, not what other
    jobs on the machine left dirty elsewhere (os.sync, the fallback, would time theirs too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs {path}")
    except AttributeError:
        os.sync()
    finally:
        os.close(fd)


def on_disk(img: Path) -> set[tuple[str, str]]:
    """(product, serial) of every version directory below `img` (images/)."""
    out = set()
    for d in img.glob("*/*/*/*/*"):
        if d.is_dir() and not d.name.startswith("."):
            parts = d.relative_to(img).parts
            out.add((":".join(parts[:4]), parts[4]))
    return out


@contextlib.contextmanager
def watcher(
    exe: str,
    state: Path,
    root: Path,
    log: Path,
    timeout: float,
    ready: Callable[[], bool],
    what: str,
) -> Iterator[None]:
    """`watch` running on `root` for the block, from the time `ready()` holds (`what` names it
    in the error when it does not within `timeout`); it must still run at the end."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [exe, "--state-dir", str(state), "watch", "--root-dir", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise BenchError(f"the watcher exited with status {proc.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what} not in {timeout:.0f} s")
            time.sleep(0.05)
        yield
        if proc.poll() is not None:
            raise BenchError(f"the watcher exited with status {proc.returncode}:\n{tail(log)}")
    finally:
        if proc.poll() is None:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stops `proc` with SIGTERM, or kills it when it has not stopped in STOP_TIMEOUT."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
