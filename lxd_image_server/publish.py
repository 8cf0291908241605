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
import gzip
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from .catalog import UPDATED_FORMAT, Products, images_document, index_document
from .fsutil import fsync_dir as fsync_dir
from .fsutil import write_atomic as write_atomic

log = logging.getLogger(__name__)

LOCK_NAME = ".lxd-image-server.lock"


class PublishError(Exception):
    """The catalog could not be written; the previous one is still in place."""


@contextlib.contextmanager
def catalog_lock(streams_dir: str) -> Iterator[None]:
    """Exclusive lock on the catalog, held by `update`, `watch` and any other writer."""
    os.makedirs(streams_dir, exist_ok=True)
    path = os.path.join(streams_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another writer of %s to finish", streams_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _without_updated(doc: dict[str, Any] | None) -> Any:
    if doc is None:
        return None
    doc = dict(doc)
    doc.pop("updated", None)
    if isinstance(doc.get("index"), dict):
        doc["index"] = {
            k: {kk: vv for kk, vv in v.items() if kk != "updated"} if isinstance(v, dict) else v
            for k, v in doc["index"].items()
        }
    return doc


def now_updated(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime(UPDATED_FORMAT)


def publish(streams_dir: str, products: Products, now: dt.datetime | None = None) -> bool:
    """Writes images.json and index.json (+ .gz) if their content changed.

    Returns True when something was written. The caller holds `catalog_lock`.
    """
    images_path = os.path.join(streams_dir, "images.json")
    index_path = os.path.join(streams_dir, "index.json")
    old_images = _read_json(images_path)
    old_index = _read_json(index_path)
    updated = now_updated(now)
    images = images_document(products, updated)
    index = index_document(products, updated)
    same_images = _without_updated(old_images) == _without_updated(images)
    same_index = _without_updated(old_index) == _without_updated(index)
    gz_present = all(os.path.exists(p + ".gz") for p in (images_path, index_path))
    if same_images and same_index and gz_present:
        return False
    if same_images and old_images is not None and isinstance(old_images.get("updated"), str):
        # content unchanged: keep its timestamp so clients' caches stay valid
        updated = old_images["updated"]
        images["updated"] = index["updated"] = updated
        index["index"]["images"]["updated"] = updated
    try:
        os.makedirs(streams_dir, exist_ok=True)
        images_bytes = encode(images)
        write_atomic(images_path + ".gz", _gzip(images_bytes))
        write_atomic(images_path, images_bytes)
        fsync_dir(streams_dir)
        index_bytes = encode(index)
        write_atomic(index_path + ".gz", _gzip(index_bytes))
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
