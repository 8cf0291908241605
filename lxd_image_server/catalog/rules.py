"""The rules a published catalog must keep for every client, checked without reading a file.

The newest clients (LXD 5.0.7, 5.21.5, 6.9 and later; Incus 7.0.1, 7.3, Debian trixie's
6.0.4-2+deb13u9) refuse what older ones let through, and the snap-only LXD cannot be run
here: these are their rules, read from their code (docs/clients.md lists them with the
versions), stated once so that `verify` (ops/verify.py) holds every catalog to them. What needs
the files' bytes (a size, a sha256, a fingerprint equal to the bytes, what a unified tarball
holds) is ops/verify.py's; this module is a pure function of the two documents.

Each rule broken is one Problem, one line: its kind, where (a file's path, a product, or
"product version") and what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from lxd_image_server.catalog.model import (
    COMBINED_ATTRS,
    CONTAINER_TYPE,
    IMAGE_DOWNLOADS,
    VM_TYPE,
    Catalog,
    Client,
    Index,
    Item,
    Product,
)
from lxd_image_server.tree.layout import COMBINED_FIELDS

#: sha256 values and fingerprints: clients refuse anything else before they download
HEX64 = re.compile(r"[0-9a-f]{64}")
DELTA_SUFFIX = ".vcdiff"
IMAGES_JSON = "streams/v1/images.json"
INDEX_JSON = "streams/v1/index.json"
_META_FTYPES = frozenset(c.meta_ftype for c in Client)
_UNIFIED_FTYPES = frozenset(c.unified_ftype for c in Client)
_TYPES = (CONTAINER_TYPE, VM_TYPE)


@dataclass(frozen=True)
class Problem:
    #: empty, index, path, hash, requirements, delta, type, fingerprint (a rootless one) (the
    #: rules); missing, unreadable, size, sha256, fingerprint, type (the files, ops/verify.py)
    kind: str
    #: a file's path relative to the root, a product, or "product version"
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.upper():<12} {self.where}: {self.detail}"


def path_problem(path: str) -> str | None:
    """Why a path in the catalog is not one relative to the served root, or None."""
    if not path:
        return "an empty path"
    if path.startswith("/"):
        return "an absolute path (clients join it to the remote's URL)"
    if ".." in path.split("/"):
        return "a path with '..' (it leaves the served root)"
    return None


def check_index(index: Index, catalog: Catalog) -> list[Problem]:
    """index.json: one image-downloads entry, at a relative path, naming exactly the products
    of images.json (a client skips an entry whose product list is empty)."""
    problems: list[Problem] = []
    entries = {k: e for k, e in index.index.items() if e.datatype == IMAGE_DOWNLOADS}
    if not entries:
        return [Problem("empty", INDEX_JSON, "no image-downloads entry: clients see no image")]
    for name, entry in sorted(entries.items()):
        why = path_problem(entry.path)
        if why:
            problems.append(Problem("path", INDEX_JSON, f"index.{name}.path {entry.path!r}: {why}"))
        if not entry.products:
            problems.append(
                Problem(
                    "empty",
                    INDEX_JSON,
                    f"index.{name} lists no product: clients skip it and see no image",
                )
            )
            continue
        listed, have = set(entry.products), set(catalog.products)
        if listed != have:
            extra, lacking = sorted(listed - have), sorted(have - listed)
            parts = []
            if extra:
                parts.append(f"lists {len(extra)} product(s) images.json lacks ({extra[0]}...)")
            if lacking:
                parts.append(f"omits {len(lacking)} of images.json's ({lacking[0]}...)")
            problems.append(Problem("index", INDEX_JSON, f"index.{name} " + "; ".join(parts)))
    return problems


def _hex_fields(item: Item) -> Iterator[tuple[str, str]]:
    yield "sha256", item.sha256
    for name, attr in COMBINED_ATTRS.items():
        value = getattr(item, attr)
        if value is not None:
            yield name, value


def _item_problems(where: str, key: str, item: Item) -> Iterator[Problem]:
    why = path_problem(item.path)
    if why:
        yield Problem("path", item.path or where, f"items.{key}: {why}")
    for name, value in _hex_fields(item):
        if not HEX64.fullmatch(value):
            yield Problem(
                "hash",
                where,
                f"items.{key}.{name} {value[:70]!r} is not 64 lowercase hex digits",
            )
    legacy, rootxz = item.combined_sha256, item.combined_rootxz_sha256
    if legacy and rootxz and legacy != rootxz:
        yield Problem(
            "hash", where, f"items.{key}: combined_sha256 and combined_rootxz_sha256 differ"
        )
    if item.combined_type is not None:
        if item.ftype not in _UNIFIED_FTYPES:
            yield Problem("type", where, f"items.{key}: combined_type on a {item.ftype} item")
        elif item.combined_type not in _TYPES:
            yield Problem(
                "type",
                where,
                f"items.{key}.combined_type {item.combined_type!r}: "
                f"expected {CONTAINER_TYPE!r} or {VM_TYPE!r}",
            )


def _rootless_fingerprints(where: str, key: str, item: Item, roots: set[str]) -> Iterator[Problem]:
    """A metadata item's combined fingerprint for a root type the version does not list:
    no client can check it (the image it names cannot be downloaded)."""
    for root_ftype, names in COMBINED_FIELDS.items():
        for name in names:
            if getattr(item, COMBINED_ATTRS[name]) is not None and root_ftype not in roots:
                yield Problem(
                    "fingerprint", where, f"items.{key}.{name} names no root file in the version"
                )


def _delta_problems(product: Product, serial: str, key: str, item: Item) -> Iterator[Problem]:
    where = f"{product.name} {serial}"
    root_ftype = item.ftype.removesuffix(DELTA_SUFFIX)
    if root_ftype not in COMBINED_FIELDS:
        yield Problem("delta", where, f"items.{key}: {item.ftype} is a delta of no root type")
        return
    base = item.delta_base
    if base is None:
        yield Problem("delta", where, f"items.{key}: a {item.ftype} item without delta_base")
        return
    if base == serial or base not in product.versions:
        yield Problem(
            "delta",
            where,
            f"{item.path} is a delta from {base!r}, not another version of {product.name}",
        )
        return
    if product.versions[serial].by_ftype(root_ftype) is None:
        yield Problem("delta", where, f"{item.path}: the version has no {root_ftype} root")
    base_version = product.versions[base]
    metas = [m for m in (base_version.by_ftype(f) for f in sorted(_META_FTYPES)) if m]
    if not metas or not all(m.combined(root_ftype) for m in metas):
        field = COMBINED_FIELDS[root_ftype][0]
        yield Problem(
            "delta",
            where,
            f"{item.path}: base {base}'s metadata carries no {field}: "
            "no client can tell it holds the base",
        )


def _requirements(product: Product) -> Problem | None:
    if product.requirements == product.lxd_requirements:
        return None
    return Problem(
        "requirements",
        product.name,
        f"requirements {dict(product.requirements or {})!r} and lxd_requirements "
        f"{dict(product.lxd_requirements or {})!r} differ (or one is absent): LXD 5.0.2 reads "
        "only lxd_requirements, Incus only requirements, LXD 5.0.3+ the first present",
    )


def check_catalog(catalog: Catalog) -> list[Problem]:
    """images.json against the clients' rules: not empty; every sha256 and fingerprint 64
    lowercase hex; relative paths; requirements equal to lxd_requirements or both absent;
    every delta from another version of its product whose metadata carries the fingerprint
    of the delta's root type; combined_type only on unified items, one of the two types."""
    problems: list[Problem] = []
    if catalog.datatype != IMAGE_DOWNLOADS:
        problems.append(
            Problem("index", IMAGES_JSON, f"datatype {catalog.datatype!r}, not {IMAGE_DOWNLOADS}")
        )
    if not catalog.products:
        problems.append(Problem("empty", IMAGES_JSON, "no product: clients see no image"))
    for pkey in sorted(catalog.products):
        product = catalog.products[pkey]
        req = _requirements(product)
        if req is not None:
            problems.append(req)
        if not product.versions:
            problems.append(Problem("empty", pkey, "a product without versions"))
        for serial in sorted(product.versions):
            where = f"{pkey} {serial}"
            items = product.versions[serial].items
            if not items:
                problems.append(Problem("empty", where, "a version without items"))
            roots = {item.ftype for item in items.values()}
            for key in sorted(items):
                item = items[key]
                problems.extend(_item_problems(where, key, item))
                problems.extend(_rootless_fingerprints(where, key, item, roots))
                if item.ftype.endswith(DELTA_SUFFIX) or item.delta_base is not None:
                    problems.extend(_delta_problems(product, serial, key, item))
    return problems


def check_unified_types(catalog: Catalog, holds: Mapping[str, str]) -> list[Problem]:
    """Every unified item whose tarball holds a VM (`holds`: path -> the type its content
    says, for the tarballs that could be read) says `combined_type: virtual-machine`, and no
    container's says so: Incus 7.0.1+ types the image by that field alone."""
    problems: list[Problem] = []
    for pkey in sorted(catalog.products):
        product = catalog.products[pkey]
        for serial in sorted(product.versions):
            items = product.versions[serial].items
            for key in sorted(items):
                item = items[key]
                held = holds.get(item.path)
                if item.ftype not in _UNIFIED_FTYPES or held is None:
                    continue
                said = item.combined_type or CONTAINER_TYPE
                if said != held:
                    problems.append(
                        Problem(
                            "type",
                            f"{pkey} {serial}",
                            f"items.{key}: {item.path} holds a {held} image, the catalog says "
                            f"combined_type {item.combined_type or '(absent: container)'}",
                        )
                    )
    return problems
