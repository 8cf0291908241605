"""`import` of split images against incus-simplestreams `add`, the same job done in Go; and
one import into a large tree, with and without a running watcher.

    python bench/bench_import.py [--sets 2x500,6x100] [--scale-versions 20000] [--repeat 3]
                                 [--workdir DIR]

For each set COUNTxMB, builds COUNT split images (a metadata tarball naming its own serial, and
a root filesystem of MB MiB: squashfs magic then random bytes; named as lxc names them,
meta-NAME.tar.xz and NAME.squashfs), then, rotating which goes first in each round, times
importing all of them into a new, empty tree:

- baseline: `incus-simplestreams add META ROOT`, one command per image, in the tree's directory
  (Debian's incus-extra: `apt-get install -t bookworm-backports incus-extra`);
- import: `lxd-image-server import META ROOT`, one command per image, no watcher (each copies,
  hashes, and publishes the whole catalog and page itself);
- import, one command: `lxd-image-server import DIR`, all images at once, published once;
- import, watcher: one command per image while `watch` runs on the tree (each import hands its
  versions to the watcher, which publishes them; the figure ends when the last import returns,
  its image listed).

All copy every byte into the tree and hash it; incus-simplestreams does not fsync, so each
measurement ends with a syncfs of the tree's file system (write-back included for all). The
sources are read once before each round (warm). Prints seconds and the ratio to the baseline;
the goal is <= 0.8x at both sizes (one command per image, the like-for-like row). Each round's
own ratio is printed too (its median): on a shared machine the load drifts between rounds.
--like-for-like times only the rows of one command per image (the baseline, import and
--before-exe's), for more rounds in the same time.

--scale-versions N (0: skip) then builds a tree of N versions (two 4 KiB files each, 100 per
product), publishes it once with `update`, and times one `import` of a small image (1 MiB root)
into it, REPEAT times each: with no watcher (import publishes the whole catalog itself), and
with a watcher running on the tree. After each import the catalog must list every version on
disk (not only the new one), or the benchmark fails. Goal: <= 0.3 s with the watcher.
A missed goal only prints MISS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import (
    BenchError,
    MiB,
    add_common_args,
    build_version,
    catalog_versions,
    machine_line,
    main_wrapper,
    median,
    on_disk,
    print_table,
    read_catalog,
    run_timed,
    runs,
    scratch_dir,
    serial,
    server_exe,
    settle,
    syncfs,
    tail,
    verdict,
    warm,
)
from common import (
    watcher as running_watcher,
)

GOAL = 0.8
GOAL_SCALE_S = 0.3
BASELINE = "incus-simplestreams"
SQUASHFS_MAGIC = b"hsqs"
#: the large tree's versions: two files of this size each, this many per product
SCALE_FILE_SIZE = 4 * 1024
SCALE_PER_PRODUCT = 100
SCALE_IMAGE_MIB = 1


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
    parser.add_argument(
        "--before-exe",
        default=None,
        metavar="PATH",
        help="another lxd-image-server (e.g. an older release) timed in the same rounds, one "
        "command per image, as the row 'import, before'",
    )
    parser.add_argument(
        "--like-for-like",
        action="store_true",
        help="only the rows of one command per image (incus-simplestreams, import and "
        "--before-exe's): more rounds in the same time, on a machine whose load varies",
    )
    parser.add_argument(
        "--scale-versions",
        type=int,
        default=20000,
        metavar="N",
        help="versions of the large tree one import goes into (default: 20000; 0: skip)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.scale_versions < 0:
        parser.error("--scale-versions takes a number of versions, 0 or more")
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
    meta = directory / f"meta-image{n}.tar.xz"
    with tarfile.open(meta, "w:xz") as tar:
        tar.add(yaml, arcname="metadata.yaml")
    yaml.unlink()
    root = directory / f"image{n}.squashfs"
    with open(root, "wb") as f:
        f.write(SQUASHFS_MAGIC)
        left = size_mib * MiB - len(SQUASHFS_MAGIC)
        while left > 0:
            chunk = os.urandom(min(left, 4 * MiB))
            f.write(chunk)
            left -= len(chunk)
    return meta, root


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


VARIANTS = ("base", "ours", "ours-one", "ours-watch", "before")
#: --like-for-like: one command per image, each tool
LIKE_FOR_LIKE = ("base", "ours", "before")
LABELS = {
    "base": BASELINE,
    "ours": "import",
    "ours-one": "import, one command",
    "ours-watch": "import, watcher",
    "before": "import, before",
}


@contextmanager
def watcher(exe: str, state: Path, root: Path, log: Path, timeout: float) -> Iterator[None]:
    """`watch` running on `root` (its first catalog published) for the block."""
    (root / "images").mkdir(parents=True, exist_ok=True)

    def ready() -> bool:
        return (state / "publish.sock").exists() and read_catalog(root) is not None

    with running_watcher(exe, state, root, log, timeout, ready, "the watcher's first catalog"):
        yield


def one_set(
    exe: str, tool: str, work: Path, count: int, size: int, args: argparse.Namespace
) -> list[list[str]]:
    src, log = work / f"src-{count}x{size}", work / "log"
    print(f"building {count} images of {size} MiB ...", flush=True)
    images = [build_image(src, n, size) for n in range(count)]
    settle()
    variants = [
        v
        for v in VARIANTS
        if (v != "before" or args.before_exe) and (not args.like_for_like or v in LIKE_FOR_LIKE)
    ]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(args.repeat):
        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
        for which in order:
            target = work / f"tree-{which}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            state, root = target / "state", target / "root"
            ours = [exe, "--state-dir", str(state), "import", "--root-dir", str(root)]
            warm([p for pair in images for p in pair])
            if which == "base":
                settle()
                cmds = [[tool, "add", str(m), str(r)] for m, r in images]
                times[which].append(timed_set(cmds, target, log, args.timeout))
            elif which in ("ours", "before"):
                settle()
                if which == "before":
                    ours[0] = args.before_exe
                cmds = [[*ours, str(m), str(r)] for m, r in images]
                times[which].append(timed_set(cmds, target, log, args.timeout))
            elif which == "ours-one":
                settle()
                times[which].append(timed_set([[*ours, str(src)]], target, log, args.timeout))
            else:
                with watcher(exe, state, root, log, args.timeout):
                    settle()
                    cmds = [[*ours, str(m), str(r)] for m, r in images]
                    times[which].append(timed_set(cmds, target, log, args.timeout))
            if which != "base":
                check_listed(root, count)
            shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    base = median(times["base"])
    print(f"  {count}x{size} MiB: " + " | ".join(f"{LABELS[v]} {runs(times[v])}" for v in variants))
    # (each round's own ratio: the load of a shared machine drifts between rounds more than
    # within one)
    per_round = {
        v: median([t / b for t, b in zip(times[v], times["base"], strict=True)])
        for v in variants[1:]
    }
    print(
        "  each round's ratio, median: "
        + ", ".join(f"{LABELS[v]} {r:.2f}" for v, r in per_round.items())
    )
    rows = [[f"{count} x {size} MiB", LABELS["base"], f"{base:.3f}", "1.00", ""]]
    for v in variants[1:]:
        t = median(times[v])
        goal = verdict(t / base <= GOAL) if v == "ours" else ""
        rows.append(["", LABELS[v], f"{t:.3f}", f"{t / base:.2f}", goal])
    return rows


def check_listed(root: Path, count: int) -> None:
    doc = read_catalog(root)
    listed = len(catalog_versions(doc)) if doc is not None else 0
    if listed != count:
        raise BenchError(f"the catalog lists {listed} versions, not the {count} imported")


# -- one import into a large tree ---------------------------------------------------------------


def build_tree(root: Path, versions: int) -> None:
    for i in range(versions):
        product, n = divmod(i, SCALE_PER_PRODUCT)
        variant = root / "images" / f"scale{product}" / "1.0" / "amd64" / "default"
        build_version(variant / serial(n), SCALE_FILE_SIZE)


def check_whole(root: Path) -> None:
    """The catalog lists every version on disk, not only the new one."""
    doc = read_catalog(root)
    listed = catalog_versions(doc) if doc is not None else set()
    missing = on_disk(root / "images") - listed
    if missing:
        raise BenchError(
            f"the catalog lists {len(listed)} versions; {len(missing)} on disk are missing, "
            f"e.g. {sorted(missing)[:3]}"
        )


def scale(exe: str, work: Path, versions: int, args: argparse.Namespace) -> list[list[str]]:
    tree, log = work / "scale", work / "scale.log"
    state, root = tree / "state", tree / "root"
    print(f"building a tree of {versions} versions ...", flush=True)
    build_tree(root, versions)
    src = work / "scale-src"
    images = [build_image(src, n, SCALE_IMAGE_MIB) for n in range(3 * args.repeat)]
    settle()
    print("publishing it once (update) ...", flush=True)
    run_timed(
        [exe, "--state-dir", str(state), "update", "--root-dir", str(root)], log, args.timeout
    )
    check_whole(root)
    ours = [exe, "--state-dir", str(state), "import", "--root-dir", str(root)]
    alone: list[float] = []
    before: list[float] = []
    for i, (m, r) in enumerate(images[: 2 * args.repeat]):
        warm([m, r])
        settle()
        if i % 2 and args.before_exe:
            cmd = [args.before_exe, *ours[1:], str(m), str(r)]
            before.append(run_timed(cmd, log, args.timeout))
        else:
            alone.append(run_timed([*ours, str(m), str(r)], log, args.timeout))
        check_whole(root)
    with_watcher: list[float] = []
    print("starting a watcher on it ...", flush=True)
    with watcher(exe, state, root, log, args.timeout):
        for m, r in images[2 * args.repeat :][: args.repeat]:
            warm([m, r])
            settle()
            time.sleep(1.0)  # the watcher idle, as between real imports
            with_watcher.append(run_timed([*ours, str(m), str(r)], log, args.timeout))
            check_whole(root)
    text = log.read_text(errors="replace")
    if "by the running watcher" not in text:
        raise BenchError("the imports were not published by the watcher:\n" + tail(log))
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    shown = f"  one import into {versions}: alone {runs(alone)} | watcher {runs(with_watcher)}"
    print(shown + (f" | before {runs(before)}" if before else ""), flush=True)
    a, w = median(alone), median(with_watcher)
    rows = [
        [f"{versions} versions", "import, no watcher", f"{a:.3f}", "", ""],
        ["", "import, watcher", f"{w:.3f}", f"{w / a:.2f}", verdict(w <= GOAL_SCALE_S)],
    ]
    if before:
        b = median(before)
        rows.append(["", "import, before (no watcher)", f"{b:.3f}", f"{b / a:.2f}", ""])
    return rows


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    if args.before_exe:
        byte_compile(args.before_exe)
    tool = shutil.which(BASELINE)
    if tool is None:
        raise BenchError(
            f"{BASELINE} is not installed (Debian: apt-get install -t bookworm-backports "
            "incus-extra)"
        )
    byte_compile(exe)
    rows: list[list[str]] = []
    scale_rows: list[list[str]] = []
    with scratch_dir(args.workdir, args.keep, "bench-import-") as work:
        for count, size in args.sets:
            rows += one_set(exe, tool, work, count, size, args)
        if args.scale_versions:
            scale_rows = scale(exe, work, args.scale_versions, args)
    print()
    print(f"{machine_line()}; median of {args.repeat}; sources warm; syncfs after each set")
    print(f"goal: import (one command per image) <= {GOAL}x {BASELINE} at every size")
    print_table(("images", "tool", "seconds", f"x {BASELINE}", "goal"), rows)
    if scale_rows:
        print()
        print(
            f"one import of a {SCALE_IMAGE_MIB} MiB image into a large tree; the catalog checked "
            f"whole after each; goal: <= {GOAL_SCALE_S} s with a watcher"
        )
        print_table(("tree", "how", "seconds", "x no watcher", "goal"), scale_rows)
    return 0


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
