"""`prune` and `remove`: the operator use cases that take versions out of the catalog.

They sit above the pipeline (they run it: the catalog is rebuilt to choose from and republished
without the chosen versions); the record of pruned versions they write, and the deletion of
expired ones, are retention.py's, below the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.retention import (
    Pending,
    RetentionError,
    arrivals,
    delete_expired,
    parse_product,
    schedule,
    select_prunable,
)
from lxd_image_server.tree.layout import serial_sort_key
from lxd_image_server.tree.scan import ScannedVersion

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
    matches = [v for v in pipeline.versions.values() if v.key.product == product]
    if not matches:
        raise RetentionError(f"no product {product} in {pipeline.paths.img_dir}")
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
    if dry_run:
        return Outcome(would=[(v.key.product, v.key.serial) for v in matches])
    return _finish(pipeline, matches, grace, now)
