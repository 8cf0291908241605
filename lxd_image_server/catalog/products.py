"""Scanned versions + digests -> the simplestreams documents (images.json, index.json).

A pure function of its inputs: no file system access, deterministic output. It logs why a
version is left out (incomplete, unhashable) so an operator can tell.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lxd_image_server.catalog.deltas import Candidate, candidates
from lxd_image_server.catalog.encode import Encoded
from lxd_image_server.catalog.hashing import Digests
from lxd_image_server.catalog.model import Client
from lxd_image_server.tree.layout import (
    COMBINED_FIELDS,
    VM_FTYPES,
    Role,
    VersionKey,
    serial_sort_key,
)
from lxd_image_server.tree.scan import FileStat, ScannedVersion
from lxd_image_server.tree.unified import CONTAINER_TYPE, VM_TYPE

log = logging.getLogger(__name__)

IMAGES_PATH = "streams/v1/images.json"
UPDATED_FORMAT = "%a, %d %b %Y %H:%M:%S +0000"
# every image is listed once for each client, under the ftypes that client reads (model.Client)
CLIENT_META_FTYPES = tuple(c.meta_ftype for c in Client)
CLIENT_UNIFIED_FTYPES = tuple(c.unified_ftype for c in Client)

Products = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class BuiltVersion:
    key: VersionKey
    items: dict[str, dict[str, Any]]
    #: "container" and/or "virtual-machine"
    types: frozenset[str]
    #: the version's entry in its product's "versions": {"items": items}, which keeps its JSON
    #: once encoded (encode.py), so a publish reuses the text of every version it built before
    entry: Encoded = field(init=False, repr=False, compare=False)
    #: serial_sort_key of the serial, kept: the products sort every version at every publish
    order: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entry", Encoded(items=self.items))
        object.__setattr__(self, "order", serial_sort_key(self.key.serial))


def _relpath(path: str, root_dir: str) -> str:
    """os.path.relpath for a path the scan built below root_dir (normalized, no '..'): a
    prefix cut, without relpath's normalization of both paths at every item."""
    prefix = root_dir if root_dir.endswith("/") else root_dir + "/"
    if path.startswith(prefix) and os.path.isabs(root_dir):
        return path[len(prefix) :]
    return os.path.relpath(path, root_dir)


def _item(f: FileStat, ftype: str, sha256: str, root_dir: str) -> dict[str, Any]:
    return {
        "ftype": ftype,
        "path": _relpath(f.path, root_dir),
        "size": f.size,
        "sha256": sha256,
    }


def build_version(
    v: ScannedVersion,
    digests: Digests,
    root_dir: str,
    unified_type: Callable[[FileStat], str] | None = None,
) -> BuiltVersion | None:
    """The items of one version, or None (logged) when it is not usable yet. `unified_type`:
    what a unified tarball holds (tree/unified.py; None: a container), for its items'
    `combined_type` (Incus 7.0.1+ takes a unified tarball without one for a container)."""
    where = v.path

    def hashed(f: FileStat) -> bool:
        return f.path in digests.files and f.path not in digests.failed

    by_role: dict[Role, list[FileStat]] = defaultdict(list)
    for f in sorted(v.files.values(), key=lambda f: (f.role.preference, f.name)):
        if hashed(f):
            by_role[f.role.role].append(f)

    metas = {f.name: f for f in by_role[Role.META]}
    roots: dict[str, FileStat] = {}
    for f in by_role[Role.ROOT]:
        if f.role.ftype in roots:
            log.warning(
                "%s: both %s and %s are %s roots; publishing %s",
                where,
                roots[f.role.ftype].name,
                f.name,
                f.role.ftype,
                roots[f.role.ftype].name,
            )
            continue
        roots[f.role.ftype] = f
    unified = by_role[Role.UNIFIED]
    if len(unified) > 1:
        log.warning(
            "%s: several unified tarballs; publishing %s and ignoring %s",
            where,
            unified[0].name,
            ", ".join(u.name for u in unified[1:]),
        )

    items: dict[str, dict[str, Any]] = {}
    types: set[str] = set()
    if metas and roots:
        for client_ftype in CLIENT_META_FTYPES:
            # the file named for this client if there is one, else the other one
            meta = metas.get(client_ftype) or next(iter(metas.values()))
            item = _item(meta, client_ftype, digests.files[meta.path], root_dir)
            for root_ftype, root in roots.items():
                combined = digests.combined.get((meta.path, root.path))
                if combined is None:
                    continue
                for field_name in COMBINED_FIELDS[root_ftype]:
                    item[field_name] = combined
            items[client_ftype] = item
        for root_ftype, root in roots.items():
            if all((m.path, root.path) in digests.combined for m in metas.values()):
                items[root_ftype] = _item(root, root_ftype, digests.files[root.path], root_dir)
                types.add("virtual-machine" if root_ftype in VM_FTYPES else "container")
    if unified:
        u = unified[0]
        kind = CONTAINER_TYPE if unified_type is None else unified_type(u)
        for client_ftype in CLIENT_UNIFIED_FTYPES:
            item = _item(u, client_ftype, digests.files[u.path], root_dir)
            if kind == VM_TYPE:
                item["combined_type"] = VM_TYPE
            items[client_ftype] = item
        types.add(kind)
    if not types:
        have = ", ".join(sorted(f.name for f in v.files.values())) or "no files"
        if metas:
            need = "a root filesystem (rootfs.squashfs, root.tar.xz or disk.qcow2)"
        elif roots:
            need = "a metadata tarball (lxd.tar.xz or incus.tar.xz)"
        else:
            need = "a metadata tarball and a root filesystem, or a unified tarball"
        log.info("not publishing %s yet: has %s, needs %s", where, have, need)
        return None
    return BuiltVersion(key=v.key, items=items, types=frozenset(types))


def default_aliases(key: VersionKey) -> list[str]:
    aliases = [f"{key.os}/{key.release}/{key.variant}"]
    if key.variant == "default":
        aliases.append(f"{key.os}/{key.release}")
    aliases.append(f"{key.os}/{key.release}/{key.arch}/{key.variant}")
    return aliases


def _dedupe(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def delta_item_key(ftype: str, base_serial: str) -> str:
    return f"{ftype}-{base_serial}"


def _add_deltas(
    grouped: dict[str, list[tuple[ScannedVersion, BuiltVersion]]],
    digests: Digests,
    root_dir: str,
    deltas: frozenset[str],
    cands: list[Candidate] | None = None,
) -> None:
    """Adds to each version the items of its deltas in `deltas` (checked: deltas.py) whose
    base is a published version of the same product with a root of the delta's kind. A
    version that gets one is a new BuiltVersion: the one given may be kept for later
    publishes (its items and text stay as they were)."""
    built = {v.path: b for group in grouped.values() for v, b in group}
    every = [v for group in grouped.values() for v, _ in group]
    added: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for c in candidates(every) if cands is None else cands:
        f = c.delta
        if f.path not in deltas or f.path not in digests.files or f.path in digests.failed:
            continue
        items, base_items = built[c.version.path].items, built[c.base.path].items
        # the roots listed must be the very files the delta was checked against
        if items.get(c.root_ftype, {}).get("path") != _relpath(
            c.target_root.path, root_dir
        ) or base_items.get(c.root_ftype, {}).get("path") != _relpath(c.base_root.path, root_dir):
            continue
        item = _item(f, f.role.ftype, digests.files[f.path], root_dir)
        item["delta_base"] = c.base.key.serial
        added[c.version.path][delta_item_key(f.role.ftype, c.base.key.serial)] = item
    for group in grouped.values():
        for i, (v, b) in enumerate(group):
            if v.path in added:
                group[i] = (v, BuiltVersion(b.key, {**b.items, **added[v.path]}, b.types))


def build_products(
    versions: Iterable[ScannedVersion],
    digests: Digests,
    root_dir: str,
    deltas: frozenset[str] = frozenset(),
) -> Products:
    """All products of the tree, keyed os:release:arch:variant (from the path). `deltas`:
    the delta files that may be listed (checked against their base, deltas.py)."""
    return products_of(
        [(v, b) for v in versions if (b := build_version(v, digests, root_dir)) is not None],
        digests,
        root_dir,
        deltas,
    )


def products_of(
    built: Iterable[tuple[ScannedVersion, BuiltVersion]],
    digests: Digests | None = None,
    root_dir: str = "",
    deltas: frozenset[str] = frozenset(),
    cands: list[Candidate] | None = None,
) -> Products:
    """The products of versions already built (`build_version`), e.g. kept from before, with
    the items of their deltas in `deltas` (their digests in `digests`). `cands`: the
    candidates (deltas.candidates) of exactly those versions, when the caller kept them."""
    grouped: dict[str, list[tuple[ScannedVersion, BuiltVersion]]] = defaultdict(list)
    for v, b in built:
        grouped[v.key.product].append((v, b))
    if deltas and digests is not None:
        _add_deltas(grouped, digests, root_dir, deltas, cands)

    products: Products = {}
    types: dict[str, frozenset[str]] = {}
    for pkey in sorted(grouped):
        entries = sorted(grouped[pkey], key=lambda e: e[1].order)
        newest, _ = entries[-1]
        key, ov = newest.key, newest.overrides
        product: dict[str, Any] = {
            "os": ov.os or key.os,
            "release": key.release,
            "release_title": ov.release_title or key.release,
            "arch": key.arch,
            "variant": ov.variant or key.variant,
            "aliases": _dedupe([*default_aliases(key), *ov.aliases]),
            "versions": {v.key.serial: b.entry for v, b in entries},
        }
        if ov.requirements:
            # "requirements" for current clients, "lxd_requirements" for LXD before 5.21
            product["requirements"] = ov.requirements_map
            product["lxd_requirements"] = ov.requirements_map
        if ov.release_codename:
            product["release_codename"] = ov.release_codename
        if ov.support_eol:
            product["support_eol"] = ov.support_eol
        products[pkey] = product
        types[pkey] = frozenset().union(*[b.types for _, b in entries])

    _resolve_alias_conflicts(products, types)
    for product in products.values():
        product["aliases"] = ",".join(product["aliases"])
    return products


def _resolve_alias_conflicts(products: Products, types: dict[str, frozenset[str]]) -> None:
    """An alias may name one image per (architecture, type): the clients refuse to pick
    otherwise. The product whose key sorts first keeps it; the others lose it, with a warning."""
    owners: dict[tuple[str, str, str], str] = {}
    for pkey in sorted(products):
        product = products[pkey]
        kept = []
        for alias in product["aliases"]:
            clash = next(
                (
                    owners[(alias, product["arch"], t)]
                    for t in sorted(types[pkey])
                    if (alias, product["arch"], t) in owners
                ),
                None,
            )
            if clash is not None:
                log.warning(
                    "alias %r of %s is already used by %s; dropping it from %s",
                    alias,
                    pkey,
                    clash,
                    pkey,
                )
                continue
            kept.append(alias)
            for t in types[pkey]:
                owners[(alias, product["arch"], t)] = pkey
        product["aliases"] = kept


def images_document(products: Products, updated: str) -> dict[str, Any]:
    return {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "products": products,
        "updated": updated,
    }


def index_document(products: Products, updated: str) -> dict[str, Any]:
    return {
        "format": "index:1.0",
        "index": {
            "images": {
                "datatype": "image-downloads",
                "format": "products:1.0",
                "path": IMAGES_PATH,
                "products": sorted(products),
                "updated": updated,
            }
        },
        "updated": updated,
    }
