"""The catalog pipeline: scan -> hash -> catalog -> publish, the one writer of streams/.

`update` runs it over the whole tree; `watch` keeps one instance and re-runs it over the
directories that changed.

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
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lxd_image_server.catalog import departures, unchanged
from lxd_image_server.catalog.deltas import OK
from lxd_image_server.catalog.deltawork import FOREGROUND, DeltaService
from lxd_image_server.catalog.gzip_chunks import GzipCache
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import Digests, HashEngine
from lxd_image_server.catalog.hashjobs import (
    DEFAULT_JOBS,
    HashJobs,
    Identity,
    Known,
    hash_version,
    identity,
)
from lxd_image_server.catalog.products import BuiltVersion, Products, build_version, products_of
from lxd_image_server.catalog.publish import catalog_lock, publish
from lxd_image_server.catalog.retention import PendingVersions, Retention
from lxd_image_server.config import Paths
from lxd_image_server.gcpause import cyclic_gc_paused
from lxd_image_server.progress import Progress
from lxd_image_server.tree.handover import Records
from lxd_image_server.tree.layout import Role
from lxd_image_server.tree.scan import Exclude, FileStat, ScannedVersion, Scanner
from lxd_image_server.tree.unified import CONTAINER_TYPE, WRITER_PEEK_BYTES, unified_holds

if TYPE_CHECKING:
    from lxd_image_server.catalog.page import PageCache

log = logging.getLogger(__name__)

ProgressStart = Callable[[int], Progress]
CatalogState = tuple[int, int, int, int] | None


def _never(_: str) -> bool:
    return False


@dataclass(frozen=True)
class _Ready:
    """A version's digests, valid while its files have identity `ident`."""

    ident: Identity
    digests: Digests


@dataclass(frozen=True)
class _Built:
    """A version's catalog entry (None: not publishable), built from the digests `ready`.
    Kept between publishes: a version whose files did not change is not built again, and its
    JSON is not encoded again (catalog.BuiltVersion.entry)."""

    ready: _Ready
    #: the identities of the files it was built from, when only some of the version's are
    #: ready (a delta still hashing); None: all of them
    part: Identity | None
    built: BuiltVersion | None


class Pipeline:
    def __init__(
        self,
        paths: Paths,
        cache: HashCache,
        progress_start: ProgressStart | None = None,
        exclude: Exclude = _never,
        hidden: Callable[[], Set[str]] | None = None,
        jobs: int = DEFAULT_JOBS,
        retention: Retention | None = None,
        deltas: DeltaService | None = None,
    ) -> None:
        self.paths = paths
        self.hasher = HashEngine(cache)
        self.scanner = Scanner(paths.img_dir, exclude)
        #: digests the upload app computed (handover.py)
        self.records = Records(paths.state.upload_digests)
        self.progress_start = progress_start
        #: version directory (relative to images/) -> what was found there
        self.versions: dict[str, ScannedVersion] = {}
        #: a version was added to `versions` since the full scan: they are not in its order
        self._unordered = False
        #: version directory -> the identity of its files as scanned (hashjobs.identity)
        self._idents: dict[str, Identity] = {}
        #: version directory -> its digests, once computed
        self._ready: dict[str, _Ready] = {}
        #: version directory -> its catalog entry, once built
        self._built: dict[str, _Built] = {}
        self._products: Products = {}
        #: the versions of a full update that found the catalog published already: built into
        #: `products` only if someone asks (unchanged.py)
        self._unbuilt: list[tuple[str, ScannedVersion, _Ready]] | None = None
        #: absolute version directories left out of the catalog: pruned or removed, files
        #: kept until their grace period is over (retention.py)
        self.hidden = hidden if hidden is not None else PendingVersions(paths.state_dir)
        #: [retention], applied at every publish: versions beyond it leave this very catalog
        #: and are recorded like pruned ones (None: keep every version)
        self.retention = retention
        #: called after every publish that changed the catalog (e.g. to push to mirrors), once
        #: the page is written too
        self.on_publish: list[Callable[[], None]] = []
        #: write the page only when `write_page` is called (the watcher: once no publish is
        #: due), not right after the catalog: the page never delays a publish
        self.defer_page = False
        #: the catalog was published since the page was last written
        self.page_due = False
        self._notify = False
        #: what images.json.gz's last publish compressed, reused by the next
        self._gzip = GzipCache()
        #: the caller drops the pipeline after update_all (the `update` command): when the
        #: catalog was published from this very tree already, the digests are not looked up,
        #: only the few the deltas ask for (unchanged.py)
        self.lookups_on_demand = False
        #: unchanged.versions_digest of `versions` as the last full scan found them (None once
        #: part of the tree was scanned again, or when no publish may be skipped)
        self._scanned_digest: str | None = None
        #: what the last page found in each version, reused by the next
        self._page: PageCache | None = None
        #: called from a hashing thread when a version's digests are done (`collect` them)
        self.on_hashed: Callable[[], None] | None = None
        # (through a weak reference: a cycle pipeline -> workers -> pipeline would leave all
        # it holds, one object per file, to the cyclic garbage collector once it is dropped)
        self.jobs = HashJobs(jobs, on_done=_weakly(self._hashed))
        #: lists checked deltas; makes and checks the others after each publish (deltawork.py)
        self.deltas = deltas or DeltaService(paths.img_dir, paths.state_dir)
        self.deltas.on_done = _weakly(self._hashed)
        #: images.json as this pipeline last published it (or found it published): another
        #: writer published since when it is not so any more
        self._state_after: CatalogState = None
        #: the inputs digest to record once the page is written (unchanged.py), while a
        #: publish waits for its deltas (`_publish_deltas`)
        self._inputs: str | None = None
        #: the version directories (relative to images/) the catalog lists: those this writer
        #: published last; None: read back from images.json when needed (departures.py)
        self._listed_versions: set[str] | None = None
        #: the files it lists and their sizes (`listing`); None: made again when asked for
        self._listing: departures.Listing | None = None

    def _hashed(self) -> None:
        if self.on_hashed is not None:
            self.on_hashed()

    @property
    def cache(self) -> HashCache:
        return self.hasher.cache

    # -- the two ways in --------------------------------------------------------------------

    def update_all(self, rehash: bool = False) -> bool:
        """Rescans and republishes everything, once every version is hashed. True if the
        catalog changed. (With the cyclic garbage collector paused: gcpause.py.)"""
        with cyclic_gc_paused():
            return self._update_all(rehash)

    def _update_all(self, rehash: bool) -> bool:
        before = self._catalog_state()
        found = self.scanner.scan()
        self.cache.adopt(self.records, found, prune=True)
        self._scanned_digest = None
        if not rehash and self._may_skip():
            self._scanned_digest = unchanged.versions_digest(found, self.paths.root_dir)
        digests: Digests
        published = self.lookups_on_demand and self._published_already(found)
        if published:
            digests = _OnDemand(functools.partial(self._digest, found))
        else:
            digests = self._digest(found, rehash)
        self.versions = {v.key.relpath: v for v in found}
        self._unordered = False
        self._idents = {rel: identity(v) for rel, v in self.versions.items()}
        self._ready = {rel: _Ready(self._idents[rel], digests) for rel in self.versions}
        with catalog_lock(self.paths.state_dir):
            if self._catalog_state() != before:
                log.info("the catalog was published by another writer meanwhile; rescanning")
                self._rescan("")
            if not published:
                # (under the lock: what another writer cached meanwhile is in this scan)
                # Published already: the files are those the last full update kept entries
                # of; entries the watcher added since for files gone again wait for the next.
                self.cache.forget_except(
                    {f.path for v in self.versions.values() for f in v.files.values()}
                )
            foreground = self.deltas.mode == FOREGROUND
            changed = self._publish(full=not rehash, deltas_next=foreground)
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
        self._take_results()
        with catalog_lock(self.paths.state_dir):
            if self._catalog_state() != self._state_after:
                log.info("the catalog was published by another writer meanwhile; rescanning")
                self._rescan("")
                return self._publish(full=True, plan=False)
            if listed:
                return self._publish(full=True, plan=False)
            # no delta to list: the page of the last publish, and its record
            if self.page_due:
                self._write_page()
            if self._inputs is not None:
                unchanged.record(self.paths.state_dir, self.paths.root_dir, self._inputs)
                self._inputs = None
            return False

    def _digest(self, found: list[ScannedVersion], rehash: bool = False) -> Digests:
        with self.cache.preloaded():
            return self.hasher.digest(found, rehash, self.progress_start)

    def _may_skip(self) -> bool:
        """A full update may skip a publish of unchanged inputs ([retention] decides anew)."""
        return self.retention is None or not self.retention.policy.active

    def _published_already(self, found: list[ScannedVersion]) -> bool:
        """The catalog was published from the tree `found` (a full scan), as far as can be
        said before the catalog lock (_publish says it again under it)."""
        if self._scanned_digest is None:
            return False
        hidden = self.hidden()
        listed = self.deltas.listable([v for v in found if v.path not in hidden])
        inputs = unchanged.inputs_digest(self._scanned_digest, hidden, listed)
        return unchanged.is_published(self.paths.state_dir, self.paths.root_dir, inputs)

    def refresh(self, prefixes: Iterable[str], budget: float | None = None) -> bool:
        """Rescans the directories `prefixes` (relative to images/) and republishes, waiting at
        most `budget` seconds (None: as long as it takes) for the versions to hash."""
        submitted: set[str] = set()
        for prefix in _outermost(prefixes):
            submitted |= self._rescan(prefix)
        # wait for this pass's versions only: one slow to hash from before delays nothing
        self.jobs.wait(budget, submitted)
        self._take_results()
        with catalog_lock(self.paths.state_dir):
            return self._publish()

    def collect(self) -> bool:
        """Publishes the versions hashed (and the deltas made or checked) in the background
        since; False if nothing changed."""
        fresh = self._take_results()
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

    # -- steps --------------------------------------------------------------------------------

    def _rescan(self, prefix: str) -> set[str]:
        """Rescans below `prefix`; returns the versions now hashing in the background."""
        # (a version directory holds no other: found at once, not by a look at every version)
        below = (
            [prefix] if prefix in self.versions else [r for r in self.versions if _under(r, prefix)]
        )
        submitted = set()
        self._scanned_digest = None
        found = self.scanner.scan(prefix)
        self.cache.adopt(self.records, found)
        # (a version found again keeps its digests while its files are the same: _schedule)
        for rel in set(below).difference(v.key.relpath for v in found):
            del self.versions[rel]
            del self._idents[rel]
            self._ready.pop(rel, None)
        for v in found:
            # a version found again keeps its place: a full publish's inputs digest
            # (unchanged.py) follows the scan's order, which a new version breaks
            rel = v.key.relpath
            self._unordered = self._unordered or rel not in self.versions
            self.versions[rel] = v
            self._idents[rel] = identity(v)
            if self._schedule(v):
                submitted.add(rel)
        return submitted

    def _schedule(self, v: ScannedVersion) -> bool:
        """Makes `v` ready from the cache, or hashes what the cache lacks in the background
        (then True)."""
        rel, ident = v.key.relpath, self._idents[v.key.relpath]
        if _still_ready(self._ready.get(rel), ident, v):
            return False
        known = self._known(v)
        if known.complete:
            self._ready[rel] = _Ready(ident, known.digests())
            return False
        # what the cache knows is published meanwhile when it is all but deltas (_publish)
        self._ready[rel] = _Ready(
            tuple(sorted(f.identity for f, _ in known.files)), known.digests()
        )
        cached = {f.path for f, _ in known.files}
        size = sum(f.size for f in v.files.values() if f.path not in cached)
        self.jobs.submit(rel, ident, size, functools.partial(hash_version, v, known))
        return True

    def _known(self, v: ScannedVersion) -> Known:
        """The digests of `v` in the hash cache (this thread owns it: lookups only)."""
        known = Known()
        metas = [f for f in v.files.values() if f.role.role is Role.META]
        for f in v.files.values():
            d = self.cache.get(f)
            if d is None:
                known.complete = False
            else:
                known.files.append((f, d))
            if f.role.role is Role.ROOT:
                for m in metas:
                    c = self.cache.get_combined(m, f)
                    if c is None:
                        known.complete = False
                    else:
                        known.combined.append((m, f, c))
        return known

    def _take_results(self) -> bool:
        """Keeps the background results that still match what was scanned; True if any."""
        fresh = False
        for r in self.jobs.take():
            v = self.versions.get(r.rel)
            if v is None or self._idents[r.rel] != r.ident:
                continue  # changed or gone since: its next job brings the right digests
            self._ready[r.rel] = _Ready(r.ident, r.digests)
            d = r.digests
            self.cache.put_many(
                [
                    (f, d.files[f.path])
                    for f in v.files.values()
                    if f.path in d.files and f.path not in d.failed
                ],
                [
                    (m, root, c)
                    for m in v.files.values()
                    for root in v.files.values()
                    if (c := d.combined.get((m.path, root.path))) is not None
                ],
            )
            fresh = True
        return fresh

    def _catalog_state(self) -> CatalogState:
        try:
            st = os.lstat(os.path.join(self.paths.streams_dir, "images.json"))
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def products(self) -> Products:
        """The catalog last published (or found published already)."""
        if self._unbuilt is not None:
            self._products = products_of(self._build(self._unbuilt))
            self._unbuilt = None
        return self._products

    def _build(
        self, shown: list[tuple[str, ScannedVersion, _Ready]]
    ) -> list[tuple[ScannedVersion, BuiltVersion]]:
        """Each version's catalog entry, kept from before while its digests and files are
        the same."""
        out: list[tuple[ScannedVersion, BuiltVersion]] = []
        built: dict[str, _Built] = {}
        for rel, v, ready in shown:
            part = None if v is self.versions.get(rel) else identity(v)
            b = self._built.get(rel)
            if b is None or b.ready is not ready or b.part != part:
                b = _Built(
                    ready,
                    part,
                    build_version(v, ready.digests, self.paths.root_dir, _unified_type),
                )
            built[rel] = b
            if b.built is not None:
                out.append((v, b.built))
        self._built = built
        return out

    def _publish(self, full: bool = False, deltas_next: bool = False, plan: bool = True) -> bool:
        """Publishes what is ready. `full`: a full update, which skips building and writing
        when the catalog and page were published from the same inputs (unchanged.py).
        `deltas_next`: the caller makes the deltas this publish leaves to do and publishes
        again (`_publish_deltas`): if there are any, the page waits for that. `plan`: hand
        the versions to the delta service (not after `update` made them: nothing would run
        what it found)."""
        self._inputs = None
        if full and self._unordered:
            self.versions = dict(sorted(self.versions.items(), key=lambda e: e[1].key))
            self._unordered = False
        hidden = self.hidden()
        shown: list[tuple[str, ScannedVersion, _Ready]] = []
        for rel, v in self.versions.items():
            ready = self._ready.get(rel)
            if v.path in hidden:
                continue
            if ready is None:
                log.debug("not publishing %s yet: still hashing", v.path)
                continue
            if ready.ident != self._idents[rel]:
                # a delta being hashed does not hold its version back: published without it
                done = set(ready.ident)
                if any(f.identity not in done for f in v.files.values() if not _is_delta(f)):
                    log.debug("not publishing %s yet: still hashing", v.path)
                    continue
                v = replace(v, files={n: f for n, f in v.files.items() if f.identity in done})
            shown.append((rel, v, ready))
        versions = [v for _, v, _ in shown]
        digests = _merged(shown)
        listed = self.deltas.listable(versions)
        state, root = self.paths.state_dir, self.paths.root_dir
        inputs = None
        if full and self._may_skip():
            scanned = self._scanned_digest
            if scanned is None:
                scanned = unchanged.versions_digest(self.versions.values(), root)
            inputs = unchanged.inputs_digest(scanned, hidden, listed)
            if unchanged.is_published(state, root, inputs):
                log.debug("the catalog and page were published from these inputs already")
                self._unbuilt = shown
                self._listed_versions = self._listing = None  # read back if ever needed
                if plan:
                    if isinstance(digests, _OnDemand) and not digests.loaded:
                        self.deltas.published(
                            versions, digests, _CachedDigests(self.cache, versions)
                        )
                    else:
                        self.deltas.published(versions, digests)
                self._state_after = self._catalog_state()
                return False
            if not self._whole(shown, hidden, digests):
                inputs = None  # the record vouches only for a tree published whole
        self._unbuilt = None
        built = self._build(shown)
        products = products_of(built, digests, root, listed)
        doomed: Set[str] = frozenset()
        if self.retention is not None:
            # under the catalog lock: the one writer decides what leaves
            doomed = self.retention.apply(state, products, versions)
            if doomed:
                shown = [e for e in shown if e[1].path not in doomed]
                versions = [v for _, v, _ in shown]
                listed = self.deltas.listable(versions)
                built = self._build(shown)
                products = products_of(built, digests, root, listed)
        publishing = {v.key.relpath for v, _ in built}
        self._check_departures(publishing, hidden, doomed)
        self._products = products
        if not self.defer_page:
            # (what is published from here on is not what the record vouches for)
            unchanged.record(state, root, None)
        changed = publish(self.paths.streams_dir, products, images_gz=self._gzip, state_dir=state)
        self._listed_versions, self._listing = publishing, None
        self._state_after = self._catalog_state()
        if plan:
            self.deltas.published(versions, digests)
        self.page_due = True
        self._notify = self._notify or changed
        if deltas_next and self.deltas.pending():
            self._inputs = inputs  # recorded with the page, after the deltas' publish
            return changed
        if not self.defer_page:
            self._write_page()
            if inputs is not None:
                unchanged.record(state, root, inputs)
        return changed

    def _whole(
        self, shown: list[tuple[str, ScannedVersion, _Ready]], hidden: Set[str], digests: Digests
    ) -> bool:
        """Every version scanned is hidden or `shown` with all its files, and each of them has
        its sha256: the digests are then those of the files' identities (unchanged.py)."""
        if digests.failed:
            return False
        expected = sum(1 for v in self.versions.values() if v.path not in hidden)
        if len(shown) != expected or any(v is not self.versions[rel] for rel, v, _ in shown):
            return False
        have = digests.files
        return all(f.path in have for _, v, _ in shown for f in v.files.values())

    def _check_departures(self, publishing: set[str], hidden: Set[str], doomed: Set[str]) -> None:
        """Raises departures.UnexplainedDepartures when a version the catalog lists would
        leave it for no reason this writer can name (departures.py)."""
        before = self._listed_versions
        if before is None:
            before = self.listing().versions(self.paths.served_images)
        known = departures.Known(
            self.paths.img_dir,
            pruned=lambda path: path in hidden or path in doomed,
            scanned=self.versions.__contains__,
            clock=self.scanner.clock,
        )
        departures.check(before, publishing, known)

    def listing(self) -> departures.Listing:
        """The files the catalog lists now, with their sizes: from the products this writer
        published last, else from the record of the last publish (departures.listed)."""
        if self._listing is None:
            if self._listed_versions is not None and self._unbuilt is None:
                self._listing = departures.listing_of(self._products)
            else:
                self._listing = departures.listed(self.paths.state_dir, self.paths.streams_dir)
        return self._listing

    def write_page(self) -> None:
        """Writes the catalog page of the last publish, if not written yet (defer_page)."""
        if self.page_due:
            with catalog_lock(self.paths.state_dir):
                self._write_page()

    def _write_page(self) -> None:
        self.page_due = False
        try:
            # (imported here: a no-change `update` never renders the page)
            from lxd_image_server.catalog.page import PageCache, write_page

            if self._page is None:
                self._page = PageCache()
            # <root>/streams/index.html, when its bytes change or it is missing
            p = self.paths
            write_page(p.root_dir, self._products, state_dir=p.state_dir, cache=self._page)
        finally:
            if self._notify:
                self._notify = False
                for listener in self.on_publish:
                    listener()


class _OnDemand(Digests):
    """The digests of a full scan, computed (from the hash cache, hashing what it lacks) when
    first read: a no-change `update` reads none (lookups_on_demand). They are read only if the
    tree or the catalog changed between the check before the catalog lock and the one under
    it; then under the lock, but the files are those of the last publish, all in the cache."""

    def __init__(self, load: Callable[[], Digests]) -> None:
        # no Digests.__init__: files, combined and failed are set by the first read
        self._load: Callable[[], Digests] | None = load

    @property
    def loaded(self) -> bool:
        return self._load is None

    def __getattr__(self, name: str) -> Any:
        # only called for an attribute not set yet
        load = self.__dict__.get("_load")
        if load is None or name not in ("files", "combined", "failed"):
            raise AttributeError(name)
        d = load()
        self.files, self.combined, self.failed = d.files, d.combined, d.failed
        self._load = None
        return getattr(self, name)


class _CachedDigests(Mapping[str, str]):
    """sha256 by path of the files of `versions`, each looked up in the hash cache when asked
    for (the deltas ask for a few roots)."""

    def __init__(self, cache: HashCache, versions: list[ScannedVersion]) -> None:
        self._cache = cache
        self._versions = versions
        self._by_dir: dict[str, ScannedVersion] | None = None

    def _file(self, path: str) -> FileStat | None:
        if self._by_dir is None:
            self._by_dir = {v.path: v for v in self._versions}
        directory, _, name = path.rpartition("/")
        v = self._by_dir.get(directory)
        return None if v is None else v.files.get(name)

    def __getitem__(self, path: str) -> str:
        f = self._file(path)
        digest = None if f is None else self._cache.get(f)
        if digest is None:
            raise KeyError(path)
        return digest

    def __iter__(self) -> Iterator[str]:
        return (
            f.path
            for v in self._versions
            for f in v.files.values()
            if self._cache.get(f) is not None
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """Calls `method` while its object lives, without keeping it alive."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


def _merged(shown: list[tuple[str, ScannedVersion, _Ready]]) -> Digests:
    """The digests of the files of `shown`: a full update's own when they all share it."""
    sources = {id(r.digests): r.digests for _, _, r in shown}
    if len(sources) == 1:
        return next(iter(sources.values()))
    out = Digests()
    for _, v, ready in shown:
        src = ready.digests
        for f in v.files.values():
            if f.path in src.files:
                out.files[f.path] = src.files[f.path]
            if f.path in src.failed:
                out.failed.add(f.path)
            for m in v.files.values():
                c = src.combined.get((m.path, f.path))
                if c is not None:
                    out.combined[(m.path, f.path)] = c
    return out


def _still_ready(ready: _Ready | None, ident: Identity, v: ScannedVersion) -> bool:
    """`ready` holds the digests of exactly the files of `v` (identity `ident`), none of which
    failed to hash (a failure is tried again at the next scan)."""
    if ready is None or ready.ident != ident:
        return False
    d = ready.digests
    if isinstance(d, _OnDemand) and not d.loaded:
        return True
    return not any(f.path in d.failed for f in v.files.values())


def _unified_type(f: FileStat) -> str:
    """What the unified tarball `f` holds (tree/unified.py), read bounded from its first
    entries when its version is built (again only once its files change: _Built)."""
    try:
        return unified_holds(f.base, f.rel, WRITER_PEEK_BYTES)
    except (OSError, ValueError) as e:
        log.warning("%s: cannot tell a container from a VM (%s); listed as a container", f.path, e)
        return CONTAINER_TYPE


def _is_delta(f: FileStat) -> bool:
    return f.role.role is Role.DELTA


def _under(rel: str, prefix: str) -> bool:
    return prefix == "" or rel == prefix or rel.startswith(prefix + "/")


def _outermost(prefixes: Iterable[str]) -> list[str]:
    """Drops prefixes inside others: rescanning the outer one covers them."""
    out: list[str] = []
    for p in sorted(set(prefixes), key=lambda p: (p.count("/"), p)):
        p = p.strip("/")
        if not any(_under(p, o) for o in out):
            out.append(p)
    return out
