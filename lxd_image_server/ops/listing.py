"""`list`: what the published catalog offers, one row per image as a client sees it.

A version yields one image per root filesystem (sharing the metadata tarball) plus one for a
unified tarball. The fingerprint is what `lxc image list` shows: the combined sha256 of
metadata + root for split images, the tarball's own sha256 for unified ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from lxd_image_server.catalog.products import (
    CLIENT_META_FTYPES,
    CLIENT_UNIFIED_FTYPES,
    serial_sort_key,
)
from lxd_image_server.catalog.readback import read_document
from lxd_image_server.progress import human
from lxd_image_server.tree.layout import COMBINED_FIELDS, VM_FTYPES

FORMATS = ("table", "json", "csv")


class CatalogMissing(Exception):
    """No readable images.json: nothing was published yet."""


@dataclass(frozen=True)
class ImageRow:
    product: str
    version: str
    #: container or virtual-machine
    type: str
    #: squashfs, root.tar.xz, disk-kvm.img or unified
    root: str
    #: bytes a client downloads
    size: int
    fingerprint: str
    aliases: tuple[str, ...]
    files: tuple[str, ...]
    #: deltas a client holding an older version downloads instead of the root:
    #: "<base serial> <bytes>"
    deltas: tuple[str, ...] = ()


def read_catalog(streams_dir: str) -> dict[str, Any]:
    path = os.path.join(streams_dir, "images.json")
    try:
        doc = read_document(path)
    except FileNotFoundError:
        raise CatalogMissing(f"no catalog at {path}: run `lxd-image-server update`") from None
    except OSError as e:
        raise CatalogMissing(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CatalogMissing(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("products"), dict):
        raise CatalogMissing(f"{path} is not a simplestreams products document")
    return doc


def _meta_item(items: dict[str, Any]) -> dict[str, Any] | None:
    for ftype in CLIENT_META_FTYPES:
        for item in items.values():
            if item.get("ftype") == ftype:
                return dict(item)
    return None


def image_rows(doc: dict[str, Any]) -> list[ImageRow]:
    rows: list[ImageRow] = []
    for pkey in sorted(doc["products"]):
        product = doc["products"][pkey]
        aliases = tuple(a for a in str(product.get("aliases", "")).split(",") if a)
        versions = product.get("versions") or {}
        for serial in sorted(versions, key=serial_sort_key):
            items: dict[str, Any] = versions[serial].get("items") or {}
            meta = _meta_item(items)
            for item in sorted(items.values(), key=lambda i: str(i.get("ftype"))):
                ftype = item.get("ftype")
                if ftype in COMBINED_FIELDS and meta is not None:
                    rows.append(
                        ImageRow(
                            product=pkey,
                            version=serial,
                            type="virtual-machine" if ftype in VM_FTYPES else "container",
                            root=str(ftype),
                            size=int(meta.get("size", 0)) + int(item.get("size", 0)),
                            fingerprint=str(meta.get(COMBINED_FIELDS[ftype][0], "")),
                            aliases=aliases,
                            files=(str(meta.get("path")), str(item.get("path"))),
                            deltas=_deltas(items, f"{ftype}.vcdiff"),
                        )
                    )
            unified = next(
                (i for f in CLIENT_UNIFIED_FTYPES for i in items.values() if i.get("ftype") == f),
                None,
            )
            if unified is not None:
                rows.append(
                    ImageRow(
                        product=pkey,
                        version=serial,
                        type="container",
                        root="unified",
                        size=int(unified.get("size", 0)),
                        fingerprint=str(unified.get("sha256", "")),
                        aliases=aliases,
                        files=(str(unified.get("path")),),
                    )
                )
    return rows


def _deltas(items: dict[str, Any], ftype: str) -> tuple[str, ...]:
    found = [i for i in items.values() if i.get("ftype") == ftype and i.get("delta_base")]
    return tuple(
        f"{i['delta_base']} {int(i.get('size', 0))}"
        for i in sorted(found, key=lambda i: serial_sort_key(str(i["delta_base"])))
    )


def render(rows: Iterable[ImageRow], fmt: str) -> str:
    rows = list(rows)
    if fmt == "json":
        return json.dumps([_json_row(r) for r in rows], indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "product",
                "version",
                "type",
                "root",
                "size",
                "fingerprint",
                "aliases",
                "files",
                "deltas",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.product,
                    r.version,
                    r.type,
                    r.root,
                    r.size,
                    r.fingerprint,
                    ",".join(r.aliases),
                    " ".join(r.files),
                    ",".join(r.deltas),
                ]
            )
        return out.getvalue()
    if fmt == "table":
        return _table(rows)
    raise ValueError(f"unknown format {fmt!r}")


def _json_row(r: ImageRow) -> dict[str, Any]:
    doc = asdict(r)
    doc["aliases"] = list(r.aliases)
    doc["files"] = list(r.files)
    doc["deltas"] = [
        {"base": base, "size": int(size)} for base, size in (d.split(" ") for d in r.deltas)
    ]
    return doc


def _table(rows: list[ImageRow]) -> str:
    if not rows:
        return "(the catalog is empty)\n"
    header = ("PRODUCT", "VERSION", "TYPE", "ROOT", "SIZE", "FINGERPRINT", "DELTAS", "ALIASES")
    body = [
        (
            r.product,
            r.version,
            "VM" if r.type == "virtual-machine" else "CONTAINER",
            r.root,
            human(r.size),
            r.fingerprint[:12],
            ", ".join(f"{b} ({human(int(n))})" for b, n in (d.split(" ") for d in r.deltas)) or "-",
            ", ".join(r.aliases),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines = []
    for row in (header, *body):
        cells = [
            c.rjust(w) if i == 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
