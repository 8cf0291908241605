"""Each product of the catalog as last published, kept with its encoded JSON (encode.Encoded)
and reused while it is the same, so a publish encodes again only the products that changed.

A product is the same when its key is, and every field but its versions is equal. The key
says everything its versions are made of: the product's view (versions.ProductView.key: its
stamp, which changes with every change to one of its records, and its hidden versions), the
versions retention took out of it, and the deltas listed in it; the rest (aliases after their
conflicts are resolved, overrides of its newest version) is compared by value.

A new product is encoded at once, at the level images.json holds it, and its versions' own
text (each version's encode.Encoded, in its record's entry) is dropped then: the catalog's
text is kept once, in its products (about 20 MB at 20,000 versions), never twice. Were the
document's layout to change, the text kept would only be encoded again, never wrong.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from lxd_image_server.catalog.encode import Encoded, encode_utf8
from lxd_image_server.catalog.products import Products


class ProductCache:
    def __init__(self) -> None:
        #: product key -> (its key, its fields but "versions", the product as published)
        self._kept: dict[str, tuple[Hashable, dict[str, Any], Encoded]] = {}

    def reuse(self, products: Products, keys: Mapping[str, Hashable]) -> Products:
        """`products` with each product that is the same as last time replaced by the one
        kept, whose JSON is encoded already (a product without a key is never kept)."""
        out: Products = {}
        kept = {}
        for pkey, product in products.items():
            key = keys.get(pkey)
            if key is None:
                out[pkey] = product
                continue
            fields = {k: v for k, v in product.items() if k != "versions"}
            hit = self._kept.get(pkey)
            if hit is None or hit[0] != key or hit[1] != fields:
                hit = (key, fields, _encoded(pkey, product))
            kept[pkey] = hit
            out[pkey] = hit[2]
        self._kept = kept  # (a product gone is forgotten)
        return out


def _encoded(pkey: str, product: dict[str, Any]) -> Encoded:
    """`product`, its text encoded where images.json holds it ({"products": {pkey: ...}}),
    and its versions' own text dropped."""
    kept = Encoded(product)
    encode_utf8({"products": {pkey: kept}})
    for entry in kept["versions"].values():
        if isinstance(entry, Encoded):
            entry.cached = None
    return kept
