"""Atomic, ordered writes of the catalog, under a lock shared by every writer.

Order: images.json.gz, images.json, then index.json.gz, index.json; each written to a hidden
temporary name in the same directory, fsynced and renamed, then the directory fsynced. A client
therefore never sees a torn document, nor an index naming products images.json lacks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any

from lxd_image_server.catalog import encode as catalog_json
from lxd_image_server.catalog.gzip_chunks import GzipCache
from lxd_image_server.catalog.products import (
    UPDATED_FORMAT,
    Products,
    images_document,
    index_document,
)
from lxd_image_server.config import StateDir
from lxd_image_server.fsutil import fsync_dir as fsync_dir
from lxd_image_server.fsutil import open_regular
from lxd_image_server.fsutil import write_atomic as write_atomic

log = logging.getLogger(__name__)

_UPDATED_RE = re.compile(rb'^ "updated": "([A-Za-z0-9 ,:+]{1,64})",?$', re.MULTILINE)


class PublishError(Exception):
    """The catalog could not be written; the previous one is still in place."""


@contextlib.contextmanager
def catalog_lock(state_dir: str) -> Iterator[None]:
    """Exclusive lock on the catalog, held by `update`, `watch` and any other writer while they
    build and write it (never while they hash). The lock file lives in the state directory; it
    is opened without following a link, and anything but a regular file there is refused with a
    one-line PublishError naming it."""
    path = StateDir(state_dir).catalog_lock
    try:
        os.makedirs(state_dir, exist_ok=True)
        fd = os.open(path, _LOCK_FLAGS, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise PublishError(f"cannot lock the catalog: {path} is not a regular file") from e
        raise PublishError(f"cannot lock the catalog: {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PublishError(f"cannot lock the catalog: {path} is not a regular file")
        os.set_blocking(fd, True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another writer of the catalog to finish (%s)", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


def encode(doc: dict[str, Any]) -> bytes:
    """json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + a line break, as bytes
    (encode.py: the same bytes, reusing the text of versions encoded before)."""
    return catalog_json.encode_utf8(doc) + b"\n"


Parts = list[bytes | memoryview]


def _dated(doc: dict[str, Any]) -> Callable[[str], Parts]:
    """encode(doc) for any value of its top-level `updated`, the last key, in two parts: the
    rest is encoded once (and not copied), as doc's bytes are the same up to that last line."""
    text = catalog_json.encode_utf8({**doc, "updated": ""})
    tail = b' "updated": ""\n}'
    if not text.endswith(tail):
        raise AssertionError("`updated` is not the document's last key")
    head = memoryview(text)[: -len(tail)]
    return lambda updated: [head, encode({"updated": updated})[2:]]


def _holds(path: str, parts: Parts) -> bool:
    """Whether `path` is a regular file of exactly the bytes `parts`, compared a piece at a
    time (a 20 MB document is not read whole); a link, a FIFO or another size: False."""
    try:
        fd = open_regular(path)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != sum(len(p) for p in parts):
            return False
        offset = 0
        for part in parts:
            view = memoryview(part)
            while view:
                piece = os.pread(fd, min(len(view), _PIECE), offset)
                if not piece or view[: len(piece)] != piece:
                    return False
                offset += len(piece)
                view = view[len(piece) :]
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def updated_in(path: str) -> str | None:
    """The top-level `updated` of the published document `path`, from its last bytes (where
    `encode` puts it); None when it is missing, not a regular file or has none."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        return updated_of(os.pread(fd, _TAIL, max(0, size - _TAIL)))
    except OSError:
        return None
    finally:
        os.close(fd)


#: what is compared at a time; how much of a document's end holds its `updated` line
_PIECE = 1 << 20
_TAIL = 4096


def updated_of(data: bytes | None) -> str | None:
    """The top-level `updated` of a document `encode` wrote (no JSON parse needed). It is the
    last key, so its line is looked for from the end (the only line indented by one space
    that starts so), and only that line is matched."""
    if data is None:
        return None
    start = data.rfind(b'\n "updated": "')
    end = data.find(b"\n", start + 1)
    m = _UPDATED_RE.fullmatch(data, start + 1, end if end != -1 else len(data))
    return m.group(1).decode() if start != -1 and m else None


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def now_updated(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime(UPDATED_FORMAT)


def publish(
    streams_dir: str,
    products: Products,
    now: dt.datetime | None = None,
    images_gz: GzipCache | None = None,
) -> bool:
    """Writes images.json and index.json (+ .gz) if their content changed.

    Returns True when something was written. The caller holds `catalog_lock`. The previous
    documents are compared byte for byte (with their own `updated`), read bounded.
    `images_gz` keeps what was compressed of the previous images.json (gzip_chunks.py).
    """
    images_path = os.path.join(streams_dir, "images.json")
    index_path = os.path.join(streams_dir, "index.json")
    updated = now_updated(now)
    images = _dated(images_document(products, updated))
    index = index_document(products, updated)
    old_updated = updated_in(images_path)
    if old_updated not in (None, updated) and _holds(images_path, images(old_updated)):
        # content unchanged: keep its timestamp so clients' caches stay valid
        updated = old_updated
        index["updated"] = index["index"]["images"]["updated"] = updated
    images_parts = images(updated)
    index_bytes = encode(index)
    same_images = _holds(images_path, images_parts)
    same_index = _holds(index_path, [index_bytes])
    gz_present = all(_is_regular(p + ".gz") for p in (images_path, index_path))
    if same_images and same_index and gz_present:
        return False
    images_bytes = b"".join(images_parts)
    del images_parts, images
    try:
        os.makedirs(streams_dir, exist_ok=True)
        write_atomic(images_path + ".gz", (images_gz or GzipCache()).compress(images_bytes))
        write_atomic(images_path, images_bytes)
        fsync_dir(streams_dir)
        write_atomic(index_path + ".gz", GzipCache().compress(index_bytes))
        write_atomic(index_path, index_bytes)
        fsync_dir(streams_dir)
    except OSError as e:
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise PublishError(f"cannot write the catalog in {streams_dir}: {reason}") from e
    log.info(
        "published %d products, %d versions to %s",
        len(products),
        sum(len(p["versions"]) for p in products.values()),
        streams_dir,
    )
    return True
