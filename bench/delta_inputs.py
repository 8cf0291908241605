"""The old and new roots bench_delta.py diffs, made once and kept in a cache directory.

- debian: the tests' debootstrapped Debian tree (tests/system/container.py's cache) squashed
  with mksquashfs (as tests/integration/test_real_images.py squashes it), and the same tree
  after a package upgrade inside it: `apt-get update`, `apt-get upgrade` (what bookworm-updates
  and bookworm-security hold that day) and `apt-get install --no-install-recommends curl`, run
  in systemd-nspawn (the tests' container tool). Both roots leave out apt's caches and package
  lists (NOT_SHIPPED), as image builds do.
- disk-N: a VM disk as the server serves it (disk-kvm.img, qcow2) of about N GiB: an ext4 file
  system (mke2fs -d, no mount needed) holding the Debian tree and random data files (the files
  of the machine's users: incompressible), converted with qemu-img. The new version is the same
  file system after a small change made with debugfs, as a package upgrade inside the VM would
  make it: three libraries replaced by changed copies and 8 MiB of new data, then converted
  again.

Each pair is made again only when what it is made from (its recipe, the Debian tree's stamp)
changed. Making them needs the network (apt) and, while the 4 GiB pair is made, about 17 GiB
of free space (11 GiB for all three pairs once made).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import BenchError, MiB

#: the tests' cache of debootstrapped trees (tests/system/container.py)
TEST_CACHE = Path(os.environ.get("LXD_IMAGE_SERVER_TEST_CACHE", "/var/cache/lxd-image-server-test"))
DEFAULT_CACHE = Path("/var/cache/lxd-image-server-bench/delta")
#: bump when a recipe below changes: cached pairs are made again
DEBIAN_RECIPE = "2"
DISK_RECIPE = "1"
#: packages installed into the new Debian version (besides the upgrade)
NEW_PACKAGES = ("curl",)
FILL_CHUNK = 64 * MiB
#: fixed, so that the same recipe makes the same file system
FS_UUID = "6a7c1f2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
GiB = 1 << 30


@dataclass(frozen=True)
class Pair:
    """An old and a new root of one image, and what changed between them."""

    name: str
    old: Path
    new: Path
    change: str


def _run(argv: Sequence[str | os.PathLike[str]], timeout: float) -> str:
    proc = subprocess.run(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        cmd = " ".join(str(a) for a in argv)
        raise BenchError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr}")
    return proc.stdout


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (bash tests/host-setup.sh installs them)")


@contextlib.contextmanager
def _building(out: Path, stamp: str) -> Iterator[Path | None]:
    """A fresh directory to build `out` in (None when `out` was made with `stamp`); renamed
    to `out` when the block ends without an error."""
    done = out / ".complete"
    if done.is_file() and done.read_text() == stamp:
        yield None
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / ".complete").write_text(stamp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def debian_tree(suite: str = "bookworm") -> Path:
    tree = TEST_CACHE / suite
    if not (tree / ".complete").is_file():
        raise BenchError(
            f"no debootstrapped tree at {tree}: run the real-image tests once "
            "(tests/integration/test_real_images.py makes it) or set LXD_IMAGE_SERVER_TEST_CACHE"
        )
    return tree


#: left out of both Debian roots, as image builds leave them out: apt's caches (debootstrap's
#: .debs, the binary caches apt-get builds, about 80 MiB) and package lists (about 80 MiB)
NOT_SHIPPED = ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*")


def _squash(tree: Path, out: Path, timeout: float) -> None:
    argv = ["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress"]
    _run([*argv, "-wildcards", "-e", ".complete", *NOT_SHIPPED], timeout)


def _packages(tree: Path) -> dict[str, str]:
    out = _run(
        ["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\\n"],
        60,
    )
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _describe(before: dict[str, str], after: dict[str, str]) -> str:
    upgraded = sorted(p for p in before if p in after and before[p] != after[p])
    added = sorted(p for p in after if p not in before)
    parts = []
    if upgraded:
        parts.append(f"{len(upgraded)} upgraded ({', '.join(upgraded)})")
    if added:
        parts.append(f"{len(added)} installed ({', '.join(added)})")
    return "; ".join(parts) or "no package changed"


def debian_pair(cache: Path, timeout: float) -> Pair:
    """A real Debian image before and after a package upgrade (squashfs roots)."""
    _need("mksquashfs", "systemd-nspawn", "dpkg-query")
    base = debian_tree()
    out = cache / "debian"
    stamp = f"{DEBIAN_RECIPE} {' '.join(NEW_PACKAGES)} {(base / '.complete').read_text().strip()}\n"
    with _building(out, stamp) as tmp:
        if tmp is not None:
            print(f"making the Debian pair in {tmp} (mksquashfs, apt-get in systemd-nspawn) ...")
            _squash(base, tmp / "old.squashfs", timeout)
            tree = tmp / "tree"
            # a copy, not links: dpkg and apt write some files in place (its log, its status)
            _run(["cp", "-a", "--reflink=auto", base, tree], timeout)
            script = (
                "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get -q update; "
                "apt-get -q -y -o APT::Keep-Downloaded-Packages=false upgrade; "
                "apt-get -q -y -o APT::Keep-Downloaded-Packages=false install "
                f"--no-install-recommends {' '.join(NEW_PACKAGES)}"
            )
            nspawn = [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                f"--directory={tree}",
            ]
            _run([*nspawn, "sh", "-c", script], timeout)
            (tmp / "change.txt").write_text(_describe(_packages(base), _packages(tree)))
            _squash(tree, tmp / "new.squashfs", timeout)
            shutil.rmtree(tree)
    return Pair(
        "debian", out / "old.squashfs", out / "new.squashfs", (out / "change.txt").read_text()
    )


def _content_size(tree: Path) -> int:
    """Bytes of the regular files below `tree`, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for d, _, files in os.walk(tree):
        for name in files:
            st = os.lstat(os.path.join(d, name))
            if (st.st_dev, st.st_ino) not in seen and os.path.isfile(os.path.join(d, name)):
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _fill(directory: Path, size: int, rng: random.Random) -> None:
    directory.mkdir(parents=True)
    i = 0
    while size > 0:
        n = min(FILL_CHUNK, size)
        (directory / f"data-{i:04d}.bin").write_bytes(rng.randbytes(n))
        size -= n
        i += 1


def _changed_copy(src: Path, dest: Path, rng: random.Random) -> None:
    """`src` as a rebuilt library might differ from it: a byte changed every 64 KiB, 64 KiB
    new in the middle."""
    data = bytearray(src.read_bytes())
    for at in range(0, len(data), 64 << 10):
        data[at] ^= 0xFF
    middle = len(data) // 2
    dest.write_bytes(bytes(data[:middle]) + rng.randbytes(64 << 10) + bytes(data[middle:]))


def _libraries(tree: Path, count: int) -> list[Path]:
    """The `count` largest shared libraries of the tree (regular files)."""
    libdir = tree / "usr/lib/x86_64-linux-gnu"
    libs = [p for p in libdir.glob("*.so*") if p.is_file() and not p.is_symlink()]
    libs.sort(key=lambda p: (-p.stat().st_size, p.name))
    if len(libs) < count:
        raise BenchError(f"fewer than {count} libraries in {libdir}")
    return libs[:count]


def _check_written(raw: Path, written: dict[str, int], timeout: float) -> None:
    """debugfs reports a failed command only in its output: look at what it wrote."""
    for path, size in written.items():
        out = _run(["debugfs", "-R", f"stat {path}", raw], timeout)
        if f"Size: {size}\n" not in out:
            raise BenchError(f"debugfs did not write {path} ({size} bytes):\n{out[:500]}")


def disk_pair(cache: Path, gib: int, timeout: float) -> Pair:
    """A VM disk (qcow2) of about `gib` GiB before and after a small change."""
    _need("mke2fs", "debugfs", "qemu-img")
    base = debian_tree()
    out = cache / f"disk-{gib}g"
    stamp = f"{DISK_RECIPE} {gib} {(base / '.complete').read_text().strip()}\n"
    libs = _libraries(base, 3)
    change = (
        f"{', '.join(p.name for p in libs)} replaced by changed copies "
        "(a byte every 64 KiB, 64 KiB inserted) and 8 MiB of new data, written with debugfs"
    )
    with _building(out, stamp) as tmp:
        if tmp is not None:
            print(f"making the {gib} GiB disk pair in {tmp} (mke2fs -d, debugfs, qemu-img) ...")
            rng = random.Random(gib)
            staging = tmp / "staging"
            staging.mkdir()
            _run(["cp", "-al", base, staging / "debian"], timeout)
            (staging / "debian" / ".complete").unlink()
            _fill(staging / "data", gib * GiB - _content_size(staging), rng)
            raw = tmp / "disk.raw"
            # room for ext4's metadata and the small files' last blocks: the qcow2 holds only
            # the clusters in use, so it is about `gib` GiB
            virtual = gib * GiB + gib * GiB // 8
            mke2fs = [
                "mke2fs", "-q", "-F", "-t", "ext4", "-U", FS_UUID,
                "-E", f"root_owner=0:0,hash_seed={FS_UUID}", "-d", str(staging), str(raw),
                f"{virtual // 1024}k",
            ]  # fmt: skip
            _run(mke2fs, timeout)
            shutil.rmtree(staging)
            _run(
                ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, tmp / "old.qcow2"],
                timeout,
            )
            commands = []
            written: dict[str, int] = {}
            for i, lib in enumerate(libs):
                copy = tmp / f"lib-{i}"
                _changed_copy(lib, copy, rng)
                inside = "/debian/" + str(lib.relative_to(base))
                commands += [f"rm {inside}", f"write {copy} {inside}"]
                written[inside] = copy.stat().st_size
            new_data = tmp / "new-data"
            new_data.write_bytes(rng.randbytes(8 * MiB))
            commands.append(f"write {new_data} /data/new.bin")
            written["/data/new.bin"] = 8 * MiB
            (tmp / "debugfs.cmd").write_text("\n".join(commands) + "\n")
            _run(["debugfs", "-w", "-f", tmp / "debugfs.cmd", raw], timeout)
            _check_written(raw, written, timeout)
            for f in (*tmp.glob("lib-*"), new_data):
                f.unlink()
            _run(
                ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, tmp / "new.qcow2"],
                timeout,
            )
            raw.unlink()
    return Pair(f"disk {gib} GiB", out / "old.qcow2", out / "new.qcow2", change)
