"""The watcher's memory grows with the versions it publishes by a bounded amount per version
(issue 13's goal: at most 150 MiB at 20,000 versions, bench/bench_scale.py).

A real watcher process on a real tree of N versions (two small files each, as the benchmark's):
the most resident memory it ever had (VmHWM) once it has published the tree, and a version
renamed in, and written its page, against the same for a tree of one version; the difference,
per version, must stay below a bound. The bound has a margin over what is measured (6.0 KiB
at 5,000 versions on Python 3.11 and 3.13) and is well below what the watcher needed before
issue 22 (8.7 KiB: a publish joined the whole images.json twice, and each version kept a
dozen more objects), so a change that brings either back fails here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lxd_image_server.config import StateDir

BIN = Path(sys.executable).parent / "lxd-image-server"
DEADLINE = 60.0
VERSIONS = 5000
PER_PRODUCT = 100
#: KiB of peak resident memory per version published, at most
BOUND_KIB = 7.0
#: the version renamed in (the newest of its product: on the page)
NEW = "20250101_0000"


def serial(n: int) -> str:
    return f"20240101_{n // 60:02d}:{n % 60:02d}"


def make_version(directory: Path, seed: int) -> None:
    directory.mkdir(parents=True)
    noise = seed.to_bytes(8, "big")
    (directory / "lxd.tar.xz").write_bytes(b"m" * 56 + noise)
    (directory / "rootfs.squashfs").write_bytes(b"r" * 56 + noise)


def build_tree(root: Path, versions: int) -> None:
    for i in range(versions):
        product, n = divmod(i, PER_PRODUCT)
        make_version(root / "images" / f"os{product}" / "1.0" / "amd64" / "default" / serial(n), i)


def listed(root: Path) -> set[str]:
    """The serials images.json lists, by product."""
    try:
        doc = json.loads((root / "streams" / "v1" / "images.json").read_bytes())
    except (OSError, ValueError):
        return set()
    return {f"{p}/{s}" for p, product in doc["products"].items() for s in product["versions"]}


def wait(what: str, check, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert proc.poll() is None, f"the watcher exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def watcher_peak(tmp_path: Path, versions: int) -> int:
    """VmHWM (KiB) of a watcher on a tree of `versions` versions (hashed by `update` first, as
    after any start), once it has published them, then one more renamed in, and its page."""
    root, state = tmp_path / "root", tmp_path / "state"
    build_tree(root, versions)
    base = [str(BIN), "--state-dir", str(state)]
    subprocess.run([*base, "update", "--root-dir", str(root)], check=True, capture_output=True)
    assert len(listed(root)) == versions
    log = open(tmp_path / "watch.log", "w+b")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*base, "watch", "--root-dir", str(root)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        variant = root / "images" / "os0" / "1.0" / "amd64" / "default"
        staging = variant / ".staging"
        make_version(staging, versions + 1)
        pid_file = Path(StateDir(str(state)).watch_pid)
        wait("its start", pid_file.exists, proc)
        time.sleep(1.0)  # (past the debounce of the staging directory's events)
        staging.rename(variant / NEW)
        wait("the new version listed", lambda: len(listed(root)) == versions + 1, proc)
        page = root / "streams" / "index.html"
        wait("its page", lambda: NEW.encode() in page.read_bytes(), proc)
        return peak_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_the_watchers_peak_memory_per_version_is_bounded(tmp_path: Path) -> None:
    one = watcher_peak(tmp_path / "one", 1)
    many = watcher_peak(tmp_path / "many", VERSIONS)
    per_version = (many - one) / VERSIONS
    assert per_version < BOUND_KIB, (
        f"{per_version:.2f} KiB per version ({one} KiB for one, {many} KiB for {VERSIONS})"
    )
    os.sync()  # (the trees are removed with tmp_path; their pages need not linger dirty)
