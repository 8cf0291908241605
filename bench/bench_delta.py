"""Bytes a client downloads to refresh an image with a delta, against the full download.

    python bench/bench_delta.py [--source DIR] [--change-mb 4] [--workdir DIR] [--keep]
                                [--exe PATH] [--timeout S]

Builds two versions of a real root filesystem: version 1 is `--source` (default: the tests'
cached Debian debootstrap tree, /var/cache/lxd-image-server-test/bookworm, if present; else a
synthetic tree of text and binary files) squashed with mksquashfs; version 2 is the same tree
plus `--change-mb` MiB of new random files. Both go into a tree with the same lxd.tar.xz, and
`lxd-image-server update` publishes them and makes the delta (timed). Then it does what LXD and
Incus do on `image refresh` while holding version 1: read the catalog, pick the delta whose
delta_base's combined_squashfs_sha256 is the held image's fingerprint, download the metadata
and the delta (bytes counted), rebuild the root with `xdelta3 -d -s OLD DELTA NEW` and check
the fingerprint of metadata + rebuilt root against the catalog's.

Baseline (same run, same files): the full download, metadata + root of version 2.
Prints the delta over the full root (target < 0.2) and the refresh's bytes over the full
download's. tests/integration/test_deltas_real.py measures the same with both real daemons,
from nginx's access log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (
    DEFAULT_WORKDIR,
    META_NAME,
    ROOT_NAME,
    VARIANT_REL,
    BenchError,
    main_wrapper,
    read_catalog,
    scratch_dir,
    serial,
    server_exe,
)

TARGET = 0.2
DEBIAN_TREE = Path("/var/cache/lxd-image-server-test/bookworm")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, help="root filesystem tree of version 1")
    p.add_argument("--change-mb", type=int, default=4, help="MiB of new files in version 2")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--exe", help="lxd-image-server to run")
    p.add_argument("--timeout", type=float, default=1800.0)
    return p.parse_args()


def synthetic_tree(dest: Path) -> Path:
    """About 100 MiB: text (compressible) and binary files, in nested directories."""
    rng = random.Random(1)
    words = [f"word{i}" for i in range(5000)]
    for d in range(40):
        sub = dest / f"usr/share/pkg{d:02d}"
        sub.mkdir(parents=True)
        for f in range(30):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(200, 8000)))
            (sub / f"doc{f:02d}.txt").write_text(text)
        (sub / "lib.so").write_bytes(rng.randbytes(rng.randint(256 << 10, 2 << 20)))
    return dest


def squash(tree: Path, out: Path, timeout: float) -> None:
    subprocess.run(
        ["mksquashfs", tree, out, "-noappend", "-quiet", "-all-root", "-e", ".complete"],
        check=True,
        timeout=timeout,
    )


def sha256_of(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def download(root: Path, rel: str, to: Path) -> int:
    """What a client's download of `rel` costs: its bytes (copied to `to`)."""
    shutil.copyfile(root / rel, to)
    return to.stat().st_size


def bench() -> int:
    args = parse_args()
    exe = server_exe(args.exe)
    for tool in ("mksquashfs", "xdelta3"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing (apt install squashfs-tools xdelta3)")
    with scratch_dir(args.workdir, args.keep, "bench-delta-") as work:
        source = args.source or (DEBIAN_TREE if DEBIAN_TREE.is_dir() else None)
        if source is None:
            print("no cached Debian tree: using a synthetic one")
            source = synthetic_tree(work / "synthetic")
        print(f"version 1: {source}; version 2: the same plus {args.change_mb} MiB of new files")
        tree2 = work / "tree2"
        subprocess.run(["cp", "-al", source, tree2], check=True, timeout=args.timeout)
        extra = tree2 / "opt" / "bench-delta"
        extra.mkdir(parents=True)
        rng = random.Random(2)
        for i in range(args.change_mb * 4):
            (extra / f"blob-{i:03d}.bin").write_bytes(rng.randbytes(256 << 10))
        root = work / "root"
        s1, s2 = serial(0), serial(60)
        v1, v2 = root / VARIANT_REL / s1, root / VARIANT_REL / s2
        for v in (v1, v2):
            v.mkdir(parents=True)
        meta_dir = work / "meta"
        meta_dir.mkdir()
        (meta_dir / "metadata.yaml").write_text(
            "architecture: x86_64\ncreation_date: 1\nproperties:\n  os: bench\n"
        )
        subprocess.run(["tar", "-C", meta_dir, "-cJf", v1 / META_NAME, "metadata.yaml"], check=True)
        shutil.copyfile(v1 / META_NAME, v2 / META_NAME)
        squash(source, v1 / ROOT_NAME, args.timeout)
        squash(tree2, v2 / ROOT_NAME, args.timeout)
        shutil.rmtree(tree2)
        for f in (*v1.iterdir(), *v2.iterdir()):
            f.chmod(0o644)
        held = sha256_of(v1 / META_NAME, v1 / ROOT_NAME)

        started = time.monotonic()
        subprocess.run(
            [exe, "--state-dir", work / "state", "update", "--root-dir", root],
            check=True,
            timeout=args.timeout,
            stderr=subprocess.DEVNULL,
        )
        made_in = time.monotonic() - started

        doc = read_catalog(root)
        if doc is None:
            raise BenchError("no catalog was published")
        (product,) = doc["products"].values()
        new = product["versions"][s2]["items"]
        meta, full = new["lxd.tar.xz"], new["squashfs"]
        # the client: a delta whose base's fingerprint is the image it holds
        delta = next(
            (
                i
                for i in new.values()
                if i["ftype"] == "squashfs.vcdiff"
                and product["versions"][i["delta_base"]]["items"]["lxd.tar.xz"].get(
                    "combined_squashfs_sha256"
                )
                == held
            ),
            None,
        )
        if delta is None:
            raise BenchError("the catalog lists no delta from version 1")
        client = work / "client"
        client.mkdir()
        got = download(root, meta["path"], client / "meta")
        got += download(root, delta["path"], client / "delta")
        started = time.monotonic()
        subprocess.run(
            ["xdelta3", "-d", "-f", "-s", v1 / ROOT_NAME, client / "delta", client / "root"],
            check=True,
            timeout=args.timeout,
        )
        applied_in = time.monotonic() - started
        if sha256_of(client / "meta", client / "root") != meta["combined_squashfs_sha256"]:
            raise BenchError("the rebuilt image's fingerprint is not version 2's")
        baseline = meta["size"] + full["size"]

        ratio = delta["size"] / full["size"]
        print(f"full root of version 2:        {full['size']:>12} bytes")
        print(f"delta from version 1:          {delta['size']:>12} bytes")
        print(f"refresh downloads (meta+delta): {got:>11} bytes; full download {baseline}")
        verdict = "ok" if ratio < TARGET else "MISS"
        print(f"delta / full root:             {ratio:>12.3f}   (target < {TARGET}) {verdict}")
        print(f"refresh / full download:       {got / baseline:>12.3f}")
        print(
            f"update (hash + make + check):  {made_in:>11.1f} s; "
            f"the client's xdelta3 -d: {applied_in:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main_wrapper(bench)
