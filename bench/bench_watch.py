"""How long after a version is renamed into place the running watcher lists it.

    python bench/bench_watch.py [--size-mb 100] [--repeat 3] [--workdir DIR]

Starts `lxd-image-server --state-dir <work>/state watch --root-dir <work>/root` on a tree with no
images (only the empty images/bench/1.0/amd64/default/ directory) and waits for its first, empty
catalog. Then, REPEAT times: builds a version (lxd.tar.xz of 4 KiB + rootfs.squashfs, SIZE_MB MiB
in all) in a hidden staging directory inside that variant directory, measures the baseline (one
Python thread reading and sha256ing those bytes, warm), renames the staging directory to a new
serial and polls images.json every 10 ms until it lists that serial. Finally stops the watcher
with SIGTERM and checks that it exits with status 0.

Prints the median latency, the latency minus the baseline (the watcher's own cost: inotify,
debounce, scan, the second digest, publish), their ratio to the baseline, and the original
lxd-image-server's 15 s for reference.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    META_SIZE,
    VARIANT_REL,
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
    runs,
    scratch_dir,
    serial,
    server_exe,
    settle,
    sha256_seconds,
    tail,
    total_size,
    wait_for,
    warm,
)

#: Seconds the original lxd-image-server took to list a new version.
ORIGINAL_SECONDS = 15.0
STOP_TIMEOUT = 60.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--size-mb",
        type=int,
        default=100,
        help="MiB per version, almost all of it rootfs.squashfs (default: 100)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.size_mb < 1:
        parser.error("--size-mb must be at least 1")
    return args


def lists(root: Path, product_serial: str) -> Callable[[], bool]:
    def check() -> bool:
        doc = read_catalog(root)
        return doc is not None and any(s == product_serial for _, s in catalog_versions(doc))

    return check


def stop(proc: subprocess.Popen[bytes], log: Path) -> int:
    """SIGTERM, then the exit status (killed and a BenchError if it does not stop in time)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchError(
            f"the watcher did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; its log:\n"
            + tail(log)
        ) from None


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    size = args.size_mb * MiB
    with scratch_dir(args.workdir, args.keep, "bench-watch-") as work:
        root, state, log = work / "root", work / "state", work / "watch.log"
        variant = root / VARIANT_REL
        variant.mkdir(parents=True)
        cmd = [exe, "--state-dir", str(state), "watch", "--root-dir", str(root)]
        with open(log, "wb") as log_f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f)
        try:
            latencies, bases, nbytes = measure(args, proc, root, variant, size, log)
        finally:
            status = stop(proc, log)
        if status != 0:
            raise BenchError(f"the watcher exited with status {status} after SIGTERM:\n{tail(log)}")

    lat, base = median(latencies), median(bases)
    overhead = lat - base
    mib = nbytes / MiB
    print()
    print(f"version: {mib:.1f} MiB; {machine_line()}; median of {args.repeat}; files warm")
    print_table(
        ("step", "seconds", "x baseline"),
        [
            ("baseline: sha256, 1 thread", f"{base:.3f}", "1.00"),
            ("rename -> listed in images.json", f"{lat:.3f}", f"{lat / base:.2f}"),
            ("watcher overhead (latency - baseline)", f"{overhead:.3f}", f"{overhead / base:.2f}"),
            ("original lxd-image-server (reference)", f"{ORIGINAL_SECONDS:.3f}", ""),
        ],
    )
    print(f"runs (s): baseline {runs(bases)} | latency {runs(latencies)}")
    print()
    print(
        f"watch: listed {lat:.3f} s after the rename = {lat / base:.2f}x single-thread hashing, "
        f"overhead {overhead:.3f} s; the original needed {ORIGINAL_SECONDS:.0f} s "
        f"({ORIGINAL_SECONDS / lat:.0f}x longer)"
    )
    print("watch: stopped with SIGTERM, exit status 0")
    return 0


def measure(
    args: argparse.Namespace,
    proc: subprocess.Popen[bytes],
    root: Path,
    variant: Path,
    size: int,
    log: Path,
) -> tuple[list[float], list[float], int]:
    """(latencies, baselines, bytes per version), one of each per repetition."""
    wait_for("initial catalog", lambda: read_catalog(root) is not None, proc, log, args.timeout)
    first = read_catalog(root)
    if first is not None and catalog_versions(first):
        raise BenchError(f"the initial catalog is not empty: {json.dumps(first)[:500]}")
    print("watcher published its initial (empty) catalog", flush=True)
    latencies: list[float] = []
    bases: list[float] = []
    nbytes = 0
    for rep in range(args.repeat):
        print(f"repetition {rep + 1} of {args.repeat} ...", flush=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=variant))
        files = build_version(staging, size - META_SIZE)
        nbytes = total_size(files)
        settle()
        warm(files)
        bases.append(sha256_seconds(files))
        warm(files)
        name = serial(rep)
        start = time.perf_counter()
        staging.rename(variant / name)
        listed = wait_for(
            f"version {name} in images.json", lists(root, name), proc, log, args.timeout
        )
        latencies.append(listed - start)
    return latencies, bases, nbytes


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
