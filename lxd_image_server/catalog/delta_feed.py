"""What the pipeline asks of the deltas at each publish, worked out per product and kept: which
delta files each product may list (their candidates, deltas.candidates) and which of its
deltas are to be made or checked (deltawork.DeltaService.published).

Both depend only on the versions a product publishes, so each product's are kept from one
publish to the next under its key (versions.ProductView.key: its stamp, which changes with
every change to one of its records, and its hidden versions): a publish where one version
changed works out that one product again, not all of them. The plans depend also on what
the service plans with (its records, settings and xdelta3: DeltaService.plan_key); when that
changes, every product is planned again.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from lxd_image_server.catalog import deltas
from lxd_image_server.catalog.deltawork import DeltaService
from lxd_image_server.tree.scan import ScannedVersion

#: a product's versions (published, or built) under a key that is equal only for the same
#: versions (versions.ProductView.key and what it is derived with)
Group = tuple[Hashable, list[ScannedVersion]]


class Candidates:
    """deltas.candidates of each product, kept while its key is the same."""

    def __init__(self) -> None:
        #: product -> its key and its candidates
        self._kept: dict[str, tuple[Hashable, list[deltas.Candidate]]] = {}

    def __call__(self, by_product: Mapping[str, Group]) -> list[deltas.Candidate]:
        out: list[deltas.Candidate] = []
        kept = {}
        for product, (key, versions) in by_product.items():
            hit = self._kept.get(product)
            if hit is None or hit[0] != key:
                hit = (key, deltas.candidates(versions))
            kept[product] = hit
            out += hit[1]
        self._kept = kept  # (a product gone is forgotten)
        return out


class DeltaFeed:
    def __init__(self, service: DeltaService) -> None:
        self.service = service
        #: the candidates among the versions published (`listable`, the plans)
        self.candidates = Candidates()
        #: the candidates among those built (with an entry: products.products_of's)
        self.built_candidates = Candidates()
        #: product -> its key when it was last planned; all forgotten when the service's
        #: plan_key changes (`published`)
        self._planned: dict[str, Hashable] = {}
        self._plan_key: object = None

    def listable(self, by_product: Mapping[str, Group]) -> frozenset[str]:
        """The delta files checked for what they and their roots are now."""
        return deltas.listable(self.candidates(by_product), self.service.records())

    def published(self, by_product: Mapping[str, Group], sha256: Mapping[str, str]) -> None:
        """After a publish of `by_product`: the service plans the products that changed since
        their last plan (all of them when what it plans with changed). `sha256`: the files'
        digests by path."""
        key = self.service.plan_key()
        if key != self._plan_key:
            self._planned, self._plan_key = {}, key
        changed = [
            v
            for product, (key, versions) in by_product.items()
            if self._planned.get(product) != key
            for v in versions
        ]
        self._planned = {product: key for product, (key, _) in by_product.items()}
        if changed:
            self.service.published(changed, sha256)
