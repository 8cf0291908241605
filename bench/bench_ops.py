"""What each operator command costs in a large tree: `import`, `prune`, `remove` and `sync` of
one version in a tree of N versions, without and with a running watcher.

    python bench/bench_ops.py [--versions 20000] [--repeat 3] [--workdir DIR]

Builds a tree of --versions versions (two 4 KiB files each, 100 per product, products
scale0, scale1, ...), publishes it once with `update` (untimed), and serves an upstream of one
product (bench:1.0:amd64:default, 4 KiB files) with nginx over TLS on loopback
(bench_sync.py's). Then, --repeat rounds without a watcher, and --repeat rounds with `watch`
running on the tree (idle a second before each step, as between real commands; one round before
them untimed: the watcher's first publish encodes every version once), each round on a product
of its own, timing one command at a time:

- import: a split image (a metadata tarball and a 64 KiB root) as version 100 of the product
  (which then has one version more than the others);
- prune: `prune --keep 100`: the product's oldest version leaves the catalog;
- remove: `remove PRODUCT SERIAL` of the version imported;
- sync: `sync URL --keep 1000` with one more version upstream than in the tree (one 4 KiB
  version downloaded, checked and placed).

After every step the catalog must list exactly what should be listed (every version on disk but
those recorded as pruned, and that set as the steps so far make it), and with a watcher each
command must say that the watcher published; otherwise the benchmark fails. Goal: each under
0.3 s with a watcher (issue 22: a command costs what its change costs). A missed goal only
prints MISS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_sync import Nginx, build_upstream, free_port
from common import (
    BenchError,
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
    tail,
    verdict,
)
from common import (
    watcher as running_watcher,
)

from lxd_image_server.service.tls import ensure_certificate

GOAL_S = 0.3
PER_PRODUCT = 100
FILE_SIZE = 4096
IMAGE_ROOT_SIZE = 64 * 1024
SYNC_PRODUCT = "bench:1.0:amd64:default"
SYNC_KEEP = 1000
STEPS = ("import", "prune", "remove", "sync")
WATCHER_SAYS = "by the running watcher"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--versions",
        type=int,
        default=20000,
        metavar="N",
        help=f"versions of the tree (default: 20000; at least {PER_PRODUCT})",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.versions < PER_PRODUCT:
        parser.error(f"--versions takes at least {PER_PRODUCT}")
    return args


def product_dir(product: str) -> str:
    return product.replace(":", "/")


def scale_product(p: int) -> str:
    return f"scale{p}:1.0:amd64:default"


def build_tree(img: Path, versions: int) -> set[tuple[str, str]]:
    """The tree's versions; (product, serial) of each."""
    out = set()
    for i in range(versions):
        p, n = divmod(i, PER_PRODUCT)
        build_version(img / product_dir(scale_product(p)) / serial(n), FILE_SIZE)
        out.add((scale_product(p), serial(n)))
    return out


def split_image(directory: Path, os_name: str) -> tuple[Path, Path]:
    """A split image as lxc exports it: meta-NAME.tar.xz (metadata.yaml) and NAME.squashfs."""
    directory.mkdir(parents=True, exist_ok=True)
    yaml = directory / "metadata.yaml"
    yaml.write_text(
        "architecture: x86_64\n"
        "creation_date: 1704067200\n"
        "properties:\n"
        f"  os: {os_name}\n"
        '  release: "1.0"\n'
        "  variant: default\n"
        "templates: {}\n"
    )
    meta = directory / f"meta-{os_name}.tar.xz"
    with tarfile.open(meta, "w:xz") as tar:
        tar.add(yaml, arcname="metadata.yaml")
    yaml.unlink()
    root = directory / f"{os_name}.squashfs"
    root.write_bytes(b"hsqs" + os.urandom(IMAGE_ROOT_SIZE - 4))
    return meta, root


# -- what the catalog must list -------------------------------------------------------------------


def pending(state: Path, img: Path) -> set[tuple[str, str]]:
    """The versions recorded as pruned (out of the catalog, their files kept a while)."""
    try:
        doc = json.loads((state / "pruned.json").read_bytes())
    except FileNotFoundError:
        return set()
    out = set()
    for entry in doc["pending"]:
        parts = Path(entry["path"]).relative_to(img).parts
        out.add((":".join(parts[:4]), parts[4]))
    return out


def check(root: Path, state: Path, expected: set[tuple[str, str]], step: str) -> None:
    """The catalog lists exactly `expected`, which is what is on disk but what was pruned."""
    doc = read_catalog(root)
    listed = catalog_versions(doc) if doc is not None else set()
    img = root / "images"
    for what, want in (
        ("the versions the steps so far leave", expected),
        ("the versions on disk but those pruned", on_disk(img) - pending(state, img)),
    ):
        if listed != want:
            extra, missing = sorted(listed - want), sorted(want - listed)
            raise BenchError(
                f"after {step}: the catalog lists {len(listed)} versions, not {what} "
                f"({len(want)}): extra {extra[:3]}, missing {missing[:3]}"
            )


# -- the commands ---------------------------------------------------------------------------------


@contextmanager
def watcher(exe: str, state: Path, root: Path, log: Path, timeout: float) -> Iterator[None]:
    """`watch` running on `root` (its socket there, its first pass done) for the block."""
    sock = state / "publish.sock"
    sock.unlink(missing_ok=True)
    with running_watcher(exe, state, root, log, timeout, sock.exists, "the watcher's socket"):
        time.sleep(1.0)
        yield


class Upstream:
    """An upstream of one product served by nginx; `offer(k)` lists its first k versions."""

    def __init__(self, work: Path, versions: int) -> None:
        self.dir = work / "upstream"
        build_upstream(self.dir, versions, FILE_SIZE)
        self.catalog = self.dir / "streams/v1/images.json"
        self.full: dict[str, Any] = json.loads(self.catalog.read_bytes())
        self.cert = ensure_certificate(str(work / "ssl"), ["127.0.0.1"])
        self.server = Nginx(
            self.dir, work / "nginx", self.cert.cert_path, self.cert.key_path, free_port()
        )

    def offer(self, k: int) -> None:
        doc = json.loads(json.dumps(self.full))
        versions = doc["products"][SYNC_PRODUCT]["versions"]
        doc["products"][SYNC_PRODUCT]["versions"] = {
            serial(n): versions[serial(n)] for n in range(k)
        }
        tmp = self.catalog.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.rename(self.catalog)

    def stop(self) -> None:
        self.server.stop()


def one_round(
    exe: str,
    root: Path,
    state: Path,
    work: Path,
    p: int,
    synced: int,
    upstream: Upstream,
    expected: set[tuple[str, str]],
    by_watcher: bool,
    args: argparse.Namespace,
) -> dict[str, float]:
    """One of each step on product `p`, the upstream offering `synced` + 1 versions; their
    seconds. `expected` is kept up to date."""
    product = scale_product(p)
    new = serial(PER_PRODUCT)
    meta, image_root = split_image(work / f"src-{p}", product.split(":")[0])
    tree = ["--root-dir", str(root)]
    base = [exe, "--state-dir", str(state)]
    upstream.offer(synced + 1)
    ca = ["--ca", upstream.cert.cert_path]
    commands = {
        "import": [*base, "import", *tree, "--serial", new, str(meta), str(image_root)],
        "prune": [*base, "prune", *tree, "--keep", str(PER_PRODUCT)],
        "remove": [*base, "remove", product, new, *tree],
        "sync": [*base, "sync", upstream.server.url, *ca, "--keep", str(SYNC_KEEP), *tree],
    }
    changes = {
        "import": ({(product, new)}, set()),
        "prune": (set(), {(product, serial(0))}),
        "remove": (set(), {(product, new)}),
        "sync": ({(SYNC_PRODUCT, serial(synced))}, set()),
    }
    times: dict[str, float] = {}
    for step in STEPS:
        log = work / f"{step}-{p}.log"
        settle()
        if by_watcher:
            time.sleep(1.0)  # the watcher idle, as between real commands
        times[step] = run_timed(commands[step], log, args.timeout)
        added, gone = changes[step]
        expected |= added
        expected -= gone
        check(root, state, expected, f"{step} ({'watcher' if by_watcher else 'no watcher'})")
        said = WATCHER_SAYS in log.read_text(errors="replace")
        if said != by_watcher:
            raise BenchError(
                f"{step} was {'not ' if by_watcher else ''}published by the watcher:\n{tail(log)}"
            )
    return times


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    rows: list[list[str]] = []
    with scratch_dir(args.workdir, args.keep, "bench-ops-") as work:
        root, state, log = work / "root", work / "state", work / "log"
        print(f"building a tree of {args.versions} versions ...", flush=True)
        expected = build_tree(root / "images", args.versions)
        rounds = 2 * args.repeat + 1  # (one untimed, the watcher's first publish)
        if args.versions // PER_PRODUCT < rounds:
            raise BenchError(f"--versions {args.versions}: too few products for the rounds")
        upstream = Upstream(work, rounds)
        try:
            print("publishing it once (update) ...", flush=True)
            run_timed([exe, "--state-dir", str(state), "update", "--root-dir", str(root)], log,
                      args.timeout)  # fmt: skip
            check(root, state, expected, "the first update")
            alone: dict[str, list[float]] = {s: [] for s in STEPS}
            watched: dict[str, list[float]] = {s: [] for s in STEPS}
            for r in range(args.repeat):
                got = one_round(exe, root, state, work, r, r, upstream, expected, False, args)
                for s in STEPS:
                    alone[s].append(got[s])
            print("starting a watcher on it ...", flush=True)
            with watcher(exe, state, root, log, args.timeout):
                # untimed: the watcher's first publish encodes every version's entry once
                r = args.repeat
                one_round(exe, root, state, work, r, r, upstream, expected, True, args)
                for r in range(args.repeat + 1, rounds):
                    got = one_round(exe, root, state, work, r, r, upstream, expected, True, args)
                    for s in STEPS:
                        watched[s].append(got[s])
        finally:
            upstream.stop()
    for s in STEPS:
        print(f"  {s}: no watcher {runs(alone[s])} | watcher {runs(watched[s])}", flush=True)
        a, w = median(alone[s]), median(watched[s])
        rows.append([s, f"{a:.3f}", f"{w:.3f}", f"{w / a:.2f}", verdict(w < GOAL_S)])
    print()
    print(f"{machine_line()}; median of {args.repeat}; the catalog checked after each step")
    print(
        f"one version imported, pruned, removed, synced in a tree of {args.versions} versions; "
        f"goal: < {GOAL_S} s with a watcher"
    )
    print_table(("command", "no watcher s", "watcher s", "x no watcher", "goal"), rows)
    return 0


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
