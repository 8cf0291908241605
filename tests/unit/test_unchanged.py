"""unchanged.inputs_digest: any input of a full publish that changes changes the digest (a
digest that missed one would let a no-change `update` skip a publish it owes), and the same
inputs give the same digest in another process (the record outlives the process)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lxd_image_server.catalog.hashing import Digests
from lxd_image_server.catalog.unchanged import inputs_digest
from lxd_image_server.tree.layout import VersionKey, classify
from lxd_image_server.tree.overrides import NO_OVERRIDES, Overrides
from lxd_image_server.tree.scan import FileStat, ScannedVersion

IMG = "/srv/images"
VDIR = f"{IMG}/alpine/3.19/amd64/default/20240101_1200"
META = f"{VDIR}/lxd.tar.xz"
ROOT = f"{VDIR}/rootfs.squashfs"

Inputs = tuple[list[tuple[ScannedVersion, Digests]], frozenset[str], str]


def _file(name: str, n: int) -> FileStat:
    role = classify(name)
    assert role is not None
    return FileStat(
        path=f"{VDIR}/{name}",
        name=name,
        role=role,
        size=4096 + n,
        mtime_ns=1_700_000_000_000_000_000 + n,
        ctime_ns=1_700_000_000_000_000_001 + n,
        inode=1000 + n,
        dev=64769,
        base=IMG,
    )


def inputs() -> Inputs:
    key = VersionKey("alpine", "3.19", "amd64", "default", "20240101_1200")
    files = {"lxd.tar.xz": _file("lxd.tar.xz", 1), "rootfs.squashfs": _file("rootfs.squashfs", 2)}
    v = ScannedVersion(key=key, path=VDIR, files=files, overrides=NO_OVERRIDES)
    d = Digests(
        files={META: "a" * 64, ROOT: "b" * 64},
        combined={(META, ROOT): "c" * 64},
    )
    return [(v, d)], frozenset(), "/srv"


def _with_file(change: Callable[[FileStat], FileStat]) -> Callable[[Inputs], Inputs]:
    def edit(i: Inputs) -> Inputs:
        ((v, d),) = i[0]
        files = dict(v.files)
        files["rootfs.squashfs"] = change(files["rootfs.squashfs"])
        return [(dataclasses.replace(v, files=files), d)], i[1], i[2]

    return edit


def _with_version(**kw: object) -> Callable[[Inputs], Inputs]:
    def edit(i: Inputs) -> Inputs:
        ((v, d),) = i[0]
        return [(dataclasses.replace(v, **kw), d)], i[1], i[2]  # type: ignore[arg-type]

    return edit


def _with_digests(change: Callable[[Digests], None]) -> Callable[[Inputs], Inputs]:
    def edit(i: Inputs) -> Inputs:
        ((v, d),) = i[0]
        d2 = Digests(dict(d.files), dict(d.combined), set(d.failed))
        change(d2)
        return [(v, d2)], i[1], i[2]

    return edit


def _field(name: str, value: object) -> Callable[[Inputs], Inputs]:
    return _with_file(lambda f: dataclasses.replace(f, **{name: value}))  # type: ignore[arg-type]


CHANGES: dict[str, Callable[[Inputs], Inputs]] = {
    "size": _field("size", 1),
    "mtime": _field("mtime_ns", 1),
    "ctime": _field("ctime_ns", 1),
    "inode": _field("inode", 1),
    "device": _field("dev", 1),
    "path": _field("path", f"{VDIR}/root.squashfs"),
    "role": _field("role", classify("root.squashfs")),
    "file removed": _with_version(files={"lxd.tar.xz": _file("lxd.tar.xz", 1)}),
    "overrides": _with_version(overrides=Overrides(release_title="other")),
    "version path": _with_version(path=VDIR + "x"),
    "version key": _with_version(
        key=VersionKey("alpine", "3.19", "amd64", "cloud", "20240101_1200")
    ),
    "digest": _with_digests(lambda d: d.files.update({ROOT: "d" * 64})),
    "digest missing": _with_digests(lambda d: d.files.pop(ROOT)),
    "failed": _with_digests(lambda d: d.failed.add(ROOT)),
    "combined": _with_digests(lambda d: d.combined.update({(META, ROOT): "e" * 64})),
    "combined missing": _with_digests(lambda d: d.combined.clear()),
    "hidden": lambda i: (i[0], frozenset({VDIR}), i[2]),
    "served root": lambda i: (i[0], i[1], "/srv2"),
    "version added": lambda i: (i[0] * 2, i[1], i[2]),
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_any_input_changed_changes_the_digest(what: str) -> None:
    before = inputs_digest(*inputs())
    assert inputs_digest(*inputs()) == before
    assert inputs_digest(*CHANGES[what](inputs())) != before


def test_the_digest_is_the_same_in_another_process() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from test_unchanged import inputs; from lxd_image_server.catalog.unchanged import "
        "inputs_digest; print(inputs_digest(*inputs()))"
    )
    here = str(Path(__file__).parent)
    # another hash seed: nothing may depend on hash() or id()
    out = subprocess.run(
        [sys.executable, "-c", code, here],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert out == inputs_digest(*inputs())
