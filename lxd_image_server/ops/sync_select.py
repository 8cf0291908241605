"""`sync`: which of an upstream catalog's versions are wanted, and the files each one becomes.

Pure: an upstream images.json (parsed) and the filters in, a plan per version out; nothing is
read or written here.

A product is taken when it matches every filter key given (`os`, `release`, `arch`,
`variant`, `type`; the same key given twice matches either value; values are shell patterns,
compared without regard to case). Of each product the newest `keep` versions (by serial) that
have an image of a wanted type are taken. A version becomes the files this project's layout
names (tree/layout.py), each from one upstream item:

- the metadata tarball: `lxd.tar.xz` (one file when upstream's lxd.tar.xz and incus.tar.xz
  items are the same bytes, as on images.linuxcontainers.org; `incus.tar.xz` besides when they
  differ, or alone when upstream has only Incus's item);
- a container's root: `rootfs.squashfs` (upstream's `squashfs` item), or, where upstream has
  no squashfs, `root.tar.xz`; a VM's: `disk.qcow2` (upstream's `disk-kvm.img`). A root is
  taken only with the combined fingerprint the metadata item carries for it: that is the
  image's fingerprint, checked against the bytes before the version is placed;
- a version with no split container image: its unified tarball (`lxd_combined.tar.gz` or
  `incus_combined.tar.gz`), named `<sha256>.tar.gz` (its sha256 is its fingerprint);
- `metadata.json`: the product's release_title, aliases, requirements, release_codename and
  support_eol, so the catalog published here says what upstream said.

Upstream's deltas (`squashfs.vcdiff`, `disk-kvm.img.vcdiff` items) are noted with the root they
rebuild: sync_place.py uses one whose base version the tree holds instead of downloading the
whole root, and keeps none of them (this server makes its own). A version that cannot be
taken (an item path that would leave the tree, a malformed item, no usable serial) is refused
with one line naming it; the others are unaffected.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lxd_image_server.catalog.model import Item, Version, version_from_json
from lxd_image_server.ops.sync_fetch import check_item_path
from lxd_image_server.tree.layout import (
    COMBINED_FIELDS,
    OVERRIDES_NAME,
    LayoutError,
    VersionKey,
    parse_version_dir,
    serial_sort_key,
    valid_serial,
)
from lxd_image_server.tree.overrides import parse_overrides

log = logging.getLogger(__name__)

FILTER_KEYS = ("os", "release", "arch", "variant", "type")
#: type filter values -> the image types they mean
TYPES = {"container": "container", "vm": "virtual-machine", "virtual-machine": "virtual-machine"}
#: our file name of each upstream root ftype
ROOT_NAMES = {
    "squashfs": "rootfs.squashfs",
    "root.tar.xz": "root.tar.xz",
    "disk-kvm.img": "disk.qcow2",
}
META_FTYPES = ("lxd.tar.xz", "incus.tar.xz")
UNIFIED_FTYPES = ("lxd_combined.tar.gz", "incus_combined.tar.gz")
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


class FilterError(ValueError):
    """A --filter that is not KEY=VALUE with a known key (a usage error)."""


@dataclass(frozen=True)
class Filters:
    """KEY -> the patterns any of which a product's KEY must match."""

    patterns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def types(self) -> frozenset[str]:
        """The image types wanted ("container", "virtual-machine")."""
        given = self.patterns.get("type")
        if not given:
            return frozenset(TYPES.values())
        return frozenset(TYPES[v] for v in given)

    def match(self, props: Mapping[str, str]) -> bool:
        for key, pats in self.patterns.items():
            if key == "type":
                continue
            value = props.get(key, "").lower()
            if not any(fnmatch.fnmatchcase(value, p.lower()) for p in pats):
                return False
        return True

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, vs in sorted(self.patterns.items()) for v in vs)


def parse_filters(given: Iterable[str]) -> Filters:
    out: dict[str, list[str]] = {}
    for text in given:
        key, sep, value = text.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not sep or not value:
            raise FilterError(f"filter {text!r}: expected KEY=VALUE")
        if key not in FILTER_KEYS:
            raise FilterError(f"filter {text!r}: KEY is one of {', '.join(FILTER_KEYS)}")
        if key == "type" and value.lower() not in TYPES:
            raise FilterError(f"filter {text!r}: type is container or vm")
        out.setdefault(key, []).append(value.lower() if key == "type" else value)
    return Filters({k: tuple(v) for k, v in out.items()})


@dataclass(frozen=True)
class Want:
    """One file to download: our name for it and the upstream item it comes from."""

    name: str
    #: "<product> <version> <item key>": what an error message names
    label: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class VersionPlan:
    key: VersionKey
    product: str
    upstream_serial: str
    #: the metadata tarball(s), downloaded first (roots are hashed after them)
    metas: tuple[Want, ...]
    #: roots and unified tarball
    files: tuple[Want, ...]
    #: root name -> (metadata name, the fingerprint of the pair upstream states)
    combined: Mapping[str, tuple[str, str]]
    #: metadata.json's bytes, or b"" for none
    overrides: bytes = b""
    #: root name -> upstream's deltas to it: (the base's serial here, the delta file)
    deltas: Mapping[str, tuple[tuple[str, Want], ...]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.product} {self.upstream_serial}"

    @property
    def size(self) -> int:
        return sum(w.size for w in (*self.metas, *self.files))

    def fingerprints(self) -> list[str]:
        out = [fp for _, fp in self.combined.values()]
        out += [w.sha256 for w in self.files if w.name.endswith(".tar.gz")]
        return out


@dataclass
class Selection:
    plans: list[VersionPlan] = field(default_factory=list)
    #: one line per version (or product) refused
    refused: list[str] = field(default_factory=list)
    #: product -> the serials (ours) selected of it, newest last
    kept: dict[str, list[str]] = field(default_factory=dict)


def local_serial(upstream: str) -> str | None:
    """The serial our layout gives upstream's version key: itself when valid_serial, else (when
    it starts with YYYYMMDD) the first 12 of its digits as YYYYMMDD_HHMM (fewer: _0000);
    None when it names no such time."""
    if valid_serial(upstream):
        return upstream
    if not upstream[:8].isascii() or not upstream[:8].isdigit():
        return None
    digits = "".join(_DIGITS.findall(upstream))
    if len(digits) >= 12:
        candidate = f"{digits[:8]}_{digits[8:12]}"
    elif len(digits) >= 8:
        candidate = f"{digits[:8]}_0000"
    else:
        return None
    return candidate if valid_serial(candidate) else None


def _text(doc: Mapping[str, Any], key: str, default: str = "") -> str:
    value = doc.get(key, default)
    return value if isinstance(value, str) else default


def _product_props(name: str, doc: Mapping[str, Any]) -> dict[str, str]:
    parts = name.split(":")
    fallback = dict(zip(("os", "release", "arch", "variant"), parts, strict=False))
    return {k: _text(doc, k, fallback.get(k, "")) for k in ("os", "release", "arch", "variant")}


def _overrides(doc: Mapping[str, Any]) -> bytes:
    """metadata.json of the product's fields that parse_overrides accepts, one by one."""
    out: dict[str, Any] = {}
    for key in ("release_title", "release_codename", "support_eol", "aliases"):
        value = doc.get(key)
        if isinstance(value, str) and value.strip():
            out[key] = value
    reqs = doc.get("requirements")
    if not isinstance(reqs, dict):
        reqs = doc.get("lxd_requirements")
    if isinstance(reqs, dict) and reqs:
        out["requirements"] = reqs
    kept: dict[str, Any] = {}
    for key, value in out.items():
        trial = json.dumps({key: value}).encode()
        if parse_overrides(trial)[1] is None:
            kept[key] = value
    return json.dumps(kept, sort_keys=True).encode() + b"\n" if kept else b""


def _want(name: str, label: str, item: Item) -> Want:
    check_item_path(item.path)
    if not _HEX64.fullmatch(item.sha256):
        raise ValueError(f"sha256 {item.sha256[:70]!r} is not 64 lowercase hex digits")
    return Want(name, label, item.path, item.size, item.sha256)


def _plan_version(
    key: VersionKey, product: str, upstream_serial: str, v: Version, types: frozenset[str]
) -> VersionPlan | None:
    """The files of version `v` for the wanted `types`, or None when it has no such image.
    ValueError (naming the item) when an item it needs is unusable."""
    label = f"{product} {upstream_serial}"
    by_ftype: dict[str, tuple[str, Item]] = {}
    for ikey in sorted(v.items):
        by_ftype.setdefault(v.items[ikey].ftype, (ikey, v.items[ikey]))

    def want(name: str, ftype: str) -> Want:
        ikey, item = by_ftype[ftype]
        try:
            return _want(name, f"{label} item {ikey}", item)
        except ValueError as e:
            raise ValueError(f"item {ikey}: {e}") from None

    metas: list[tuple[str, Want]] = []  # (upstream ftype, want)
    for ftype in META_FTYPES:
        if ftype in by_ftype:
            w = want(ftype, ftype)
            if metas and metas[0][1].sha256 == w.sha256:
                continue  # the same file for both clients: one lxd.tar.xz
            metas.append((ftype, w))
    roots: dict[str, str] = {}  # root ftype -> metadata name it pairs with
    combined: dict[str, tuple[str, str]] = {}
    if metas:
        # the first metadata file is the one every root pairs with here
        _, first = metas[0]
        meta_item = by_ftype[metas[0][0]][1]
        for root_ftype in COMBINED_FIELDS:
            if root_ftype not in by_ftype:
                continue
            kind = "virtual-machine" if root_ftype == "disk-kvm.img" else "container"
            if kind not in types:
                continue
            if root_ftype == "root.tar.xz" and "squashfs" in roots:
                continue  # the squashfs is the container image clients take
            fp = meta_item.combined(root_ftype)
            if not fp:
                log.info(
                    "%s: no combined fingerprint for its %s item; not taking it", label, root_ftype
                )
                continue
            if not _HEX64.fullmatch(fp):
                raise ValueError(f"the combined fingerprint {fp[:70]!r} is not 64 hex digits")
            roots[root_ftype] = first.name
            combined[ROOT_NAMES[root_ftype]] = (first.name, fp)
    files = [want(ROOT_NAMES[r], r) for r in roots]
    if "container" in types and not any(r != "disk-kvm.img" for r in roots):
        for ftype in UNIFIED_FTYPES:
            if ftype in by_ftype:
                ikey, item = by_ftype[ftype]
                files.append(want(f"{item.sha256}.tar.gz", ftype))
                break
    if not files:
        return None
    used_metas = tuple(w for _, w in metas) if roots else ()
    deltas = {ROOT_NAMES[r]: _deltas(v, r, label) for r in roots}
    return VersionPlan(
        key,
        product,
        upstream_serial,
        used_metas,
        tuple(files),
        combined,
        deltas={name: d for name, d in deltas.items() if d},
    )


def _deltas(v: Version, root_ftype: str, label: str) -> tuple[tuple[str, Want], ...]:
    """Upstream's deltas to the `root_ftype` root of `v` (an unusable one is left out: a delta
    only saves bytes, the whole root is there too)."""
    out: list[tuple[str, Want]] = []
    for ikey, item in sorted(v.items.items()):
        if item.ftype != f"{root_ftype}.vcdiff" or not item.delta_base:
            continue
        base = local_serial(item.delta_base)
        try:
            want = _want(f".delta-{len(out)}.vcdiff", f"{label} item {ikey}", item)
        except ValueError as e:
            log.info("%s item %s: %s; not using that delta", label, ikey, e)
            continue
        if base is not None:
            out.append((base, want))
    return tuple(out)


def select(doc: Mapping[str, Any], filters: Filters, keep: int) -> Selection:
    """The versions of the parsed upstream images.json `doc` to hold: per product matching
    `filters`, its newest `keep` with an image of a wanted type."""
    out = Selection()
    products = doc.get("products")
    if not isinstance(products, dict):
        out.refused.append("images.json: no products object")
        return out
    types = filters.types()
    for pname in sorted(products):
        pdoc = products[pname]
        if not isinstance(pdoc, dict):
            out.refused.append(f"product {pname[:80]!r}: not an object; skipped")
            continue
        props = _product_props(pname, pdoc)
        if not filters.match(props):
            continue
        versions = pdoc.get("versions")
        if not isinstance(versions, dict):
            out.refused.append(f"product {pname[:80]!r}: no versions object; skipped")
            continue
        overrides = _overrides(pdoc)
        taken: list[VersionPlan] = []
        seen: set[str] = set()
        for userial in sorted(versions, key=serial_sort_key, reverse=True):
            if len(taken) >= keep:
                break
            label = f"{pname[:80]} {userial[:40]!r}"
            serial = local_serial(userial)
            if serial is None:
                out.refused.append(f"{label}: version key has no date (YYYYMMDD...); skipped")
                continue
            if serial in seen:
                out.refused.append(f"{label}: its serial {serial} is taken by a newer version")
                continue
            try:
                key = parse_version_dir(
                    (props["os"], props["release"], props["arch"], props["variant"], serial)
                )
                v = version_from_json(userial, versions[userial], "")
                plan = _plan_version(key, pname, userial, v, types)
            except (LayoutError, ValueError) as e:
                out.refused.append(f"{label}: {str(e).lstrip('.')}; not synced")
                seen.add(serial)
                continue
            if plan is None:
                continue
            seen.add(serial)
            if overrides:
                plan = dataclasses.replace(plan, overrides=overrides)
            taken.append(plan)
        if taken:
            taken.reverse()
            out.plans.extend(taken)
            out.kept[taken[0].key.product] = [p.key.serial for p in taken]
    return out


def names(plan: VersionPlan) -> Sequence[str]:
    """Every file name the version directory gets."""
    extra = [OVERRIDES_NAME] if plan.overrides else []
    return [w.name for w in (*plan.metas, *plan.files)] + extra
