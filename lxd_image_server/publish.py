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

from . import catalog_json
from .catalog import UPDATED_FORMAT, Products, images_document, index_document
from .catalog_gzip import GzipCache
from .fsutil import TooLarge, read_regular
from .fsutil import fsync_dir as fsync_dir
from .fsutil import write_atomic as write_atomic

log = logging.getLogger(__name__)

#: in the state directory, which only the catalog writer may write (streams/ is served)
LOCK_NAME = "catalog.lock"
#: what is read back of the previous documents: as much as the new one has, and a little more
_SLACK = 256
_UPDATED_RE = re.compile(rb'^ "updated": "([A-Za-z0-9 ,:+]{1,64})",?$', re.MULTILINE)


class PublishError(Exception):
    """The catalog could not be written; the previous one is still in place."""


@contextlib.contextmanager
def catalog_lock(state_dir: str) -> Iterator[None]:
    """Exclusive lock on the catalog, held by `update`, `watch` and any other writer while they
    build and write it (never while they hash). The lock file lives in the state directory; it
    is opened without following a link, and anything but a regular file there is refused with a
    one-line PublishError naming it."""
    path = os.path.join(state_dir, LOCK_NAME)
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
    (catalog_json: the same bytes, reusing the text of versions encoded before)."""
    return (catalog_json.encode(doc) + "\n").encode()


def _dated(doc: dict[str, Any]) -> Callable[[str], bytes]:
    """encode(doc) for any value of its top-level `updated`, the last key, encoding the rest
    once: doc's bytes are the same up to that last line."""
    text = encode({**doc, "updated": ""})
    tail = b' "updated": ""\n}\n'
    if not text.endswith(tail):
        raise AssertionError("`updated` is not the document's last key")
    head = text[: -len(tail)]
    return lambda updated: head + encode({"updated": updated})[2:]


def _previous(path: str, limit: int) -> bytes | None:
    """The bytes of a document published before, if it is a regular file of at most `limit`
    bytes: a link, a FIFO or a huge file is never followed or read whole (it is replaced)."""
    try:
        return read_regular(path, limit)
    except (OSError, TooLarge):
        return None


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
    `images_gz` keeps what was compressed of the previous images.json (catalog_gzip).
    """
    images_path = os.path.join(streams_dir, "images.json")
    index_path = os.path.join(streams_dir, "index.json")
    updated = now_updated(now)
    images = _dated(images_document(products, updated))
    index = index_document(products, updated)
    images_bytes = images(updated)
    old_images = _previous(images_path, len(images_bytes) + _SLACK)
    old_updated = updated_of(old_images)
    if old_updated not in (None, updated) and images(old_updated) == old_images:
        # content unchanged: keep its timestamp so clients' caches stay valid
        updated = old_updated
        index["updated"] = index["index"]["images"]["updated"] = updated
    images_bytes = images(updated)
    index_bytes = encode(index)
    same_images = images_bytes == old_images
    same_index = index_bytes == _previous(index_path, len(index_bytes) + _SLACK)
    gz_present = all(_is_regular(p + ".gz") for p in (images_path, index_path))
    if same_images and same_index and gz_present:
        return False
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
