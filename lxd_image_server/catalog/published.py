"""What the writer published last, recorded beside the catalog: it never reads images.json
back to learn what it wrote.

The record (StateDir.published, `published.json`) holds the catalog's `updated` (kept while
the content stays the same, so clients' caches stay valid; the page shows it) and the version
directories it lists (departures.py: none leaves without a reason). publish.py writes it
atomically before images.json: a record ahead of a catalog that a crash left unwritten names
only versions whose departure was checked already, or that are about to be listed.

It is read bounded (a regular file, no link followed, at most MAX_RECORD_BYTES) and checked
entry by entry; anything wrong with it (missing, a link, too large, not JSON, another shape) is
one log line and None: the caller falls back to what it can tell without it (publish: a new
`updated`; departures: what images.json lists, read as a client reads it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lxd_image_server.catalog.products import Products
from lxd_image_server.config import StateDir
from lxd_image_server.fsutil import TooLarge, load_json_bounded, read_regular, write_atomic

log = logging.getLogger(__name__)

#: the record's own format
FORMAT = 1
#: about 60 bytes a version: a million versions fit
MAX_RECORD_BYTES = 64 << 20
_MAX_PATH = 4096
#: products.UPDATED_FORMAT's text
_UPDATED = re.compile(r"[A-Za-z0-9 ,:+]{1,64}")


@dataclass(frozen=True)
class Published:
    """A publish: its `updated`, and the directories of the versions it listed (each relative
    to the served root, as the items' paths are: 'images/<os>/.../<serial>')."""

    updated: str
    versions: frozenset[str]

    def below(self, images: str) -> set[str]:
        """The version directories relative to images/ (`images`: its path relative to the
        served root, with a slash)."""
        return {v[len(images) :] for v in self.versions if v.startswith(images)}


def of(products: Products, updated: str) -> Published:
    """The record of a publish of `products` (every item of a version is in its directory)."""
    return Published(
        updated,
        frozenset(
            next(iter(v.items.values())).path.rpartition("/")[0]
            for p in products.values()
            for v in p.versions.values()
            if v.items
        ),
    )


def write(state_dir: str, record: Published) -> None:
    """Writes the record atomically (OSError when it cannot)."""
    data = json.dumps(
        {"format": FORMAT, "updated": record.updated, "versions": sorted(record.versions)},
        separators=(",", ":"),
    ).encode()
    os.makedirs(state_dir, exist_ok=True)
    write_atomic(StateDir(state_dir).published, data + b"\n")


def read(state_dir: str) -> Published | None:
    """The record of the last publish, or None (logged unless it is just missing)."""
    path = StateDir(state_dir).published
    try:
        doc = load_json_bounded(read_regular(path, MAX_RECORD_BYTES), MAX_RECORD_BYTES, 4)
        return _checked(doc)
    except FileNotFoundError:
        return None
    except TooLarge:
        why = f"larger than {MAX_RECORD_BYTES} bytes"
    except (OSError, ValueError) as e:
        why = str(e) or type(e).__name__
    log.warning("ignoring the record of the last publish %s: %s", path, why)
    return None


def _checked(doc: object) -> Published:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a record of format {FORMAT}")
    updated, versions = doc.get("updated"), doc.get("versions")
    if not isinstance(updated, str) or not _UPDATED.fullmatch(updated):
        raise ValueError("no valid `updated`")
    if not isinstance(versions, list):
        raise ValueError("no list of versions")
    return Published(updated, frozenset(_paths(versions)))


def _paths(values: Iterable[object]) -> Iterable[str]:
    for v in values:
        if (
            not isinstance(v, str)
            or not v
            or len(v) > _MAX_PATH
            or v.startswith("/")
            or any(part in ("", ".", "..") for part in v.split("/"))
        ):
            raise ValueError(f"not a version directory: {str(v)[:80]!r}")
        yield v
