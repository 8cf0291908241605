"""The inotify watches on images/, within a cap (used by watch.py).

Only directories that fit the layout get a watch (valid names, no deeper than a version), and
at most `max_watches` of them (default 4096: half of the smallest default of
fs.inotify.max_user_watches, 8192, so the kernel limit is never what stops us; enough for about
3,000 versions). The directories above the versions are watched first (every new version
appears in one of them), then the versions, newest first. Past the cap: one warning, and the
watcher rescans the whole tree every `rescan_interval` seconds (`rescan_due`), with new watches
added as room frees; a version directory created or moved in takes the watch of the version
quiet the longest, so new uploads are followed as closely as below the cap.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable

from inotify_simple import INotify, flags

from lxd_image_server.tree.layout import (
    KNOWN_ARCHES,
    VERSION_DEPTH,
    LayoutError,
    check_component,
    is_ignored_name,
    valid_serial,
)

#: the watcher's loggers: what it says about its watches reads as the watcher's
log = logging.getLogger(f"{__package__}.watch")
#: what an uploader can make us say again and again: said once an hour (watch.QUIET_LOGGERS)
quiet_log = logging.getLogger(f"{__package__}.watch.quiet")

DIR_MASK = (
    flags.CREATE
    | flags.CLOSE_WRITE
    | flags.MODIFY
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.DELETE
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
)
DEFAULT_MAX_WATCHES = 4096
DEFAULT_RESCAN_INTERVAL = 60.0


def rel_depth(rel: str) -> int:
    return 0 if rel == "" else rel.count("/") + 1


def rel_join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def fits_layout(depth: int, name: str) -> bool:
    """Whether a directory `name` at `depth` below images/ could hold or lead to a version."""
    if depth < 1 or depth > VERSION_DEPTH or is_ignored_name(name):
        return False
    if depth == 3:
        return name in KNOWN_ARCHES
    if depth == VERSION_DEPTH:
        return valid_serial(name)
    try:
        check_component(name, "name")
    except LayoutError:
        return False
    return True


class WatchSet:
    """The watched directories of images/ (relative names, "" for images/ itself) and their
    watch descriptors, within `max_watches`."""

    def __init__(
        self,
        img_dir: str,
        max_watches: int = DEFAULT_MAX_WATCHES,
        rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
    ) -> None:
        self.img_dir = img_dir
        self.max_watches = max(1, max_watches)
        self.rescan_interval = rescan_interval
        self.inotify = INotify()
        self.wds: dict[int, str] = {}
        #: the same, the other way round: watched directory (relative to images/) -> wd
        self.watched: dict[str, int] = {}
        #: the watched version directories, the one quiet the longest first (evicted first
        #: when a new version needs a watch at the cap)
        self.version_watches: OrderedDict[str, None] = OrderedDict()
        #: some directory that fits the layout has no watch (the cap): poll the tree
        self.over_cap = False
        self._cap_hit = False
        #: when the next rescan of the whole tree is due (time.monotonic()), over the cap
        self.next_rescan: float | None = None

    def rescan_due(self) -> bool:
        """A rescan of the whole tree is due (over the cap); the next one is planned."""
        if self.next_rescan is None or time.monotonic() < self.next_rescan:
            return False
        self.next_rescan = time.monotonic() + self.rescan_interval
        return True

    def unsettled(self, path: str, rel: str, listed_size: Callable[[], int | None]) -> float | None:
        """For the file `path` (`rel` below images/): when (time.monotonic()) it will have
        been unchanged for a rescan interval, if its directory has no watch and it may still
        be being written (nothing tells us); None when it may be published now: watched,
        unchanged that long, or the very file the catalog lists at the size it lists
        (`listed_size`: a new ctime alone, a chown at an upgrade or a touch, does not withdraw
        a published version)."""
        if rel.rpartition("/")[0] in self.watched:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        changed = max(st.st_mtime, st.st_ctime)
        if time.time() - changed >= self.rescan_interval or listed_size() == st.st_size:
            return None
        return time.monotonic() + changed + self.rescan_interval - time.time()

    def touched(self, rel: str) -> None:
        """Something changed in the version directory `rel`: the last to lose its watch."""
        if rel in self.version_watches:
            self.version_watches.move_to_end(rel)

    def close(self) -> None:
        self.inotify.close()

    def _add_tree(self, rel: str, evict: bool = False) -> None:
        """Watches `rel` and every directory below it that fits the layout, down to versions
        (at most `max_watches` in all), level by level: every directory above the versions
        first (each new version appears in one of them), then the version directories, the
        most recently changed first. Each directory is listed only once it is watched, so
        nothing created meanwhile goes unseen.

        `evict`: the version directories found are new (created or moved in): at the cap, each
        takes the watch of the version directory that has been quiet the longest (an old
        version, complete for a long time, needs no watch: a rescan still sees it change)."""
        level = [rel]
        depth = rel_depth(rel)
        while level:
            below: list[tuple[int, str]] = []
            for r in level:
                if not self._add_watch(r, evict and depth == VERSION_DEPTH):
                    continue
                if depth < VERSION_DEPTH:
                    self._list_into(r, depth, below)
            if depth + 1 == VERSION_DEPTH:
                below.sort(key=lambda e: e[0], reverse=True)  # newest first
            level = [r for _, r in below]
            depth += 1

    def _list_into(self, rel: str, depth: int, out: list[tuple[int, str]]) -> None:
        """The subdirectories of `rel` that fit the layout, with their mtime, into `out`."""
        path = os.path.join(self.img_dir, rel) if rel else self.img_dir
        try:
            entries = os.scandir(path)
        except OSError:
            return
        with entries:
            for entry in entries:
                if not fits_layout(depth + 1, entry.name):
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
                out.append((mtime, rel_join(rel, entry.name)))

    def _add_watch(self, rel: str, evict: bool) -> bool:
        """Watches the directory `rel` (True), unless the cap or an error prevents it."""
        if rel in self.watched:
            return True
        if len(self.watched) >= self.max_watches and evict and self.version_watches:
            quiet, _ = self.version_watches.popitem(last=False)
            wd = self.watched[quiet]
            self.forget(wd)
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(wd)
        if len(self.watched) >= self.max_watches:
            self._cap_hit = True
            return False
        path = os.path.join(self.img_dir, rel) if rel else self.img_dir
        try:
            wd = self.inotify.add_watch(path, DIR_MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                quiet_log.warning(
                    "cannot watch %r: inotify watch limit reached "
                    "(raise fs.inotify.max_user_watches or lower --max-watches)",
                    path,
                )
                self._cap_hit = True
            elif e.errno not in (errno.ENOENT, errno.ENOTDIR):
                quiet_log.warning("cannot watch %r: %s", path, e.strerror or e)
            return False
        old = self.wds.get(wd)
        if old is not None and self.watched.get(old) == wd:
            self.forget(wd)  # the same directory, moved: known by its new name
        self.wds[wd] = rel
        self.watched[rel] = wd
        if rel_depth(rel) == VERSION_DEPTH:
            self.version_watches[rel] = None
        return True

    def watch_tree(self, rel: str, evict: bool = False) -> None:
        """Watches `rel` and below (see `_add_tree`), then says once when the cap left
        directories without a watch."""
        self._cap_hit = False
        self._add_tree(rel, evict)
        if self._cap_hit and not self.over_cap:
            quiet_log.warning(
                "inotify watch cap (%d) reached: directories beyond it are not watched; "
                "rescanning the whole tree every %.0f s",
                self.max_watches,
                self.rescan_interval,
            )
            self.over_cap = True
            self.next_rescan = time.monotonic() + self.rescan_interval
        elif not self._cap_hit and rel == "" and self.over_cap:
            log.info("every directory is watched again (%d watches)", len(self.watched))
            self.over_cap = False
            self.next_rescan = None

    def forget(self, wd: int) -> str | None:
        rel = self.wds.pop(wd, None)
        if rel is not None and self.watched.get(rel) == wd:
            del self.watched[rel]
            self.version_watches.pop(rel, None)
        return rel

    def drop_tree(self, rel: str) -> None:
        """Stops watching `rel` and below (it was moved away)."""
        for wd, wrel in list(self.wds.items()):
            if wrel == rel or wrel.startswith(rel + "/"):
                self.forget(wd)
                with contextlib.suppress(OSError):
                    self.inotify.rm_watch(wd)

    def rewatch_all(self) -> None:
        for wd in list(self.wds):
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(wd)
        self.wds.clear()
        self.watched.clear()
        self.version_watches.clear()
        self.over_cap = False
        self.watch_tree("")
