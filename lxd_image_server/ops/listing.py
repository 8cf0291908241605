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

from lxd_image_server.catalog.model import Catalog, catalog_from_json, read_document
from lxd_image_server.progress import human

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


def read_catalog(streams_dir: str) -> Catalog:
    path = os.path.join(streams_dir, "images.json")
    try:
        doc = read_document(path)
    except FileNotFoundError:
        raise CatalogMissing(f"no catalog at {path}: run `lxd-image-server update`") from None
    except OSError as e:
        raise CatalogMissing(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        if os.path.getsize(path) == 0:
            raise CatalogMissing(
                f"{path} is empty: clients refuse it (LXD keeps its stale cached copy)"
            ) from None
        raise CatalogMissing(f"cannot read {path}: {e}") from None
    try:
        return catalog_from_json(doc)
    except ValueError as e:
        raise CatalogMissing(f"{path} is not a simplestreams products document: {e}") from None


def image_rows(catalog: Catalog) -> list[ImageRow]:
    """One row per image of every version, as LXD sees it (Incus's view when a version has
    no LXD items: both clients see the same images)."""
    rows: list[ImageRow] = []
    for pkey in sorted(catalog.products):
        product = catalog.products[pkey]
        for serial in product.serials():
            version = product.versions[serial]
            images = version.client_images()
            for image in sorted(images, key=lambda i: (i.root == "unified", i.root)):
                rows.append(
                    ImageRow(
                        product=pkey,
                        version=serial,
                        type=image.type,
                        root=image.root,
                        size=image.size,
                        fingerprint=image.fingerprint,
                        aliases=product.aliases,
                        files=tuple(f.path for f in image.files),
                        deltas=tuple(
                            f"{d.delta_base} {d.size}" for d in version.deltas(image.root)
                        ),
                    )
                )
    return rows


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
