"""The catalog made of the records: each product's view of its records (versions.py), the
deltas' share (delta_feed.py), and the products (products.py: the one place the writer builds
them)."""

from __future__ import annotations

from collections.abc import Mapping, Set

from lxd_image_server.catalog import unchanged
from lxd_image_server.catalog.delta_feed import DeltaFeed, Group
from lxd_image_server.catalog.deltawork import DeltaService
from lxd_image_server.catalog.hashing import Digests
from lxd_image_server.catalog.products import Products, products_of
from lxd_image_server.catalog.versions import ProductView, Versions

Views = list[ProductView]


class Assembly:
    def __init__(self, known: Versions, deltas: DeltaService, root_dir: str) -> None:
        self.known = known
        self.root_dir = root_dir
        self._feed = DeltaFeed(deltas)

    def views(self, hidden: Set[str]) -> Views:
        """Each product's versions that may be published, but those `hidden`."""
        return self.known.views(hidden)

    def without(self, views: Views, doomed: Set[str]) -> Views:
        return [view.without(doomed) for view in views]

    def listable(self, views: Views) -> frozenset[str]:
        """The delta files of `views` that may be listed (checked for what they are now)."""
        return self._feed.listable(_groups(views))

    def catalog(self, views: Views, listed: frozenset[str]) -> tuple[Products, set[str]]:
        """The products of `views` with the deltas `listed`, and the version directories
        (relative to images/) they list."""
        root = self.root_dir
        built = [e for view in views for e in view.built(root)]
        cands = None
        sha: dict[str, str] = {}
        if listed:
            known = self.known.sha256()
            sha = {p: known[p] for p in listed if p in known}
            cands = self._feed.built_candidates({v.product: v.built_group(root) for v in views})
        products = products_of(built, Digests(files=sha), root, listed, cands)
        return products, {rel for view in views for rel in view.listed(root)}

    def bare(self, views: Views) -> Products:
        """The products of `views` without their deltas (those of a publish skipped)."""
        return products_of([e for view in views for e in view.built(self.root_dir)])

    def plan(self, views: Views) -> None:
        """Hands the versions published to the deltas' plans (delta_feed.py). The digests they
        ask for are looked up in the hash cache when the records' are not (unchanged.OnDemand:
        a publish skipped)."""
        sha: Mapping[str, str] = self.known.sha256()
        first = next((r.ready for view in views for r in view.records), None)
        if first is not None and unchanged.deferred(first.digests):
            versions = [v for view in views for v in view.versions]
            sha = unchanged.CachedDigests(self.known.cache, versions)
        self._feed.published(_groups(views), sha)

    def whole(self, views: Views, hidden: Set[str]) -> bool:
        """Every version scanned is hidden or shown with all its files, and each of them has
        its sha256: the digests are then those of the files' identities (unchanged.py)."""
        expected = sum(1 for r in self.known.records() if r.scanned.path not in hidden)
        shown = [r for view in views for r in view.records]
        return len(shown) == expected and all(r.whole() for r in shown)


def _groups(views: Views) -> dict[str, Group]:
    """The products that publish a version, for the deltas (delta_feed.py)."""
    return {view.product: view.group() for view in views if view.versions}
