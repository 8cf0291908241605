"""Atomic, ordered writes of the catalog, under a lock shared by every writer.

Order: the record of what is published (published.py, in the state directory), then
images.json.gz, images.json, then index.json.gz, index.json; each written to a hidden temporary
name in the same directory, fsynced and renamed, then the directory fsynced. A client therefore
never sees a torn document, nor an index naming products images.json lacks.

The previous catalog is compared byte for byte with the new one (read bounded, never parsed):
the same content keeps the `updated` the record holds, so clients' caches stay valid.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator

from lxd_image_server.catalog import published
from lxd_image_server.catalog.encode import dated_catalog, index_bytes
from lxd_image_server.catalog.gzip_chunks import GzipCache
from lxd_image_server.catalog.products import UPDATED_FORMAT, Products, catalog_of, index_of
from lxd_image_server.config import StateDir
from lxd_image_server.fsutil import fsync_dir as fsync_dir
from lxd_image_server.fsutil import holds
from lxd_image_server.fsutil import write_atomic as write_atomic

log = logging.getLogger(__name__)


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
    *,
    state_dir: str,
) -> bool:
    """Writes images.json and index.json (+ .gz) if their content changed, and before them
    the record of what they list in `state_dir` (published.py).

    Returns True when something was written. The caller holds `catalog_lock`. The previous
    documents are compared byte for byte (with the `updated` the record holds), read bounded.
    `images_gz` keeps what was compressed of the previous images.json (gzip_chunks.py).
    """
    images_path = os.path.join(streams_dir, "images.json")
    index_path = os.path.join(streams_dir, "index.json")
    updated = now_updated(now)
    images = dated_catalog(catalog_of(products, ""))
    old_updated = published.read_updated(state_dir)
    if old_updated not in (None, updated) and holds(images_path, images(old_updated).parts):
        # content unchanged: keep its timestamp so clients' caches stay valid
        updated = old_updated
    images_parts = images(updated)
    index = index_bytes(index_of(products, updated))
    same_images = holds(images_path, images_parts.parts)
    same_index = holds(index_path, [index])
    gz_present = all(_is_regular(p + ".gz") for p in (images_path, index_path))
    if same_images and same_index and gz_present:
        if old_updated is None:
            _write_record(state_dir, products, updated)  # (missing or damaged)
        return False
    del images
    _write_record(state_dir, products, updated)
    try:
        os.makedirs(streams_dir, exist_ok=True)
        gz = (images_gz or GzipCache()).compress_parts(images_parts)
        write_atomic(images_path + ".gz", gz)
        del gz
        write_atomic(images_path, images_parts.parts)
        fsync_dir(streams_dir)
        write_atomic(index_path + ".gz", GzipCache().compress(index))
        write_atomic(index_path, index)
        fsync_dir(streams_dir)
    except OSError as e:
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise PublishError(f"cannot write the catalog in {streams_dir}: {reason}") from e
    log.info(
        "published %d products, %d versions to %s",
        len(products),
        sum(len(p.versions) for p in products.values()),
        streams_dir,
    )
    return True


def _write_record(state_dir: str, products: Products, updated: str) -> None:
    """Writes the record; when it cannot (a directory in its place, a full disk), removes the
    old one (nothing stale may vouch for the catalog) and says so: the publish goes on, and the
    next writer that needs the record reads images.json instead (departures.py)."""
    try:
        published.write(state_dir, products, updated)
    except OSError as e:
        path = StateDir(state_dir).published
        with contextlib.suppress(OSError):
            os.unlink(path)
        log.warning("cannot record what is published in %s: %s", path, e.strerror or e)
