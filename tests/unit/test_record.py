"""One record per version (issue 21): what the writer keeps of each version is built and
changed in one place, every cache beside it is derived from it by value, and a publish where
one version changed works on that version (and its product) only."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import deltas, products, record
from lxd_image_server.catalog.deltawork import FOREGROUND, DeltaService
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.pipeline import Pipeline, Use
from lxd_image_server.catalog.watch import Watcher
from lxd_image_server.config import Paths
from lxd_image_server.settings import DeltaSettings
from lxd_image_server.tree.scan import ScannedVersion

from .helpers import blob, sha, version_dir, write

PRODUCTS = ("alpine", "busybox", "debian")
SERIALS = ("20240101_1200", "20240102_1200")
NEW = "20240103_1200"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    return p


def add(paths: Paths, os_: str, serial: str, seed: int = 0) -> Path:
    d = version_dir(Path(paths.img_dir), os_=os_, serial=serial)
    write(d / "lxd.tar.xz", blob(100, seed))
    write(d / "rootfs.squashfs", blob(1000, seed + 1))
    return d


def rel(paths: Paths, d: Path) -> str:
    return os.path.relpath(d, paths.img_dir)


def catalog(paths: Paths) -> dict[str, Any]:
    products: dict[str, Any] = json.loads(Path(paths.streams_dir, "images.json").read_bytes())[
        "products"
    ]
    return products


def root_sha(products: dict[str, Any], os_: str, serial: str) -> str:
    digest: str = products[f"{os_}:1.35:amd64:default"]["versions"][serial]["items"]["squashfs"][
        "sha256"
    ]
    return digest


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The versions whose catalog entry is built, in order (record.build_version's calls)."""
    calls: list[str] = []
    real = products.build_version

    def counting(v: ScannedVersion, *args: Any, **kwargs: Any) -> Any:
        calls.append(v.key.product.split(":")[0] + "/" + v.key.serial)
        return real(v, *args, **kwargs)

    monkeypatch.setattr(record, "build_version", counting)
    return calls


@pytest.fixture
def hidden() -> set[str]:
    return set()


@pytest.fixture
def pipeline(paths: Paths, hidden: set[str]) -> Iterator[Pipeline]:
    for i, os_ in enumerate(PRODUCTS):
        for j, serial in enumerate(SERIALS):
            add(paths, os_, serial, seed=10 * i + 2 * j)
    cache = HashCache(None)
    p = Pipeline(paths, cache, hidden=lambda: frozenset(hidden))
    assert p.update_all()
    yield p
    cache.close()


def test_a_publish_builds_only_the_version_that_changed(
    paths: Paths, pipeline: Pipeline, built: list[str]
) -> None:
    d = add(paths, "busybox", NEW, seed=99)
    assert pipeline.refresh([rel(paths, d)])
    assert built == ["busybox/" + NEW]
    assert NEW in catalog(paths)["busybox:1.35:amd64:default"]["versions"]
    # a rescan of everything that finds every version as it was builds nothing
    built.clear()
    assert pipeline.refresh([""]) is False
    assert built == []


def test_a_changed_file_gets_a_new_entry_never_the_old_one(
    paths: Paths, pipeline: Pipeline, built: list[str]
) -> None:
    """The entry kept in the record is dropped with the digests it was built from: a root
    rewritten in place (same path, same size) is published with its new sha256."""
    d = version_dir(Path(paths.img_dir), os_="alpine", serial=SERIALS[1])
    new_root = blob(1000, 1234)
    write(d / "rootfs.squashfs", new_root)
    os.utime(d / "rootfs.squashfs", ns=(1, 1))  # another mtime, even on a coarse clock
    assert pipeline.refresh([rel(paths, d)], budget=None)
    assert built == ["alpine/" + SERIALS[1]]
    assert root_sha(catalog(paths), "alpine", SERIALS[1]) == sha(new_root)


def test_hiding_and_showing_a_version_again_builds_nothing(
    paths: Paths, pipeline: Pipeline, built: list[str], hidden: set[str]
) -> None:
    """A product's view is kept by value (its stamp and its hidden versions): hiding a
    version takes it out, showing it again puts back the entry its record kept."""
    d = version_dir(Path(paths.img_dir), os_="debian", serial=SERIALS[0])
    before = catalog(paths)
    hidden.add(str(d))
    assert pipeline.refresh([])
    assert SERIALS[0] not in catalog(paths)["debian:1.35:amd64:default"]["versions"]
    hidden.clear()
    assert pipeline.refresh([])
    assert catalog(paths) == before
    assert built == []


def test_a_version_gone_leaves_and_one_back_is_built_again(
    paths: Paths, pipeline: Pipeline, built: list[str]
) -> None:
    d = version_dir(Path(paths.img_dir), os_="busybox", serial=SERIALS[0])
    away = Path(str(d).replace(SERIALS[0], ".away"))
    os.rename(d, away)
    assert pipeline.refresh([rel(paths, d)])
    assert SERIALS[0] not in catalog(paths)["busybox:1.35:amd64:default"]["versions"]
    os.rename(away, d)
    assert pipeline.refresh([rel(paths, d)])
    assert SERIALS[0] in catalog(paths)["busybox:1.35:amd64:default"]["versions"]
    assert built == ["busybox/" + SERIALS[0]]


class Planning(DeltaService):
    """A real DeltaService that also notes which products each plan was given."""

    def __init__(self, paths: Paths) -> None:
        super().__init__(paths.img_dir, paths.state_dir, DeltaSettings(min_size=0), FOREGROUND)
        self.planned: list[set[str]] = []

    def published(self, versions: Any, sha: Any) -> None:
        versions = list(versions)
        self.planned.append({v.key.os for v in versions})
        super().published(versions, sha)


def test_the_deltas_plan_only_the_products_that_changed(paths: Paths) -> None:
    for i, os_ in enumerate(PRODUCTS):
        add(paths, os_, SERIALS[0], seed=10 * i)
    cache = HashCache(None)
    try:
        service = Planning(paths)
        pipeline = Pipeline(paths, cache, deltas=service)
        pipeline.update_all()
        assert service.planned == [set(PRODUCTS)]
        d = add(paths, "busybox", NEW, seed=77)
        pipeline.refresh([rel(paths, d)])
        assert service.planned[-1] == {"busybox"}
        # what the service plans with changed (its records): every product again
        deltas.save(paths.state_dir, {"/nowhere/x.vcdiff": deltas.Record("failed", "", "", "")})
        pipeline.refresh([])
        assert service.planned[-1] == set(PRODUCTS)
        # nothing changed: nothing planned
        count = len(service.planned)
        pipeline.refresh([])
        assert len(service.planned) == count
    finally:
        cache.close()


def test_the_watcher_takes_only_a_pipeline_built_for_it(paths: Paths) -> None:
    cache = HashCache(None)
    try:
        with pytest.raises(ValueError, match=r"Use\.WATCH"):
            Watcher(paths, lambda exclude, wake: Pipeline(paths, cache, exclude=exclude))
        watcher = Watcher(
            paths,
            lambda exclude, wake: Pipeline(
                paths, cache, use=Use.WATCH, exclude=exclude, on_hashed=wake
            ),
        )
        assert watcher.pipeline.use is Use.WATCH
        watcher.watches.close()
        os.close(watcher._wake_r)
        os.close(watcher._wake_w)
    finally:
        cache.close()


def test_a_product_whose_view_is_kept_loses_an_alias_another_takes(
    paths: Paths, pipeline: Pipeline
) -> None:
    """busybox's view (its versions, their entries) is kept here, but alpine now claims one
    of its aliases, which busybox loses (the product that sorts first keeps it)."""
    assert "busybox/1.35" in catalog(paths)["busybox:1.35:amd64:default"]["aliases"].split(",")
    d = version_dir(Path(paths.img_dir), os_="alpine", serial=SERIALS[1])
    write(d / "metadata.json", b'{"aliases": ["busybox/1.35"]}')
    assert pipeline.refresh([rel(paths, d)])
    products = catalog(paths)
    assert "busybox/1.35" in products["alpine:1.35:amd64:default"]["aliases"].split(",")
    assert "busybox/1.35" not in products["busybox:1.35:amd64:default"]["aliases"].split(",")
    # and the whole catalog is what a pipeline that kept nothing writes
    os.unlink(Path(paths.streams_dir, "images.json"))
    cache = HashCache(None)
    try:
        Pipeline(paths, cache).update_all()
    finally:
        cache.close()
    assert catalog(paths) == products
