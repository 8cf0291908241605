"""The catalog pipeline: scan -> hash -> catalog -> publish, the one writer of streams/.

A pipeline is built for one use (`Use`), with everything it works with given then: `update`
runs it once over the whole tree; `watch` keeps one and re-runs it over the directories that
changed; the operator commands (import, prune, remove, init) publish with one as the watcher
does. What it knows of each version is that version's record (versions.py, record.py).

Hashing is the only step whose cost grows with the bytes on disk, and an uploader chooses those
bytes. So the catalog lock is held only to build and write the catalog, never while hashing:
- `update_all` (the `update` command, the watcher's start) hashes everything it scanned, then
  takes the lock. If another writer published meanwhile (it may have seen a newer tree), it
  scans again under the lock and publishes what the hash cache already covers; anything else is
  left to that writer, which publishes it once hashed.
  With deltas made in the foreground (`update`), it then makes them and publishes again,
  rescanning only the versions that got a delta file (`_publish_deltas`); the page is written
  once, after that.
- `refresh` (the watcher) hashes each changed version in the background (hashjobs.py), waits at
  most `budget` seconds, and publishes the versions whose digests are done. A version still
  being hashed is left out (a new one does not appear yet; a changed one is withdrawn, its old
  digests being wrong) and added by `collect`, in a later publish, once its digests are done.
A version is published only with the digests of exactly the files scanned (same identity).
A publish rebuilds only what changed: each version's entry is kept in its record, each
product's view, deltas' work and JSON while it is the same (assembly.py).
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Set

from lxd_image_server.catalog import departures, unchanged
from lxd_image_server.catalog.assembly import Assembly, Views
from lxd_image_server.catalog.deltas import OK
from lxd_image_server.catalog.deltawork import FOREGROUND, DeltaService
from lxd_image_server.catalog.gzip_chunks import GzipCache
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import Digests
from lxd_image_server.catalog.hashjobs import DEFAULT_JOBS, HashJobs
from lxd_image_server.catalog.listed import CatalogState, Listed
from lxd_image_server.catalog.page_writer import PageWriter
from lxd_image_server.catalog.products import Products
from lxd_image_server.catalog.publish import catalog_lock, publish
from lxd_image_server.catalog.retention import PendingVersions, Retention
from lxd_image_server.catalog.versions import Versions, outermost
from lxd_image_server.config import Paths
from lxd_image_server.gcpause import cyclic_gc_paused
from lxd_image_server.progress import ProgressStart
from lxd_image_server.tree.scan import Exclude, ScannedVersion

log = logging.getLogger(__name__)


class Use(enum.Enum):
    #: the `update` command: one full update, then dropped. When the catalog was published
    #: from this very tree already, no digest is looked up (unchanged.py).
    UPDATE = "update"
    #: the watcher: the page is written when it asks (`write_page`, once no publish is due),
    #: never right after the catalog, so the page never delays a publish
    WATCH = "watch"
    #: import, prune, remove, init: publish as the watcher does, the page at once
    OPERATOR = "operator"


def _never(_: str) -> bool:
    return False


class Pipeline:
    def __init__(
        self,
        paths: Paths,
        cache: HashCache,
        *,
        use: Use = Use.OPERATOR,
        retention: Retention | None = None,
        deltas: DeltaService | None = None,
        hidden: Callable[[], Set[str]] | None = None,
        on_publish: Iterable[Callable[[], None]] = (),
        on_hashed: Callable[[], None] | None = None,
        exclude: Exclude = _never,
        progress_start: ProgressStart | None = None,
        jobs: int = DEFAULT_JOBS,
    ) -> None:
        """`retention`: [retention], applied at every publish (versions beyond it leave this
        very catalog and are recorded like pruned ones; None: keep every version; `reload`
        replaces it). `deltas`: lists checked deltas, makes and checks the others after each
        publish (deltawork.py; default: lists only). `hidden`: the absolute version directories
        left out (pruned or removed, files kept for their grace period: retention.py).
        `on_publish`: called after every publish that changed the catalog, once the page is
        written too (e.g. a push to the mirrors). `on_hashed`: called from a background thread
        when a version's digests (or a delta) are done: `collect` them. `exclude`: files the
        scanner leaves out (being written)."""
        self.paths = paths
        self.use = use
        self._retention = retention
        self._hidden = hidden if hidden is not None else PendingVersions(paths.state_dir)
        self._on_hashed = on_hashed
        self._progress_start = progress_start
        # (through a weak reference: a cycle pipeline -> workers -> pipeline would leave all
        # it holds, one object per file, to the cyclic garbage collector once it is dropped)
        self.jobs = HashJobs(jobs, on_done=_weakly(self._hashed))
        #: every version found, one record each
        self.known = Versions(paths, cache, exclude, self.jobs)
        self.deltas = deltas or DeltaService(paths.img_dir, paths.state_dir)
        self.deltas.on_done = _weakly(self._hashed)
        self._assembly = Assembly(self.known, self.deltas, paths.root_dir)
        self._listed = Listed(paths)
        #: the no-change shortcut's record (unchanged.py)
        self._shortcut = unchanged.Shortcut(paths.state_dir, paths.root_dir)
        self._page = PageWriter(paths.root_dir, paths.state_dir, on_publish)
        #: what images.json.gz's last publish compressed, reused by the next
        self._gzip = GzipCache()
        self._products: Products = {}
        #: the versions of a publish skipped (unchanged.py): built into `products` only if
        #: someone asks
        self._unbuilt: Views | None = None
        #: images.json as this pipeline last published it (or found it published): another
        #: writer published since when it is not so any more
        self._state_after: CatalogState = None

    def reload(self, retention: Retention | None) -> None:
        """[retention] as the configuration says now (the watcher's reload)."""
        self._retention = retention

    @property
    def retention(self) -> Retention | None:
        return self._retention

    def _hashed(self) -> None:
        if self._on_hashed is not None:
            self._on_hashed()

    @property
    def cache(self) -> HashCache:
        return self.known.cache

    @property
    def versions(self) -> Mapping[str, ScannedVersion]:
        """Each version scanned, by directory relative to images/."""
        return self.known.scanned()

    @property
    def page_due(self) -> bool:
        """The catalog was published since the page was last written."""
        return self._page.due

    # -- the ways in ----------------------------------------------------------------------------

    def update_all(self, rehash: bool = False) -> bool:
        """Rescans and republishes everything, once every version is hashed. True if the
        catalog changed. (With the cyclic garbage collector paused: gcpause.py.)"""
        with cyclic_gc_paused():
            return self._update_all(rehash)

    def _update_all(self, rehash: bool) -> bool:
        before = self._listed.state()
        found = self.known.scan_all()
        self._shortcut.full_scan(found if not rehash and self._may_skip() else None)
        published = self.use is Use.UPDATE and self._published_already(found)
        digests: Digests
        if published:
            digests = unchanged.OnDemand(functools.partial(self.known.digest, found))
        else:
            # (`update`: the new digests go to the cache while it publishes; not the watcher,
            # whose peak memory that would raise, the rows living through the build)
            apart = self.use is Use.UPDATE
            digests = self.known.digest(found, rehash, self._progress_start, cache_apart=apart)
        self.known.replace_all(found, digests)
        with catalog_lock(self.paths.state_dir):
            if self._listed.state() != before:
                log.info("the catalog was published by another writer meanwhile; rescanning")
                self._rescan("")
            foreground = self.deltas.mode == FOREGROUND
            changed = self._publish(full=not rehash, deltas_next=foreground)
            if not published:
                # (under the lock: what another writer cached meanwhile is in this scan; after
                # the publish, made while the new digests were written to the cache apart)
                # Published already: the files are those the last full update kept entries
                # of; entries the watcher added since for files gone again wait for the next.
                self.known.forget_others()
        if foreground:
            changed = self._publish_deltas() or changed
        return changed

    def _publish_deltas(self) -> bool:
        """Makes and checks the deltas the last publish left to do, here and now (`update`),
        and publishes those that may be listed: only the versions that got a delta file are
        scanned (and hashed) again, every other version is reused as built and encoded. Then
        writes the page, once. True if the catalog changed."""
        done = self.deltas.run_pending()
        if not done and not self.page_due:
            return False  # nothing to make, or nothing made: published as it was
        listed = [job for job, rec in done if rec.result == OK]
        made = {os.path.relpath(job.target_dir, self.paths.img_dir) for job in listed}
        submitted: set[str] = set()
        for rel in sorted(made):
            submitted |= self._rescan(rel)
        self.jobs.wait(None, submitted)
        self.known.take_results()
        with catalog_lock(self.paths.state_dir):
            if self._listed.state() != self._state_after:
                log.info("the catalog was published by another writer meanwhile; rescanning")
                self._rescan("")
                return self._publish(full=True, plan=False)
            if listed:
                return self._publish(full=True, plan=False)
            # no delta to list: the page of the last publish, and its record
            if self.page_due:
                self._page.write(self._products)
            self._shortcut.record_due()
            return False

    def _may_skip(self) -> bool:
        """A full update may skip a publish of unchanged inputs ([retention] decides anew)."""
        return self._retention is None or not self._retention.policy.active

    def _published_already(self, found: list[ScannedVersion]) -> bool:
        """The catalog was published from the tree `found` (a full scan), as far as can be
        said before the catalog lock (_publish says it again under it)."""
        hidden = self._hidden()
        listed = self.deltas.listable([v for v in found if v.path not in hidden])
        return self._shortcut.is_published(self._shortcut.scanned_inputs(hidden, listed))

    def refresh(self, prefixes: Iterable[str], budget: float | None = None) -> bool:
        """Rescans the directories `prefixes` (relative to images/) and republishes, waiting at
        most `budget` seconds (None: as long as it takes) for the versions to hash."""
        submitted: set[str] = set()
        for prefix in outermost(prefixes):
            submitted |= self._rescan(prefix)
        # wait for this pass's versions only: one slow to hash from before delays nothing
        self.jobs.wait(budget, submitted)
        self.known.take_results()
        with catalog_lock(self.paths.state_dir):
            return self._publish()

    def collect(self) -> bool:
        """Publishes the versions hashed (and the deltas made or checked) in the background
        since; False if nothing changed."""
        fresh = self.known.take_results()
        if not (fresh | self.deltas.take_news()):
            return False
        with catalog_lock(self.paths.state_dir):
            return self._publish()

    def has_news(self) -> bool:
        """Background work is done (hashes, deltas): `collect` would publish it."""
        return self.jobs.has_results() or self.deltas.has_news()

    def hashing(self) -> int:
        """How many versions are being hashed in the background."""
        return self.jobs.pending()

    # -- steps ----------------------------------------------------------------------------------

    def _rescan(self, prefix: str) -> set[str]:
        """Rescans below `prefix`; returns the versions now hashing in the background."""
        self._shortcut.partial_scan()
        return self.known.rescan(prefix)

    @property
    def products(self) -> Products:
        """The catalog last published (or found published already)."""
        if self._unbuilt is not None:
            self._products = self._assembly.bare(self._unbuilt)
            self._unbuilt = None
        return self._products

    def _publish(self, full: bool = False, deltas_next: bool = False, plan: bool = True) -> bool:
        """Publishes what is ready. `full`: a full update, which skips building and writing
        when the catalog and page were published from the same inputs (unchanged.py).
        `deltas_next`: the caller makes the deltas this publish leaves to do and publishes
        again (`_publish_deltas`): if there are any, the page waits for that. `plan`: hand
        the versions to the delta service (not after `update` made them: nothing would run
        what it found)."""
        self._shortcut.record_later(None)
        if full:
            self.known.in_order()
        hidden = self._hidden()
        views = self._assembly.views(hidden)
        listed = self._assembly.listable(views)
        inputs = None
        if full and self._may_skip():
            inputs = self._shortcut.inputs(self.known.all_scanned, hidden, listed)
            if self._shortcut.is_published(inputs):
                log.debug("the catalog and page were published from these inputs already")
                self._unbuilt = views
                self._listed.unknown()
                if plan:
                    self._assembly.plan(views)
                self._state_after = self._listed.state()
                return False
            if not self._assembly.whole(views, hidden):
                inputs = None  # the record vouches only for a tree published whole
        self._unbuilt = None
        products, publishing = self._assembly.catalog(views, listed)
        doomed: Set[str] = frozenset()
        if self._retention is not None:
            # under the catalog lock: the one writer decides what leaves
            versions = [v for view in views for v in view.versions]
            doomed = self._retention.apply(self.paths.state_dir, products, versions)
            if doomed:
                views = self._assembly.without(views, doomed)
                listed = self._assembly.listable(views)
                products, publishing = self._assembly.catalog(views, listed)
        self._listed.check(
            publishing,
            lambda path: path in hidden or path in doomed,
            self.known.__contains__,
            self.known.scanner.clock,
        )
        self._products = products
        if self.use is not Use.WATCH:
            self._shortcut.forget()  # what is published now is not what the record vouches for
        streams, state = self.paths.streams_dir, self.paths.state_dir
        changed = publish(streams, products, images_gz=self._gzip, state_dir=state)
        self._listed.published(products, publishing)
        self._state_after = self._listed.state()
        if plan:
            self._assembly.plan(views)
        self._page.published(changed)
        if deltas_next and self.deltas.pending():
            self._shortcut.record_later(inputs)  # with the page, after the deltas' publish
            return changed
        if self.use is not Use.WATCH:
            self._page.write(products)
            self._shortcut.record_now(inputs)
        return changed

    def listing(self) -> departures.Listing:
        """The files the catalog lists now, with their sizes (listed.py)."""
        return self._listed.listing()

    def write_page(self) -> None:
        """Writes the catalog page of the last publish, if not written yet (Use.WATCH)."""
        if self.page_due:
            with catalog_lock(self.paths.state_dir):
                self._page.write(self._products)


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """Calls `method` while its object lives, without keeping it alive."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call
