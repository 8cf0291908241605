"""Deltas under the package units' system call filter (issue 18, finding 1).

The units refuse `@resources` (setpriority, ioprio_set) with EPERM. Here `update` runs under a
real seccomp filter that does the same (libseccomp through ctypes, loaded in the child before
it runs the program; xdelta3 and its wrappers inherit it): the delta must still be made,
checked and listed. Without the filter, xdelta3 runs at nice 19 and the idle I/O class.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lxd_image_server.catalog import deltas
from lxd_image_server.tree.layout import delta_name

from ..unit.helpers import blob, version_dir, write

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = "20240101_12:00", "20240102_12:00"
ROOT_1 = blob(400_000, 2)
ROOT_2 = ROOT_1[:200_000] + blob(20_000, 3) + ROOT_1[220_000:]

#: loads a filter refusing `syscalls` (argv[1], comma-separated) with EPERM, as systemd's
#: SystemCallFilter=~... with SystemCallErrorNumber=EPERM does, then runs argv[2:]
_SANDBOX = """
import ctypes, os, sys
lib = ctypes.CDLL(sys.argv[1])
lib.seccomp_init.restype = ctypes.c_void_p
ctx = ctypes.c_void_p(lib.seccomp_init(ctypes.c_uint32(0x7FFF0000)))  # SCMP_ACT_ALLOW
for name in sys.argv[2].split(","):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    # SCMP_ACT_ERRNO(EPERM)
    if lib.seccomp_rule_add(ctx, ctypes.c_uint32(0x00050000 | 1), nr, ctypes.c_uint(0)) != 0:
        sys.exit(f"cannot filter {name}")
if lib.seccomp_load(ctx) != 0:
    sys.exit("seccomp_load failed")
os.execv(sys.argv[3], sys.argv[3:])
"""


def libseccomp() -> str:
    found = ctypes.util.find_library("seccomp")
    if not found:
        pytest.fail("libseccomp is missing (Debian: libseccomp2, which systemd depends on)")
    return found


def run_update(tmp_path: Path, refused: str | None) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "lxd_image_server",
        "--state-dir",
        str(tmp_path / "state"),
        "update",
        "--root-dir",
        str(tmp_path / "root"),
    ]
    if refused is not None:
        argv = [sys.executable, "-c", _SANDBOX, libseccomp(), refused, *argv]
    if not (tmp_path / "conf").exists():
        (tmp_path / "conf").write_text("[deltas]\nmin_size = 0\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "LXD_IMAGE_SERVER_CONFIG": str(tmp_path / "conf"),
    }
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)


def tree(tmp_path: Path) -> Path:
    img = tmp_path / "root" / "images"
    for serial, root in ((OLD, ROOT_1), (NEW, ROOT_2)):
        d = version_dir(img, serial=serial)
        write(d / "lxd.tar.xz", blob(3000, 1))
        write(d / "rootfs.squashfs", root)
    return version_dir(img, serial=NEW)


def test_refused_priority_calls_the_proof(tmp_path: Path) -> None:
    """The filter really refuses: util-linux ionice fails under it (the bug's cause)."""
    proc = subprocess.run(
        [sys.executable, "-c", _SANDBOX, libseccomp(), "ioprio_set,setpriority",
         "/usr/bin/ionice", "-c", "3", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "ioprio_set" in proc.stderr, proc


@pytest.mark.parametrize("refused", [None, "ioprio_set,setpriority"])
def test_deltas_are_made_when_the_sandbox_refuses_priorities(
    tmp_path: Path, refused: str | None
) -> None:
    new = tree(tmp_path)
    proc = run_update(tmp_path, refused)
    assert proc.returncode == 0, proc
    name = delta_name("squashfs", OLD)
    records = deltas.load(str(tmp_path / "state"))
    rec = records.get(str(new / name))
    assert rec is not None and rec.result == deltas.OK, (records, proc.stderr)
    catalog = json.loads((tmp_path / "root/streams/v1/images.json").read_text())
    items = next(iter(catalog["products"].values()))["versions"][NEW]["items"]
    assert any(i["ftype"] == "squashfs.vcdiff" for i in items.values()), items


def test_an_uploaded_delta_is_checked_when_the_sandbox_refuses_priorities(tmp_path: Path) -> None:
    new = tree(tmp_path)
    old = new.parent / OLD
    good = new / delta_name("squashfs", OLD)
    subprocess.run(
        ["xdelta3", "-e", "-9", "-s", old / "rootfs.squashfs", new / "rootfs.squashfs", good],
        check=True,
    )
    proc = run_update(tmp_path, "ioprio_set,setpriority")
    assert proc.returncode == 0, proc
    rec = deltas.load(str(tmp_path / "state")).get(str(good))
    assert rec is not None and rec.result == deltas.OK, (rec, proc.stderr)
