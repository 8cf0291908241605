"""What a delta costs at real sizes: the server making and checking it, the client applying it.

    python bench/bench_delta.py [--pairs debian,disk-1,disk-4] [--alternatives debian,disk-1]
                                [--cache-dir DIR] [--workdir DIR] [--keep] [--exe PATH]

For each pair of roots (bench/delta_inputs.py: a real Debian image before and after a package
upgrade, and VM disks of 1 and 4 GiB before and after a small change) and each xdelta3 setting
(the server's, catalog/deltagen.py's SETTINGS, and alternatives that change one thing of it:
the level, the source window, the secondary compression), it measures:

- make: `xdelta3 -e ...` as catalog/deltagen.py runs it (base by path, target on stdin, delta
  to stdout), its seconds and peak RSS (the child's ru_maxrss);
- the delta's size, against the full download of the new root;
- check: `xdelta3 -d -c -B WINDOW -s OLD` as the server checks a delta, its output hashed here
  with sha256 (what deltagen does), compared with the new root's digest;
- apply: what LXD and Incus run on `image refresh`, `xdelta3 -f -d -s OLD DELTA NEW` (no -B:
  xdelta3's default 64 MiB window), its seconds and peak RSS; its output is then compared with
  the new root byte for byte.

Baselines, same run, same warm files: sha256 of the new root on one thread (for make and check:
both read every byte and do work per byte), a copy of the new root with 1 MiB reads and writes
(for apply, which writes the same bytes), and the new root's size (the full download).
Make runs once per row; check and apply five times on roots under 256 MiB (their median: one
run takes a fraction of a second), once on larger ones; the baselines five or three times.
xdelta3 runs without nice/ionice here (the server runs it at nice 19 in the idle I/O class,
which only changes who waits when the machine is busy).

For the Debian pair it also checks that the server makes exactly the delta the bench's row of
the server's settings made: `update` publishes both versions and makes the delta, and a client
that holds version 1 refreshes through the catalog (metadata + delta, fingerprint checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common import (
    CHUNK,
    DEFAULT_WORKDIR,
    META_NAME,
    ROOT_NAME,
    VARIANT_REL,
    BenchError,
    MiB,
    machine_line,
    main_wrapper,
    median,
    print_table,
    read_catalog,
    scratch_dir,
    serial,
    server_exe,
    settle,
    sha256_seconds,
    warm,
)
from delta_inputs import DEFAULT_CACHE, Pair, debian_pair, disk_pair

from lxd_image_server.catalog.deltagen import SETTINGS, Settings

XDELTA3 = "xdelta3"
PAIRS = ("debian", "disk-1", "disk-4")
#: roots smaller than this have their quick steps run several times (repeats)
QUICK_SIZE = 256 * MiB


@dataclass(frozen=True)
class Variant:
    label: str
    settings: Settings


#: what the server used before issue 22: -9, and xdelta3's own secondary compression (LZMA in
#: Debian's build)
BEFORE = Settings(level=9, max_window=256 * MiB, secondary=None)


def variants(alternatives: bool) -> list[Variant]:
    """The server's settings and those it used before; with `alternatives`, then settings that
    each change one thing of the server's: the level, the window, the secondary compression."""
    out = [Variant(f"server: {describe(SETTINGS)}", SETTINGS)]
    if BEFORE != SETTINGS:
        out.append(Variant(f"before: {describe(BEFORE)}", BEFORE))
    if not alternatives:
        return out
    for level in (9, 6, 3):
        if level != SETTINGS.level:
            out.append(Variant(f"-{level}", dataclasses.replace(SETTINGS, level=level)))
    for window in (64 * MiB, 256 * MiB, 1024 * MiB):
        if window != SETTINGS.max_window:
            label = f"window {window // MiB} MiB"
            out.append(Variant(label, dataclasses.replace(SETTINGS, max_window=window)))
    for secondary in ("lzma", "djw", "none"):
        if secondary != SETTINGS.secondary:
            out.append(
                Variant(f"-S {secondary}", dataclasses.replace(SETTINGS, secondary=secondary))
            )
    return out


def describe(s: Settings) -> str:
    secondary = f"-S {s.secondary}" if s.secondary else "-S default"
    return f"-{s.level} {secondary} window {s.max_window // MiB} MiB"


@dataclass(frozen=True)
class Run:
    seconds: float
    max_rss: int  # bytes


def run_measured(
    argv: Sequence[str],
    stdin: IO[bytes] | None,
    stdout: IO[bytes] | None,
    timeout: float,
    reader: Callable[[IO[bytes]], None] | None = None,
) -> Run:
    """Runs `argv`; its wall-clock seconds and peak RSS. With `reader`, its standard output is
    a pipe handed to `reader`. A failure or a timeout is a BenchError."""
    out: IO[bytes] | int = subprocess.PIPE if reader else (stdout or subprocess.DEVNULL)
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=stdin or subprocess.DEVNULL, stdout=out, stderr=errors)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            if reader:
                assert proc.stdout is not None
                with proc.stdout:
                    reader(proc.stdout)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            errors.seek(0)
            message = errors.read()[-500:].decode(errors="replace")
            how = "timed out" if elapsed >= timeout else f"exited {proc.returncode}"
            raise BenchError(f"{' '.join(argv)} {how}: {message}")
    return Run(elapsed, usage.ru_maxrss * 1024)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while chunk := fa.read(CHUNK):
            if chunk != fb.read(len(chunk)):
                return False
    return True


def copy_seconds(src: Path, dest: Path) -> float:
    """Seconds to copy `src` to `dest` with 1 MiB reads and writes (no fsync, as the client's
    xdelta3 does not sync either)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    with open(src, "rb", buffering=0) as fin, open(dest, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            fout.write(view[:n])
    elapsed = time.perf_counter() - start
    dest.unlink()
    return elapsed


@dataclass(frozen=True)
class Baseline:
    sha256_s: float
    copy_s: float
    full: int
    digest: str


def baseline(pair: Pair, work: Path) -> Baseline:
    warm([pair.old, pair.new])
    n = max(3, repeats(pair))
    hashes = [sha256_seconds([pair.new]) for _ in range(n)]
    copies = []
    for _ in range(n):
        settle()
        copies.append(copy_seconds(pair.new, work / "copy"))
    return Baseline(median(hashes), median(copies), pair.new.stat().st_size, sha256_file(pair.new))


@dataclass(frozen=True)
class Result:
    variant: Variant
    make: Run
    check: Run
    apply: Run
    delta: int
    delta_sha256: str


def repeats(pair: Pair) -> int:
    """How many times the quick steps (check, apply, the baselines) run: their median is taken
    where one run takes a fraction of a second."""
    return 5 if pair.new.stat().st_size < QUICK_SIZE else 1


def median_run(runs: Sequence[Run]) -> Run:
    """The median time, and the largest peak RSS."""
    ordered = sorted(r.seconds for r in runs)
    return Run(ordered[len(ordered) // 2], max(r.max_rss for r in runs))


def check_once(pair: Pair, s: Settings, delta: Path, base: Baseline, timeout: float) -> Run:
    """The server's check: the rebuilt root hashed here, as catalog/deltagen.py does."""
    digest = hashlib.sha256()

    def hash_all(stream: IO[bytes]) -> None:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)

    argv = [XDELTA3, *s.decode_options(pair.old.stat().st_size), "-s", str(pair.old)]
    settle()
    with open(delta, "rb") as d:
        run = run_measured(argv, d, None, timeout, hash_all)
    if digest.hexdigest() != base.digest:
        raise BenchError(f"{pair.name}: the check rebuilt something else")
    return run


def apply_once(pair: Pair, delta: Path, work: Path, timeout: float) -> Run:
    """The client's apply, its output then compared with the new root byte for byte."""
    applied = work / "applied"
    settle()
    run = run_measured(
        [XDELTA3, "-f", "-d", "-s", str(pair.old), str(delta), str(applied)], None, None, timeout
    )
    if not same_bytes(applied, pair.new):
        raise BenchError(f"{pair.name}: xdelta3 -d did not rebuild the new root")
    applied.unlink()
    return run


def measure(pair: Pair, variant: Variant, base: Baseline, work: Path, timeout: float) -> Result:
    s = variant.settings
    delta = work / "delta"
    settle()
    with open(pair.new, "rb") as new, open(delta, "wb") as out:
        argv = [XDELTA3, *s.encode_options(pair.old.stat().st_size), "-s", str(pair.old)]
        make = run_measured(argv, new, out, timeout)
    n = repeats(pair)
    check = median_run([check_once(pair, s, delta, base, timeout) for _ in range(n)])
    apply = median_run([apply_once(pair, delta, work, timeout) for _ in range(n)])
    result = Result(variant, make, check, apply, delta.stat().st_size, sha256_file(delta))
    delta.unlink()
    return result


def report(pair: Pair, base: Baseline, results: Sequence[Result]) -> None:
    old, new = pair.old.stat().st_size, pair.new.stat().st_size
    print(f"\n{pair.name}: old {old / MiB:.1f} MiB, new {new / MiB:.1f} MiB ({pair.new.name})")
    print(f"  change: {pair.change}")
    print(
        f"  baselines: sha256 of the new root {base.sha256_s:.2f} s, copying it "
        f"{base.copy_s:.2f} s, full download {base.full / MiB:.1f} MiB"
    )
    header = ["setting", "make s", "x sha", "RSS", "check s", "x sha", "RSS", "apply s",
              "x copy", "RSS", "delta MiB", "/ full"]  # fmt: skip
    rows = []
    for r in results:
        rows.append(
            [
                r.variant.label,
                f"{r.make.seconds:.1f}",
                f"{r.make.seconds / base.sha256_s:.0f}",
                f"{r.make.max_rss / MiB:.0f}",
                f"{r.check.seconds:.1f}",
                f"{r.check.seconds / base.sha256_s:.1f}",
                f"{r.check.max_rss / MiB:.0f}",
                f"{r.apply.seconds:.1f}",
                f"{r.apply.seconds / base.copy_s:.1f}",
                f"{r.apply.max_rss / MiB:.0f}",
                f"{r.delta / MiB:.2f}",
                f"{r.delta / base.full:.4f}",
            ]
        )
    print_table(header, rows)


@dataclass(frozen=True)
class Served:
    delta_sha256: str
    delta: int
    meta: int
    update_s: float


def server_delta(pair: Pair, exe: str, work: Path, timeout: float) -> Served:
    """`update` publishes the pair as two versions and makes the delta; a client holding
    version 1 then refreshes through the catalog (metadata and delta, fingerprint checked)."""
    root = work / "root"
    s1, s2 = serial(0), serial(60)
    meta = work / "meta"
    meta.mkdir()
    (meta / "metadata.yaml").write_text(
        "architecture: x86_64\ncreation_date: 1\nproperties:\n  os: bench\n"
    )
    for s, src in ((s1, pair.old), (s2, pair.new)):
        v = root / VARIANT_REL / s
        v.mkdir(parents=True)
        subprocess.run(["tar", "-C", meta, "-cJf", v / META_NAME, "metadata.yaml"], check=True)
        os.link(src, v / ROOT_NAME)
    v1 = root / VARIANT_REL / s1
    held = hashlib.sha256((v1 / META_NAME).read_bytes())
    with open(v1 / ROOT_NAME, "rb") as f:
        while chunk := f.read(CHUNK):
            held.update(chunk)
    start = time.perf_counter()
    subprocess.run(
        [exe, "--state-dir", str(work / "state"), "update", "--root-dir", str(root)],
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    took = time.perf_counter() - start
    doc = read_catalog(root)
    if doc is None:
        raise BenchError("update published no catalog")
    (product,) = doc["products"].values()
    items = product["versions"][s2]["items"]
    old_meta = product["versions"][s1]["items"]["lxd.tar.xz"]
    if old_meta.get("combined_squashfs_sha256") != held.hexdigest():
        raise BenchError("the catalog's fingerprint of version 1 is not the held image's")
    deltas = [
        i for i in items.values() if i["ftype"] == "squashfs.vcdiff" and i["delta_base"] == s1
    ]
    if not deltas:
        raise BenchError("update listed no delta from version 1")
    delta, new_meta = deltas[0], items["lxd.tar.xz"]
    rebuilt = work / "rebuilt"
    subprocess.run(
        [XDELTA3, "-f", "-d", "-s", str(v1 / ROOT_NAME), str(root / delta["path"]), str(rebuilt)],
        check=True,
        timeout=timeout,
    )
    got = hashlib.sha256((root / new_meta["path"]).read_bytes())
    with open(rebuilt, "rb") as f:
        while chunk := f.read(CHUNK):
            got.update(chunk)
    if got.hexdigest() != new_meta["combined_squashfs_sha256"]:
        raise BenchError("the refreshed image's fingerprint is not version 2's")
    return Served(sha256_file(root / delta["path"]), delta["size"], new_meta["size"], took)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}"
    )
    p.add_argument(
        "--alternatives",
        default="debian,disk-1",
        help="the pairs measured with the alternative settings too (the others with the "
        "server's and the former settings only); empty: none",
    )
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the pairs are kept")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--exe", help="lxd-image-server to run")
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args()
    unknown = (set(args.pairs.split(",")) | set(filter(None, args.alternatives.split(",")))) - set(
        PAIRS
    )
    if unknown:
        p.error(f"unknown pairs: {', '.join(sorted(unknown))}")
    return args


def xdelta3_version() -> str:
    out = subprocess.run([XDELTA3, "-V"], capture_output=True, text=True, check=False)
    lines = (out.stdout + out.stderr).splitlines()
    return lines[0].split(",")[0] if lines else "xdelta3 (no version)"


def make_pair(name: str, cache: Path, timeout: float) -> Pair:
    if name == "debian":
        return debian_pair(cache, timeout)
    return disk_pair(cache, int(name.removeprefix("disk-")), timeout)


def bench() -> int:
    args = parse_args()
    exe = server_exe(args.exe)
    alternatives = set(args.alternatives.split(","))
    names = args.pairs.split(",")
    pairs = [(n, make_pair(n, args.cache_dir, args.timeout)) for n in names]
    with scratch_dir(args.workdir, args.keep, "bench-delta-") as work:
        print(f"{machine_line()}; {xdelta3_version()}")
        for key, pair in pairs:
            base = baseline(pair, work)
            results = []
            for v in variants(key in alternatives):
                print(f"{pair.name}: {v.label} ...", flush=True)
                results.append(measure(pair, v, base, work, args.timeout))
            report(pair, base, results)
            if key == "debian":
                sub = work / "server"
                sub.mkdir()
                served = server_delta(pair, exe, sub, args.timeout)
                same = served.delta_sha256 == results[0].delta_sha256
                refresh = served.meta + served.delta
                print(
                    f"  update (hash, make, check, publish): {served.update_s:.1f} s; its delta: "
                    f"{served.delta} bytes, {'the same' if same else 'OTHER'} bytes as the "
                    f"server row's; a refresh downloads {refresh} bytes, "
                    f"{refresh / (served.meta + base.full):.4f} of the full download"
                )
                if not same:
                    raise BenchError("update made another delta than the server's settings here")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main_wrapper(bench)
