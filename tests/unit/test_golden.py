"""The catalog's bytes are pinned (issue 13): whatever is done to make publishing faster, the
same tree gives the same images.json and index.json, byte for byte, whether it is published by
a full `update` or by the watcher's incremental passes; and the page it writes.

The tree holds every image form (squashfs, root.tar.xz, a VM disk, a unified tarball, both
metadata names), metadata.json overrides (non-ASCII text, aliases, requirements), an alias two
products want, every serial spelling and versions that are not published (incomplete, failed).
Run with GOLDEN_UPDATE=1 to rewrite the pinned files after a deliberate format change.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.page import page_path
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import Paths

from .helpers import blob, version_dir, write

GOLDEN = Path(__file__).parent / "golden"
DOCS = ("images.json", "index.json")
_UPDATED = re.compile(rb'"updated": "[^"]*"')


def normalized(data: bytes) -> bytes:
    """The document with every `updated` replaced by a fixed value (it is the clock's)."""
    return _UPDATED.sub(b'"updated": "Mon, 01 Jan 2024 00:00:00 +0000"', data)


def build_tree(img: Path) -> None:
    seed = iter(range(1000))

    def put(d: Path, *names: str) -> None:
        for name in names:
            write(d / name, blob(200 + 17 * len(name), next(seed)))

    # one product, three serial spellings, growing forms
    put(version_dir(img, serial="20240101_12:00"), "lxd.tar.xz", "rootfs.squashfs")
    put(
        version_dir(img, serial="20240102_1300"),
        "lxd.tar.xz",
        "incus.tar.xz",
        "rootfs.squashfs",
        "disk.qcow2",
    )
    put(version_dir(img, serial="202401031400"), "incus.tar.xz", "root.tar.xz", "disk-kvm.img")
    # incomplete: metadata only (not published)
    put(version_dir(img, serial="202401041500"), "lxd.tar.xz")
    # overrides with non-ASCII text, aliases and requirements on the newest version
    alp = version_dir(img, "alpine", "3.19", "arm64", "cloud", "20240301_0000")
    put(alp, "incus.tar.xz", "rootfs.tar.xz")
    old = version_dir(img, "alpine", "3.19", "arm64", "cloud", "20240201_0000")
    put(old, "lxd.tar.xz", "rootfs.squashfs")
    write(
        alp / "metadata.json",
        json.dumps(
            {
                "os": "Alpine Linux",
                "release_title": "3.19 (stable) — «Édition» ☃",
                "aliases": ["alp", "alpine/edge", "shared"],
                "requirements": {"secureboot": "false", "cgroup": "v2"},
                "variant": "cloud",
                "release_codename": "snowy",
                "support_eol": "2026-12-31",
            }
        ).encode(),
    )
    # a unified tarball, and an alias another product takes first
    deb = version_dir(img, "debian", "12", "amd64", "default", "20240501_0600")
    put(deb, "debian-12-amd64-default-20240501_0600.tar.gz")
    write(deb / "metadata.json", json.dumps({"aliases": ["shared", "deb"]}).encode())
    # a VM only, other arch
    put(version_dir(img, "debian", "12", "x86_64", "default", "20240501_0600"), "lxd.tar.xz")
    put(
        version_dir(img, "debian", "12", "x86_64", "default", "20240502_0600"),
        "lxd.tar.xz",
        "rootfs.img",
    )
    # things never published
    write(img / "debian" / "12" / "amd64" / "default" / "20240601_0000" / "notes.txt", b"x")
    write(img / "bad arch" / "1" / "nope" / "default" / "20240101_0000" / "lxd.tar.xz", b"x")
    put(version_dir(img, serial="20240105_1600"), "lxd.tar.xz", "rootfs.squashfs.part")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    build_tree(Path(p.img_dir))
    return p


def run_update(paths: Paths) -> dict[str, bytes]:
    cache = HashCache(paths.cache_path)
    try:
        Pipeline(paths, cache, hidden=frozenset).update_all()
    finally:
        cache.close()
    return published(paths)


def published(paths: Paths) -> dict[str, bytes]:
    out = {}
    for name in DOCS:
        data = Path(paths.streams_dir, name).read_bytes()
        assert gzip.decompress(Path(paths.streams_dir, name + ".gz").read_bytes()) == data
        out[name] = data
    return out


def test_update_gives_the_pinned_bytes(paths: Paths) -> None:
    got = run_update(paths)
    if os.environ.get("GOLDEN_UPDATE"):
        GOLDEN.mkdir(exist_ok=True)
        for name, data in got.items():
            (GOLDEN / name).write_bytes(normalized(data))
    for name, data in got.items():
        assert normalized(data) == (GOLDEN / name).read_bytes(), name
    # and a second run on the unchanged tree writes nothing
    before = {n: os.stat(Path(paths.streams_dir, n)).st_ino for n in DOCS}
    assert run_update(paths) == got
    assert {n: os.stat(Path(paths.streams_dir, n)).st_ino for n in DOCS} == before


def test_update_gives_the_pinned_page(paths: Paths) -> None:
    """The catalog page too (issue 11: refactors keep what users see), its one timestamp, the
    catalog's `updated`, replaced by a fixed value."""
    run_update(paths)
    images = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    page = Path(page_path(paths.root_dir)).read_bytes()
    stamp = images["updated"].encode()
    assert stamp in page
    page = page.replace(stamp, b"Mon, 01 Jan 2024 00:00:00 +0000")
    if os.environ.get("GOLDEN_UPDATE"):
        (GOLDEN / "index.html").write_bytes(page)
    assert page == (GOLDEN / "index.html").read_bytes()


def test_incremental_passes_give_the_bytes_of_a_full_update(paths: Paths, tmp_path: Path) -> None:
    """The watcher's passes (refresh of a few directories, reusing what it built before) end
    with the same bytes a fresh `update` of the same tree writes."""
    img = Path(paths.img_dir)
    cache = HashCache(paths.cache_path)
    try:
        pipeline = Pipeline(paths, cache, hidden=frozenset)
        pipeline.update_all()
        d = img / "alpine/3.19/arm64/cloud/20240401_0000"
        bb = img / "busybox/1.35/amd64/default"

        def new_version() -> None:
            # a new version, newest of its product: the product's fields follow it
            write(d / "lxd.tar.xz", blob(300, 901))
            write(d / "rootfs.squashfs", blob(300, 902))

        def new_overrides() -> None:
            write(
                d / "metadata.json",
                json.dumps({"release_title": "neu", "aliases": ["a2"]}).encode(),
            )

        def replaced() -> None:
            write(bb / "20240101_12:00/rootfs.squashfs", blob(250, 903))

        def completed_and_removed() -> None:
            write(bb / "202401041500/rootfs.squashfs", blob(260, 904))
            shutil.rmtree(bb / "20240102_1300")
            shutil.rmtree(img / "debian/12/amd64")

        def nothing() -> None:
            pass

        steps = [
            (new_version, ("alpine/3.19/arm64/cloud/20240401_0000",)),
            (new_overrides, ("alpine/3.19/arm64/cloud/20240401_0000",)),
            (replaced, ("busybox/1.35/amd64/default/20240101_12:00",)),
            (
                completed_and_removed,
                (
                    "busybox/1.35/amd64/default/202401041500",
                    "busybox/1.35/amd64/default/20240102_1300",
                    "debian/12",
                ),
            ),
            # the alias the removed product held is free now: alpine's is kept
            (nothing, ("alpine/3.19",)),
        ]
        for change, prefixes in steps:
            change()
            pipeline.refresh(prefixes)
            incremental = published(paths)
            # (the same tree, another catalog and state: the page is not compared)
            fresh_paths = dataclasses.replace(
                paths, streams_dir=str(tmp_path / "fresh" / "v1"), state_dir=str(tmp_path / "fs")
            )
            shutil.rmtree(tmp_path / "fresh", ignore_errors=True)
            shutil.rmtree(tmp_path / "fs", ignore_errors=True)
            full = run_update(fresh_paths)
            for name in DOCS:
                assert normalized(incremental[name]) == normalized(full[name]), (prefixes, name)
    finally:
        cache.close()


def test_an_unchanged_update_skips_work_but_never_leaves_streams_wrong(paths: Paths) -> None:
    """A full update whose inputs were published already writes nothing (unchanged.py), yet
    its products are the catalog's, and anything changed on either side is published again."""
    got = run_update(paths)
    streams = Path(paths.streams_dir)
    page = Path(paths.root_dir, "streams", "index.html")
    cache = HashCache(paths.cache_path)
    try:
        pipeline = Pipeline(paths, cache, hidden=frozenset)
        assert pipeline.update_all() is False
        assert pipeline._unbuilt is not None  # skipped: nothing built yet
        assert json.loads(got["images.json"])["products"] == {
            k: p.to_json() for k, p in pipeline.products.items()
        }
    finally:
        cache.close()
    # the page removed, a document edited in place, the .gz removed: all put back
    page.unlink()
    with open(streams / "images.json", "r+b") as f:
        f.write(b"[")
    (streams / "index.json.gz").unlink()
    # (published again: with the clock's `updated`, which may have ticked meanwhile)
    again = run_update(paths)
    assert {n: normalized(d) for n, d in again.items()} == {
        n: normalized(d) for n, d in got.items()
    }
    assert page.exists()
    # an override changed (metadata.json is no file of the version's identity)
    alp = Path(paths.img_dir, "alpine/3.19/arm64/cloud/20240301_0000")
    (alp / "metadata.json").write_text(json.dumps({"release_title": "other"}))
    after = run_update(paths)
    assert b'"release_title": "other"' in after["images.json"]
    # and a version hidden (pruned): gone from the catalog
    cache = HashCache(paths.cache_path)
    try:
        Pipeline(paths, cache, hidden=lambda: frozenset({str(alp)})).update_all()
    finally:
        cache.close()
    assert b"20240301_0000" not in Path(paths.streams_dir, "images.json").read_bytes()
