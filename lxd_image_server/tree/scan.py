"""Walk the image tree (or part of it) and describe each version directory found.

Never raises for what it finds on disk: anything that does not fit the layout is skipped with
one log line naming the path and the reason.

Everything below images/ is an uploader's and may change under us, so the walk acts on what it
checked: it goes down through directory file descriptors opened without following links and
describes each file by fstatat of its name in its version directory's descriptor, without
following a link (one system call per file, as a plain stat pass; nothing is opened, so no FIFO
or device is ever waited on). Hashing opens the file the same way and checks that it is the
file described here (same device, inode, size, mtime and ctime). A symbolic link anywhere below
images/, a FIFO, a device, a setuid, setgid or executable file and a sparse giant are never
published.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lxd_image_server.fsutil import NotRegularFile, TooLarge, open_dir, open_regular, read_bounded
from lxd_image_server.tree.layout import (
    KNOWN_ARCHES,
    VERSION_DEPTH,
    FileRole,
    LayoutError,
    Role,
    VersionKey,
    check_component,
    check_serial,
    check_serial_not_ahead,
    classify,
    fixed_name,
    is_ignored_name,
)
from lxd_image_server.tree.overrides import (
    MAX_OVERRIDES_BYTES,
    NO_OVERRIDES,
    Overrides,
    parse_overrides,
)

log = logging.getLogger(__name__)

_COMPONENT_NAMES = ("os", "release", "arch", "variant", "serial")

#: Mode bits no published file needs: setuid, setgid, sticky and the executable bits.
SPECIAL_BITS = 0o7111
#: A file larger than this whose blocks on disk cover less than SPARSE_RATIO of its size is
#: sparse: holes an uploader made with one write at a far offset. Hashing it reads zeros for
#: minutes and mirrors would receive them all. Images are compressed (squashfs, xz, gzip,
#: qcow2), so none is legitimately mostly holes.
SPARSE_MIN_SIZE = 64 << 20
SPARSE_RATIO = 0.5


def _shown(path: str) -> str:
    """A path for a log line: as is, or escaped when it holds control characters (so a name
    with a newline cannot forge a second line)."""
    return path if path.isprintable() else repr(path)


def unpublishable(st: os.stat_result) -> str | None:
    """Why a regular file with status `st` is not published, or None when it may be."""
    if st.st_mode & SPECIAL_BITS:
        return (
            f"mode {stat.S_IMODE(st.st_mode):04o} has setuid, setgid, sticky or executable bits "
            "(no image file needs them: chmod 0644 it)"
        )
    if st.st_size > SPARSE_MIN_SIZE and st.st_blocks * 512 < st.st_size * SPARSE_RATIO:
        return (
            f"sparse ({st.st_blocks * 512} bytes on disk for {st.st_size}): "
            "images are compressed, upload the file itself"
        )
    return None


def open_below(base: str, rel: str) -> int:
    """Opens the regular file `rel` (a relative path with '/') below the directory `base`
    without following a link anywhere below `base`: each directory is opened relative to its
    parent's descriptor with O_NOFOLLOW, the file with fsutil.open_regular. Raises OSError
    (NotRegularFile, NotADirectoryError, FileNotFoundError, ...)."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise NotRegularFile(errno.EINVAL, "not a plain relative path", rel)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            sub = open_dir(name, dir_fd=fd)
            os.close(fd)
            fd = sub
        return open_regular(parts[-1], dir_fd=fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class FileStat:
    """One file as found on disk; (path, dev, inode, size, mtime, ctime) identify its bytes."""

    path: str
    name: str
    role: FileRole
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    dev: int
    #: The trusted directory `path` lies below: the file is opened again from there, through
    #: directory descriptors without following links (see open_below).
    base: str

    @classmethod
    def of(
        cls,
        path: str,
        name: str,
        role: FileRole,
        st: os.stat_result,
        base: str,
        dev: int | None = None,
    ) -> FileStat:
        """The file at `path` as `st` (a stat of it, no link followed) describes it (`dev`:
        st.st_dev, as an object the caller shares between files)."""
        return cls(
            path=path,
            name=name,
            role=role,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            inode=st.st_ino,
            dev=st.st_dev if dev is None else dev,
            base=base,
        )

    @property
    def rel(self) -> str:
        """`path` relative to `base`."""
        return os.path.relpath(self.path, self.base)

    @property
    def identity(self) -> tuple[str, int, int, int, int, int]:
        return (self.path, self.dev, self.inode, self.size, self.mtime_ns, self.ctime_ns)


@dataclass(frozen=True, slots=True)
class ScannedVersion:
    key: VersionKey
    #: Directory of the version, absolute.
    path: str
    #: Publishable files by name (metadata.json excluded).
    files: dict[str, FileStat] = field(default_factory=dict)
    overrides: Overrides = NO_OVERRIDES


Exclude = Callable[[str], bool]


def _never(_: str) -> bool:
    return False


def _entry_name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _key_tuple(v: ScannedVersion) -> tuple[str, str, str, str, str]:
    """`v.key` as a tuple: the same order as comparing the keys, without their methods."""
    k = v.key
    return (k.os, k.release, k.arch, k.variant, k.serial)


class Scanner:
    """Finds versions below `img_dir`. `exclude(path)` hides files still being written;
    `clock()` is the time a serial may not be more than a day ahead of (layout.py)."""

    def __init__(
        self,
        img_dir: str | Path,
        exclude: Exclude = _never,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.img_dir = os.path.abspath(img_dir)
        self.exclude = exclude
        self.clock = clock
        #: the device of the last file found: kept in FileStats as this one object
        self._dev = -1

    def scan(self, rel_prefix: str = "") -> list[ScannedVersion]:
        """Versions at or below images/<rel_prefix> (a directory path, '' for all)."""
        parts = [p for p in rel_prefix.split("/") if p]
        if len(parts) > VERSION_DEPTH:
            return []
        for i, name in enumerate(parts):
            if is_ignored_name(name):
                return []
            if not self._component_ok(os.path.join(self.img_dir, *parts[: i + 1]), parts[: i + 1]):
                return []
        try:
            fd = os.open(self.img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return []
        path = self.img_dir
        try:
            for name in parts:
                path = os.path.join(path, name)
                sub = self._open_subdir(name, fd, path, quiet_if_missing=True)
                if sub is None:
                    return []
                os.close(fd)
                fd = sub
            found: list[ScannedVersion] = []
            if len(parts) == VERSION_DEPTH:
                version = self._read_version(fd, path, VersionKey(*parts))
                if version is not None:
                    found.append(version)
            else:
                self._walk(fd, path, parts, found, {})
            found.sort(key=_key_tuple)
            return found
        finally:
            os.close(fd)

    # -- walking ------------------------------------------------------------------------------

    def _component_ok(self, path: str, parts: list[str]) -> bool:
        """Checks the name at depth len(parts) (the levels above it were checked already);
        logs and returns False when it is unusable."""
        depth = len(parts)
        name = parts[-1]
        what = _COMPONENT_NAMES[depth - 1]
        try:
            if depth == VERSION_DEPTH:
                check_serial(name)
                check_serial_not_ahead(name, self.clock())
            elif what == "arch":
                if name not in KNOWN_ARCHES:
                    log.warning(
                        "skipping %s: unknown architecture %s (LXD and Incus would skip it)",
                        _shown(path),
                        name,
                    )
                    return False
            else:
                check_component(name, what)
        except LayoutError as e:
            log.warning("skipping %s: %s", _shown(path), e)
            return False
        return True

    @staticmethod
    def _open_subdir(name: str, fd: int, path: str, quiet_if_missing: bool = False) -> int | None:
        """The directory `name` in `fd`, opened without following a link; None (logged) when
        it is a link, not a directory or gone."""
        try:
            return open_dir(name, dir_fd=fd)
        except FileNotFoundError:
            if not quiet_if_missing:
                log.info("skipping %s: it vanished", _shown(path))
            return None
        except NotADirectoryError:
            try:
                link = stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
            except OSError:
                link = False
            if link:
                log.warning("skipping %s: a symbolic link (links are never followed)", _shown(path))
            elif not quiet_if_missing:
                log.warning("skipping %s: not a directory", _shown(path))
            return None
        except OSError as e:
            log.warning("skipping %s: cannot open it (%s)", _shown(path), e.strerror or e)
            return None

    @staticmethod
    def _list(fd: int, path: str) -> list[os.DirEntry[str]] | None:
        """The entries of the directory `fd` by name, or None (logged)."""
        try:
            with os.scandir(fd) as it:
                return sorted(it, key=_entry_name)
        except OSError as e:
            log.warning("skipping %s: cannot list it (%s)", _shown(path), e.strerror or e)
            return None

    def _walk(
        self,
        fd: int,
        path: str,
        parts: list[str],
        found: list[ScannedVersion],
        serials: dict[str, str],
    ) -> None:
        """Adds to `found` the versions below the directory `fd` (at `path`, `parts` below
        images/, fewer than VERSION_DEPTH levels). `serials`: each serial met in this scan,
        as one string (products built together share their serials)."""
        entries = self._list(fd, path)
        if entries is None:
            return
        prefix = path if path.endswith("/") else path + "/"
        versions_here = len(parts) + 1 == VERSION_DEPTH
        for entry in entries:
            name = entry.name
            if is_ignored_name(name):
                continue
            sub_path = prefix + name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if not is_dir:
                if entry.is_symlink():
                    log.warning(
                        "skipping %s: a symbolic link (links are never followed)", _shown(sub_path)
                    )
                else:
                    log.warning(
                        "skipping %s: a file where the %s directory belongs "
                        "(expected images/os/release/arch/variant/serial/FILE)",
                        _shown(sub_path),
                        _COMPONENT_NAMES[len(parts)],
                    )
                continue
            sub = [*parts, name]
            if not self._component_ok(sub_path, sub):
                continue
            sub_fd = self._open_subdir(name, fd, sub_path)
            if sub_fd is None:
                continue
            try:
                if versions_here:
                    sub[-1] = serials.setdefault(name, name)
                    version = self._read_version(sub_fd, sub_path, VersionKey(*sub))
                    if version is not None:
                        found.append(version)
                else:
                    self._walk(sub_fd, sub_path, sub, found, serials)
            finally:
                os.close(sub_fd)

    def _read_version(self, fd: int, path: str, key: VersionKey) -> ScannedVersion | None:
        entries = self._list(fd, path)
        if entries is None:
            return None
        files: dict[str, FileStat] = {}
        overrides = NO_OVERRIDES
        prefix = path + "/"
        exclude = self.exclude
        for entry in entries:
            name = entry.name
            file_path = prefix + name
            role = classify(name)  # None for ignored names
            if role is None:
                if is_ignored_name(name) or exclude(file_path):
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    log.warning(
                        "skipping %s: directories inside a version are not published",
                        _shown(file_path),
                    )
                else:
                    log.debug("ignoring %s: not a file LXD or Incus use", _shown(file_path))
                continue
            if exclude(file_path):
                continue
            if role.role is Role.OVERRIDES:
                overrides = self._read_overrides(fd, name, file_path)
                continue
            st = self._stat_file(entry, file_path)
            if st is None:
                continue
            dev = self._dev  # (one number for the files of a file system)
            if st.st_dev != dev:
                dev = self._dev = st.st_dev
            name = fixed_name(name)  # (one string for that name in every version)
            files[name] = FileStat.of(file_path, name, role, st, self.img_dir, dev)
        return ScannedVersion(key=key, path=path, files=files, overrides=overrides)

    @staticmethod
    def _open_file(dir_fd: int, name: str, path: str) -> int | None:
        """`name` in the version directory `dir_fd`, if it is a regular file (else logged)."""
        try:
            return open_regular(name, dir_fd=dir_fd)
        except NotRegularFile as e:
            log.warning(
                "skipping %s: %s; only regular files are published", _shown(path), e.strerror
            )
        except FileNotFoundError:
            log.info("skipping %s: it vanished", _shown(path))
        except OSError as e:
            log.warning("skipping %s: cannot open it (%s)", _shown(path), e.strerror or e)
        return None

    @staticmethod
    def _stat_file(entry: os.DirEntry[str], path: str) -> os.stat_result | None:
        """The status of the directory entry itself (fstatat of the version directory's
        descriptor, no link followed), when it is a regular file that may be published (else
        logged). One system call: the file is opened only to be hashed, and hashing checks that
        what it opened is the file described here (hashing.hash_file)."""
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            log.info("skipping %s: it vanished", _shown(path))
            return None
        except OSError as e:
            log.warning("skipping %s: cannot stat it (%s)", _shown(path), e.strerror or e)
            return None
        if not stat.S_ISREG(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            log.warning("skipping %s: %s; only regular files are published", _shown(path), what)
            return None
        reason = unpublishable(st)
        if reason is not None:
            log.warning("skipping %s: %s", _shown(path), reason)
            return None
        return st

    def _read_overrides(self, dir_fd: int, name: str, path: str) -> Overrides:
        fd = self._open_file(dir_fd, name, path)
        if fd is None:
            return NO_OVERRIDES
        try:
            data = read_bounded(fd, MAX_OVERRIDES_BYTES)
        except TooLarge:
            log.warning(
                "%s: larger than %d bytes; using defaults", _shown(path), MAX_OVERRIDES_BYTES
            )
            return NO_OVERRIDES
        except OSError as e:
            log.warning("%s: cannot read it (%s); using defaults", _shown(path), e.strerror or e)
            return NO_OVERRIDES
        finally:
            os.close(fd)
        overrides, problem = parse_overrides(data)
        if problem:
            log.warning("%s: %s", _shown(path), problem)
        return overrides
