"""Issue 17: the one writer of streams/ names a reason for every version that leaves the
catalog, and does not write a catalog that would drop versions for none (departures.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lxd_image_server.catalog import departures, published
from lxd_image_server.catalog.departures import UnexplainedDepartures
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.retention import schedule
from lxd_image_server.config import Paths, StateDir
from lxd_image_server.tree.scan import ScannedVersion

from .helpers import blob, version_dir, write

SERIALS = ("20240101_1200", "20240102_1200", "20240103_1200")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    for n, serial in enumerate(SERIALS):
        d = version_dir(Path(p.img_dir), serial=serial)
        write(d / "lxd.tar.xz", blob(100, 2 * n))
        write(d / "rootfs.squashfs", blob(1000, 2 * n + 1))
    return p


@pytest.fixture
def pipeline(paths: Paths) -> Iterator[Pipeline]:
    cache = HashCache(None)
    p = Pipeline(paths, cache)
    p.update_all()
    yield p
    cache.close()


def images_json(paths: Paths) -> bytes:
    return Path(paths.streams_dir, "images.json").read_bytes()


def listed(paths: Paths) -> set[str]:
    doc = json.loads(images_json(paths))
    return {s for p in doc["products"].values() for s in p["versions"]}


def rel(paths: Paths, serial: str) -> str:
    return os.path.relpath(version_dir(Path(paths.img_dir), serial=serial), paths.img_dir)


def hide_from_scan(p: Pipeline, serial: str) -> None:
    """The scanner misses one version whose directory is still there (a directory it could
    not list, a partial view): what no publish may act on."""
    real = p.known.scanner.scan

    def partial(rel_prefix: str = "") -> list[ScannedVersion]:
        return [v for v in real(rel_prefix) if v.key.serial != serial]

    p.known.scanner.scan = partial  # type: ignore[method-assign]


def test_a_partial_scan_is_not_published(paths: Paths, pipeline: Pipeline) -> None:
    before = images_json(paths)
    hide_from_scan(pipeline, SERIALS[0])
    with pytest.raises(UnexplainedDepartures, match=r"1 version\(s\) would leave the catalog"):
        pipeline.refresh([""])
    assert images_json(paths) == before


def refused_by_a_new_writer(paths: Paths) -> None:
    """A writer that just started (the watcher at boot, `update`, an operator command) and
    scans a partial tree does not publish: it knows what the catalog lists."""
    before = images_json(paths)
    cache = HashCache(None)
    fresh = Pipeline(paths, cache)
    hide_from_scan(fresh, SERIALS[1])
    try:
        with pytest.raises(UnexplainedDepartures):
            fresh.update_all()
    finally:
        cache.close()
    assert images_json(paths) == before


def test_a_new_writer_knows_what_is_listed_from_its_record_not_images_json(
    paths: Paths, pipeline: Pipeline
) -> None:
    """Issue 21: the writer never parses what it published; the record of its last publish
    (published.py) says what is listed. images.json made unreadable changes nothing."""
    assert recorded(paths) == {rel(paths, s) for s in SERIALS}
    images = Path(paths.streams_dir, "images.json")
    images.write_bytes(b"[" + images.read_bytes())  # no JSON any more: never parsed
    refused_by_a_new_writer(paths)


def test_without_a_record_a_new_writer_reads_images_json_as_a_client(
    paths: Paths, pipeline: Pipeline
) -> None:
    """A catalog published by a release without the record: what images.json lists."""
    os.unlink(StateDir(paths.state_dir).published)
    refused_by_a_new_writer(paths)


def recorded(paths: Paths) -> set[str] | None:
    """The version directories (relative to images/) the record of the last publish lists."""
    record = published.read(paths.state_dir)
    if record is None:
        return None
    return departures.Listing(record.files).versions(paths.served_images)


def plant(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "huge":
        with open(path, "wb") as f:
            f.truncate(published.MAX_RECORD_BYTES + 1)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "link":
        other = path.with_name("elsewhere.json")
        other.write_text('{"format": 1, "updated": "x"}\n')
        path.symlink_to(other)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "nested":
        path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    else:
        path.write_text(HOSTILE_RECORDS[kind])


HEAD = '{"format": 1, "updated": "Mon, 01 Jan 2024 00:00:00 +0000"}\n'
HOSTILE_RECORDS = {
    "not json": "{",
    "empty": "",
    "listing nothing": HEAD,
    "other format": '{"format": 2, "updated": "x"}\n',
    "bad updated": '{"format": 1, "updated": "<b>\\n"}\n',
    "dot-dot": HEAD + '["images/../../etc", {"x": 1}]\n',
    "a path for a name": HEAD + '["images/a", {"b/c": 1}]\n',
    "not a size": HEAD + '["images/a", {"b": "1"}]\n',
    "not a line": HEAD + '["images/a", {"b": 1}]\n{"x": 1}\n',
    "nested line": HEAD + "[" * 100_000 + "\n",
}
KINDS = ["huge", "dev-zero", "link", "fifo", "directory", "nested", *HOSTILE_RECORDS]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_record_falls_back_and_never_stops_publishing(
    paths: Paths, pipeline: Pipeline, kind: str
) -> None:
    """The record damaged or replaced (corrupt, huge, a link, a FIFO, a directory, a list
    that would unpublish everything): not trusted; the writer falls back to what images.json
    lists and still refuses a partial scan; a whole one publishes, and the record is right
    again (but where a directory stands in its place: then the next writer falls back)."""
    record = Path(StateDir(paths.state_dir).published)
    plant(record, kind)
    if kind != "listing nothing":
        # (a record listing nothing is well formed: what it says is what was published)
        assert published.read(paths.state_dir) is None
        refused_by_a_new_writer(paths)
    shutil.rmtree(version_dir(Path(paths.img_dir), serial=SERIALS[0]))
    cache = HashCache(None)
    try:
        assert Pipeline(paths, cache).update_all()
    finally:
        cache.close()
    assert listed(paths) == set(SERIALS[1:])
    if kind == "directory":
        assert recorded(paths) is None and record.is_dir()
    else:
        assert recorded(paths) == {rel(paths, s) for s in SERIALS[1:]}
        assert not record.is_symlink()


def test_a_deleted_version_leaves_with_its_reason(
    paths: Paths, pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(version_dir(Path(paths.img_dir), serial=SERIALS[0]))
    with caplog.at_level(logging.INFO, "lxd_image_server.catalog.departures"):
        assert pipeline.refresh([""])
    assert listed(paths) == set(SERIALS[1:])
    assert "1 version(s) leave the catalog: 1 gone" in caplog.text


def test_a_missing_images_directory_unpublishes_nothing(paths: Paths, pipeline: Pipeline):
    """images/ unmounted or moved away: every version looks gone, which is no reason."""
    before = images_json(paths)
    os.rename(paths.img_dir, paths.img_dir + ".away")
    with pytest.raises(UnexplainedDepartures):
        pipeline.refresh([""])
    assert images_json(paths) == before


def test_a_pruned_version_leaves(paths: Paths, pipeline: Pipeline) -> None:
    doomed = [v for v in pipeline.versions.values() if v.key.serial == SERIALS[0]]
    schedule(paths.state_dir, doomed, grace=3600)
    assert pipeline.refresh([""])
    assert listed(paths) == set(SERIALS[1:])


def test_a_version_missing_its_root_leaves(paths: Paths, pipeline: Pipeline) -> None:
    d = version_dir(Path(paths.img_dir), serial=SERIALS[2])
    os.unlink(d / "rootfs.squashfs")
    assert pipeline.refresh([rel(paths, SERIALS[2])])
    assert listed(paths) == set(SERIALS[:2])


def test_reasons_are_named(paths: Paths) -> None:
    known = departures.Known(
        paths.img_dir, pruned=lambda p: p.endswith(SERIALS[0]), scanned=lambda r: False
    )
    assert departures.reason(rel(paths, SERIALS[0]), known) == "pruned"
    assert departures.reason(rel(paths, SERIALS[1]), known) is None  # there, not scanned
    assert departures.reason("busybox/1.35/amd64/default/20250101_1200", known) == "gone"
    bad = departures.reason("busybox/1.35/amd64/default/notaserial", known)
    assert bad is not None and bad.startswith("invalid")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"products": {"p": {"versions": {"v": {"items": {"i": {"path": 1}}}}}}}',
        b'{"products": []}',
    ],
)
def test_a_hostile_images_json_lists_nothing_and_crashes_nothing(tmp_path: Path, data: bytes):
    """Without a record, images.json is read as a client reads it: bounded, and anything that
    is not a catalog lists nothing."""
    path = tmp_path / "images.json"
    path.write_bytes(data)
    assert departures.listed(str(tmp_path / "state"), str(tmp_path)).sizes == {}


def test_a_link_as_images_json_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(
        '{"products": {"p": {"versions": {"v": {"items": {"i": {"ftype": "x", "sha256": "",'
        '"path": "images/a/b/amd64/d/20240101_1200/x", "size": 1}}}}}}}'
    )
    assert departures.listed(str(tmp_path / "state"), str(tmp_path)).sizes == {}
    os.rename(secret, tmp_path / "images.json")
    assert departures.listed(str(tmp_path / "state"), str(tmp_path)).sizes == {
        "images/a/b/amd64/d/20240101_1200/x": 1
    }
    os.rename(tmp_path / "images.json", secret)
    (tmp_path / "images.json").symlink_to(secret)
    assert departures.listed(str(tmp_path / "state"), str(tmp_path)).sizes == {}


def test_a_listed_serial_far_ahead_of_the_clock_leaves_as_invalid(paths: Paths) -> None:
    """Published before the scanner refused serials more than a day ahead (issue 18): the scan
    skips it now, and that is a reason the writer names, not a partial view that would stop
    every later publish."""
    cache = HashCache(None)
    p = Pipeline(paths, cache)
    future = version_dir(Path(paths.img_dir), serial="99991231_2359")
    write(future / "lxd.tar.xz", blob(100, 90))
    write(future / "rootfs.squashfs", blob(1000, 91))
    p.known.scanner.clock = lambda: 253402300000.0  # the year 9999: the serial is not ahead yet
    p.update_all()
    assert "99991231_2359" in listed(paths)
    p.known.scanner.clock = lambda: 1750000000.0  # 2025: far behind the serial
    assert p.refresh([""])
    assert listed(paths) == set(SERIALS)
    cache.close()


def _without_record_refreshed(paths: Paths) -> Pipeline:
    """A new writer on the tree as published, the record of that publish gone."""
    os.unlink(StateDir(paths.state_dir).published)
    return Pipeline(paths, HashCache(None))


def test_without_a_record_nothing_leaving_needs_no_typed_reading(
    paths: Paths, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold `update` at 20,000 versions: images.json's item paths are enough to see that every
    version it lists is published again; the typed reading is not made."""

    def typed(*_: object) -> departures.Listing:
        raise AssertionError("typed reading made")

    monkeypatch.setattr(departures, "listed", typed)
    fresh = _without_record_refreshed(paths)
    try:
        fresh.update_all(rehash=True)  # (rehash: published again, not skipped as unchanged)
    finally:
        fresh.cache.close()
    assert listed(paths) == set(SERIALS)


def test_without_a_record_a_version_leaving_is_checked_by_the_typed_reading(
    paths: Paths, pipeline: Pipeline
) -> None:
    """One listed version missing from a partial scan: the quick reading does not decide, the
    typed one refuses the publish as before."""
    os.unlink(StateDir(paths.state_dir).published)
    refused_by_a_new_writer(paths)
    assert listed(paths) == set(SERIALS)


def test_without_a_record_a_catalog_the_typed_reading_refuses_lists_nothing(
    paths: Paths, pipeline: Pipeline
) -> None:
    """An images.json with items whose paths read but which are no catalog (a negative size):
    as before, taken as listing nothing, so a version leaving it is no departure to refuse."""
    images = Path(paths.streams_dir, "images.json")
    doc = json.loads(images.read_bytes())
    for product in doc["products"].values():
        for version in product["versions"].values():
            for item in version["items"].values():
                item["size"] = -1
    images.write_text(json.dumps(doc))
    fresh = _without_record_refreshed(paths)
    hide_from_scan(fresh, SERIALS[1])
    try:
        fresh.update_all()
    finally:
        fresh.cache.close()
    assert listed(paths) == {SERIALS[0], SERIALS[2]}
