"""gcpause.cyclic_gc_paused (issue 13): the collector is off inside, back as it was after
(also when the block raises, also when it was off already), and a full update runs with it
off: the scan and the catalog are built without the collector walking them."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import Paths
from lxd_image_server.gcpause import cyclic_gc_paused
from lxd_image_server.tree.scan import Scanner

from .helpers import blob, version_dir, write


@pytest.fixture
def collector_on() -> Iterator[None]:
    was_on = gc.isenabled()
    gc.enable()
    yield
    if not was_on:
        gc.disable()


def test_off_inside_and_on_again_after(collector_on: None) -> None:
    with cyclic_gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_on_again_after_an_error(collector_on: None) -> None:
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_nested_and_off_before_stays_off(collector_on: None) -> None:
    with cyclic_gc_paused():
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()  # the inner block does not turn it on
    gc.disable()
    with cyclic_gc_paused():
        pass
    assert not gc.isenabled()  # it was off: left off


def test_a_full_update_scans_with_the_collector_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector_on: None
) -> None:
    paths = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(paths.img_dir)
    d = version_dir(Path(paths.img_dir), serial="20240101_1200")
    write(d / "lxd.tar.xz", blob(100, 1))
    write(d / "rootfs.squashfs", blob(1000, 2))
    seen: list[bool] = []
    scan = Scanner.scan

    def spy(self: Scanner, rel_prefix: str = "") -> list:  # type: ignore[type-arg]
        seen.append(gc.isenabled())
        return scan(self, rel_prefix)

    monkeypatch.setattr(Scanner, "scan", spy)
    cache = HashCache(paths.cache_path)
    try:
        assert Pipeline(paths, cache, hidden=frozenset).update_all() is True
    finally:
        cache.close()
    assert seen == [False]
    assert gc.isenabled()


def test_a_dropped_pipeline_is_freed_without_the_collector(
    tmp_path: Path, collector_on: None
) -> None:
    """No reference cycle holds a pipeline (and the scan it keeps, objects per file): the
    collector would otherwise walk them all once more after an update."""
    paths = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(paths.img_dir)
    cache = HashCache(paths.cache_path)
    try:
        with cyclic_gc_paused():
            pipeline = Pipeline(paths, cache, hidden=frozenset)
            pipeline.update_all()
            gone = weakref.ref(pipeline)
            del pipeline
            assert gone() is None
    finally:
        cache.close()
