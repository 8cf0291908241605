"""[retention] (issue 12): the catalog writer keeps the newest N versions of each product at
every publish; the others leave that very catalog and are recorded exactly as `prune` records
them (their files stay for the grace period)."""

from __future__ import annotations

import logging
import os
import string
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.products import Products
from lxd_image_server.catalog.retention import (
    Retention,
    delete_expired,
    load,
    next_expiry,
    select_prunable,
    state_path,
)
from lxd_image_server.config import Paths
from lxd_image_server.retention_policy import KeepRule, PolicyError, RetentionPolicy
from lxd_image_server.tree import layout
from lxd_image_server.tree.scan import ScannedVersion

from .helpers import model_products
from .test_retention import HOUR, PRODUCT, add_version, published

KEEP_2 = RetentionPolicy(keep=2)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    return p


def make_pipeline(paths: Paths, policy: RetentionPolicy, grace: int = HOUR) -> Pipeline:
    return Pipeline(paths, HashCache(None), retention=Retention(policy, grace))


@pytest.fixture
def pipeline(paths: Paths) -> Iterator[Pipeline]:
    p = make_pipeline(paths, KEEP_2)
    yield p
    p.cache.close()


# -- the policy ---------------------------------------------------------------------------------


def test_rules_match_component_by_component() -> None:
    rule = KeepRule("debian/*", 1)
    assert rule.matches("debian:12:amd64:default") and rule.matches("debian:sid:arm64:cloud")
    assert not rule.matches("debian-ports:12:amd64:default")
    assert not KeepRule("deb*/1", 1).matches("debian:12:amd64:default")  # * never crosses /
    assert KeepRule("*/*/arm64", 1).matches("alpine:3.20:arm64:default")
    assert not KeepRule("*/*/arm64", 1).matches("alpine:3.20:amd64:default")
    assert KeepRule("*/*/*/cloud", 1).matches("alpine:3.20:amd64:cloud")
    assert KeepRule("alpine/3.[12]?", 1).matches("alpine:3.20:amd64:default")
    assert not KeepRule("alpine/3.[12]?", 1).matches("alpine:3.9:amd64:default")


@pytest.mark.parametrize("bad", ["debian", "a/b/c/d/e", "a//b", "a/b c", "a/b\n", "/a/b", "a/é"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(PolicyError):
        KeepRule(bad, 1)


def test_first_matching_rule_decides_and_zero_keeps_all() -> None:
    p = RetentionPolicy(3, (KeepRule("a/1", 0), KeepRule("a/*", 1)))
    assert (p.keep_for("a:1:amd64:x"), p.keep_for("a:2:amd64:x"), p.keep_for("b:1:amd64:x")) == (
        0,
        1,
        3,
    )
    assert p.active
    assert not RetentionPolicy(0, (KeepRule("a/*", 0),)).active
    assert RetentionPolicy(0, (KeepRule("a/*", 2),)).active


def test_select_by_policy_never_the_newest_nor_an_unparsable_serial(
    caplog: pytest.LogCaptureFixture,
) -> None:
    products = model_products(
        {
            "a:1:amd64:default": {"versions": {"20240101_1200": {}, "20240102_1200": {}}},
            "b:1:amd64:default": {
                "versions": {"20240101_1200": {}, "not-a-serial": {}, "20240102_1200": {}}
            },
            "c:1:amd64:default": {"versions": {"20240101_1200": {}, "20240102_1200": {}}},
        }
    )
    policy = RetentionPolicy(1, (KeepRule("c/*", 0),))
    with caplog.at_level(logging.WARNING):
        chosen = select_prunable(products, policy.keep_for)
    assert chosen == [
        ("a:1:amd64:default", "20240101_1200"),
        ("b:1:amd64:default", "20240101_1200"),
    ]
    assert "not-a-serial" in caplog.text


# -- applied by the pipeline ---------------------------------------------------------------------


def test_a_third_version_pushes_the_first_out_at_once(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    first = add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    pipeline.update_all()
    assert published(paths) == {PRODUCT: ["20240101_1200", "20240102_1200"]}
    assert not os.path.exists(state_path(paths.state_dir))

    add_version(img, "20240103_1200")
    pipeline.refresh(["busybox"])
    # one publish: the third appears and the first leaves together
    assert published(paths) == {PRODUCT: ["20240102_1200", "20240103_1200"]}
    (entry,) = load(paths.state_dir)
    assert (entry.path, entry.product, entry.serial) == (str(first), PRODUCT, "20240101_1200")
    assert entry.expires - entry.pruned == HOUR
    assert first.is_dir()  # downloadable until the grace period is over
    assert next_expiry(paths) == entry.expires

    assert delete_expired(paths, now=entry.expires - 1) == []
    assert first.is_dir()
    assert [p.path for p in delete_expired(paths, now=entry.expires)] == [str(first)]
    assert not first.exists()
    pipeline.refresh(["busybox"])
    assert published(paths) == {PRODUCT: ["20240102_1200", "20240103_1200"]}
    assert next_expiry(paths) is None


def test_an_upload_in_progress_pushes_nothing_out(paths: Paths, pipeline: Pipeline) -> None:
    img = Path(paths.img_dir)
    add_version(img, "20240101_1200")
    add_version(img, "20240102_1200")
    add_version(img, "20240103_1200", complete=False)
    pipeline.update_all()
    assert published(paths) == {PRODUCT: ["20240101_1200", "20240102_1200"]}
    assert load(paths.state_dir) == []


def test_rules_per_product(paths: Paths) -> None:
    img = Path(paths.img_dir)
    for serial in ("20240101_1200", "20240102_1200", "20240103_1200"):
        add_version(img, serial)
        add_version(img, serial, variant="cloud")
    policy = RetentionPolicy(1, (KeepRule("busybox/*/*/cloud", 0),))
    p = make_pipeline(paths, policy)
    p.update_all()
    p.cache.close()
    assert published(paths) == {
        PRODUCT: ["20240103_1200"],
        "busybox:1.35:amd64:cloud": ["20240101_1200", "20240102_1200", "20240103_1200"],
    }


def test_off_changes_nothing(paths: Paths) -> None:
    img = Path(paths.img_dir)
    for serial in ("20240101_1200", "20240102_1200", "20240103_1200"):
        add_version(img, serial)
    p = make_pipeline(paths, RetentionPolicy())
    p.update_all()
    p.cache.close()
    assert len(published(paths)[PRODUCT]) == 3
    assert not os.path.exists(state_path(paths.state_dir))


def test_a_damaged_record_keeps_everything_published(
    paths: Paths, pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    """Hidden but never recorded, a version's files would never go: nothing is hidden then."""
    img = Path(paths.img_dir)
    for serial in ("20240101_1200", "20240102_1200", "20240103_1200"):
        add_version(img, serial)
    os.makedirs(paths.state_dir, exist_ok=True)
    Path(state_path(paths.state_dir)).write_text("{not json")
    with caplog.at_level(logging.ERROR):
        pipeline.update_all()
    assert len(published(paths)[PRODUCT]) == 3
    assert "retention: cannot record" in caplog.text


def test_runs_under_the_catalog_lock(paths: Paths, pipeline: Pipeline) -> None:
    """The one writer: the policy is applied while the catalog lock is held."""
    import fcntl

    img = Path(paths.img_dir)
    for serial in ("20240101_1200", "20240102_1200", "20240103_1200"):
        add_version(img, serial)
    seen: list[bool] = []
    real = pipeline.retention
    assert real is not None

    class Probe(Retention):
        def apply(
            self,
            state_dir: str,
            products: Products,
            versions: Iterable[ScannedVersion],
            now: float | None = None,
        ) -> set[str]:
            fd = os.open(os.path.join(state_dir, "catalog.lock"), os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except BlockingIOError:
                seen.append(True)
            finally:
                os.close(fd)
            return super().apply(state_dir, products, versions, now)

    pipeline.reload(Probe(real.policy, real.grace))
    pipeline.update_all()
    assert seen and all(seen)
    assert published(paths) == {PRODUCT: ["20240102_1200", "20240103_1200"]}


# -- issue 18, finding 5: a serial ahead of the others never rewrites history ------------------


def _newest_ctime(version: Path) -> int:
    return max(f.stat().st_ctime_ns for f in version.iterdir())


def _published_after(version: Path, earlier: Path) -> None:
    """Makes sure every file of `version` changed after every file of `earlier` (ctimes are
    coarse: two versions written at once may share one)."""
    limit = _newest_ctime(earlier)
    for f in version.iterdir():
        while f.stat().st_ctime_ns <= limit:
            os.chmod(f, f.stat().st_mode)  # a change of its inode: a new ctime
            time.sleep(0.002)


def test_select_never_prunes_what_was_published_after_the_newest_kept() -> None:
    products = model_products(
        {PRODUCT: {"versions": {"20240101_1200": {}, "20240102_1200": {}, "20240110_1200": {}}}}
    )
    published = {
        (PRODUCT, "20240110_1200"): 100,  # the newest serial came first
        (PRODUCT, "20240101_1200"): 50,
        (PRODUCT, "20240102_1200"): 150,  # published after it
    }
    spared: list[tuple[str, str, str]] = []
    chosen = select_prunable(products, 1, published, lambda *a: spared.append(a))
    assert chosen == [(PRODUCT, "20240101_1200")]
    assert spared == [(PRODUCT, "20240102_1200", "20240110_1200")]
    # without the times: the serials alone decide, as `prune --keep` did
    assert len(select_prunable(products, 1)) == 2


def test_a_far_future_serial_on_disk_never_pushes_real_versions_out(
    paths: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    """99991231_2359, placed before such serials were refused: with keep = 1 it would be the one
    version kept, every real one (and every later upload) leaving the catalog, then the disk."""
    img = Path(paths.img_dir)
    future = add_version(img, "99991231_2359")
    add_version(img, "20240101_1200")
    second = add_version(img, "20240102_1200")
    p = make_pipeline(paths, RetentionPolicy(keep=1))
    with caplog.at_level(logging.WARNING):
        p.update_all()
    assert published(paths) == {PRODUCT: ["20240102_1200"]}
    assert [e.serial for e in load(paths.state_dir)] == ["20240101_1200"]
    assert "ahead of this server's clock" in caplog.text
    third = add_version(img, "20240103_1200")
    _published_after(third, second)
    p.refresh(["busybox"])
    p.cache.close()
    assert published(paths) == {PRODUCT: ["20240103_1200"]}
    assert future.is_dir()  # not the catalog writer's to delete: `remove` or DELETE does that


def test_versions_published_after_the_newest_kept_stay(
    paths: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    """A serial a little ahead (less than a day: accepted) came first; real versions uploaded
    after it have older serials. Retention keeps them until a newer one is published."""
    img = Path(paths.img_dir)
    now = time.time()
    ahead = time.strftime("%Y%m%d_%H%M", time.gmtime(now + 20 * HOUR))
    before = time.strftime("%Y%m%d_%H%M", time.gmtime(now - 3 * HOUR))
    real = [time.strftime("%Y%m%d_%H%M", time.gmtime(now - h * HOUR)) for h in (2, 1)]
    old = add_version(img, before)
    first = add_version(img, ahead)
    _published_after(first, old)
    later = first
    for serial in real:
        d = add_version(img, serial)
        _published_after(d, later)
        later = d
    p = make_pipeline(paths, RetentionPolicy(keep=1))
    with caplog.at_level(logging.WARNING):
        p.update_all()
        p.update_all()
    assert published(paths) == {PRODUCT: sorted([ahead, *real])}
    assert [e.serial for e in load(paths.state_dir)] == [before]
    spared = [r.getMessage() for r in caplog.records if "stays although" in r.getMessage()]
    assert len(spared) == 2  # one line each, not one per publish
    newest = add_version(img, time.strftime("%Y%m%d_%H%M", time.gmtime(now + 21 * HOUR)))
    _published_after(newest, later)
    p.refresh(["busybox"])
    p.cache.close()
    assert list(published(paths)[PRODUCT]) == [newest.name]


def test_patterns_name_what_the_layout_names() -> None:
    """retention_policy sits in the foundation (settings refuses a bad pattern when it reads the
    file) and so cannot import tree/layout: what it knows of the layout is checked here. Every
    name the layout accepts is a pattern component, and a product is matched by its names."""
    chars = "".join(c for c in string.printable if layout.valid_name("a" + c))
    assert set(chars) >= set("._+~-") and "/" not in chars and ":" not in chars
    key = layout.VersionKey(f"os{chars}", f"1{chars}", "amd64", f"v{chars}", "20240101_0000")
    names = (key.os, key.release, key.arch, key.variant)
    for n in range(2, 5):
        assert KeepRule("/".join(names[:n]), 1).matches(key.product)
    assert not KeepRule("/".join((*names[:3], "other")), 1).matches(key.product)
