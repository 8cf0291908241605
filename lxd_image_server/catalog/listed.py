"""What the published catalog lists, as its writer knows it: the version directories of its
last publish and, when asked, the files with their sizes (departures.Listing). Not known after
a publish this writer skipped (unchanged.py) or before its first: taken from the record of the
last publish then (departures.listed, published.py). A publish that would drop a listed
version for no reason it can name is refused (departures.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from lxd_image_server.catalog import departures
from lxd_image_server.catalog.model import read_document
from lxd_image_server.catalog.products import Products
from lxd_image_server.config import Paths


def listed_among(products: Products, rels: Iterable[str]) -> set[str]:
    """Those of the version directories `rels` (relative to images/) that `products` list:
    looked up one by one (the whole catalog's listing costs a pass over its items)."""
    out = set()
    for rel in rels:
        product, _, serial = rel.rpartition("/")
        listed = products.get(product.replace("/", ":"))
        if listed is not None and serial in listed.versions:
            out.add(rel)
    return out


def _versions_in(paths: Paths) -> set[str] | None:
    """The version directories (relative to images/) of the items images.json lists, read
    bounded (model.read_document) but not into the typed model: a third of the time at 20,000
    versions. None when it cannot be read so or is not shaped as a catalog: only the typed
    reading says what that means. Every item's path is taken, as departures.listing_of takes
    them, so these are the versions of departures.listed whenever that reads images.json."""
    try:
        doc = read_document(os.path.join(paths.streams_dir, "images.json"))
    except (OSError, ValueError):
        return None
    images = paths.served_images
    out: set[str] = set()
    try:
        for product in doc["products"].values():
            for version in product["versions"].values():
                for item in version["items"].values():
                    path = item["path"]
                    if not isinstance(path, str):
                        return None
                    if path.startswith(images):
                        out.add(path[len(images) :].rpartition("/")[0])
    except (AttributeError, KeyError, TypeError):
        return None
    return out


#: images.json as found on disk (device, inode, mtime, size), None: missing
CatalogState = tuple[int, int, int, int] | None


class Listed:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        #: the version directories (relative to images/) of the last publish (a tuple: a set
        #: of 20,000 takes 2 MiB, and it is only gone through), and its products
        self._versions: tuple[str, ...] | None = None
        self._products: Products | None = None
        #: the files they list and their sizes, made when first asked for
        self._listing: departures.Listing | None = None

    def published(self, products: Products, versions: set[str]) -> None:
        self._products, self._versions, self._listing = products, tuple(versions), None

    def unknown(self) -> None:
        """A publish was skipped: what is listed is read back if ever needed."""
        self._products = self._versions = self._listing = None

    def listing(self) -> departures.Listing:
        if self._listing is None:
            if self._products is not None:
                self._listing = departures.listing_of(self._products)
            else:
                self._listing = departures.listed(self.paths.state_dir, self.paths.streams_dir)
        return self._listing

    def check(
        self,
        publishing: set[str],
        pruned: Callable[[str], bool],
        scanned: Callable[[str], bool],
        clock: Callable[[], float],
    ) -> None:
        """Raises departures.UnexplainedDepartures when a version listed now would leave the
        catalog `publishing` for no reason this writer can name."""
        before: Iterable[str] | None = self._versions
        if before is None and not os.path.lexists(self.paths.state.published):
            # no record (a first publish, an emptied state directory): images.json read back,
            # its item paths only; when every version it lists is still published, the check
            # of the typed reading (departures.listed) would pass too, and it is not made
            quick = _versions_in(self.paths)
            if quick is not None and quick <= publishing:
                before = quick
        if before is None:
            # (read back from the record, the listing is not kept: every file with its size,
            # held through the publish this check precedes, which replaces it anyway)
            listing = self._listing
            if listing is None:
                listing = departures.listed(self.paths.state_dir, self.paths.streams_dir)
            before = listing.versions(self.paths.served_images)
            del listing
        known = departures.Known(self.paths.img_dir, pruned=pruned, scanned=scanned, clock=clock)
        departures.check(before, publishing, known)

    def state(self) -> CatalogState:
        """images.json as it is now: another writer published when it changes."""
        try:
            st = os.lstat(os.path.join(self.paths.streams_dir, "images.json"))
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
