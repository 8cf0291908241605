"""unchanged.py and the no-change `update` (issue 13): any input of a full publish that changes
changes the digest (one it missed would let a no-change `update` skip a publish it owes), the
same inputs give the same digest in another process (the record outlives the process), and an
`update` that skips looking up the digests still publishes every change made to the tree."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import hashing
from lxd_image_server.catalog.hashing import FileChanged, HashCache, HashEngine
from lxd_image_server.catalog.unchanged import inputs_digest, versions_digest
from lxd_image_server.config import Paths
from lxd_image_server.ops import updating
from lxd_image_server.settings import DeltaSettings, Settings
from lxd_image_server.tree.layout import VersionKey, classify
from lxd_image_server.tree.overrides import NO_OVERRIDES, Overrides
from lxd_image_server.tree.scan import FileStat, ScannedVersion

from .helpers import blob, sha, version_dir, write

IMG = "/srv/images"
VDIR = f"{IMG}/alpine/3.19/amd64/default/20240101_1200"

#: (versions, hidden, listed deltas, served root)
Inputs = tuple[list[ScannedVersion], frozenset[str], frozenset[str], str]


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
    return [v], frozenset(), frozenset(), "/srv"


def digest(i: Inputs) -> str:
    return inputs_digest(versions_digest(i[0], i[3]), i[1], i[2])


def _with_file(change: Callable[[FileStat], FileStat]) -> Callable[[Inputs], Inputs]:
    def edit(i: Inputs) -> Inputs:
        (v,) = i[0]
        files = dict(v.files)
        files["rootfs.squashfs"] = change(files["rootfs.squashfs"])
        return [dataclasses.replace(v, files=files)], i[1], i[2], i[3]

    return edit


def _with_version(**kw: object) -> Callable[[Inputs], Inputs]:
    def edit(i: Inputs) -> Inputs:
        (v,) = i[0]
        return [dataclasses.replace(v, **kw)], i[1], i[2], i[3]  # type: ignore[arg-type]

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
    "hidden": lambda i: (i[0], frozenset({VDIR}), i[2], i[3]),
    "delta listed": lambda i: (
        i[0],
        i[1],
        frozenset({f"{VDIR}/rootfs.20231231_1200.vcdiff"}),
        i[3],
    ),
    "served root": lambda i: (i[0], i[1], i[2], "/srv2"),
    "version added": lambda i: (i[0] * 2, i[1], i[2], i[3]),
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_any_input_changed_changes_the_digest(what: str) -> None:
    before = digest(inputs())
    assert digest(inputs()) == before
    assert digest(CHANGES[what](inputs())) != before


def test_the_digest_is_the_same_in_another_process() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.unit.test_unchanged import inputs, digest; print(digest(inputs()))"
    )
    here = str(Path(__file__).parents[2])
    # another hash seed: nothing may depend on hash() or id()
    out = subprocess.run(
        [sys.executable, "-c", code, here],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert out == digest(inputs())


# -- through `update`: a skipped publish is never a missed one ---------------------------------

#: the version the tests change, the newest (its overrides are the product's); OLDER, the other
SERIAL, OLDER = "20240202_1200", "20240101_1200"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    for i, serial in enumerate((OLDER, SERIAL)):
        d = version_dir(Path(p.img_dir), serial=serial)
        write(d / "lxd.tar.xz", blob(300, 2 * i))
        write(d / "rootfs.squashfs", blob(3000, 2 * i + 1))
    return p


def update(paths: Paths, settings: Settings | None = None) -> bool:
    return updating.update(paths, settings or Settings()).changed


def listed(paths: Paths) -> dict[str, dict[str, str]]:
    """serial -> {file name: sha256} as images.json lists them."""
    doc = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    out: dict[str, dict[str, str]] = {}
    for product in doc["products"].values():
        for serial, version in product["versions"].items():
            items = version["items"].values()
            out[serial] = {item["path"].rsplit("/", 1)[1]: item["sha256"] for item in items}
    return out


def test_a_no_change_update_looks_up_no_digest(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert update(paths) is True
    calls: list[str] = []
    for name in ("get", "get_combined", "preloaded"):
        real = getattr(HashCache, name)

        def spy(*a: object, _real: Callable[..., object] = real, _n: str = name) -> object:
            calls.append(_n)
            return _real(*a)

        monkeypatch.setattr(HashCache, name, spy)
    monkeypatch.setattr(HashEngine, "digest", lambda *a, **k: pytest.fail("digest() called"))
    assert update(paths) is False
    # the deltas asked for the newest root's digest only, one lookup
    assert calls.count("preloaded") == 0
    assert calls.count("get") <= 1


def _rewrite_root(d: Path) -> None:
    with open(d / "rootfs.squashfs", "r+b") as f:  # same size, same inode
        f.write(b"other bytes")


def _root_to_link(d: Path) -> None:
    outside = d.parents[5] / "outside.squashfs"
    outside.write_bytes(blob(3000, 2))
    (d / "rootfs.squashfs").unlink()
    (d / "rootfs.squashfs").symlink_to(outside)


def _root_to_fifo(d: Path) -> None:
    (d / "rootfs.squashfs").unlink()
    os.mkfifo(d / "rootfs.squashfs")


def _remove_root(d: Path) -> None:
    (d / "rootfs.squashfs").unlink()


def _add_file(d: Path) -> None:
    write(d / "incus.tar.xz", blob(300, 9))


def _add_overrides(d: Path) -> None:
    (d / "metadata.json").write_text(json.dumps({"release_title": "changed"}))


def _remove_version(d: Path) -> None:
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _add_version(d: Path) -> None:
    for i, name in enumerate(("lxd.tar.xz", "rootfs.squashfs")):
        write(d.parent / "20240303_1200" / name, blob(300, i))


TREE_CHANGES: dict[str, Callable[[Path], None]] = {
    "root rewritten in place": _rewrite_root,
    "root removed": _remove_root,
    "root replaced by a link": _root_to_link,
    "root replaced by a FIFO": _root_to_fifo,
    "file added": _add_file,
    "metadata.json added": _add_overrides,
    "version removed": _remove_version,
    "version added": _add_version,
}


@pytest.mark.parametrize("what", sorted(TREE_CHANGES))
def test_every_change_is_published_after_a_skipped_update(paths: Paths, what: str) -> None:
    assert update(paths) is True
    assert update(paths) is False  # skipped: the record vouches for streams/
    before = Path(paths.streams_dir, "images.json").read_bytes()
    d = Path(paths.img_dir, "busybox/1.35/amd64/default", SERIAL)
    TREE_CHANGES[what](d)
    assert update(paths) is True
    after = Path(paths.streams_dir, "images.json").read_bytes()
    assert after != before
    versions = listed(paths)
    if what == "root rewritten in place":
        root = (d / "rootfs.squashfs").read_bytes()
        assert versions[SERIAL]["rootfs.squashfs"] == sha(root)
    elif what == "metadata.json added":
        assert b'"release_title": "changed"' in after
    elif what == "file added":
        assert "incus.tar.xz" in versions[SERIAL]
    elif what == "version added":
        assert "20240303_1200" in versions
    else:  # the version lost its root (or all): not published
        assert SERIAL not in versions
    assert update(paths) is False  # and skipped again


def test_a_publish_with_a_file_not_hashed_is_not_recorded(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that could not be hashed leaves its version out; the next update must try it
    again and publish it, not skip as if that catalog were the tree's."""

    def failing(real: Callable[..., Any], at: int) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            f = a[at]
            if f.name == "rootfs.squashfs" and SERIAL in f.path:
                raise FileChanged("it changed since it was scanned")
            return real(*a, **k)

        return call

    # (small versions are read whole, bigger files hashed in chunks: both fail)
    monkeypatch.setattr(hashing, "hash_file", failing(hashing.hash_file, 0))
    monkeypatch.setattr(hashing, "read_whole", failing(hashing.read_whole, 1))
    assert update(paths) is True
    assert SERIAL not in listed(paths)
    assert not Path(paths.state.catalog_inputs).exists()
    monkeypatch.undo()
    assert update(paths) is True
    assert SERIAL in listed(paths)


def test_a_skipped_update_still_makes_the_deltas_due(paths: Paths) -> None:
    """The deltas take the newest root's digest from the hash cache, looked up on demand."""
    base = blob(64 << 10, 7)
    product = Path(paths.img_dir, "busybox/1.35/amd64/default")
    write(product / OLDER / "rootfs.squashfs", base)
    write(product / SERIAL / "rootfs.squashfs", base[:1000] + b"changed" + base[1007:])
    off = Settings(deltas=DeltaSettings(enabled=False))
    assert update(paths, off) is True
    assert update(paths, off) is False
    assert not list(product.glob("*/*.vcdiff"))
    # deltas on: the tree and catalog are as recorded (skipped), yet the delta is made
    assert update(paths, Settings(deltas=DeltaSettings(min_size=0))) is True
    name = f"rootfs.{OLDER.replace(':', '')}.vcdiff"
    assert [p.name for p in (product / SERIAL).glob("*.vcdiff")] == [name]
    assert name in listed(paths)[SERIAL]
