"""`import`: one or several images placed into the tree and published once.

1. plan every image (import_batch.py: which files; import_detect.py: what they are, where they
   go): a file that is no image, or two images naming one version, and nothing is imported;
2. stage each (import_place.py: copied or moved, hashed, fsynced under a hidden name) and hand
   its digests to the catalog writer (import_handover.py); a failure takes back all staged;
3. reveal them all (renamed into place), one after the other in a few microseconds, so that
   the watcher sees them together;
4. publish once: the running watcher is asked to (catalog/publish_requests.py: it rescans only
   those versions and publishes at once), or, without one (or when it does not answer), this
   command publishes the whole tree itself under the catalog lock, as `update` does.
While the files are copied (hashing runs outside the interpreter's lock), a thread imports what
the command needs after the copy: the handover, the watcher's channel and, with no watcher
running, the pipeline and the page it publishes with (_publisher_loaded): a command per image
no longer pays those imports (~50 ms) after its copy.
Started as root, it reads the sources as root and becomes the catalog writer
(privileges.become_writer) before it publishes.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lxd_image_server.config import Paths
from lxd_image_server.ops import import_detect, import_place
from lxd_image_server.ops.import_detect import ImagePlan
from lxd_image_server.ops.import_errors import ImportFailed, NamingError, VersionExists
from lxd_image_server.ops.import_naming import Naming
from lxd_image_server.ops.import_place import Placed, Staged
from lxd_image_server.privileges import become_writer
from lxd_image_server.progress import ProgressStart
from lxd_image_server.settings import Settings

if TYPE_CHECKING:
    from lxd_image_server.catalog.hashcache import HashCache
    from lxd_image_server.catalog.pipeline import Pipeline
    from lxd_image_server.ops.import_early import EarlyRoot

# (the pipeline, the hash cache and retention are imported where they are used: an import
# the running watcher publishes loads none of them; each image imported pays its start-up)

#: what every import needs once its files are copied (the digests handed over, the watcher
#: asked), and what publishing without a watcher imports (updating: the pipeline, the hash
#: cache, retention; the page): loaded in a thread while the images are copied
#: (_publisher_loaded)
AFTER_COPY_MODULES = (
    "lxd_image_server.ops.import_handover",
    "lxd_image_server.catalog.publish_requests",
)
PUBLISHER_MODULES = ("lxd_image_server.ops.updating", "lxd_image_server.catalog.page")

log = logging.getLogger(__name__)


@dataclass
class ImportResult:
    placed: list[tuple[ImagePlan, Placed]] = field(default_factory=list)
    #: images not placed (their version appeared meanwhile): plan -> why
    failed: list[tuple[ImagePlan, str]] = field(default_factory=list)
    #: version directories (relative to images/) placed but not in the catalog -> why
    missing: dict[str, str] = field(default_factory=dict)
    #: the running watcher published them (else this command did)
    by_watcher: bool = False


def plan_all(groups: Sequence[tuple[str, ...]], naming: Naming) -> list[ImagePlan]:
    """The plan of each image; NamingError/ImportFailed before anything is placed."""
    if len(groups) > 1 and naming.serial is not None:
        raise NamingError("--serial names one version: import one image at a time with it")
    plans = [import_detect.plan_import(files, naming) for files in groups]
    seen: dict[str, ImagePlan] = {}
    for plan in plans:
        other = seen.get(plan.key.relpath)
        if other is not None:
            raise NamingError(
                f"{_names(other)} and {_names(plan)} are both {plan.key.product} "
                f"{plan.key.serial}; nothing imported"
            )
        seen[plan.key.relpath] = plan
    return plans


def import_images(
    paths: Paths,
    settings: Settings,
    plans: Sequence[ImagePlan],
    move: bool = False,
    force: bool = False,
    progress_start: ProgressStart | None = None,
    publish_progress: ProgressStart | None = None,
    early: EarlyRoot | None = None,
) -> ImportResult:
    """Places the images of `plans` and publishes them once (module docstring).
    ImportFailed (VersionExists) when one cannot be staged: then none is placed.
    `progress_start`: each image's copy; `publish_progress`: hashing, when this command
    publishes itself; `early`: a root's copy started with the command (import_early.py),
    closed here once the images are staged."""
    staged: list[tuple[ImagePlan, Staged]] = []
    with _publisher_loaded(paths):
        try:
            for plan in plans:
                staged.append((plan, _stage(paths, plan, move, force, progress_start, early)))
        except BaseException:
            for _, s in reversed(staged):
                s.abort()
            raise
        finally:
            if early is not None:
                early.close()  # (before this process becomes the catalog writer)
    result = ImportResult()
    for plan, s in staged:
        try:
            result.placed.append((plan, s.reveal()))
        except (ImportFailed, OSError) as e:
            result.failed.append((plan, str(e)))
    if not result.placed:
        return result
    # the files are in place (as root, the sources may be root's); what follows writes the
    # catalog side: as its writer
    become_writer(paths)
    version_dirs = [p.version_dir for _, p in result.placed]
    if os.path.exists(paths.state.pruned):  # (versions pruned: one may be imported again)
        from lxd_image_server.catalog import retention

        if any(retention.pending_for(paths.state_dir, d) for d in version_dirs):
            retention.unschedule(paths.state_dir, version_dirs)
    _publish(paths, settings, [p for _, p in result.placed], publish_progress, result)
    return result


@contextmanager
def _publisher_loaded(paths: Paths) -> Iterator[None]:
    """What the command needs after the copy (AFTER_COPY_MODULES and, with no watcher
    running, PUBLISHER_MODULES) is imported in a thread during the block (the copy: its
    hashing runs without the interpreter's lock, so the imports cost it little), and is
    loaded when the block ends. A failed import is left to the code that uses the module (it
    imports it again and reports what fails)."""
    loader = threading.Thread(target=_preload, args=(paths.state.watch_pid,), name="import-preload")
    loader.start()
    try:
        yield
    finally:
        loader.join()


def _preload(pid_file: str) -> None:
    if not _load(AFTER_COPY_MODULES):
        return
    from lxd_image_server.catalog.publish_requests import running_watcher

    try:
        running_watcher(pid_file)
    except ProcessLookupError:
        _load(PUBLISHER_MODULES)


def _load(modules: Sequence[str]) -> bool:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # (ImportError and what a module's own code may raise)
            log.debug("preloading %s failed: %s", name, e)
            return False
    return True


def _hand_over(paths: Paths, dir_fd: int, placed: Placed) -> None:
    from lxd_image_server.ops.import_handover import hand_over_placed

    hand_over_placed(paths, dir_fd, placed)


def _stage(
    paths: Paths,
    plan: ImagePlan,
    move: bool,
    force: bool,
    progress_start: ProgressStart | None,
    early: EarlyRoot | None,
) -> Staged:
    version_dir = os.path.join(paths.img_dir, plan.key.relpath)
    try:
        return import_place.stage(
            plan,
            paths.img_dir,
            move=move,
            force=force,
            progress_start=progress_start,
            on_filled=lambda fd, placed: _hand_over(paths, fd, placed),
            early=early,
        )
    except VersionExists as e:
        from lxd_image_server.catalog import retention

        pending = retention.pending_for(paths.state_dir, version_dir)
        if pending is None:
            raise
        raise VersionExists(
            f"{e} (it was pruned; its files go after {retention.utc_text(pending.expires)})"
        ) from e


def _publish(
    paths: Paths,
    settings: Settings,
    placed: list[Placed],
    progress_start: ProgressStart | None,
    result: ImportResult,
) -> None:
    from lxd_image_server.catalog.publish_requests import request_publish

    rels = [p.key.relpath for p in placed]
    answer = request_publish(paths.state.publish_socket, paths.state.watch_pid, paths.img_dir, rels)
    if answer is not None:
        result.by_watcher = True
        result.missing = dict(answer.missing)
        return

    from lxd_image_server.ops.updating import with_pipeline

    def cache_first(cache: HashCache) -> None:
        for p in placed:
            import_place.seed_cache(cache, paths.img_dir, p)

    def publish(pipeline: Pipeline) -> set[str]:
        pipeline.update_all()
        return pipeline.listing().versions(paths.served_images)

    listed = with_pipeline(paths, settings, publish, progress_start, cache_first)
    result.missing = {
        rel: "not listed: see the messages above" for rel in rels if rel not in listed
    }


def _names(plan: ImagePlan) -> str:
    return " + ".join(os.path.basename(s.path) for s in plan.sources)
