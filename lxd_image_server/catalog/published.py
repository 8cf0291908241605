"""What the writer published last, recorded beside the catalog: it never reads images.json
back to learn what it wrote.

The record (StateDir.published, `published.json`) holds the catalog's `updated` (kept while
the content stays the same, so clients' caches stay valid; the page shows it) and each file it
lists with its size (departures.py: no version leaves without a reason; the watcher: a listed
file at its listed size is not one being written; `prune` with a watcher running: the versions
it chooses from, ops/pruning.py, read by read_crowded). publish.py writes it atomically before
images.json: a record ahead of a catalog that a crash left unwritten names only versions whose
departure was checked already, or that were about to be listed.

JSON lines: first {"format": 1, "updated": "..."}, then one line per version directory,
["images/<os>/.../<serial>", {"<file name>": <size>, ...}]. A version's line is made once and
kept with it (model.Version.derived), so a publish joins lines rather than walking every item;
`updated` is read from the first line alone.

It is read bounded (a regular file, no link followed, at most MAX_RECORD_BYTES) and checked
line by line; anything wrong with it (missing, a link, too large, not JSON, another shape) is
one log line and None: the caller falls back to what it can tell without it (publish: a new
`updated`; departures: what images.json lists, read as a client reads it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import TypeVar

from lxd_image_server.catalog.model import Version
from lxd_image_server.catalog.products import Products
from lxd_image_server.config import StateDir
from lxd_image_server.fsutil import (
    TooLarge,
    load_json_bounded,
    open_regular,
    read_regular,
    write_atomic,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the record's own format
FORMAT = 1
#: about 120 bytes a version: half a million versions fit
MAX_RECORD_BYTES = 64 << 20
#: the first line's bytes, at most
_MAX_HEAD = 4096
_MAX_PATH = 4096
_NOT_NAMES = ("", ".", "..")
#: products.UPDATED_FORMAT's text
_UPDATED = re.compile(r"[A-Za-z0-9 ,:+]{1,64}")


@dataclass(frozen=True)
class Published:
    """A publish: its `updated`, and each file it listed (its path relative to the served
    root, as items name it: 'images/<os>/.../<serial>/<name>') with its size."""

    updated: str
    files: dict[str, int]


def _head(updated: str) -> bytes:
    return json.dumps({"format": FORMAT, "updated": updated}).encode() + b"\n"


def _lines(version: Version) -> bytes:
    """The version's lines: one per directory of its items (all of them are in its own)."""
    by_dir: dict[str, dict[str, int]] = {}
    for item in version.items.values():
        directory, _, name = item.path.rpartition("/")
        by_dir.setdefault(directory, {})[name] = item.size
    return "".join(
        f"[{encode_basestring(d)}, {{"
        + ", ".join(f"{encode_basestring(n)}: {int(files[n])}" for n in sorted(files))
        + "}]\n"
        for d, files in by_dir.items()
    ).encode()


def record_parts(products: Products, updated: str) -> list[bytes]:
    """The record of a publish of `products`, in pieces (each version's kept lines)."""
    parts = [_head(updated)]
    parts.extend(
        v.derived("published", _lines) for p in products.values() for v in p.versions.values()
    )
    return parts


def record_bytes(products: Products, updated: str) -> bytes:
    """The record of a publish of `products`."""
    return b"".join(record_parts(products, updated))


def write(state_dir: str, products: Products, updated: str) -> None:
    """Writes the record atomically (OSError when it cannot), its pieces never joined."""
    os.makedirs(state_dir, exist_ok=True)
    write_atomic(StateDir(state_dir).published, record_parts(products, updated))


def read_updated(state_dir: str) -> str | None:
    """The `updated` of the last publish, from the record's first line (None: no usable
    record; logged unless it is missing)."""
    try:
        data = _read(state_dir, _MAX_HEAD, whole=False)
        return _checked_head(data.partition(b"\n")[0])
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _ignored(state_dir, e)
        return None


def read(state_dir: str) -> Published | None:
    """The record of the last publish (None: no usable record; logged unless missing)."""
    return _whole(state_dir, lambda updated, body: Published(updated, dict(_files(body))))


def read_crowded(
    state_dir: str, prefix: str, more_than: int
) -> dict[str, dict[str, dict[str, int]]] | None:
    """The version directories the last publish listed, for the products that had more than
    `more_than` of them: {'os/release/arch/variant': {serial: {file name: size}}}, relative to
    `prefix` (the images directory as items name it, 'images/'). None: no usable record
    (logged unless it is missing).

    Every line must have the shape the writer gives it (a version directory below `prefix`,
    then its files), and the lines of those products are read and checked whole; the others
    are only counted (a product with `more_than` versions or fewer cannot change what `prune`
    chooses), which keeps reading the record of 20,000 versions to a few milliseconds."""
    return _whole(state_dir, lambda _updated, body: _crowded(body, prefix, more_than))


def _crowded(body: bytes, prefix: str, more_than: int) -> dict[str, dict[str, dict[str, int]]]:
    """read_crowded's choice from the record's lines (ValueError: not the writer's shape)."""
    start = b'["' + prefix.encode()
    by_product: dict[bytes, list[bytes]] = {}
    for n, line in enumerate(body.splitlines(), start=2):
        end = line.find(b'", {', len(start))
        rel = line[len(start) : end]
        if not line.startswith(start) or end < 0 or rel.count(b"/") != 4:
            raise ValueError(f"line {n}: not a version directory below {prefix}")
        if not line.endswith(b"}]"):
            raise ValueError(f"line {n}: not a version directory and its files")
        by_product.setdefault(rel.rpartition(b"/")[0], []).append(line)
    out: dict[str, dict[str, dict[str, int]]] = {}
    for lines in by_product.values():
        if len(lines) <= more_than:
            continue
        for directory, files in _entries(b"\n".join(lines)):
            product, _, serial = directory.removeprefix(prefix).rpartition("/")
            if not directory.startswith(prefix) or product.count("/") != 3:
                raise ValueError(f"{directory[:200]!r} is not a version directory")
            out.setdefault(product, {}).setdefault(serial, {}).update(files)
    return out


def _whole(state_dir: str, parse: Callable[[str, bytes], T]) -> T | None:
    """`parse(updated, lines)` of the whole record, its first line checked (None: no usable
    record, logged unless it is missing)."""
    try:
        data = _read(state_dir, MAX_RECORD_BYTES, whole=True)
        head, _, body = data.partition(b"\n")
        return parse(_checked_head(head), body)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _ignored(state_dir, e)
        return None


def _read(state_dir: str, limit: int, whole: bool) -> bytes:
    """The record's bytes (`whole`: all of them, at most `limit`; else its first `limit`)."""
    path = StateDir(state_dir).published
    if whole:
        try:
            return read_regular(path, limit)
        except TooLarge:
            raise ValueError(f"larger than {limit} bytes") from None
    fd = open_regular(path)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _ignored(state_dir: str, e: Exception) -> None:
    why = getattr(e, "strerror", None) or str(e) or type(e).__name__
    log.warning(
        "ignoring the record of the last publish %s: %s", StateDir(state_dir).published, why
    )


def _checked_head(line: bytes) -> str:
    doc = load_json_bounded(line, _MAX_HEAD, 2)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a record of format {FORMAT}")
    updated = doc.get("updated")
    if not isinstance(updated, str) or not _UPDATED.fullmatch(updated):
        raise ValueError("no valid `updated`")
    return updated


def _files(body: bytes) -> Iterator[tuple[str, int]]:
    for directory, files in _entries(body):
        for name, size in files.items():
            yield f"{directory}/{name}", size


def _entries(body: bytes) -> Iterator[tuple[str, dict[str, int]]]:
    """Each line's version directory and its files (name: size), checked."""
    lines = body.splitlines()
    # (one parse of all the lines: a line is one JSON value, so they join as an array)
    # (its size is bounded by the read; its depth by the shape checked below, once parsed)
    try:
        doc = json.loads(b"[" + b",".join(lines) + b"]")
    except RecursionError:
        raise ValueError("nested too deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, list):
        raise ValueError("not lines of version directories")
    for n, entry in enumerate(doc, start=2):
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not _relative(entry[0])
            or not isinstance(entry[1], dict)
        ):
            raise ValueError(f"line {n}: not a version directory and its files")
        for name, size in entry[1].items():
            if "/" in name or name in _NOT_NAMES or type(size) is not int or size < 0:
                raise ValueError(f"line {n}: not a file name and its size")
        yield entry[0], entry[1]


def _relative(path: object) -> bool:
    return (
        isinstance(path, str)
        and 0 < len(path) <= _MAX_PATH
        and not path.startswith("/")
        and not any(part in ("", ".", "..") for part in path.split("/"))
    )
