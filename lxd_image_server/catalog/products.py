"""Scanned versions + digests -> the catalog as the typed model (model.py): products,
versions, items, aliases, and the documents images.json and index.json (encode.py writes them).

A pure function of its inputs: no file system access, deterministic output. It logs why a
version is left out (incomplete, unhashable) so an operator can tell.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from lxd_image_server.catalog.deltas import Candidate, candidates
from lxd_image_server.catalog.hashing import Digests
from lxd_image_server.catalog.model import (
    COMBINED_ATTRS,
    IMAGE_DOWNLOADS,
    INDEX_FORMAT,
    PRODUCTS_FORMAT,
    Catalog,
    Client,
    Index,
    IndexEntry,
    Item,
    Product,
    Version,
)
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

#: the catalog's products by key (os:release:arch:variant)
Products = Mapping[str, Product]


@dataclass(frozen=True, slots=True)
class BuiltVersion:
    key: VersionKey
    #: the version as published; it keeps its entry's text once encoded (Version.derived), so a
    #: publish reuses the text of every version it built before
    version: Version
    #: "container" and/or "virtual-machine"
    types: frozenset[str]
    #: the first half of serial_sort_key of the serial (`order`), kept: the products sort
    #: every version at every publish
    digits: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digits", serial_sort_key(self.key.serial)[0])

    @property
    def order(self) -> tuple[str, str]:
        """serial_sort_key of the serial."""
        return (self.digits, self.key.serial)

    @property
    def items(self) -> Mapping[str, Item]:
        return self.version.items


def _relpath(path: str, root_dir: str) -> str:
    """os.path.relpath for a path the scan built below root_dir (normalized, no '..'): a
    prefix cut, without relpath's normalization of both paths at every item."""
    prefix = root_dir if root_dir.endswith("/") else root_dir + "/"
    if path.startswith(prefix) and os.path.isabs(root_dir):
        return path[len(prefix) :]
    return os.path.relpath(path, root_dir)


def _item(f: FileStat, ftype: str, sha256: str, root_dir: str, **more: str) -> Item:
    return Item(ftype, _relpath(f.path, root_dir), f.size, sha256, **more)


#: a version's types, one object each (kept with each of 20,000 versions and more)
_TYPES = {
    t: t
    for t in (
        frozenset({CONTAINER_TYPE}),
        frozenset({VM_TYPE}),
        frozenset({CONTAINER_TYPE, VM_TYPE}),
    )
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

    items: dict[str, Item] = {}
    types: set[str] = set()
    paths: dict[str, str] = {}

    def item(f: FileStat, ftype: str, sha256: str, **more: str) -> Item:
        # (a file listed for both clients: one string for its path)
        path = paths.get(f.path)
        if path is None:
            path = paths[f.path] = _relpath(f.path, root_dir)
        return Item(ftype, path, f.size, sha256, **more)

    if metas and roots:
        for client_ftype in CLIENT_META_FTYPES:
            # the file named for this client if there is one, else the other one
            meta = metas.get(client_ftype) or next(iter(metas.values()))
            fingerprints: dict[str, str] = {}
            for root_ftype, root in roots.items():
                combined = digests.combined.get((meta.path, root.path))
                if combined is None:
                    continue
                for field_name in COMBINED_FIELDS[root_ftype]:
                    fingerprints[COMBINED_ATTRS[field_name]] = combined
            sha256 = digests.files[meta.path]
            items[client_ftype] = item(meta, client_ftype, sha256, **fingerprints)
        for root_ftype, root in roots.items():
            if all((m.path, root.path) in digests.combined for m in metas.values()):
                items[root_ftype] = item(root, root_ftype, digests.files[root.path])
                types.add("virtual-machine" if root_ftype in VM_FTYPES else "container")
    if unified:
        u = unified[0]
        kind = CONTAINER_TYPE if unified_type is None else unified_type(u)
        holds = {"combined_type": VM_TYPE} if kind == VM_TYPE else {}
        for client_ftype in CLIENT_UNIFIED_FTYPES:
            items[client_ftype] = item(u, client_ftype, digests.files[u.path], **holds)
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
    kinds = frozenset(types)
    return BuiltVersion(v.key, Version(v.key.serial, items), _TYPES.get(kinds, kinds))


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
    added: dict[str, dict[str, Item]] = defaultdict(dict)
    for c in candidates(every) if cands is None else cands:
        f = c.delta
        if f.path not in deltas or f.path not in digests.files or f.path in digests.failed:
            continue
        root = built[c.version.path].items.get(c.root_ftype)
        base_root = built[c.base.path].items.get(c.root_ftype)
        # the roots listed must be the very files the delta was checked against
        if root is None or root.path != _relpath(c.target_root.path, root_dir):
            continue
        if base_root is None or base_root.path != _relpath(c.base_root.path, root_dir):
            continue
        base = c.base.key.serial
        item = _item(f, f.role.ftype, digests.files[f.path], root_dir, delta_base=base)
        added[c.version.path][delta_item_key(f.role.ftype, base)] = item
    for group in grouped.values():
        for i, (v, b) in enumerate(group):
            if v.path in added:
                version = Version(b.version.serial, {**b.items, **added[v.path]})
                group[i] = (v, BuiltVersion(b.key, version, b.types))


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

    aliases: dict[str, list[str]] = {}
    arch: dict[str, str] = {}
    types: dict[str, frozenset[str]] = {}
    for pkey, entries in grouped.items():
        entries.sort(key=lambda e: e[1].order)
        newest = entries[-1][0]
        aliases[pkey] = _dedupe([*default_aliases(newest.key), *newest.overrides.aliases])
        arch[pkey] = newest.key.arch
        types[pkey] = frozenset().union(*[b.types for _, b in entries])
    _resolve_alias_conflicts(aliases, arch, types)

    products: dict[str, Product] = {}
    for pkey in sorted(grouped):
        entries = grouped[pkey]
        newest = entries[-1][0]
        key, ov = newest.key, newest.overrides
        # "requirements" for current clients, "lxd_requirements" for LXD before 5.21
        requirements = ov.requirements_map if ov.requirements else None
        products[pkey] = Product(
            name=pkey,
            os=ov.os or key.os,
            release=key.release,
            release_title=ov.release_title or key.release,
            arch=key.arch,
            variant=ov.variant or key.variant,
            aliases=tuple(aliases[pkey]),
            versions={v.key.serial: b.version for v, b in entries},
            requirements=requirements,
            lxd_requirements=requirements,
            release_codename=ov.release_codename or None,
            support_eol=ov.support_eol or None,
        )
    return products


def _resolve_alias_conflicts(
    aliases: dict[str, list[str]], arch: Mapping[str, str], types: Mapping[str, frozenset[str]]
) -> None:
    """An alias may name one image per (architecture, type): the clients refuse to pick
    otherwise. The product whose key sorts first keeps it; the others lose it, with a warning."""
    owners: dict[tuple[str, str, str], str] = {}
    for pkey in sorted(aliases):
        kept = []
        for alias in aliases[pkey]:
            clash = next(
                (
                    owners[(alias, arch[pkey], t)]
                    for t in sorted(types[pkey])
                    if (alias, arch[pkey], t) in owners
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
                owners[(alias, arch[pkey], t)] = pkey
        aliases[pkey] = kept


def catalog_of(products: Products, updated: str) -> Catalog:
    """images.json."""
    return Catalog("images", IMAGE_DOWNLOADS, PRODUCTS_FORMAT, updated, products)


def index_of(products: Products, updated: str) -> Index:
    """index.json: it names images.json and its products."""
    names = tuple(sorted(products))
    entry = IndexEntry(IMAGE_DOWNLOADS, PRODUCTS_FORMAT, IMAGES_PATH, names, updated)
    return Index(INDEX_FORMAT, updated, {"images": entry})
