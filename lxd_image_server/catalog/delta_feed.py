"""What the pipeline asks of the deltas at each publish, worked out per product and kept: which
delta files each product may list (their candidates, deltas.candidates) and which of its
deltas are to be made or checked (deltawork.DeltaService.published).

Both depend only on the versions a product publishes, so each product's are kept from one
publish to the next, keyed by the stamps of those versions' records (record.py: a stamp changes
with every change of its record): a publish where one version changed works out that one
product again, not all of them. The plans depend also on what the service plans with (its
records, settings and xdelta3: DeltaService.plan_key); when that changes, every product is
planned again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lxd_image_server.catalog import deltas
from lxd_image_server.catalog.deltawork import DeltaService
from lxd_image_server.catalog.record import VersionRecord
from lxd_image_server.tree.scan import ScannedVersion

#: a product's published versions: the stamps of their records and the versions as shown
Group = tuple[tuple[int, ...], list[ScannedVersion]]


def groups(shown: Iterable[tuple[VersionRecord, ScannedVersion]]) -> dict[str, Group]:
    """The published versions (each record with its version as shown) by product."""
    stamps: dict[str, list[int]] = {}
    versions: dict[str, list[ScannedVersion]] = {}
    for r, v in shown:
        product = v.key.product
        if product in versions:
            stamps[product].append(r.stamp)
            versions[product].append(v)
        else:
            stamps[product], versions[product] = [r.stamp], [v]
    return {p: (tuple(stamps[p]), versions[p]) for p in versions}


class Candidates:
    """deltas.candidates of each product, kept while the stamps of its versions are the same."""

    def __init__(self) -> None:
        #: product -> the stamps of its versions and their candidates
        self._kept: dict[str, tuple[tuple[int, ...], list[deltas.Candidate]]] = {}

    def __call__(self, by_product: Mapping[str, Group]) -> list[deltas.Candidate]:
        out: list[deltas.Candidate] = []
        kept = {}
        for product, (stamps, versions) in by_product.items():
            hit = self._kept.get(product)
            if hit is None or hit[0] != stamps:
                hit = (stamps, deltas.candidates(versions))
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
        #: product -> the stamps of its versions when it was last planned; all forgotten
        #: when the service's plan_key changes (`published`)
        self._planned: dict[str, tuple[int, ...]] = {}
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
            for product, (stamps, versions) in by_product.items()
            if self._planned.get(product) != stamps
            for v in versions
        ]
        self._planned = {product: stamps for product, (stamps, _) in by_product.items()}
        if changed:
            self.service.published(changed, sha256)
