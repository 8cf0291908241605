"""The versions the catalog writer knows: one record each (record.py), found by scans and kept
hashed. The only place records are made, changed and dropped.

- A full scan (`scan_all`, then `replace_all`) makes a new record of every version, all with
  the digests of that scan.
- A rescan below a prefix (`rescan`) keeps the record of a version found again, and its
  digests while its files are the same; a version gone loses its record, a new one gets one.
  A version whose digests the hash cache does not hold is hashed in the background
  (hashjobs.py); `take_results` gives each record the digests of its job, if its files are
  still those the job hashed (else its newer job brings the right ones).
- Every change to a record bumps its product's stamp (a number from one counter, never
  reused). What is derived from a whole product's records, its `ProductView` (the versions it
  publishes, their entries), is kept while the stamp and the hidden versions of the product are
  the same; delta_feed.py keeps the deltas' work per product under the same key. A rescan that
  finds a version exactly as it was (equal ScannedVersion) changes nothing.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Hashable, Iterable, Iterator, Mapping, Set

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import Digests, HashEngine
from lxd_image_server.catalog.hashjobs import HashJobs, Known, files_identity, hash_version
from lxd_image_server.catalog.products import BuiltVersion
from lxd_image_server.catalog.record import Ready, VersionRecord
from lxd_image_server.config import Paths
from lxd_image_server.progress import ProgressStart
from lxd_image_server.tree.handover import Records
from lxd_image_server.tree.layout import Role
from lxd_image_server.tree.scan import Exclude, ScannedVersion, Scanner

log = logging.getLogger(__name__)


class ProductView:
    """What a product publishes, derived from its records and the versions hidden in it; made
    again (`Versions.views`) when its key changes. (Parallel lists rather than a tuple per
    version: a view of every product is kept between publishes.)"""

    __slots__ = ("_built", "_entries", "key", "product", "records", "versions")

    def __init__(
        self,
        product: str,
        key: Hashable,
        records: list[VersionRecord],
        versions: list[ScannedVersion],
    ) -> None:
        self.product = product
        #: (the product's stamp, its hidden versions): equal keys, equal views
        self.key = key
        #: its versions as they may be published now (record.VersionRecord.shown), in the
        #: scan's order, and their records (in the same order)
        self.versions = versions
        self.records = records
        #: the indices in those lists of the versions that have an entry, and their entries
        self._built: list[int] | None = None
        self._entries: list[BuiltVersion] = []

    def _built_now(self, root_dir: str) -> list[int]:
        if self._built is None:
            built, entries = [], []
            for i, r in enumerate(self.records):
                b = r.entry(root_dir)
                if b is not None:
                    built.append(i)
                    entries.append(b)
            self._built, self._entries = built, entries
        return self._built

    def built(self, root_dir: str) -> list[tuple[ScannedVersion, BuiltVersion]]:
        """The entries of those versions that have one (products.products_of's input; the
        pipeline's root_dir never changes)."""
        built = self._built_now(root_dir)
        return [(self.versions[i], b) for i, b in zip(built, self._entries, strict=True)]

    def listed(self, root_dir: str) -> Iterator[str]:
        """The version directories (relative to images/) of `built`."""
        return (self.records[i].rel for i in self._built_now(root_dir))

    def group(self) -> tuple[Hashable, list[ScannedVersion]]:
        """Its versions under its key (delta_feed.Group)."""
        return self.key, self.versions

    def built_group(self, root_dir: str) -> tuple[Hashable, list[ScannedVersion]]:
        """The versions of `built` under a key of their own (delta_feed.Group)."""
        return (self.key, "built"), [self.versions[i] for i in self._built_now(root_dir)]

    def without(self, doomed: Set[str]) -> ProductView:
        """This view without the versions `doomed` (absolute directories)."""
        gone = frozenset(v.path for v in self.versions if v.path in doomed)
        if not gone:
            return self
        kept = [i for i, v in enumerate(self.versions) if v.path not in gone]
        return ProductView(
            self.product,
            (self.key, gone),
            [self.records[i] for i in kept],
            [self.versions[i] for i in kept],
        )


class Versions:
    def __init__(self, paths: Paths, cache: HashCache, exclude: Exclude, jobs: HashJobs) -> None:
        self.hasher = HashEngine(cache)
        self.scanner = Scanner(paths.img_dir, exclude)
        #: digests the upload app computed (tree/handover.py)
        self.handed_over = Records(paths.state.upload_digests)
        self.jobs = jobs
        #: version directory (relative to images/) -> its record, in the scan's order
        self._records: dict[str, VersionRecord] = {}
        #: a record was added since the full scan: not in its order (`in_order`)
        self._unordered = False
        self._stamps = itertools.count(1)
        #: product -> its stamp, bumped at every change to one of its records (`_touch`)
        self._stamp: dict[str, int] = {}
        #: the records by product (in the scan's order), and by version directory (absolute):
        #: derived from `_records`, kept in step by `_add` and `_drop` (and `in_order`)
        self._by_product: dict[str, list[VersionRecord]] = {}
        self._by_path: dict[str, VersionRecord] = {}
        #: product -> its view, kept while its key is the same (`views`)
        self._views: dict[str, ProductView] = {}

    @property
    def cache(self) -> HashCache:
        return self.hasher.cache

    def _touch(self, r: VersionRecord) -> None:
        """`r` changed (or was added or dropped): its product's view is made again."""
        self._stamp[r.scanned.key.product] = next(self._stamps)

    def _add(self, r: VersionRecord) -> None:
        self._records[r.rel] = r
        self._by_product.setdefault(r.scanned.key.product, []).append(r)
        self._by_path[r.scanned.path] = r
        self._touch(r)

    def _drop(self, rel: str) -> None:
        r = self._records.pop(rel)
        product = r.scanned.key.product
        others = self._by_product[product]
        others.remove(r)
        self._touch(r)
        if not others:
            del self._by_product[product], self._stamp[product]
        del self._by_path[r.scanned.path]

    # -- reading --------------------------------------------------------------------------------

    def __contains__(self, rel: object) -> bool:
        return rel in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> Iterator[VersionRecord]:
        return iter(self._records.values())

    def scanned(self) -> Mapping[str, ScannedVersion]:
        """Each version as scanned, by directory relative to images/."""
        return {rel: r.scanned for rel, r in self._records.items()}

    def all_scanned(self) -> Iterator[ScannedVersion]:
        return (r.scanned for r in self._records.values())

    def sha256(self) -> Mapping[str, str]:
        """sha256 by path of every file hashed (and not failed), looked up when asked for."""
        return _Sha256(self)

    def record_at(self, directory: str) -> VersionRecord | None:
        """The record of the version directory `directory` (absolute)."""
        return self._by_path.get(directory)

    def views(self, hidden: Set[str]) -> list[ProductView]:
        """Each product's view with the versions `hidden` (absolute directories) left out."""
        hidden_in: dict[str, set[str]] = {}
        for path in hidden:
            h = self.record_at(path)
            if h is not None:
                hidden_in.setdefault(h.scanned.key.product, set()).add(path)
        views = {}
        for product, records in self._by_product.items():
            gone = hidden_in.get(product, set())
            key = (self._stamp[product], frozenset(gone))
            view = self._views.get(product)
            if view is None or view.key != key:
                view = ProductView(product, key, *_shown(records, gone))
            views[product] = view
        self._views = views  # (a product gone is forgotten)
        return list(views.values())

    def in_order(self) -> None:
        """Puts the records back into the scan's order (a full publish's inputs digest,
        unchanged.py, follows it; a new version breaks it)."""
        if self._unordered:
            self._records = dict(sorted(self._records.items(), key=lambda e: e[1].scanned.key))
            self._unordered = False
            self._by_product = {}
            for r in self._records.values():
                self._by_product.setdefault(r.scanned.key.product, []).append(r)

    # -- a full scan ----------------------------------------------------------------------------

    def scan_all(self) -> list[ScannedVersion]:
        found = self.scanner.scan()
        self.cache.adopt(self.handed_over, found, prune=True)
        return found

    def digest(
        self,
        found: list[ScannedVersion],
        rehash: bool = False,
        progress_start: ProgressStart | None = None,
        cache_apart: bool = False,
    ) -> Digests:
        """Every digest of `found`, from the hash cache or read now. `cache_apart`: those
        read now are written to the cache while the caller goes on (HashCache.put_many)."""
        with self.cache.preloaded():
            return self.hasher.digest(found, rehash, progress_start, cache_apart=cache_apart)

    def replace_all(self, found: list[ScannedVersion], digests: Digests) -> None:
        """The records of a full scan: each version with `digests`."""
        self._records, self._by_product, self._by_path, self._stamp = {}, {}, {}, {}
        for v in found:
            r = VersionRecord(v.key.relpath, v)
            r.hashed(Ready(r.ident, digests))
            self._add(r)
        self._unordered = False

    def forget_others(self) -> None:
        """Drops the hash cache's entries of files no record holds (a full scan's)."""
        self.cache.forget_except(
            {f.path for r in self._records.values() for f in r.scanned.files.values()}
        )

    # -- rescans and background hashing ---------------------------------------------------------

    def rescan(self, prefix: str) -> set[str]:
        """Rescans below `prefix`; returns the versions now hashing in the background."""
        records = self._records
        # (a version directory holds no other: found at once, not by a look at every version)
        below = [prefix] if prefix in records else [r for r in records if _under(r, prefix)]
        found = self.scanner.scan(prefix)
        self.cache.adopt(self.handed_over, found)
        for rel in set(below).difference(v.key.relpath for v in found):
            self._drop(rel)
        submitted = set()
        for v in found:
            rel = v.key.relpath
            r = records.get(rel)
            if r is None:
                # a version found again keeps its place; a new one goes last (`in_order`)
                r = VersionRecord(rel, v)
                self._add(r)
                self._unordered = True
            elif v != r.scanned:
                r.rescanned(v)
                self._touch(r)
            if self._schedule(r):
                submitted.add(rel)
        return submitted

    def _schedule(self, r: VersionRecord) -> bool:
        """Makes `r` ready from the hash cache, or hashes what the cache lacks in the
        background (then True). Digests still those of its files are kept."""
        if r.is_ready():
            return False
        v = r.scanned
        known = self._known(v)
        self._touch(r)
        if known.complete:
            r.hashed(Ready(r.ident, known.digests()))
            return False
        # what the cache knows is published meanwhile when it is all but deltas (record.py)
        r.hashed(Ready(files_identity(f for f, _ in known.files), known.digests()))
        cached = {f.path for f, _ in known.files}
        size = sum(f.size for f in v.files.values() if f.path not in cached)
        self.jobs.submit(r.rel, r.ident, size, functools.partial(hash_version, v, known))
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

    def take_results(self) -> bool:
        """Gives the background results to the records whose files they still match (and
        to the hash cache); True if any."""
        fresh = False
        for res in self.jobs.take():
            r = self._records.get(res.rel)
            if r is None or r.ident != res.ident:
                continue  # changed or gone since: its next job brings the right digests
            r.hashed(Ready(res.ident, res.digests))
            self._touch(r)
            d, files = res.digests, r.scanned.files.values()
            self.cache.put_many(
                [
                    (f, d.files[f.path])
                    for f in files
                    if f.path in d.files and f.path not in d.failed
                ],
                [
                    (m, root, c)
                    for m in files
                    for root in files
                    if (c := d.combined.get((m.path, root.path))) is not None
                ],
            )
            fresh = True
        return fresh


class _Sha256(Mapping[str, str]):
    """Versions.sha256: each path looked up in its version's record."""

    def __init__(self, versions: Versions) -> None:
        self._versions = versions

    def __getitem__(self, path: str) -> str:
        r = self._versions.record_at(path.rpartition("/")[0])
        digest = None if r is None else r.sha256(path)
        if digest is None:
            raise KeyError(path)
        return digest

    def __iter__(self) -> Iterator[str]:
        for r in self._versions.records():
            for f in r.scanned.files.values():
                if r.sha256(f.path) is not None:
                    yield f.path

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _shown(
    records: list[VersionRecord], hidden: Set[str]
) -> tuple[list[VersionRecord], list[ScannedVersion]]:
    """The records not `hidden` whose version may be published, and those versions."""
    shown, versions = [], []
    for r in records:
        if r.scanned.path in hidden:
            continue
        v = r.shown()
        if v is None:
            log.debug("not publishing %s yet: still hashing", r.scanned.path)
            continue
        shown.append(r)
        versions.append(v)
    return shown, versions


def _under(rel: str, prefix: str) -> bool:
    return prefix == "" or rel == prefix or rel.startswith(prefix + "/")


def outermost(prefixes: Iterable[str]) -> list[str]:
    """Drops prefixes inside others: rescanning the outer one covers them."""
    out: list[str] = []
    for p in sorted(set(prefixes), key=lambda p: (p.count("/"), p)):
        p = p.strip("/")
        if not any(_under(p, o) for o in out):
            out.append(p)
    return out
