"""Storing and deleting files below images/, acting only on what was checked.

Everything below images/ may be swapped by an uploader at any moment (a directory replaced by
a symbolic link to elsewhere). So nothing here uses a path below images/: the tree is walked
from a descriptor of images/ one component at a time, each directory opened without following
a link, created with mkdir relative to its parent's descriptor (fsutil.DirChain); files are
created, renamed, linked and removed relative to their directory's descriptor. A swap then
changes nothing but which directory inside images/ receives the file.

A body is streamed into a hidden temporary file (the catalog watcher ignores hidden names),
hashed on the way, fsynced and renamed into place, and the directory fsynced; on any failure
the temporary file and the directories made for it are removed again.

Modes, whatever the umask: files 0644 (never executable, setuid or setgid), directories 0775
(group-writable, so the catalog writer, in the uploaders' group, can delete expired versions),
keeping the setgid bit they inherit from a setgid images/.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from lxd_image_server.fsutil import DirChain, DirectoryChanged, delete_tree, load_json_bounded
from lxd_image_server.tree.layout import OVERRIDES_NAME, VersionKey, classify
from lxd_image_server.tree.overrides import parse_overrides
from lxd_image_server.web.upload_errors import HTTPError, clip
from lxd_image_server.web.upload_seal import (
    Primed,
    Temp,
    can_name_unnamed,
    open_temp,
    prime_combined,
    record,
)
from lxd_image_server.web.upload_sink import ReadInto, Sink

log = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o775
#: metadata.json is read whole by the catalog; keep it small and shallow.
MAX_OVERRIDES_SIZE = 64 * 1024
MAX_OVERRIDES_DEPTH = 8
#: `<name>.1` ... `<name>.N` are tried when the name is taken and overwrites are off.
MAX_ALTERNATES = 1000
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


@dataclass
class Stored:
    path: str
    stored_as: str
    size: int
    sha256: str
    replaced: bool = False
    warning: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.stored_as != self.path:
            doc["stored_as"] = self.stored_as
            doc["note"] = (
                f"{self.path} exists; stored as {self.stored_as}, which is not published; "
                "set ALLOW_OVERWRITES to replace it"
            )
        if self.replaced:
            doc["replaced"] = True
        if self.warning:
            doc["warning"] = f"metadata.json: {clip(self.warning)}"
        return doc


class _Walk(DirChain):
    """The DirChain from images/ down to a version directory, its errors as HTTP answers."""

    def __init__(self, root_fd: int, shown: str) -> None:
        super().__init__(root_fd)
        self.shown = shown

    def down(self, name: str, mode: int | None = None) -> None:
        parent = self.fd
        try:
            super().down(name, mode)
        except FileNotFoundError:
            if mode is not None:
                raise  # a directory on the way went meanwhile (_os_error: 409)
            raise HTTPError(404, f"{self.shown} does not exist") from None
        except NotADirectoryError:
            raise _not_a_directory(name, parent, self.shown) from None
        except DirectoryChanged as e:
            raise HTTPError(409, f"{self.shown}: {e.strerror}; try again") from None


def _not_a_directory(name: str, parent: int, shown: str) -> HTTPError:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return HTTPError(409, f"{shown}: a directory changed; try again")
    if stat.S_ISLNK(st.st_mode):
        return HTTPError(403, f"{shown}: {name} is a symbolic link; links are never followed")
    return HTTPError(409, f"{shown}: {name} is not a directory")


class Store:
    """Puts files into, and takes them out of, the tree below `img_dir`."""

    def __init__(
        self,
        img_dir: str,
        allow_overwrites: bool = False,
        max_size: int | None = None,
        digest_dir: str | None = None,
    ) -> None:
        self.img_dir = img_dir
        self.allow_overwrites = allow_overwrites
        self.max_size = max_size
        #: where the digests of stored files are handed to the catalog writer (None: nowhere)
        self.digest_dir = digest_dir
        self._unnamed = can_name_unnamed()

    def _walk(self, shown: str) -> _Walk:
        # images/ itself is configuration, not an uploader's: it may be reached through links.
        try:
            root = os.open(self.img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise HTTPError(500, f"the image directory {self.img_dir} does not exist") from None
        return _Walk(root, shown)

    # -- storing ----------------------------------------------------------------------------

    def store(self, key: VersionKey, name: str, readinto: ReadInto) -> Stored:
        """Streams one file to images/<key>/<name>; HTTPError (nothing left behind) on failure.

        `readinto(buffer)` fills the buffer with the next bytes of the file (fewer only at its
        end)."""
        rel = f"{key.relpath}/{name}"
        walk = self._walk(rel)
        tmp: str | None = None
        temp: Temp | None = None
        try:
            for component in key.relpath.split("/"):
                walk.down(component, DIR_MODE)
            temp = open_temp(walk.fd, self.digest_dir is not None and self._unnamed)
            tmp = temp.name
            os.fchmod(temp.fd, FILE_MODE)
            primed = prime_combined(walk.fd, name) if temp.unnamed else []
            size, digest, combined, kept = self._receive(temp.fd, rel, name, readinto, primed)
            os.fsync(temp.fd)
            warning = _check_overrides(rel, kept) if kept is not None else None
            tmp = temp.name_it(walk.fd)
            final, replaced = self._place(walk.fd, tmp, name, rel)
            tmp = None
            os.fsync(walk.fd)
            if final == name and classify(name) is not None:
                sealed = temp.sealed_key()
                if sealed is not None:
                    record(self.digest_dir, sealed, digest, combined)
        except BaseException as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=walk.fd)
            walk.remove_created()
            if isinstance(e, OSError):
                raise _os_error(e, rel) from e
            raise
        finally:
            if temp is not None:
                temp.close()
            walk.close()
        stored_as = f"{key.relpath}/{final}"
        log.info("stored %s (%d bytes, sha256 %s)", stored_as, size, digest)
        return Stored(rel, stored_as, size, digest, replaced, warning)

    def _receive(
        self, fd: int, rel: str, name: str, readinto: ReadInto, primed: list[Primed]
    ) -> tuple[int, str, list[tuple[Primed, str]], bytes | None]:
        limit = self.max_size
        keep: bytearray | None = None
        if name == OVERRIDES_NAME:
            limit = MAX_OVERRIDES_SIZE if limit is None else min(limit, MAX_OVERRIDES_SIZE)
            keep = bytearray()
        digest = hashlib.sha256()
        size = 0
        sink = Sink(fd, [digest, *(p.hasher for p in primed)])
        try:
            while True:
                buf = sink.buffer()
                n = readinto(buf)
                if n == 0:
                    break
                size += n
                if limit is not None and size > limit:
                    raise HTTPError(413, f"{rel} is larger than the limit of {limit} bytes")
                if keep is not None:
                    keep += buf[:n]
                sink.put(buf, n)
        finally:
            sink.close()
        combined = [(p, p.hasher.hexdigest()) for p in primed]
        return size, digest.hexdigest(), combined, None if keep is None else bytes(keep)

    def _place(self, dir_fd: int, tmp: str, name: str, rel: str) -> tuple[str, bool]:
        """Renames the finished temp file into place -> (final name, replaced an old file)."""
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise HTTPError(403, f"{rel} is a symbolic link; links are never followed or replaced")
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise HTTPError(409, f"{rel} is a directory")
        if self.allow_overwrites:
            try:
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except IsADirectoryError:
                raise HTTPError(409, f"{rel} is a directory") from None
            return name, st is not None
        # link() never replaces: two uploads racing for one name cannot clobber each other.
        # (An empty file is renamed instead: the watcher takes a new empty file as "being
        # written" until it is closed, which a link never is.)
        use_link = os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False).st_size > 0
        for n in range(MAX_ALTERNATES + 1):
            candidate = name if n == 0 else f"{name}.{n}"
            if use_link:
                try:
                    os.link(
                        tmp, candidate, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False
                    )
                except FileExistsError:
                    continue
                except OSError as e:
                    if e.errno not in _NO_LINKS:
                        raise
                    use_link = False  # a file system without hard links
                else:
                    os.unlink(tmp, dir_fd=dir_fd)
                    return candidate, False
            if not _lexists(candidate, dir_fd):
                os.rename(tmp, candidate, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                return candidate, False
        raise HTTPError(409, f"{rel} and {MAX_ALTERNATES} alternate names are all taken")

    # -- deleting ---------------------------------------------------------------------------

    def delete(self, parents: list[str], name: str, version: bool) -> str:
        """Deletes images/<parents>/<name>: a version directory (`version`) or a file."""
        rel = "/".join([*parents, name])
        walk = self._walk(rel)
        try:
            for component in parents:
                walk.down(component)
            try:
                st = os.stat(name, dir_fd=walk.fd, follow_symlinks=False)
            except FileNotFoundError:
                raise HTTPError(404, f"{rel} does not exist") from None
            if stat.S_ISLNK(st.st_mode):
                raise HTTPError(403, f"{rel} is a symbolic link; links are never followed")
            if version:
                if not stat.S_ISDIR(st.st_mode):
                    raise HTTPError(400, f"{rel} is not a version directory")
                # one rename makes the whole version vanish at once for the watcher
                delete_tree(name, walk.fd)
            else:
                if stat.S_ISDIR(st.st_mode):
                    raise HTTPError(400, f"{rel} is a directory, not a file")
                os.unlink(name, dir_fd=walk.fd)
                os.fsync(walk.fd)
            walk.prune()
        except OSError as e:
            raise _os_error(e, rel, "deleting") from e
        finally:
            walk.close()
        log.info("deleted %s", rel)
        return rel


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _check_overrides(rel: str, data: bytes) -> str | None:
    """A metadata.json that is not a JSON object is refused (400); other problems come back
    as a warning for the response."""
    try:
        load_json_bounded(data, MAX_OVERRIDES_SIZE, MAX_OVERRIDES_DEPTH)
    except ValueError as e:
        raise HTTPError(400, f"{rel}: {clip(str(e))}") from None
    _, problem = parse_overrides(data)
    if problem and problem.startswith(("invalid JSON", "top level")):
        raise HTTPError(400, f"{rel}: {clip(problem.removesuffix('; using defaults'))}")
    return problem


def _os_error(e: OSError, rel: str, doing: str = "storing") -> HTTPError:
    if e.errno in _NO_SPACE:
        return HTTPError(507, f"no space left for {rel}", fatal=True)
    if e.errno == errno.ENOENT:  # a directory we hold was removed (or swapped) meanwhile
        return HTTPError(409, f"{rel}: a directory was removed or replaced meanwhile; try again")
    if e.errno == errno.ENAMETOOLONG:
        return HTTPError(400, f"{rel}: a name is too long for the file system")
    return HTTPError(500, f"{doing} {rel} failed: {e.strerror or e}", fatal=True)
