"""`update` and `watch`: publishing the tree once, or whenever it changes, and pushing it to the
mirrors; and the pipeline the operator commands publish with.

These are the use cases the command line calls (one call each): they sit above the pipeline,
the deltas, retention and the mirrors, and say what happened by their return value or by an
exception of their own (`MirrorsFailed`), never by an exit code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lxd_image_server.catalog.deltawork import BACKGROUND, FOREGROUND, DeltaService
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.pipeline import Pipeline, Use
from lxd_image_server.catalog.retention import Retention, RetentionError, delete_expired
from lxd_image_server.config import Paths
from lxd_image_server.gcpause import cyclic_gc_paused
from lxd_image_server.progress import ProgressStart
from lxd_image_server.settings import Settings
from lxd_image_server.tree.scan import Exclude

log = logging.getLogger(__name__)
T = TypeVar("T")


class MirrorsFailed(Exception):
    """`update` published, but the push to at least one mirror failed."""


def retention_of(settings: Settings) -> Retention:
    """[retention] with the grace period of [prune], for the pipeline."""
    return Retention(settings.retention, settings.prune_grace)


def with_pipeline(
    paths: Paths,
    settings: Settings,
    run: Callable[[Pipeline], T],
    progress_start: ProgressStart | None = None,
    cache_first: Callable[[HashCache], object] | None = None,
) -> T:
    """`run` with a pipeline that publishes as the watcher does ([retention] included): what
    the operator commands (import, prune, remove) publish with."""
    cache = HashCache(paths.cache_path)
    try:
        if cache_first is not None:
            cache_first(cache)
        pipeline = Pipeline(
            paths,
            cache,
            use=Use.OPERATOR,
            progress_start=progress_start,
            retention=retention_of(settings),
        )
        return run(pipeline)
    finally:
        cache.close()


def _delete_expired(paths: Paths) -> None:
    try:
        delete_expired(paths)  # pruned versions whose grace period is over
    except RetentionError as e:
        log.error("not deleting pruned versions: %s", e)


@dataclass(frozen=True)
class UpdateResult:
    changed: bool
    #: versions the scan found (the products are built only when something asks for them)
    versions: int


def update(
    paths: Paths,
    settings: Settings,
    rehash: bool = False,
    progress_start: ProgressStart | None = None,
) -> UpdateResult:
    """`update`: deletes the expired versions, publishes the tree (with the deltas still
    missing, made now), deletes what [retention] took out without a grace period, and pushes
    to every configured mirror. MirrorsFailed: a push failed (the catalog is published).
    The cyclic garbage collector is paused throughout (gcpause.py): what the pipeline builds
    lives until the end, and a collection after its update_all would walk it all once more."""
    with cyclic_gc_paused():
        return _update(paths, settings, rehash, progress_start)


def _update(
    paths: Paths, settings: Settings, rehash: bool, progress_start: ProgressStart | None
) -> UpdateResult:
    _delete_expired(paths)
    cache = HashCache(paths.cache_path)
    try:
        deltas = DeltaService(paths.img_dir, paths.state_dir, settings.deltas, FOREGROUND)
        # (with the deltas still missing made, checked and published too: FOREGROUND)
        pipeline = Pipeline(
            paths,
            cache,
            use=Use.UPDATE,
            progress_start=progress_start,
            retention=retention_of(settings),
            deltas=deltas,
        )
        changed = pipeline.update_all(rehash=rehash)
    finally:
        cache.close()
    _delete_expired(paths)  # with no grace period, what [retention] took out just now
    result = UpdateResult(changed, len(pipeline.known))
    if not changed:
        log.info("catalog unchanged (%d versions scanned)", result.versions)
    if settings.mirrors:
        from lxd_image_server.mirror.worker import push_once

        results = push_once(settings.mirrors, paths)
        for r in results:
            if r.ok:
                log.info("mirror %s: pushed in %.1f s", r.name, r.duration)
            else:
                log.error("mirror %s: push failed: %s", r.name, r.message)
        failed = [r.name for r in results if not r.ok]
        if failed:
            raise MirrorsFailed(f"the push to {len(failed)} mirror(s) failed: {', '.join(failed)}")
    return result


def watch(
    paths: Paths,
    settings: Settings,
    reload_settings: Callable[[], Settings],
    max_watches: int,
    rescan_interval: float,
) -> None:
    """`watch`: publishes the tree, then republishes on every change and pushes to the mirrors
    after each publish, until stopped (SIGTERM, SIGINT). On SIGHUP the settings come
    from `reload_settings` (which raises to keep the old ones) and are applied to the mirrors,
    [retention] and the deltas."""
    from lxd_image_server.catalog.watch import Watcher
    from lxd_image_server.mirror.worker import Mirrors

    mirrors = Mirrors(paths)
    deltas = DeltaService(paths.img_dir, paths.state_dir, settings.deltas, BACKGROUND)

    def reload() -> None:
        new = reload_settings()
        mirrors.configure(new.mirrors)
        watcher.pipeline.reload(retention_of(new))
        deltas.configure(new.deltas)

    cache = HashCache(paths.cache_path)

    def pipeline_for(exclude: Exclude, wake: Callable[[], None]) -> Pipeline:
        return Pipeline(
            paths,
            cache,
            use=Use.WATCH,
            retention=retention_of(settings),
            deltas=deltas,
            on_publish=[mirrors.request],
            on_hashed=wake,
            exclude=exclude,
        )

    try:
        mirrors.configure(settings.mirrors)
        watcher = Watcher(
            paths,
            pipeline_for,
            on_reload=reload,
            pid_file=paths.state.watch_pid,
            publish_socket=paths.state.publish_socket,
            max_watches=max_watches,
            rescan_interval=rescan_interval,
        )
        watcher.run()
    finally:
        mirrors.stop()
        cache.close()
