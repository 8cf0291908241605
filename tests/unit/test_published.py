"""The record of what the writer published (catalog/published.py, issue 21): what images.json
lists, written with it, read bounded, each version's lines made once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from lxd_image_server.catalog import departures, published
from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.model import Item, Product, Version, read_catalog
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import Paths, StateDir

from .helpers import blob, version_dir, write


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    img = Path(p.img_dir)
    write(version_dir(img, serial="20240101_1200") / "lxd.tar.xz", blob(100, 1))
    write(version_dir(img, serial="20240101_1200") / "rootfs.squashfs", blob(900, 2))
    d = version_dir(img, "alpine", "3.19", "arm64", "cloud", "20240102_1200")
    write(d / "incus.tar.xz", blob(110, 3))
    write(d / "rootfs.squashfs", blob(950, 4))
    write(d / "disk.qcow2", blob(700, 5))
    return p


def update(paths: Paths) -> Pipeline:
    cache = HashCache(None)
    try:
        pipeline = Pipeline(paths, cache)
        pipeline.update_all()
        return pipeline
    finally:
        cache.close()


def test_the_record_lists_what_images_json_lists_and_its_updated(paths: Paths) -> None:
    update(paths)
    record = published.read(paths.state_dir)
    catalog = read_catalog(os.path.join(paths.streams_dir, "images.json"))  # (as a client)
    assert record is not None
    assert record.updated == catalog.updated == published.read_updated(paths.state_dir)
    assert departures.Listing(record.files) == departures.listing_of(catalog.products)
    assert len(record.files) == 5


def test_each_version_s_lines_are_made_once(paths: Paths, monkeypatch) -> None:
    pipeline = update(paths)
    made: list[str] = []
    real = published._lines

    def counting(version: Version) -> bytes:
        made.append(version.serial)
        return real(version)

    monkeypatch.setattr(published, "_lines", counting)
    products = pipeline.products
    first = published.record_bytes(products, "x")
    assert (
        published.record_bytes(products, "y")[len(b'{"format": 1, "updated": "y"}\n') :]
        == (first[len(b'{"format": 1, "updated": "x"}\n') :])
    )
    assert made == []  # made with the publish already, kept by each Version


def test_updated_is_read_from_the_first_line_alone(paths: Paths) -> None:
    """A damaged body does not lose `updated` (the timestamp clients' caches follow), but the
    record as a whole is not trusted."""
    update(paths)
    path = Path(StateDir(paths.state_dir).published)
    updated = published.read_updated(paths.state_dir)
    with open(path, "ab") as f:
        f.write(b"[" * (published.MAX_RECORD_BYTES + 1))
    assert published.read_updated(paths.state_dir) == updated
    assert published.read(paths.state_dir) is None


def test_without_the_record_the_catalog_is_read_as_a_client_until_the_next_publish(
    paths: Paths,
) -> None:
    update(paths)
    record = Path(StateDir(paths.state_dir).published)
    listing = departures.Listing(published.read(paths.state_dir).files)  # type: ignore[union-attr]
    record.unlink()
    assert departures.listed(paths.state_dir, paths.streams_dir) == listing
    write(version_dir(Path(paths.img_dir), serial="20240103_1200") / "lxd.tar.xz", blob(9, 9))
    write(version_dir(Path(paths.img_dir), serial="20240103_1200") / "rootfs.squashfs", blob(9, 8))
    update(paths)
    again = published.read(paths.state_dir)
    assert again is not None and len(again.files) == len(listing.sizes) + 2


def test_odd_file_names_read_back_as_written(tmp_path: Path) -> None:
    d = "images/os/1/amd64/default/20240101_1200"
    names = ['a"b', "back\\slash", "é☃", "tab\tx"]
    items = {n: Item("squashfs", f"{d}/{n}", i, "0" * 64) for i, n in enumerate(names)}
    product = Product("os:1:amd64:default", "os", "1", "1", "amd64", "default", (), {})
    product = dataclasses.replace(product, versions={"20240101_1200": Version("s", items)})
    published.write(str(tmp_path), {product.name: product}, "Mon, 01 Jan 2024 00:00:00 +0000")
    record = published.read(str(tmp_path))
    assert record is not None and record.files == {f"{d}/{n}": i for i, n in enumerate(names)}


def test_the_writer_never_parses_what_it_published(paths: Paths, monkeypatch) -> None:
    """Issue 21: a writer's publishes (first and later, full and incremental, the page, the
    departures check, the watcher's listing) never parse images.json: the one reader refuses
    to be called."""
    update(paths)  # (the record of the first publish)

    def refuse(*_: object) -> None:
        raise AssertionError("the writer parsed a published document")

    for target in ("model.read_document", "model.parse_document", "departures.read_catalog"):
        module, name = target.split(".")
        monkeypatch.setattr(f"lxd_image_server.catalog.{module}.{name}", refuse)
    cache = HashCache(None)
    try:
        pipeline = Pipeline(paths, cache)
        assert pipeline.listing().sizes  # what is listed, before any publish of its own
        write(version_dir(Path(paths.img_dir), serial="20240105_1200") / "lxd.tar.xz", blob(9, 7))
        write(
            version_dir(Path(paths.img_dir), serial="20240105_1200") / "rootfs.squashfs", blob(9, 6)
        )
        assert pipeline.update_all()
        os.unlink(Path(version_dir(Path(paths.img_dir), serial="20240101_1200"), "lxd.tar.xz"))
        assert pipeline.refresh(["busybox/1.35/amd64/default/20240101_1200"])
    finally:
        cache.close()
    assert len(departures.listed(paths.state_dir, paths.streams_dir).sizes) == 3 + 2
