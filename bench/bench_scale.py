"""The catalog at scale: trees of many small versions, against one os.walk + stat pass.

    python bench/bench_scale.py [--sizes 1000,5000,20000] [--delta-min-size BYTES]
                                [--repeat 3] [--workdir DIR]

For each size N, builds a tree of N versions (lxd.tar.xz + rootfs.squashfs of 4 KiB each, so
hashing is negligible and every figure measures the per-file and per-version work), spread over
N/100 products (at least one), and measures, with the tree warm in the page cache:

- baseline: one `os.walk` of images/ with an `os.stat` of every file, in-process;
- cold `update`: `update` with an empty state directory (every file hashed, catalog written);
- no-change `update`: `update` again on the unchanged tree (everything from the hash cache);
- watch: a running watcher on the tree; a new version is built in a hidden staging directory and
  renamed into place; seconds until the first images.json listing it is in place (median of
  REPEAT renames; read by a thread at every rename; parsing 20 MB is the benchmark's own work,
  not timed);
- watcher peak RSS (VmHWM of the watcher process, in MiB) after those renames;
- the fewest versions any publish of that watcher listed (read at every rename of images.json);
- a start after an upgrade: the watcher started again after a new ctime on every file (what
  postinst's chown gives them), with --rescan-interval 5: the fewest versions any publish
  listed from the start through two rescans and, over the watch cap, seconds from a new file in
  a version directory without a watch to listed.
A publish that listed fewer versions than are on disk fails the benchmark (after the table):
a fast watcher that unpublishes is a wrong one.

Prints each figure and its ratio to the baseline of the same size, measured in the same run,
and the goals of issue 13 (no-change update <= 3x, cold update <= 10x, watch <= 0.5 s, peak
RSS <= 150 MiB at 20,000 versions). A missed goal only prints MISS; a failing command is fatal.

--delta-min-size BYTES runs every command with a configuration file setting `[deltas] min_size`
(default: none, so the built-in 1 MiB, and no 4 KiB root gets a delta); 0 makes the cold
`update` make a delta for the newest version of every product (needs xdelta3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    POLL_INTERVAL,
    STOP_TIMEOUT,
    BenchError,
    MiB,
    add_common_args,
    build_version,
    catalog_versions,
    machine_line,
    main_wrapper,
    median,
    print_table,
    read_catalog,
    run_timed,
    runs,
    scratch_dir,
    serial,
    server_exe,
    settle,
    stop,
    tail,
    verdict,
    wait_for,
    write_random,
)
from inotify_simple import INotify, flags

#: a version's two files
FILE_SIZE = 4 * 1024
VERSIONS_PER_PRODUCT = 100
GOAL_NOCHANGE = 3.0
GOAL_COLD = 10.0
GOAL_WATCH_S = 0.5
GOAL_RSS_MIB = 150.0
#: the watcher's --rescan-interval here: a new file in a directory without a watch is listed
#: once unchanged that long (the default is 60 s)
RESCAN_INTERVAL = 5.0
#: the watcher's default --max-watches: a tree with more directories has some unwatched
DEFAULT_MAX_WATCHES = 4096


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        default="1000,5000,20000",
        help="comma-separated numbers of versions (default: 1000,5000,20000)",
    )
    parser.add_argument(
        "--delta-min-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="run every command with [deltas] min_size = BYTES (0: a delta for every "
        "product's newest version; default: the built-in setting)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.delta_min_size is not None and args.delta_min_size < 0:
        parser.error("--delta-min-size takes a number of bytes, 0 or more")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes takes numbers separated by commas")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--sizes needs at least one positive number")
    return args


def variant_dir(root: Path, product: int) -> Path:
    return root / "images" / f"scale{product}" / "1.0" / "amd64" / "default"


def build_tree(root: Path, versions: int, similar: bool) -> None:
    """`versions` versions of two 4 KiB files each, VERSIONS_PER_PRODUCT per product.
    `similar`: the roots of a product share all but their first 64 bytes, so a delta between
    two of them is small enough to be kept and listed."""
    shared = b""
    for i in range(versions):
        product, n = divmod(i, VERSIONS_PER_PRODUCT)
        files = build_version(variant_dir(root, product) / serial(n), FILE_SIZE)
        if similar:
            if n == 0:
                shared = files[1].read_bytes()
            files[1].write_bytes(os.urandom(64) + shared[64:])


def listed_deltas(doc: dict[str, Any]) -> int:
    """How many delta items the catalog lists."""
    count = 0
    for product in doc.get("products", {}).values():
        for version in product.get("versions", {}).values():
            items = version.get("items", {}).values()
            count += sum(1 for i in items if str(i.get("ftype", "")).endswith(".vcdiff"))
    return count


def walk_stat_seconds(root: Path) -> float:
    """One os.walk of images/ with an os.stat of every file: the least a full scan must do."""
    start = time.perf_counter()
    for directory, _dirs, files in os.walk(root / "images"):
        for name in files:
            os.stat(os.path.join(directory, name))
    return time.perf_counter() - start


def peak_rss_mib(pid: int) -> float:
    """VmHWM of `pid`: the most resident memory it has had, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MiB
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


def holds(root: Path, name: str) -> Callable[[], bool]:
    """Whether images.json holds the bytes `name` (a new serial: there once it is published)."""
    path = root / "streams" / "v1" / "images.json"
    needle = name.encode()

    def check() -> bool:
        try:
            return needle in path.read_bytes()
        except OSError:
            return False

    return check


def listed(root: Path, name: str) -> Callable[[], bool]:
    # a cheap test first: the serial's bytes in the file, then the parse
    there = holds(root, name)

    def check() -> bool:
        if not there():
            return False
        doc = read_catalog(root)
        return doc is not None and any(s == name for _, s in catalog_versions(doc))

    return check


class PublishMonitor(threading.Thread):
    """Reads images.json at every rename into place (inotify on streams/v1) and keeps the
    fewest versions any publish listed: a fast watcher that unpublishes is a wrong one. It also
    keeps, for each catalog it read, when it opened it and the serials it lists: that catalog
    was in place by then (`listed_at`)."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.inotify = INotify()
        self.inotify.add_watch(root / "streams" / "v1", flags.MOVED_TO)
        self.stop_event = threading.Event()
        self.fewest: int | None = None
        self.publishes = 0
        #: (perf_counter() once the catalog read was open, the serials it lists)
        self.seen: list[tuple[float, frozenset[str]]] = []
        self.lock = threading.Lock()

    def read(self) -> None:
        try:
            with open(self.root / "streams" / "v1" / "images.json", "rb") as f:
                opened = time.perf_counter()
                doc = json.load(f)
        except (OSError, ValueError):
            return
        if not isinstance(doc, dict):
            return
        versions = catalog_versions(doc)
        n = len(versions)
        with self.lock:
            self.publishes += 1
            self.fewest = n if self.fewest is None else min(self.fewest, n)
            self.seen.append((opened, frozenset(s for _, s in versions)))

    def listed_at(self, name: str, since: float, wait: float = 10.0) -> float | None:
        """The first time after `since` a catalog listing `name` was open to be read (waits
        at most `wait` seconds for this thread to read it); None if it did not."""
        deadline = time.perf_counter() + wait
        while True:
            with self.lock:
                times = [t for t, serials in self.seen if t >= since and name in serials]
            if times or time.perf_counter() > deadline:
                return min(times) if times else None
            time.sleep(POLL_INTERVAL)

    def run(self) -> None:
        while not self.stop_event.is_set():
            if any(e.name == "images.json" for e in self.inotify.read(timeout=100)):
                self.read()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(STOP_TIMEOUT)
        self.inotify.close()


def refresh_ctimes(root: Path) -> None:
    """A new ctime on every file, as the package's postinst chown gives them at an upgrade."""
    for directory, _dirs, files in os.walk(root / "images"):
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


def in_catalog(root: Path, item_path: str) -> Callable[[], bool]:
    path = root / "streams" / "v1" / "images.json"
    needle = f'"{item_path}"'.encode()

    def check() -> bool:
        try:
            return needle in path.read_bytes()
        except OSError:
            return False

    return check


def measure_watch(
    exe: str, config: list[str], root: Path, state: Path, log: Path, repeat: int, timeout: float
) -> tuple[list[float], float, int]:
    """(seconds from rename to listed, per repetition; the watcher's peak RSS in MiB; the
    fewest versions any of its publishes listed)."""
    cmd = [exe, *config, "--state-dir", str(state), "watch", "--root-dir", str(root)]
    monitor = PublishMonitor(root)
    monitor.start()
    with open(log, "ab") as log_f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f)
    try:
        # the watcher publishes once at start (from the hash cache); wait until it is idle
        first = serial(VERSIONS_PER_PRODUCT + 1)
        warmup = variant_dir(root, 0) / first
        build_version(warmup, FILE_SIZE)
        wait_for("the first catalog", listed(root, first), proc, log, timeout)
        latencies = []
        for rep in range(repeat):
            name = serial(VERSIONS_PER_PRODUCT + 2 + rep)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=variant_dir(root, 0)))
            build_version(staging, FILE_SIZE)
            settle()
            time.sleep(1.5)  # past the watcher's debounce of the staging directory's events
            start = time.perf_counter()
            staging.rename(variant_dir(root, 0) / name)
            # until the first catalog listing it was in place: when the monitor opened it (or,
            # if the monitor missed it, when the poll below found its bytes). Parsing 20 MB
            # (200 ms, holding the interpreter's lock) is the benchmark's own work: not timed.
            polled = wait_for(name, holds(root, name), proc, log, timeout)
            if not listed(root, name)():
                raise BenchError(f"{name} is in images.json but not listed as a version")
            at = monitor.listed_at(name, start)
            latencies.append(min(polled, at if at is not None else polled) - start)
        rss = peak_rss_mib(proc.pid)
    finally:
        stop(proc)
        monitor.stop()
    if monitor.fewest is None:
        raise BenchError("the watcher published nothing")
    return latencies, rss, monitor.fewest


@dataclass
class StartFigures:
    #: the fewest versions a publish listed, from the start through two rescans
    fewest: int
    #: seconds from a new file in a version directory without a watch to listed (None: every
    #: directory had a watch)
    unwatched: float | None


def measure_start(
    exe: str, config: list[str], root: Path, state: Path, log: Path, timeout: float
) -> StartFigures:
    """The watcher started as after an upgrade (a new ctime on every file), with rescans
    every RESCAN_INTERVAL seconds: every publish read from the start through two rescans."""
    cmd = [exe, *config, "--state-dir", str(state), "watch", "--root-dir", str(root)]
    cmd += ["--rescan-interval", str(RESCAN_INTERVAL)]
    refresh_ctimes(root)
    monitor = PublishMonitor(root)
    monitor.start()
    with open(log, "ab") as log_f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f)
    try:
        unwatched = None
        # (over the cap once the first full scan is done: the watches are in place then)
        mark = serial(VERSIONS_PER_PRODUCT + 50)
        build_version(variant_dir(root, 1) / mark, FILE_SIZE)
        wait_for("the start's publish", listed(root, mark), proc, log, timeout)
        if watched_dirs(proc.pid) >= DEFAULT_MAX_WATCHES:
            # the oldest version of the first product: its directory has no watch
            target = variant_dir(root, 0) / serial(0) / "rootfs.tar.xz"
            write_random(target, FILE_SIZE)
            start = time.perf_counter()
            item = str(target.relative_to(root))
            unwatched = wait_for(item, in_catalog(root, item), proc, log, timeout) - start
        time.sleep(2 * RESCAN_INTERVAL + 1)  # through two rescans at least
        if proc.poll() is not None:
            raise BenchError(f"the watcher exited with status {proc.returncode}:\n{tail(log)}")
    finally:
        stop(proc)
        monitor.stop()
    if monitor.fewest is None:
        raise BenchError("the watcher published nothing after the ctimes changed")
    return StartFigures(monitor.fewest, unwatched)


def watched_dirs(pid: int) -> int:
    """How many inotify watches `pid` holds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def config_args(work: Path, args: argparse.Namespace) -> list[str]:
    """`--config FILE` with the options' settings, or nothing."""
    if args.delta_min_size is None:
        return []
    path = work / "config.toml"
    path.write_text(f"[deltas]\nmin_size = {args.delta_min_size}\n", encoding="ascii")
    return ["--config", str(path)]


def one_size(
    exe: str, work: Path, versions: int, args: argparse.Namespace, wrong: list[str]
) -> list[list[str]]:
    """The figures of one size; a wrong result is added to `wrong` (fatal once printed)."""
    root, state, log = work / f"root-{versions}", work / f"state-{versions}", work / "log"
    print(f"building {versions} versions ...", flush=True)
    build_tree(root, versions, args.delta_min_size is not None)
    settle()
    walk_stat_seconds(root)  # warm the dentry and inode caches
    bases, colds, nochanges = [], [], []
    config = config_args(work, args)
    update = [exe, *config, "--state-dir", str(state), "update", "--root-dir", str(root)]
    for _ in range(args.repeat):
        bases.append(walk_stat_seconds(root))
        shutil.rmtree(state, ignore_errors=True)
        colds.append(run_timed(update, log, args.timeout))
        nochanges.append(run_timed(update, log, args.timeout))
    doc = read_catalog(root)
    if doc is None or len(catalog_versions(doc)) != versions:
        count = 0 if doc is None else len(catalog_versions(doc))
        raise BenchError(f"the catalog lists {count} versions, not {versions}:\n{tail(log)}")
    if args.delta_min_size is not None and args.delta_min_size <= FILE_SIZE:
        sizes = [
            min(VERSIONS_PER_PRODUCT, versions - i)
            for i in range(0, versions, VERSIONS_PER_PRODUCT)
        ]
        want = sum(1 for n in sizes if n > 1)  # the newest of each product, from one base
        if listed_deltas(doc) != want:
            raise BenchError(f"the catalog lists {listed_deltas(doc)} deltas, not {want}")
    latencies, rss, fewest = measure_watch(exe, config, root, state, log, args.repeat, args.timeout)
    if fewest < versions:
        wrong.append(f"{versions}: a publish of the watcher listed {fewest} of {versions}")
    on_disk = versions + 1 + args.repeat  # and the watch figures' versions
    w = measure_start(exe, config, root, state, log, args.timeout)
    if w.fewest < on_disk:
        wrong.append(f"{versions}: a publish of the watcher listed {w.fewest} of {on_disk}")
    base, cold, nochange, lat = median(bases), median(colds), median(nochanges), median(latencies)
    unwatched = "-" if w.unwatched is None else f"{w.unwatched:.1f} s"
    print(
        f"  {versions}: walk {runs(bases)} | cold {runs(colds)} | no-change {runs(nochanges)}"
        f" | watch {runs(latencies)} | peak RSS {rss:.0f} MiB | fewest listed {w.fewest}"
        f" of {on_disk} | unwatched {unwatched}",
        flush=True,
    )
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    goals = versions >= 20000
    return [
        [f"{versions}: os.walk + stat (baseline)", f"{base:.3f}", "1.00", ""],
        [
            f"{versions}: update, nothing changed",
            f"{nochange:.3f}",
            f"{nochange / base:.2f}",
            verdict(nochange / base <= GOAL_NOCHANGE) if goals else "",
        ],
        [
            f"{versions}: update, cold hash cache",
            f"{cold:.3f}",
            f"{cold / base:.2f}",
            verdict(cold / base <= GOAL_COLD) if goals else "",
        ],
        [
            f"{versions}: watch, renamed in -> listed",
            f"{lat:.3f}",
            f"{lat / base:.2f}",
            verdict(lat <= GOAL_WATCH_S) if goals else "",
        ],
        [
            f"{versions}: watch: fewest listed (of {versions})",
            f"{fewest}",
            "",
            verdict(fewest >= versions),
        ],
        [
            f"{versions}: start after an upgrade: fewest listed (of {on_disk})",
            f"{w.fewest}",
            "",
            verdict(w.fewest >= on_disk),
        ],
        [
            f"{versions}: new file without a watch -> listed (rescan {RESCAN_INTERVAL:.0f} s)",
            "-" if w.unwatched is None else f"{w.unwatched:.3f}",
            "",
            "",
        ],
        [
            f"{versions}: watcher peak RSS (MiB)",
            f"{rss:.0f}",
            "",
            verdict(rss <= GOAL_RSS_MIB) if goals else "",
        ],
    ]


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    rows: list[list[str]] = []
    wrong: list[str] = []
    with scratch_dir(args.workdir, args.keep, "bench-scale-") as work:
        for versions in args.sizes:
            rows += one_size(exe, work, versions, args, wrong)
    print()
    deltas = "" if args.delta_min_size is None else f"; [deltas] min_size = {args.delta_min_size}"
    print(f"{machine_line()}; median of {args.repeat}; files of 4 KiB, warm{deltas}")
    print(
        f"goals at 20,000 versions: no-change <= {GOAL_NOCHANGE:.0f}x, cold <= {GOAL_COLD:.0f}x, "
        f"watch <= {GOAL_WATCH_S} s, peak RSS <= {GOAL_RSS_MIB:.0f} MiB"
    )
    print_table(("figure", "seconds", "x baseline", "goal"), rows)
    if wrong:
        raise BenchError("versions on disk were unpublished: " + "; ".join(wrong))
    return 0


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
