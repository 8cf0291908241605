"""`prune` and `remove`: the operator use cases that take versions out of the catalog.

They sit above the pipeline (they run it: the catalog is rebuilt to choose from and republished
without the chosen versions); the record of pruned versions they write, and the deletion of
expired ones, are retention.py's, below the pipeline. `remove` with a watcher running on the
tree scans only the product and asks the watcher to publish without the versions chosen
(`remove_by_watcher`: catalog/publish_requests.py), as `import` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.publish_requests import request_publish, running_watcher
from lxd_image_server.catalog.retention import (
    Pending,
    RetentionError,
    arrivals,
    delete_expired,
    parse_product,
    schedule,
    select_prunable,
)
from lxd_image_server.config import Paths
from lxd_image_server.tree.layout import serial_sort_key
from lxd_image_server.tree.scan import ScannedVersion, Scanner

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
    rels = [v.key.relpath for v in matches]
    answer = request_publish(paths.state.publish_socket, paths.state.watch_pid, paths.img_dir, rels)
    if answer is None:
        publish_here()
    elif answer.listed:
        raise WatcherListsThem(
            f"the running watcher still lists {', '.join(answer.listed)}; see its log"
        )
    outcome.deleted = delete_expired(paths, now=now)
    return outcome


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
