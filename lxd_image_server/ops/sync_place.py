"""`sync`: one version downloaded, checked and placed whole.

Every file of a version goes first to images/.sync-partial/<sha256>.part (a hidden directory:
never scanned, published or served), where a download that broke off is kept and resumed by
the next sync with a Range request. A file whose bytes are all there and whose sha256 is the
catalog's is renamed into a hidden staging directory in the version's variant directory
(import_place.new_version); when every file is there and the combined fingerprint of each image
(sha256 of metadata then root, hashed while downloading) is upstream's, the staging directory
is renamed to the version's serial. Anything else removes the staging directory: a version
lands whole or not at all.

Below images/ nothing is followed: the directories are opened through descriptors without
following links, the partial file with O_NOFOLLOW and checked to be a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lxd_image_server.catalog import deltagen
from lxd_image_server.catalog.hashing import Hasher
from lxd_image_server.fsutil import DirChain, open_dir_below
from lxd_image_server.ops.import_errors import ImportFailed
from lxd_image_server.ops.import_place import FILE_MODE, new_version
from lxd_image_server.ops.sync_fetch import CHUNK, Connection, FetchFailed, RangeIgnored
from lxd_image_server.ops.sync_select import VersionPlan, Want
from lxd_image_server.tree.layout import OVERRIDES_NAME, VersionKey
from lxd_image_server.tree.scan import open_below

log = logging.getLogger(__name__)

PARTIAL_DIR = ".sync-partial"
#: a partial download not resumed for this long is removed (its version is likely gone)
PARTIAL_MAX_AGE = 7 * 86400
#: the hidden directories a version is staged in (in its variant directory)
STAGING_PREFIX = ".sync-staging-"
DIR_MODE = 0o755
_OPEN = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Landed:
    plan: VersionPlan
    #: bytes downloaded now (resumed parts not counted)
    downloaded: int
    #: file name -> (size, sha256), for the hash cache
    files: dict[str, tuple[int, str]]


@contextlib.contextmanager
def _partial(img_dir: str, want: Want) -> Iterator[tuple[int, int, int] | None]:
    """(directory fd, file fd, bytes already there) of the kept partial file of `want`, locked;
    None when another download holds it, or the partial directory or file is not one this
    process made (an uploader may write images/: what it put there is never resumed from),
    and then the file is downloaded without one."""
    img_fd = os.open(img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with DirChain(img_fd) as chain:
        name = f"{want.sha256}.part"
        try:
            chain.down(PARTIAL_DIR, DIR_MODE)
            if os.fstat(chain.fd).st_uid != os.geteuid():
                raise OSError(errno.EPERM, "not ours", PARTIAL_DIR)
            fd = os.open(name, _OPEN, FILE_MODE, dir_fd=chain.fd)
        except OSError as e:
            log.warning("%s/%s: %s; downloading without resuming", img_dir, PARTIAL_DIR, e)
            yield None
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                yield None
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            have = st.st_size
            if have >= want.size:  # stale or foreign: start again
                os.ftruncate(fd, 0)
                have = 0
            yield chain.fd, fd, have
        finally:
            os.close(fd)


class VersionFailed(Exception):
    """A version could not be synced; the one-line message names it and the item.
    `resumable`: what was downloaded of the file is kept for the next sync."""

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class Digests:
    """The hashers one file's bytes go to: its sha256 and, for a root, the combined
    fingerprint (a copy of its metadata tarball's sha256, fed the root after it)."""

    def __init__(self, meta: Hasher | None = None) -> None:
        self.meta = meta
        self.reset()

    def reset(self) -> None:
        self.plain: Hasher = hashlib.sha256()
        self.combined: Hasher | None = self.meta.copy() if self.meta is not None else None
        self.sinks: list[Hasher] = [self.plain]
        if self.combined is not None:
            self.sinks.append(self.combined)


def _feed_prefix(fd: int, have: int, digests: Digests) -> None:
    """The bytes already in the partial file, hashed again (resumed: the digests cover it)."""
    buf = bytearray(CHUNK)
    done = 0
    while done < have:
        n = os.preadv(fd, [memoryview(buf)[: min(CHUNK, have - done)]], done)
        if not n:
            raise OSError(errno.EIO, "the partial file shrank")
        for s in digests.sinks:
            s.update(memoryview(buf)[:n])
        done += n
    os.lseek(fd, have, os.SEEK_SET)


def fetch_file(
    conn: Connection,
    img_dir: str,
    want: Want,
    staging_fd: int,
    digests: Digests,
    progress: Callable[[int], None],
) -> int:
    """Downloads `want` (resuming a kept partial file) into the staging directory under its
    name, its size and sha256 checked; `digests` get its bytes. -> bytes downloaded now.
    VersionFailed naming the item otherwise."""
    with _partial(img_dir, want) as held:
        if held is None:
            # another version downloads the same file now (or no partial file can be kept):
            # this one goes without resuming
            fd = os.open(want.name, _OPEN | os.O_EXCL, FILE_MODE, dir_fd=staging_fd)
            try:
                _download(conn, want, fd, 0, digests, progress)
                _check(want, digests)
                os.fchmod(fd, FILE_MODE)
            finally:
                os.close(fd)
            return want.size
        dir_fd, fd, have = held
        name = f"{want.sha256}.part"
        try:
            if have:
                log.info("%s: resuming at byte %d of %d", want.label, have, want.size)
                _feed_prefix(fd, have, digests)
                progress(have)
            try:
                _download(conn, want, fd, have, digests, progress)
            except RangeIgnored:
                log.info("%s: the server does not resume; downloading it whole", want.label)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                digests.reset()
                have = 0
                _download(conn, want, fd, 0, digests, progress)
            _check(want, digests)
        except VersionFailed as e:
            if not e.resumable:
                os.unlink(name, dir_fd=dir_fd)
            raise
        os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
        os.rename(name, want.name, src_dir_fd=dir_fd, dst_dir_fd=staging_fd)
        return want.size - have


def _download(
    conn: Connection,
    want: Want,
    fd: int,
    offset: int,
    digests: Digests,
    progress: Callable[[int], None],
) -> None:
    try:
        conn.download(want.path, want.size, fd, offset, digests.sinks, progress)
    except RangeIgnored:
        if offset:
            raise
        raise VersionFailed(f"{want.label} ({want.path}): a range it did not ask for") from None
    except FetchFailed as e:
        raise VersionFailed(f"{want.label} ({want.path}): {e}", e.resumable) from None


def _check(want: Want, digests: Digests) -> None:
    got = digests.plain.hexdigest()
    if got != want.sha256:
        raise VersionFailed(
            f"{want.label} ({want.path}): sha256 is {got}, the catalog says {want.sha256}"
        )


def clear_leftovers(img_dir: str, keys: list[VersionKey], now: float | None = None) -> None:
    """Removes the staging directories (.sync-staging-*) that a killed sync left in the variant
    directories of `keys`, and partial downloads nobody resumed for PARTIAL_MAX_AGE (called
    under the sync lock: no other sync is filling one)."""
    _drop_old_partials(img_dir, time.time() if now is None else now)
    for variant in sorted({k.relpath.rsplit("/", 1)[0] for k in keys}):
        try:
            fd = open_dir_below(img_dir, variant)
        except OSError:
            continue
        try:
            for name in os.listdir(fd):
                if name.startswith(STAGING_PREFIX):
                    log.info(
                        "removing %s/%s/%s, left by an interrupted sync", img_dir, variant, name
                    )
                    shutil.rmtree(name, dir_fd=fd, ignore_errors=True)
        finally:
            os.close(fd)


def _drop_old_partials(img_dir: str, now: float) -> None:
    try:
        fd = open_dir_below(img_dir, PARTIAL_DIR)
    except OSError:
        return
    try:
        for name in os.listdir(fd):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if now - st.st_mtime > PARTIAL_MAX_AGE:
                    os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


#: called with the staging directory, the files (name -> size, sha256) and the combined
#: fingerprints (root name -> metadata name, sha256) once every file is in it
OnFilled = Callable[[int, dict[str, tuple[int, str]], dict[str, tuple[str, str]]], None]


def sync_version(
    conn: Connection,
    img_dir: str,
    plan: VersionPlan,
    progress: Callable[[int], None],
    on_filled: OnFilled | None = None,
) -> Landed:
    """Downloads, checks and places one version (see the module's text). VersionFailed (one
    line naming the version and the item) when any of it fails: nothing of it is placed.
    VersionExists (import_errors) when the version directory exists already. `on_filled`:
    before the version appears (import_handover.py: its digests handed over)."""
    files: dict[str, tuple[int, str]] = {}
    downloaded = 0
    try:
        with new_version(img_dir, plan.key, STAGING_PREFIX) as staging_fd:
            meta_hash: dict[str, Hasher] = {}
            for want in plan.metas:
                digests = Digests()
                downloaded += fetch_file(conn, img_dir, want, staging_fd, digests, progress)
                meta_hash[want.name] = digests.plain
                files[want.name] = (want.size, want.sha256)
            for want in plan.files:
                pair = plan.combined.get(want.name)
                digests = Digests(meta_hash[pair[0]] if pair is not None else None)
                n = _by_delta(conn, img_dir, plan, want, staging_fd, digests, progress)
                if n is None:
                    n = fetch_file(conn, img_dir, want, staging_fd, digests, progress)
                downloaded += n
                files[want.name] = (want.size, want.sha256)
                if pair is not None and digests.combined is not None:
                    got = digests.combined.hexdigest()
                    if got != pair[1]:
                        raise VersionFailed(
                            f"{want.label}: the image's fingerprint (sha256 of {pair[0]} and "
                            f"{want.name}) is {got}, the catalog says {pair[1]}"
                        )
            if plan.overrides:
                _write_small(staging_fd, OVERRIDES_NAME, plan.overrides)
            if on_filled is not None:
                on_filled(staging_fd, files, dict(plan.combined))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VersionFailed(f"{plan.label}: no space left in {img_dir}") from None
        raise VersionFailed(f"{plan.label}: {e.strerror or e} ({e.filename})") from None
    except ImportFailed as e:
        if type(e) is ImportFailed:
            raise VersionFailed(f"{plan.label}: {e}") from None
        raise
    return Landed(plan, downloaded, files)


def _by_delta(
    conn: Connection,
    img_dir: str,
    plan: VersionPlan,
    want: Want,
    staging_fd: int,
    digests: Digests,
    progress: Callable[[int], None],
) -> int | None:
    """`want` rebuilt from one of upstream's deltas whose base version the tree holds (the
    first that works), its size and sha256 checked: the bytes downloaded, or None (nothing
    usable, or every try failed: logged) to download the whole file."""
    variant = plan.key.relpath.rsplit("/", 1)[0]
    for base_serial, delta in plan.deltas.get(want.name, ()):
        try:
            base_fd = open_below(img_dir, f"{variant}/{base_serial}/{want.name}")
        except OSError:
            continue  # not held here (or not a plain file): no use
        try:
            problem = _rebuild(conn, want, delta, base_fd, staging_fd, digests, progress)
        finally:
            os.close(base_fd)
        if problem is None:
            log.info("%s: rebuilt from %s with upstream's delta", want.label, base_serial)
            return delta.size
        log.info("%s: %s; downloading the whole file", want.label, problem)
        digests.reset()
    return None


def _rebuild(
    conn: Connection,
    want: Want,
    delta: Want,
    base_fd: int,
    staging_fd: int,
    digests: Digests,
    progress: Callable[[int], None],
) -> str | None:
    """Downloads `delta` (checked), rebuilds `want` from it into the staging directory; None
    when the result is `want` (size, sha256), else why not (nothing of it is left)."""
    tmp_delta, tmp_out = f".{secrets.token_hex(6)}.vcdiff", f".{secrets.token_hex(6)}.part"
    made: list[str] = []
    try:
        dfd = os.open(tmp_delta, _OPEN | os.O_EXCL, FILE_MODE, dir_fd=staging_fd)
        made.append(tmp_delta)
        try:
            ddig = Digests()
            try:
                conn.download(delta.path, delta.size, dfd, 0, ddig.sinks, progress)
            except FetchFailed as e:
                return f"the delta {delta.path}: {e}"
            if ddig.plain.hexdigest() != delta.sha256:
                return f"the delta {delta.path}: sha256 differs from the catalog's"
            ofd = os.open(tmp_out, _OPEN | os.O_EXCL, FILE_MODE, dir_fd=staging_fd)
            made.append(tmp_out)
            try:
                written = 0

                def sink(chunk: bytes) -> None:
                    nonlocal written
                    _write_all(ofd, chunk)
                    for s in digests.sinks:
                        s.update(chunk)
                    written += len(chunk)

                base_size = os.fstat(base_fd).st_size
                problem = deltagen.rebuild(
                    base_fd, dfd, base_size, want.size, sink, deltagen.Limits()
                )
                if problem:
                    return f"the delta {delta.path}: {problem}"
                if written != want.size or digests.plain.hexdigest() != want.sha256:
                    return f"the delta {delta.path} does not rebuild it (sha256 differs)"
                os.fchmod(ofd, FILE_MODE)
                os.fsync(ofd)
            finally:
                os.close(ofd)
        finally:
            os.close(dfd)
        os.rename(tmp_out, want.name, src_dir_fd=staging_fd, dst_dir_fd=staging_fd)
        made.remove(tmp_out)
        progress(max(0, want.size - delta.size))
        return None
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=staging_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_small(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, _OPEN | os.O_EXCL, FILE_MODE, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
