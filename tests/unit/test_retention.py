"""prune/remove: versions leave the catalog at once (for every Pipeline, the watcher's too) and
their files go only once the grace period is over, by `update`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.retention import (
    PendingVersions,
    RetentionError,
    delete_expired,
    load,
    parse_product,
    select_prunable,
    state_path,
    unschedule,
)
from lxd_image_server.config import Paths
from lxd_image_server.ops.pruning import prune, remove

from .helpers import blob, model_products, version_dir, write

PRODUCT = "busybox:1.35:amd64:default"
HOUR = 3600
NOW = 1_800_000_000.0


def add_version(img: Path, serial: str, variant: str = "default", complete: bool = True) -> Path:
    d = version_dir(img, variant=variant, serial=serial)
    seed = int("".join(c for c in serial + variant if c.isdigit()) or 0) + len(variant)
    write(d / "lxd.tar.xz", blob(100, seed))
    if complete:
        write(d / "rootfs.squashfs", blob(300, seed + 1))
    return d


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    return p


@pytest.fixture
def pipeline(paths: Paths) -> Iterator[Pipeline]:
    cache = HashCache(None)
    yield Pipeline(paths, cache)
    cache.close()


def published(paths: Paths) -> dict[str, list[str]]:
    doc = json.loads(Path(paths.streams_dir, "images.json").read_bytes())
    return {k: sorted(p["versions"]) for k, p in doc["products"].items()}


def test_select_prunable_orders_by_time_across_spellings() -> None:
    products = model_products(
        {
            "a:1:amd64:default": {
                "versions": {"20240102_1200": {}, "20240101_12:00": {}, "202401031200": {}}
            },
            "b:1:amd64:default": {"versions": {"20240101_1200": {}}},
        }
    )
    assert select_prunable(products, 1) == [
        ("a:1:amd64:default", "20240101_12:00"),
        ("a:1:amd64:default", "20240102_1200"),
    ]
    assert select_prunable(products, 2) == [("a:1:amd64:default", "20240101_12:00")]
    assert select_prunable(products, 3) == []
    with pytest.raises(ValueError):
        select_prunable(products, 0)


def test_parse_product() -> None:
    assert parse_product(PRODUCT) == ("busybox", "1.35", "amd64", "default")
    for bad in ("busybox:1.35:amd64", "a:b:c:d:e", "busybox:1.35:amd64:.x", "busybox:..:amd64:x"):
        with pytest.raises(RetentionError):
            parse_product(bad)


def test_prune_hides_at_once_and_deletes_after_the_grace_period(
    paths: Paths, pipeline: Pipeline
) -> None:
    img = Path(paths.img_dir)
    old = add_version(img, "20240101_1200")
    mid = add_version(img, "20240102_1200")
    new = add_version(img, "20240103_1200")
    add_version(img, "20240101_1200", variant="other")  # a product with one version: kept

    outcome = prune(pipeline, keep=1, grace=HOUR, now=NOW)
    assert sorted(p.serial for p in outcome.scheduled) == ["20240101_1200", "20240102_1200"]
    assert outcome.deleted == []
    assert published(paths) == {
        PRODUCT: ["20240103_1200"],
        "busybox:1.35:amd64:other": ["20240101_1200"],
    }
    assert old.is_dir() and mid.is_dir()  # still downloadable by clients with the old catalog
    entries = load(paths.state_dir)
    assert {e.path for e in entries} == {str(old), str(mid)}
    assert all(e.expires == NOW + HOUR for e in entries)

    # a fresh pipeline (another process: `update`, the watcher) leaves them out too
    cache = HashCache(None)
    other = Pipeline(paths, cache)
    other.update_all()
    cache.close()
    assert other.products[PRODUCT].versions.keys() == {"20240103_1200"}

    assert delete_expired(paths, now=NOW + HOUR - 1) == []
    assert old.is_dir()
    deleted = delete_expired(paths, now=NOW + HOUR)
    assert sorted(p.serial for p in deleted) == ["20240101_1200", "20240102_1200"]
    assert not old.exists() and not mid.exists() and new.is_dir()
    assert load(paths.state_dir) == []
    assert not [n for n in os.listdir(new.parent) if n.startswith(".")]
    other.update_all()
    assert other.products[PRODUCT].versions.keys() == {"20240103_1200"}
    cache.close()


def test_prune_twice_keeps_the_first_expiry(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    prune(pipeline, keep=1, grace=HOUR, now=NOW)
    again = prune(pipeline, keep=1, grace=HOUR, now=NOW + 100)
    # the pruned version is no longer published, so it is not chosen again
    assert again.scheduled == [] and again.already == []
    assert load(paths.state_dir)[0].expires == NOW + HOUR


def test_prune_dry_run_changes_nothing(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    outcome = prune(pipeline, keep=1, grace=HOUR, dry_run=True, now=NOW)
    assert outcome.would == [(PRODUCT, "20240101_1200")]
    assert not os.path.exists(state_path(paths.state_dir))
    assert published(paths) == {PRODUCT: ["20240101_1200", "20240102_1200"]}


def test_an_upload_in_progress_neither_counts_nor_goes(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    partial = add_version(img, "20240103_1200", complete=False)
    outcome = prune(pipeline, keep=1, grace=HOUR, now=NOW)
    assert [p.serial for p in outcome.scheduled] == ["20240101_1200"]
    assert published(paths) == {PRODUCT: ["20240102_1200"]}
    assert partial.is_dir() and str(partial) not in {e.path for e in load(paths.state_dir)}


def test_zero_grace_deletes_at_once(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    old = add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    outcome = prune(pipeline, keep=1, grace=0, now=NOW)
    assert [p.path for p in outcome.deleted] == [str(old)]
    assert not old.exists()
    assert load(paths.state_dir) == []


def test_remove_a_version_and_a_product(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    a = add_version(img, "20240101_12:00")
    b = add_version(img, "20240102_1200", complete=False)  # not published: removable anyway
    other = add_version(img, "20240101_1200", variant="other")

    outcome = remove(pipeline, PRODUCT, "20240101_1200", grace=HOUR, now=NOW)  # other spelling
    assert [p.path for p in outcome.scheduled] == [str(a)]
    assert PRODUCT not in published(paths)

    outcome = remove(pipeline, PRODUCT, None, grace=HOUR, now=NOW + 10)
    assert [p.path for p in outcome.scheduled] == [str(b)]
    assert [p.path for p in outcome.already] == [str(a)]
    assert published(paths) == {"busybox:1.35:amd64:other": ["20240101_1200"]}

    with pytest.raises(RetentionError, match="no version 20250101_1200"):
        remove(pipeline, PRODUCT, "20250101_1200", grace=HOUR)
    with pytest.raises(RetentionError, match="no product"):
        remove(pipeline, "nope:1:amd64:default", None, grace=HOUR)
    assert delete_expired(paths, now=NOW + HOUR + 10)
    assert not a.exists() and not b.exists() and other.is_dir()
    # the emptied variant directory went too; the other product's are untouched
    assert not a.parent.exists() and other.parent.is_dir()


def test_import_again_forgets_the_prune(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    old = add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    prune(pipeline, keep=1, grace=HOUR, now=NOW)
    assert [p.path for p in unschedule(paths.state_dir, [str(old)])] == [str(old)]
    pipeline.update_all()
    assert published(paths) == {PRODUCT: ["20240101_1200", "20240102_1200"]}


def test_delete_expired_only_touches_version_directories_of_this_tree(
    paths: Paths, tmp_path: Path
) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "file").write_text("keep me")
    inside_but_not_a_version = Path(paths.img_dir) / "busybox"
    inside_but_not_a_version.mkdir()
    gone = Path(paths.img_dir) / "busybox/1.35/amd64/default/20240101_1200"
    entries = [
        {"path": str(victim), "product": "x", "serial": "y", "pruned": 0, "expires": 0},
        {"path": str(inside_but_not_a_version), "product": "x", "serial": "y", "pruned": 0,
         "expires": 0},
        {"path": str(gone), "product": PRODUCT, "serial": "20240101_1200", "pruned": 0,
         "expires": 0},
    ]  # fmt: skip
    os.makedirs(paths.state_dir)
    Path(state_path(paths.state_dir)).write_text(json.dumps({"format": 1, "pending": entries}))
    assert delete_expired(paths, now=NOW) == []
    assert (victim / "file").read_text() == "keep me"
    assert inside_but_not_a_version.is_dir()
    # the vanished version is forgotten; the others are kept (not ours to judge)
    assert {e.path for e in load(paths.state_dir)} == {
        str(victim),
        str(inside_but_not_a_version),
    }


def test_damaged_state(paths: Paths, pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    img = Path(paths.img_dir)
    add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    os.makedirs(paths.state_dir)
    Path(state_path(paths.state_dir)).write_text("{not json")
    with pytest.raises(RetentionError, match="damaged"):
        load(paths.state_dir)
    with pytest.raises(RetentionError, match="damaged"):
        prune(pipeline, keep=1, grace=HOUR)
    with pytest.raises(RetentionError, match="damaged"):
        delete_expired(paths)
    # the catalog still publishes (hiding nothing) rather than failing
    with caplog.at_level(logging.WARNING):
        assert PendingVersions(paths.state_dir)() == frozenset()
    assert "not hiding pruned versions" in caplog.text
    assert published(paths) == {PRODUCT: ["20240101_1200", "20240102_1200"]}


def test_pending_versions_rereads_only_when_changed(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    old = add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    reader = PendingVersions(paths.state_dir)
    assert reader() == frozenset()
    prune(pipeline, keep=1, grace=HOUR, now=NOW)
    assert reader() == {str(old)}
    assert reader() is reader()
    unschedule(paths.state_dir, [str(old)])
    assert reader() == frozenset()


def test_state_is_written_atomically_and_readable(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    prune(pipeline, keep=1, grace=HOUR, now=NOW)
    doc = json.loads(Path(state_path(paths.state_dir)).read_text())
    assert doc["format"] == 1
    (entry,) = doc["pending"]
    assert entry["product"] == PRODUCT and entry["serial"] == "20240101_1200"
    assert entry["expires_utc"] == "2027-01-15 09:00:00 UTC"
    assert not [n for n in os.listdir(paths.state_dir) if n.endswith(".tmp")]


# -- deletions never leave images/ (issue 9): relative to directory fds, no link followed ------


def _expired(paths: Paths, version: Path) -> None:
    os.makedirs(paths.state_dir, exist_ok=True)
    entry = {"path": str(version), "product": PRODUCT, "serial": version.name, "pruned": 0,
             "expires": 0}  # fmt: skip
    Path(state_path(paths.state_dir)).write_text(json.dumps({"format": 1, "pending": [entry]}))


def test_symlink_planted_in_a_doomed_version_keeps_its_target(paths: Paths, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file").write_text("keep me")
    doomed = add_version(Path(paths.img_dir), "20240101_1200")
    (doomed / "link-to-dir").symlink_to(precious)
    (doomed / "link-to-file").symlink_to(precious / "file")
    (doomed / "sub").mkdir()
    (doomed / "sub" / "deeper").symlink_to(precious)
    _expired(paths, doomed)
    assert [p.path for p in delete_expired(paths, now=NOW)] == [str(doomed)]
    assert not doomed.exists()
    assert (precious / "file").read_text() == "keep me"


@pytest.mark.parametrize("level", ["variant", "arch", "version"])
def test_parent_swapped_for_a_symlink_deletes_nothing_outside(
    paths: Paths, tmp_path: Path, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An uploader swaps a directory on the way to a doomed version for a symlink to an outside
    tree with the same names: the outside files survive, and the entry is kept."""
    img = Path(paths.img_dir)
    doomed = add_version(img, "20240101_1200")
    outside = add_version(tmp_path / "outside", "20240101_1200")
    (outside / "file").write_text("keep me")
    up = {"version": 0, "variant": 1, "arch": 2}[level]
    inner, outer = doomed, outside
    for _ in range(up):
        inner, outer = inner.parent, outer.parent
    inner.rename(inner.with_name(".moved-away"))
    inner.symlink_to(outer)
    _expired(paths, doomed)
    with caplog.at_level(logging.WARNING):
        assert delete_expired(paths, now=NOW) == []
    assert (outside / "file").read_text() == "keep me"
    assert (outside / "rootfs.squashfs").exists()
    assert inner.is_symlink()
    assert "symbolic link" in caplog.text


def test_nested_state_file_is_damaged_not_a_crash(paths: Paths) -> None:
    os.makedirs(paths.state_dir)
    Path(state_path(paths.state_dir)).write_text('{"pending": ' + "[" * 5000)
    with pytest.raises(RetentionError, match="damaged"):
        load(paths.state_dir)
    assert PendingVersions(paths.state_dir)() == frozenset()
