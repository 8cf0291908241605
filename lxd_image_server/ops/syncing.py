"""`sync`: a chosen set of an upstream simplestreams remote's images brought into the tree and
published.

One sync: the upstream's streams/v1/index.json, then the images.json it names (both read
bounded: sync_fetch.py); the versions wanted (sync_select.py); those the tree does not hold yet
downloaded, a few at once, each checked and placed whole (sync_place.py), one log line per
version, its digests handed to the catalog writer (import_handover.py); then, if any landed,
one publish, as `import` publishes: by the running watcher at our request (it rescans only
those versions), else through a pipeline of our own. A sync that finds nothing new makes those
two requests and nothing else, and does not publish.

A version that fails (a bad item, a wrong hash, a size that lies, a cut or stalled download)
is reported in one line naming it and the item; nothing of it is placed; the others go on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lxd_image_server.catalog import retention
from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.model import index_from_json
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.publish_requests import request_publish
from lxd_image_server.config import Paths
from lxd_image_server.fsutil import exclusive_lock
from lxd_image_server.ops import pruning
from lxd_image_server.ops.import_errors import VersionExists
from lxd_image_server.ops.import_handover import hand_over
from lxd_image_server.ops.sync_fetch import (
    DEFAULT_TIMEOUT,
    MAX_CATALOG_BYTES,
    MAX_INDEX_BYTES,
    Connection,
    FetchFailed,
    SyncError,
    check_item_path,
    parse_upstream,
    ssl_context,
)
from lxd_image_server.ops.sync_place import Landed, VersionFailed, clear_leftovers, sync_version
from lxd_image_server.ops.sync_select import Filters, Selection, VersionPlan, select
from lxd_image_server.ops.updating import with_pipeline
from lxd_image_server.progress import Progress, ProgressStart, human, no_progress
from lxd_image_server.settings import Settings
from lxd_image_server.tree.layout import Role, serial_sort_key, valid_serial
from lxd_image_server.tree.scan import ScannedVersion, Scanner

log = logging.getLogger(__name__)

INDEX_PATH = "streams/v1/index.json"
DEFAULT_JOBS = 4
#: image-downloads documents read from one index, at most
MAX_DOCUMENTS = 16


@dataclass(frozen=True)
class SyncRequest:
    url: str
    filters: Filters
    keep: int = 1
    cafile: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    jobs: int = DEFAULT_JOBS
    dry_run: bool = False


@dataclass
class SyncResult:
    upstream: str
    selected: list[VersionPlan] = field(default_factory=list)
    #: selected versions the tree holds already
    present: list[VersionPlan] = field(default_factory=list)
    landed: list[Landed] = field(default_factory=list)
    #: one line per version that failed or was refused
    failed: list[str] = field(default_factory=list)
    published: bool = False
    #: HTTP requests made
    requests: int = 0
    #: product -> the serials of it selected (upstream's newest `keep`), oldest first
    kept: dict[str, list[str]] = field(default_factory=dict)
    #: (product, serial) taken out of the catalog: no longer among upstream's newest
    retired: list[tuple[str, str]] = field(default_factory=list)

    @property
    def missing(self) -> list[VersionPlan]:
        held = {id(p) for p in self.present}
        return [p for p in self.selected if id(p) not in held]


def read_upstream(conn: Connection) -> dict[str, Any]:
    """The upstream's catalog: the products of every image-downloads document its index names
    (merged; the first document naming a product wins). SyncError (one line) otherwise."""
    where = f"{conn.upstream.url}/{INDEX_PATH}"
    try:
        index = index_from_json(conn.document(INDEX_PATH, MAX_INDEX_BYTES))
    except (FetchFailed, ValueError) as e:
        raise SyncError(f"{where}: {e}") from None
    paths = [e.path for e in index.index.values() if e.datatype == "image-downloads" and e.products]
    if not paths:
        raise SyncError(f"{where}: names no image-downloads document with products")
    products: dict[str, Any] = {}
    for path in paths[:MAX_DOCUMENTS]:
        try:
            check_item_path(path)
        except ValueError as e:
            raise SyncError(f"{where}: {e}") from None
        try:
            doc = conn.document(path, MAX_CATALOG_BYTES)
        except FetchFailed as e:
            raise SyncError(f"{conn.upstream.url}/{path}: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("products"), dict):
            raise SyncError(f"{conn.upstream.url}/{path}: not a products:1.0 document")
        for name, product in doc["products"].items():
            products.setdefault(name, product)
    return {"products": products}


def _present(img_dir: str, plan: VersionPlan) -> bool:
    return os.path.lexists(os.path.join(img_dir, plan.key.relpath))


class _Shared:
    """A progress callback several threads may call at once."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.progress(n)


def sync(
    request: SyncRequest,
    paths: Paths,
    settings: Settings,
    progress_start: ProgressStart | None = None,
) -> SyncResult:
    """One sync of `request` into the tree of `paths` (see the module's text)."""
    upstream = parse_upstream(request.url)
    context = ssl_context(request.cafile)
    result = SyncResult(upstream.url)
    conns = [Connection(upstream, context, request.timeout)]
    try:
        chosen: Selection = select(read_upstream(conns[0]), request.filters, request.keep)
        result.failed.extend(chosen.refused)
        for line in chosen.refused:
            log.error("not synced: %s", line)
        result.kept = chosen.kept
        result.selected = chosen.plans
        result.present = [p for p in chosen.plans if _present(paths.img_dir, p)]
        if request.dry_run:
            return result
        missing = result.missing
        if missing:
            os.makedirs(paths.img_dir, 0o755, exist_ok=True)
            for _ in range(min(request.jobs, len(missing)) - 1):
                conns.append(Connection(upstream, context, request.timeout))
            total = sum(p.size for p in missing)
            progress = _Shared(progress_start(total) if progress_start else no_progress)
            with exclusive_lock(paths.state.sync_lock):
                clear_leftovers(paths.img_dir, [p.key for p in missing])
                _download_all(paths, missing, conns, progress, result)
    finally:
        result.requests = sum(c.requests for c in conns)
        for c in conns:
            c.close()
    if result.landed or _stale(paths, result.kept):
        result.retired = publish(paths, settings, result.landed, result.kept, result.failed)
        result.published = True
    return result


def _download_all(
    paths: Paths,
    missing: list[VersionPlan],
    conns: list[Connection],
    progress: Progress,
    result: SyncResult,
) -> None:
    """Every missing version, as many at once as there are connections."""
    idle: queue.SimpleQueue[Connection] = queue.SimpleQueue()
    for c in conns:
        idle.put(c)

    def one(plan: VersionPlan) -> Landed | str | None:
        conn = idle.get()
        started = time.monotonic()
        try:
            landed = sync_version(
                conn,
                paths.img_dir,
                plan,
                progress,
                lambda fd, files, combined: hand_over(paths, fd, files, combined),
            )
        except VersionExists:
            log.info("%s: %s is there already", plan.label, plan.key.relpath)
            return None
        except VersionFailed as e:
            log.error("not synced: %s", e)
            return str(e)
        finally:
            idle.put(conn)
        log.info(
            "synced %s as %s: %d files, %s downloaded in %.1f s",
            plan.label,
            plan.key.relpath,
            len(landed.files),
            human(landed.downloaded),
            time.monotonic() - started,
        )
        return landed

    with ThreadPoolExecutor(len(conns), thread_name_prefix="sync") as pool:
        for outcome in pool.map(one, missing):
            if isinstance(outcome, Landed):
                result.landed.append(outcome)
            elif outcome is not None:
                result.failed.append(outcome)


def _stale(paths: Paths, kept: dict[str, list[str]]) -> bool:
    """Whether a synced product holds a version its sync no longer keeps (not yet pruned):
    a look at the variant directories, so a sync with nothing new publishes nothing."""
    try:
        pending = {p.path for p in retention.load(paths.state_dir)}
    except retention.RetentionError:
        pending = set()
    for product, serials in kept.items():
        variant_dir = os.path.join(paths.img_dir, *product.split(":"))
        try:
            names = os.listdir(variant_dir)
        except OSError:
            continue
        newest = serial_sort_key(serials[-1])
        for name in names:
            if (
                valid_serial(name)
                and name not in serials
                and serial_sort_key(name) < newest
                and os.path.join(variant_dir, name) not in pending
            ):
                return True
    return False


def _outdated(img_dir: str, kept: dict[str, list[str]]) -> list[ScannedVersion]:
    """The versions of synced products older than the newest kept and not kept; none of a
    product whose kept versions are not all in the tree (one failed: the older stay)."""
    doomed: list[ScannedVersion] = []
    scanner = Scanner(img_dir)
    for product, serials in kept.items():
        versions = scanner.scan(product.replace(":", "/"))
        if not set(serials) <= {v.key.serial for v in versions}:
            continue
        newest = serial_sort_key(serials[-1])
        doomed += [
            v
            for v in versions
            if v.key.serial not in serials and serial_sort_key(v.key.serial) < newest
        ]
    return sorted(doomed, key=lambda v: v.key)


def publish(
    paths: Paths,
    settings: Settings,
    landed: list[Landed],
    kept: dict[str, list[str]],
    failed: list[str] | None = None,
) -> list[tuple[str, str]]:
    """The versions of the synced products that upstream's newest no longer cover leave by
    the retention path (recorded as pruned: out of the catalog, files after [prune]
    grace_period); then one publish: by the running watcher, asked to rescan only the versions
    landed and retired (catalog/publish_requests.py; it took their digests from the handover
    records), else through a pipeline of our own, the synced files' digests given to the hash
    cache first (they were hashed while downloading). A landed version the watcher does not
    list is added to `failed`. -> (product, serial) retired."""
    retired = pruning.retire(paths.state_dir, _outdated(paths.img_dir, kept), settings.prune_grace)
    for p in retired:
        log.info(
            "%s %s: no longer among upstream's newest; out of the catalog, its files go after %s",
            p.product,
            p.serial,
            retention.utc_text(p.expires),
        )

    def seed(cache: HashCache) -> None:
        for item in landed:
            seed_cache(cache, paths.img_dir, item)

    def run(pipeline: Pipeline) -> None:
        pipeline.update_all()

    if not _by_watcher(paths, landed, retired, failed if failed is not None else []):
        with_pipeline(paths, settings, run, None, seed)
    if retired:
        try:
            retention.delete_expired(paths)  # with no grace period: now
        except retention.RetentionError as e:
            log.error("not deleting pruned versions: %s", e)
    return [(p.product, p.serial) for p in retired]


def _by_watcher(
    paths: Paths, landed: list[Landed], retired: list[retention.Pending], failed: list[str]
) -> bool:
    """Asks the running watcher to publish; False when there is none (or it did not answer)."""
    new = [item.plan.key.relpath for item in landed]
    gone = [os.path.relpath(p.path, paths.img_dir) for p in retired]
    answer = request_publish(
        paths.state.publish_socket, paths.state.watch_pid, paths.img_dir, new + gone
    )
    if answer is None:
        return False
    listed = set(answer.listed)
    for item in landed:
        rel = item.plan.key.relpath
        if rel not in listed:
            why = answer.missing.get(rel, "not listed")
            log.error("%s: %s is in the tree but not in the catalog: %s", item.plan.label, rel, why)
            failed.append(f"{item.plan.label}: not in the catalog: {why}")
    for rel in gone:
        if rel in listed:
            log.warning("%s is still listed by the running watcher", rel)
    log.info("published by the running watcher")
    return True


def seed_cache(cache: HashCache, img_dir: str, landed: Landed) -> None:
    """The digests of a landed version (and its images' fingerprints, upstream's, checked)."""
    versions = Scanner(img_dir).scan(landed.plan.key.relpath)
    if not versions:
        return
    files = versions[0].files
    plain = [(files[n], sha) for n, (_, sha) in landed.files.items() if n in files]
    combined = []
    for root, (meta, fp) in landed.plan.combined.items():
        if root in files and meta in files and files[meta].role.role is Role.META:
            combined.append((files[meta], files[root], fp))
    cache.put_many(plain, combined)
