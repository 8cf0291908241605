"""`update --rehash` and a cached `update` against one thread hashing the same tree.

    python bench/bench_update.py [--total-mb 1024] [--versions 8] [--repeat 3] [--workdir DIR]

Builds VERSIONS versions (lxd.tar.xz of 4 KiB + rootfs.squashfs of TOTAL_MB/VERSIONS MiB of
random bytes) under <work>/root/images/bench/1.0/amd64/default/<serial>/, runs one untimed
`update` (the first publish, and the deltas it tries between the versions), then, REPEAT times,
with every file warm in the page cache before each timed step:

- baseline: one Python thread reads and sha256s every byte of the tree once (1 MiB reads);
- A's floors: the digests A computes, each rootfs read twice (once per digest) or once (both
  digests fed from each chunk), the files spread over one thread per CPU;
- A: `lxd-image-server --state-dir <work>/state update --root-dir <work>/root --rehash`, its
  wall-clock and CPU seconds;
- B: the same without --rehash, on the unchanged tree (everything comes from the hash cache).

Prints the medians and their ratios to the baseline, against the targets A <= 1.2x and
B <= 0.05x. A missed target is printed, not fatal; a failing command is (exit status 1).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    CHUNK,
    META_NAME,
    ROOT_NAME,
    VARIANT_REL,
    BenchError,
    MiB,
    add_common_args,
    build_version,
    catalog_versions,
    machine_line,
    main_wrapper,
    median,
    parallel_sha256_seconds,
    print_table,
    read_catalog,
    run_timed,
    runs,
    scratch_dir,
    serial,
    server_exe,
    settle,
    sha256_seconds,
    total_size,
    verdict,
    warm,
)

TARGET_REHASH = 1.2
TARGET_CACHED = 0.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--total-mb",
        type=int,
        default=1024,
        help="MiB of root file systems in the tree, split evenly between versions (default: 1024)",
    )
    parser.add_argument("--versions", type=int, default=8, help="versions in the tree (default: 8)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.versions < 1 or args.total_mb < args.versions:
        parser.error("need at least one version and at least 1 MiB per version")
    return args


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    with scratch_dir(args.workdir, args.keep, "bench-update-") as work:
        root, state, log = work / "root", work / "state", work / "commands.log"
        root_size = args.total_mb * MiB // args.versions
        files: list[Path] = []
        print(f"building {args.versions} versions of {root_size / MiB:.1f} MiB ...", flush=True)
        for i in range(args.versions):
            files += build_version(root / VARIANT_REL / serial(i), root_size)
        settle()
        nbytes = total_size(files)

        rehash_cmd = [exe, "--state-dir", str(state), "update", "--root-dir", str(root), "--rehash"]
        cached_cmd = rehash_cmd[:-1]
        startup_cmd = [exe, "--version"]
        run_timed(startup_cmd, log, args.timeout)  # untimed: warms the interpreter's imports
        # untimed: the first publish, with the deltas between the versions tried (xdelta3 on
        # random bytes: tens of seconds, refused as too big), so that every A is a rehash of
        # a published tree and the median is one of A's own runs
        first = run_timed(cached_cmd, log, args.timeout)
        print(f"first update (untimed): {first:.1f} s", flush=True)

        # A's floors: the digests A must compute (each rootfs twice: its own sha256 and the
        # combined fingerprint), spread over every CPU; they show how loaded the machine is.
        floor_jobs = files + [f for f in files if f.name == ROOT_NAME]
        pairs = [(f.with_name(META_NAME), f) for f in files if f.name == ROOT_NAME]
        threads = os.cpu_count() or 1
        floor_t: list[float] = []
        once_t: list[float] = []
        base_t: list[float] = []
        base_cpu: list[float] = []
        rehash_t: list[float] = []
        rehash_cpu: list[float] = []
        cached_t: list[float] = []
        startup_t: list[float] = []
        for rep in range(args.repeat):
            print(f"repetition {rep + 1} of {args.repeat} ...", flush=True)
            warm(files)
            cpu = time.process_time()
            base_t.append(sha256_seconds(files))
            base_cpu.append(time.process_time() - cpu)
            warm(files)
            floor_t.append(parallel_sha256_seconds(floor_jobs, threads))
            warm(files)
            once_t.append(read_once_seconds(pairs, threads))
            warm(files)
            cpu = children_cpu()
            rehash_t.append(run_timed(rehash_cmd, log, args.timeout))
            rehash_cpu.append(children_cpu() - cpu)
            if rep == 0:
                check_catalog(root, args.versions)
            warm(files)
            cached_t.append(run_timed(cached_cmd, log, args.timeout))
            startup_t.append(run_timed(startup_cmd, log, args.timeout))

    base, floor, once, rehash, cached, startup = map(
        median, (base_t, floor_t, once_t, rehash_t, cached_t, startup_t)
    )
    cpu_base, cpu_rehash = median(base_cpu), median(rehash_cpu)
    mib = nbytes / MiB
    ok_rehash = rehash <= TARGET_REHASH * base
    ok_cached = cached <= TARGET_CACHED * base
    print()
    print(
        f"tree: {args.versions} versions, {mib:.1f} MiB; {machine_line()}; "
        f"median of {args.repeat}; files warm in the page cache"
    )
    print_table(
        ("step", "seconds", "x baseline", "MiB/s", "target", ""),
        [
            ("baseline: sha256, 1 thread", f"{base:.3f}", "1.00", f"{mib / base:.0f}", "", ""),
            (
                f"A's floor: its digests on {threads} threads",
                f"{floor:.3f}",
                f"{floor / base:.2f}",
                "",
                "",
                "",
            ),
            (
                "A's floor, each rootfs read once",
                f"{once:.3f}",
                f"{once / base:.2f}",
                "",
                "",
                "",
            ),
            (
                "A: update --rehash",
                f"{rehash:.3f}",
                f"{rehash / base:.2f}",
                f"{mib / rehash:.0f}",
                f"<= {TARGET_REHASH:.2f}x",
                verdict(ok_rehash),
            ),
            (
                "B: update (hash cache)",
                f"{cached:.3f}",
                f"{cached / base:.3f}",
                "",
                f"<= {TARGET_CACHED:.2f}x",
                verdict(ok_cached),
            ),
            ("CLI start-up (--version)", f"{startup:.3f}", f"{startup / base:.3f}", "", "", ""),
            (
                "CPU s: A (user + sys)",
                f"{cpu_rehash:.3f}",
                f"{cpu_rehash / cpu_base:.2f}",
                "",
                "",
                "",
            ),
        ],
    )
    print(f"baseline CPU {cpu_base:.3f} s: A's CPU is shown against it (2.00 = twice the work)")
    print(f"runs (s): baseline {runs(base_t)} | A's floors {runs(floor_t)} / {runs(once_t)}")
    print(f"          A {runs(rehash_t)} | B {runs(cached_t)} | start-up {runs(startup_t)}")
    print()
    print(
        f"update --rehash: {rehash / base:.2f}x single-thread hashing "
        f"(target <= {TARGET_REHASH}x) {verdict(ok_rehash)}"
    )
    print(
        f"update (cached): {cached / base:.3f}x single-thread hashing "
        f"(target <= {TARGET_CACHED}x) {verdict(ok_cached)}"
    )
    if not ok_cached and startup > TARGET_CACHED * base:
        print(
            f"note: starting the CLI alone (--version) takes {startup / base:.3f}x the baseline, "
            "more than the cached target; a bigger --total-mb lowers both ratios"
        )
    return 0


def children_cpu() -> float:
    """CPU seconds (user + system) of the children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_once_seconds(pairs: Sequence[tuple[Path, Path]], threads: int) -> float:
    """Seconds `threads` threads need for each (metadata, rootfs) pair's two digests, the
    rootfs read once: each chunk feeds sha256(rootfs) and sha256(metadata + rootfs)."""

    def one(pair: tuple[Path, Path]) -> None:
        meta, root = pair
        sinks = [hashlib.sha256(), hashlib.sha256(meta.read_bytes())]
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open(root, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                for sink in sinks:
                    sink.update(view[:n])
        for sink in sinks:
            sink.hexdigest()

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, pairs))
    return time.perf_counter() - start


def check_catalog(root: Path, expected: int) -> None:
    doc = read_catalog(root)
    if doc is None:
        raise BenchError(f"no readable {root}/streams/v1/images.json after update")
    found = catalog_versions(doc)
    if len(found) != expected:
        raise BenchError(f"the catalog lists {len(found)} versions, expected {expected}")
    print(f"catalog check: {len(found)} versions listed, as expected")


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
