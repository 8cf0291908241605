"""`import` of split images against incus-simplestreams `add`, the same job done in Go.

    python bench/bench_import.py [--sets 2x500,6x100] [--repeat 3] [--workdir DIR]

For each set COUNTxMB, builds COUNT split images (a metadata tarball naming its own serial, and
a root filesystem of MB MiB: squashfs magic then random bytes), then, alternating which tool goes
first in each round, times importing all of them one command per image into a new, empty tree:

- baseline: `incus-simplestreams add META ROOT` in the tree's directory (Debian's incus-extra:
  `apt-get install -t bookworm-backports incus-extra`);
- import: `lxd-image-server import META ROOT` (copies, hashes, publishes the catalog and page).

Both copy every byte into the tree and hash it; incus-simplestreams does not fsync, so each
measurement ends with a syncfs of the tree's file system (write-back included for both). The
sources are read once before each round (warm). Prints seconds and the ratio import/baseline
per set; the goal is <= 0.8x at both sizes. A missed goal only prints MISS.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import (
    BenchError,
    MiB,
    add_common_args,
    machine_line,
    main_wrapper,
    median,
    print_table,
    runs,
    scratch_dir,
    server_exe,
    settle,
    tail,
    verdict,
    warm,
)

GOAL = 0.8
BASELINE = "incus-simplestreams"
SQUASHFS_MAGIC = b"hsqs"


def parse_sets(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        count, _, size = part.strip().partition("x")
        out.append((int(count), int(size)))
    if not out or min(min(s) for s in out) < 1:
        raise ValueError(text)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sets",
        default="2x500,6x100",
        help="comma-separated COUNTxMiB image sets (default: 2x500,6x100)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    try:
        args.sets = parse_sets(args.sets)
    except ValueError:
        parser.error("--sets takes COUNTxMIB items separated by commas, e.g. 2x500,6x100")
    return args


def build_image(directory: Path, n: int, size_mib: int) -> tuple[Path, Path]:
    """A split image: meta-N.tar.xz (metadata.yaml naming serial N) and root-N.squashfs."""
    directory.mkdir(parents=True, exist_ok=True)
    yaml = directory / f"metadata-{n}.yaml"
    yaml.write_text(
        "architecture: x86_64\n"
        f"creation_date: {1704110400 + 60 * n}\n"
        "properties:\n"
        "  architecture: x86_64\n"
        f"  description: bench image {n}\n"
        "  os: bench\n"
        '  release: "1.0"\n'
        "  variant: default\n"
        f'  serial: "202401{n // 24 + 1:02d}_{n % 24:02d}00"\n'
        "templates: {}\n"
    )
    meta = directory / f"meta-{n}.tar.xz"
    with tarfile.open(meta, "w:xz") as tar:
        tar.add(yaml, arcname="metadata.yaml")
    yaml.unlink()
    root = directory / f"root-{n}.squashfs"
    with open(root, "wb") as f:
        f.write(SQUASHFS_MAGIC)
        left = size_mib * MiB - len(SQUASHFS_MAGIC)
        while left > 0:
            chunk = os.urandom(min(left, 4 * MiB))
            f.write(chunk)
            left -= len(chunk)
    return meta, root


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


def byte_compile(exe: str) -> None:
    """Byte-compiles the package `exe` runs, as installing it does (Debian's py3compile):
    with PYTHONDONTWRITEBYTECODE set, or a source tree never imported, every command would
    otherwise compile each module it imports again."""
    with open(exe, "rb") as f:
        first = f.readline()
    python = first[2:].strip().decode() if first.startswith(b"#!") else sys.executable
    code = (
        "import compileall, os, lxd_image_server as p; "
        "raise SystemExit(not compileall.compile_dir(os.path.dirname(p.__file__), quiet=1))"
    )
    if subprocess.run([python, "-c", code], check=False).returncode != 0:
        raise BenchError(f"cannot byte-compile the package {exe} runs (with {python})")


def timed_set(cmds: list[list[str]], cwd: Path, log: Path, timeout: float) -> float:
    """Seconds to run `cmds` one after the other in `cwd`, then write back the file system."""
    start = time.perf_counter()
    for cmd in cmds:
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.run(
                cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout
            )
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited with status {proc.returncode}:\n{tail(log)}")
    syncfs(cwd)
    return time.perf_counter() - start


def one_set(
    exe: str, tool: str, work: Path, count: int, size: int, args: argparse.Namespace
) -> list[str]:
    src, log = work / f"src-{count}x{size}", work / "log"
    print(f"building {count} images of {size} MiB ...", flush=True)
    images = [build_image(src, n, size) for n in range(count)]
    settle()
    base_runs: list[float] = []
    ours_runs: list[float] = []
    for rnd in range(args.repeat):
        order = ("base", "ours") if rnd % 2 == 0 else ("ours", "base")
        for which in order:
            target = work / f"tree-{which}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            warm([p for pair in images for p in pair])
            settle()
            if which == "base":
                cmds = [[tool, "add", str(m), str(r)] for m, r in images]
                base_runs.append(timed_set(cmds, target, log, args.timeout))
            else:
                state, root = str(target / "state"), str(target / "root")
                cmds = [
                    [exe, "--state-dir", state, "import", "--root-dir", root, str(m), str(r)]
                    for m, r in images
                ]
                ours_runs.append(timed_set(cmds, target, log, args.timeout))
            shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    base, ours = median(base_runs), median(ours_runs)
    print(f"  {count}x{size} MiB: {BASELINE} {runs(base_runs)} | import {runs(ours_runs)}")
    return [f"{count} x {size} MiB", f"{base:.3f}", f"{ours:.3f}", f"{ours / base:.2f}",
            verdict(ours / base <= GOAL)]  # fmt: skip


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    tool = shutil.which(BASELINE)
    if tool is None:
        raise BenchError(
            f"{BASELINE} is not installed (Debian: apt-get install -t bookworm-backports "
            "incus-extra)"
        )
    byte_compile(exe)
    rows = []
    with scratch_dir(args.workdir, args.keep, "bench-import-") as work:
        for count, size in args.sets:
            rows.append(one_set(exe, tool, work, count, size, args))
    print()
    print(f"{machine_line()}; median of {args.repeat}; sources warm; syncfs after each set")
    print(f"goal: import <= {GOAL}x {BASELINE} at every size")
    print_table(("images", f"{BASELINE} s", "import s", "ratio", "goal"), rows)
    return 0


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
