"""Walk the image tree (or part of it) and describe each version directory found.

Never raises for what it finds on disk: anything that does not fit the layout is skipped with
one log line naming the path and the reason.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .layout import (
    KNOWN_ARCHES,
    VERSION_DEPTH,
    FileRole,
    LayoutError,
    Role,
    VersionKey,
    check_component,
    classify,
    is_ignored_name,
    parse_version_dir,
)
from .overrides import NO_OVERRIDES, Overrides, parse_overrides

log = logging.getLogger(__name__)

MAX_OVERRIDES_BYTES = 64 * 1024
_COMPONENT_NAMES = ("os", "release", "arch", "variant", "serial")


@dataclass(frozen=True)
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

    @property
    def identity(self) -> tuple[str, int, int, int, int, int]:
        return (self.path, self.dev, self.inode, self.size, self.mtime_ns, self.ctime_ns)


@dataclass(frozen=True)
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


class Scanner:
    """Finds versions below `img_dir`. `exclude(path)` hides files still being written."""

    def __init__(self, img_dir: str | Path, exclude: Exclude = _never) -> None:
        self.img_dir = os.path.abspath(img_dir)
        self.exclude = exclude

    def scan(self, rel_prefix: str = "") -> list[ScannedVersion]:
        """Versions at or below images/<rel_prefix> (a directory path, '' for all)."""
        parts = [p for p in rel_prefix.split("/") if p]
        start = os.path.join(self.img_dir, *parts)
        if len(parts) > VERSION_DEPTH or not os.path.isdir(start) or os.path.islink(start):
            return []
        for i, name in enumerate(parts):
            if is_ignored_name(name):
                return []
            if not self._component_ok(os.path.join(self.img_dir, *parts[: i + 1]), parts[: i + 1]):
                return []
        return sorted(self._walk(start, parts), key=lambda v: v.key)

    # -- walking ------------------------------------------------------------------------------

    def _component_ok(self, path: str, parts: list[str]) -> bool:
        """Checks the name at depth len(parts); logs and returns False when it is unusable."""
        depth = len(parts)
        name = parts[-1]
        what = _COMPONENT_NAMES[depth - 1]
        if depth == VERSION_DEPTH:
            try:
                parse_version_dir(parts)
            except LayoutError as e:
                log.warning("skipping %s: %s", path, e)
                return False
            return True
        if what == "arch":
            if name not in KNOWN_ARCHES:
                log.warning(
                    "skipping %s: unknown architecture %r (LXD and Incus would skip it)",
                    path,
                    name,
                )
                return False
            return True
        try:
            check_component(name, what)
        except LayoutError as e:
            log.warning("skipping %s: %s", path, e)
            return False
        return True

    def _walk(self, path: str, parts: list[str]) -> Iterator[ScannedVersion]:
        if len(parts) == VERSION_DEPTH:
            version = self._read_version(path, parts)
            if version is not None:
                yield version
            return
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            log.warning("skipping %s: cannot list it (%s)", path, e.strerror or e)
            return
        for entry in entries:
            if is_ignored_name(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if not is_dir:
                if entry.is_symlink():
                    log.warning("skipping %s: symlinks are not followed above versions", entry.path)
                else:
                    level = _COMPONENT_NAMES[len(parts)]
                    log.warning(
                        "skipping %s: a file where the %s directory belongs "
                        "(expected images/os/release/arch/variant/serial/FILE)",
                        entry.path,
                        level,
                    )
                continue
            sub = [*parts, entry.name]
            if self._component_ok(entry.path, sub):
                yield from self._walk(entry.path, sub)

    def _read_version(self, path: str, parts: list[str]) -> ScannedVersion | None:
        key = parse_version_dir(parts)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            log.warning("skipping %s: cannot list it (%s)", path, e.strerror or e)
            return None
        files: dict[str, FileStat] = {}
        overrides = NO_OVERRIDES
        for entry in entries:
            if is_ignored_name(entry.name) or self.exclude(entry.path):
                continue
            role = classify(entry.name)
            try:
                st = self._stat(entry)
            except OSError as e:
                log.warning("skipping %s: cannot stat it (%s)", entry.path, e.strerror or e)
                continue
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                log.warning(
                    "skipping %s: directories inside a version are not published", entry.path
                )
                continue
            if role is None:
                log.debug("ignoring %s: not a file LXD or Incus use", entry.path)
                continue
            if role.role is Role.OVERRIDES:
                overrides = self._read_overrides(entry.path, st.st_size)
                continue
            files[entry.name] = FileStat(
                path=entry.path,
                name=entry.name,
                role=role,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns,
                inode=st.st_ino,
                dev=st.st_dev,
            )
        return ScannedVersion(key=key, path=path, files=files, overrides=overrides)

    def _stat(self, entry: os.DirEntry[str]) -> os.stat_result | None:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.commonpath([target, self.img_dir]) != self.img_dir:
                log.warning("skipping %s: symlink leads out of %s", entry.path, self.img_dir)
                return None
        st = os.stat(entry.path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            log.warning("skipping %s: not a regular file", entry.path)
            return None
        return st

    @staticmethod
    def _read_overrides(path: str, size: int) -> Overrides:
        if size > MAX_OVERRIDES_BYTES:
            log.warning("%s: larger than %d bytes; using defaults", path, MAX_OVERRIDES_BYTES)
            return NO_OVERRIDES
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_OVERRIDES_BYTES + 1)
        except OSError as e:
            log.warning("%s: cannot read it (%s); using defaults", path, e.strerror or e)
            return NO_OVERRIDES
        overrides, problem = parse_overrides(data)
        if problem:
            log.warning("%s: %s", path, problem)
        return overrides
