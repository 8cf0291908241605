"""`prune` and `remove`: the operator use cases that take versions out of the catalog.

They sit above the pipeline (they run it: the catalog is rebuilt to choose from and republished
without the chosen versions); the record of pruned versions they write, and the deletion of
expired ones, are retention.py's, below the pipeline. With a watcher running on the tree, each
costs what it changes: the watcher publishes without the versions chosen
(catalog/publish_requests.py), as it does for `import`:
- `remove` scans only the product (`remove_by_watcher`);
- `prune` chooses from the record of the last publish (catalog/published.py: the versions the
  watcher published, with their files and sizes), and scans only the products with more
  versions than it keeps, each of which must be on disk exactly as the record lists it
  (`prune_by_watcher`). A record that cannot be read, names anything but this tree's version
  directories, or differs from the disk for one of those products is not chosen from: one log
  line, and `prune` builds the whole catalog itself, as without a watcher.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lxd_image_server.catalog import published
from lxd_image_server.catalog.publish_requests import request_publish, running_watcher
from lxd_image_server.catalog.retention import (
    Pending,
    RetentionError,
    arrivals,
    delete_expired,
    load,
    parse_product,
    schedule,
    select_prunable,
)
from lxd_image_server.config import Paths
from lxd_image_server.tree.layout import LayoutError, parse_version_dir, serial_sort_key
from lxd_image_server.tree.scan import ScannedVersion, Scanner

if TYPE_CHECKING:
    from lxd_image_server.catalog.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    #: newly out of the catalog
    scheduled: list[Pending] = field(default_factory=list)
    #: were already out of the catalog
    already: list[Pending] = field(default_factory=list)
    #: files deleted now (their grace period was over)
    deleted: list[Pending] = field(default_factory=list)
    #: --dry-run: (product, serial) that would go
    would: list[tuple[str, str]] = field(default_factory=list)
    #: the running watcher published the catalog without them
    by_watcher: bool = False


def _prefixes(versions: Iterable[ScannedVersion]) -> set[str]:
    return {v.key.relpath.rsplit("/", 1)[0] for v in versions}


def _finish(
    pipeline: Pipeline, doomed: list[ScannedVersion], grace: int, now: float | None
) -> Outcome:
    outcome = Outcome()
    outcome.scheduled, outcome.already = schedule(pipeline.paths.state_dir, doomed, grace, now=now)
    if outcome.scheduled:
        pipeline.refresh(_prefixes(doomed))
    outcome.deleted = delete_expired(pipeline.paths, now=now)
    return outcome


def _tell_spared(product: str, serial: str, newest: str) -> None:
    log.warning(
        "%s %s stays: it was published after %s, the newest version kept", product, serial, newest
    )


def retire(
    state_dir: str, versions: list[ScannedVersion], grace: int, now: float | None = None
) -> list[Pending]:
    """Records `versions` as pruned (their files go after `grace` seconds), before a publish
    that then leaves them out: what `sync` does with the versions upstream's newest no longer
    cover. -> those newly recorded."""
    return schedule(state_dir, versions, grace, now=now)[0]


def prune(
    pipeline: Pipeline, keep: int, grace: int, dry_run: bool = False, now: float | None = None
) -> Outcome:
    """Takes every version but the newest `keep` of each product out of the catalog.

    Only published versions count (an upload still in progress is neither kept nor pruned).
    """
    pipeline.update_all()
    by_key = {(v.key.product, v.key.serial): v for v in pipeline.versions.values()}
    chosen = select_prunable(
        pipeline.products, keep, arrivals(pipeline.versions.values()), _tell_spared
    )
    if dry_run:
        return Outcome(would=chosen)
    return _finish(pipeline, [by_key[c] for c in chosen], grace, now)


def prune_by_watcher(
    paths: Paths,
    keep: int,
    grace: int,
    publish_here: Callable[[], object],
    dry_run: bool = False,
    now: float | None = None,
) -> Outcome | None:
    """`prune` when a watcher runs on the tree: the versions are chosen from the record of the
    last publish (only the products with more than `keep` versions scanned, each found on disk
    as listed) and the watcher publishes without them. None, with nothing done, when no
    watcher runs or the record cannot be chosen from (logged): `prune` with a pipeline of
    one's own. `publish_here` when the watcher does not take them once they are recorded (or
    they are more than one request names); WatcherListsThem when it still lists one."""
    try:
        running_watcher(paths.state.watch_pid)
    except ProcessLookupError:
        return None
    found = _published_beyond(paths, keep)
    if found is None:
        return None
    products, scanned = found
    by_key = {(v.key.product, v.key.serial): v for v in scanned}
    chosen = select_prunable(products, keep, arrivals(scanned), _tell_spared)
    if dry_run:
        return Outcome(would=chosen)
    doomed = [by_key[c] for c in chosen]
    outcome = Outcome()
    outcome.scheduled, outcome.already = schedule(paths.state_dir, doomed, grace, now=now)
    if outcome.scheduled:
        outcome.by_watcher = _hand_over(paths, doomed, publish_here)
    outcome.deleted = delete_expired(paths, now=now)
    return outcome


@dataclass(frozen=True)
class _Listed:
    """A product as the record of the last publish lists it: its serials (what choosing needs:
    retention.Versioned)."""

    versions: dict[str, dict[str, int]]


class _NotTheTree(Exception):
    """The record of the last publish cannot be chosen from (the message says why)."""


class _Damaged(_NotTheTree):
    """It names something that is no version directory of the layout."""


class _Stale(_NotTheTree):
    """It no longer says what is on disk for a product (a change the watcher has not
    published yet, or another tree's record in a shared state directory)."""


def _published_beyond(
    paths: Paths, keep: int
) -> tuple[dict[str, _Listed], list[ScannedVersion]] | None:
    """The products the last publish listed with more than `keep` versions, and their
    versions as scanned now; None (one log line) when the record cannot be chosen from."""
    record = published.read_crowded(paths.state_dir, paths.served_images, keep)
    if record is None:
        damaged = os.path.lexists(paths.state.published)  # (then said there, in one line)
        log.log(
            logging.DEBUG if damaged else logging.INFO,
            "no usable record of the last publish: choosing from the whole tree",
        )
        return None
    try:
        pending = {p.path for p in load(paths.state_dir)} if record else set()
        listed = _by_product(paths, record, pending)
        beyond = {k: p for k, p in listed.items() if len(p.versions) > keep}
        scanned: list[ScannedVersion] = []
        scanner = Scanner(paths.img_dir)
        for product, entry in beyond.items():
            scanned += _as_listed(scanner.scan(product.replace(":", "/")), entry, pending)
    except _NotTheTree as e:
        log.log(
            logging.WARNING if isinstance(e, _Damaged) else logging.INFO,
            "the record of the last publish %s %s: choosing from the whole tree",
            paths.state.published,
            e,
        )
        return None
    return beyond, scanned


def _by_product(
    paths: Paths, record: dict[str, dict[str, dict[str, int]]], pending: set[str]
) -> dict[str, _Listed]:
    """The record's versions by product key (but those recorded as pruned); _NotTheTree when
    one is not a version directory as the layout names it."""
    out: dict[str, _Listed] = {}
    for directory, versions in record.items():
        for serial, files in versions.items():
            rel = f"{directory}/{serial}"
            try:
                key = parse_version_dir(rel.split("/"))
            except LayoutError as e:
                raise _Damaged(f"is damaged: it lists {rel[:200]!r} ({e})") from None
            if os.path.join(paths.img_dir, rel) in pending:
                continue
            out.setdefault(key.product, _Listed({})).versions[key.serial] = files
    return out


def _as_listed(
    scanned: list[ScannedVersion], entry: _Listed, pending: set[str]
) -> list[ScannedVersion]:
    """`scanned` (a product's versions on disk), or _Stale unless they are the ones `entry`
    lists with the files it lists at their sizes (versions recorded as pruned, and empty
    directories, aside)."""
    on_disk = {v.key.serial: v for v in scanned if v.files and v.path not in pending}
    differ = sorted(entry.versions.keys() ^ on_disk.keys())
    if differ:
        where = "on disk, not published yet" if differ[0] in on_disk else "gone from disk"
        raise _Stale(f"is not the tree: {differ[0]} is {where}")
    for serial, files in entry.versions.items():
        have = on_disk[serial].files
        for name, size in files.items():
            if name not in have or have[name].size != size:
                raise _Stale(f"is not the tree: {serial}/{name} changed since")
    return list(on_disk.values())


def remove(
    pipeline: Pipeline,
    product: str,
    serial: str | None,
    grace: int,
    dry_run: bool = False,
    now: float | None = None,
) -> Outcome:
    """Takes a product (every version, published or not) or one version out of the catalog."""
    parse_product(product)
    pipeline.update_all()
    matches = _chosen(list(pipeline.versions.values()), pipeline.paths, product, serial)
    if dry_run:
        return Outcome(would=[(v.key.product, v.key.serial) for v in matches])
    return _finish(pipeline, matches, grace, now)


class WatcherListsThem(RetentionError):
    """The running watcher still lists versions `remove` took out (it says why not)."""


def remove_by_watcher(
    paths: Paths,
    product: str,
    serial: str | None,
    grace: int,
    publish_here: Callable[[], object],
    dry_run: bool = False,
    now: float | None = None,
) -> Outcome | None:
    """`remove` when a watcher runs on the tree: only the product's directory is scanned, and
    the watcher publishes without the versions chosen (it rescans only those). None when no
    watcher runs (nothing done: `remove` with a pipeline of one's own); `publish_here` when
    the watcher does not answer once they are recorded. WatcherListsThem when the watcher
    still lists one."""
    parse_product(product)
    try:
        running_watcher(paths.state.watch_pid)
    except ProcessLookupError:
        return None
    if dry_run:
        found = Scanner(paths.img_dir).scan(product.replace(":", "/"))
        matches = _chosen(found, paths, product, serial)
        return Outcome(would=[(v.key.product, v.key.serial) for v in matches])
    found = Scanner(paths.img_dir).scan(product.replace(":", "/"))
    matches = _chosen(found, paths, product, serial)
    outcome = Outcome()
    outcome.scheduled, outcome.already = schedule(paths.state_dir, matches, grace, now=now)
    outcome.by_watcher = _hand_over(paths, matches, publish_here)
    outcome.deleted = delete_expired(paths, now=now)
    return outcome


def _hand_over(
    paths: Paths, versions: list[ScannedVersion], publish_here: Callable[[], object]
) -> bool:
    """The running watcher publishes the catalog without `versions` (recorded as pruned
    already): True. False when it did not take them and `publish_here` did;
    WatcherListsThem when it still lists one."""
    rels = [v.key.relpath for v in versions]
    answer = request_publish(paths.state.publish_socket, paths.state.watch_pid, paths.img_dir, rels)
    if answer is None:
        publish_here()
        return False
    if answer.listed:
        raise WatcherListsThem(
            f"the running watcher still lists {', '.join(answer.listed)}; see its log"
        )
    return True


def _chosen(
    versions: list[ScannedVersion], paths: Paths, product: str, serial: str | None
) -> list[ScannedVersion]:
    """The versions of `product` (all, or the one `serial` names) among `versions`, oldest
    first; RetentionError when there are none."""
    matches = [v for v in versions if v.key.product == product]
    if not matches:
        raise RetentionError(f"no product {product} in {paths.img_dir}")
    if serial is not None:
        exact = [v for v in matches if v.key.serial == serial]
        if not exact:  # another spelling of the same time (20240101_1200 for 20240101_12:00)
            digits = serial_sort_key(serial)[0]
            exact = [v for v in matches if serial_sort_key(v.key.serial)[0] == digits]
        if len(exact) != 1:
            have = ", ".join(sorted((v.key.serial for v in matches), key=serial_sort_key))
            raise RetentionError(f"{product} has no version {serial} (it has {have})")
        matches = exact
    matches.sort(key=lambda v: serial_sort_key(v.key.serial))
    return matches
