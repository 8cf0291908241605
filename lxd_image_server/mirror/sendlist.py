"""What a mirror push sends: the files the published catalog lists, checked, and held open.

Nothing an uploader plants travels. A push sends exactly:
  - the catalog (streams/v1/{index,images}.json[.gz]) and the page (streams/index.html), read
    as regular files (no link followed, no FIFO waited on), bounded in size, copied aside;
  - the files that copy of images.json lists (read as a client reads it: model.parse_catalog,
    bounded; a copy that is not a catalog fails the push), by paths checked here (relative,
    below images/, no `..`, no hidden or empty part, ASCII without control characters).

Every directory from images/ down to a listed file is opened without following links (a link
or a missing directory: its files are left out, one log line per push), and each listed file is
checked to be a regular file it can open. rsync then reads through those open directories, not
through the path: a link swapped in for a version directory after the check is never followed
(rsync itself opens the file with O_NOFOLLOW and skips what is not a regular file). The held
directories reach rsync as /proc/self/fd/N, behind links in a staging tree of ours, whose other
directories are real ones; rsync follows the staging links as the directories they lead to.

The deletions on the mirror are driven by another tree of ours: empty placeholders for exactly
the listed files, which rsync never sends (--existing --ignore-existing), only compares names
with, so whatever else lies below images/ on the mirror goes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from lxd_image_server.catalog.model import parse_catalog
from lxd_image_server.catalog.page import PAGE_NAME
from lxd_image_server.fsutil import (
    NotRegularFile,
    TooLarge,
    open_dir,
    open_dirs,
    open_regular,
    read_bounded,
)

log = logging.getLogger(__name__)

#: the largest catalog file (and page) a push copies; a larger one fails that push
MAX_CATALOG_BYTES = 64 << 20
#: copied in the reverse of publish.py's order, so an index.json is never newer than the
#: images.json copied with it
CATALOG_FILES = ("index.json", "index.json.gz", "images.json", "images.json.gz")
#: directories held open for one rsync run (the process's descriptors are limited)
PINS_PER_RUN = 200
MAX_PATH = 4096
MAX_NAME = 255


class CatalogError(Exception):
    """The catalog cannot be read for a push; the message says which file and why."""


def check_path(path: object, prefix: Sequence[str]) -> str | None:
    """Why `path` (an item path of the catalog) must not be handed to rsync, or None if it may:
    it must be relative to the served root and lie below the image directory (`prefix`, its
    parts relative to the root), in plain printable ASCII, without `.`, `..`, empty or hidden
    parts."""
    if not isinstance(path, str):
        return "not a string"
    if not path:
        return "empty"
    if len(path) > MAX_PATH:
        return "too long"
    if not path.isascii() or not path.isprintable():
        return "not printable ASCII"
    if path.startswith("/"):
        return "absolute"
    parts = path.split("/")
    if len(parts) <= len(prefix) or tuple(parts[: len(prefix)]) != tuple(prefix):
        return f"not below {'/'.join(prefix)}/"
    for part in parts[len(prefix) :]:
        if not part:
            return "has an empty part"
        if part in (".", ".."):
            return f"has a {part!r} part"
        if part.startswith("."):
            return "has a hidden part"
        if len(part) > MAX_NAME:
            return "has a part longer than 255 characters"
    return None


def image_prefix(root_dir: str, img_dir: str) -> tuple[str, ...]:
    """The image directory's parts relative to the served root (('images',) by default)."""
    rel = os.path.relpath(img_dir, root_dir)
    parts = tuple(rel.split("/"))
    if rel in (".", "") or ".." in parts:
        raise CatalogError(f"the image directory {img_dir} is not below the root {root_dir}")
    return parts


@dataclass(frozen=True)
class Listing:
    """The item paths of a catalog: those a push may send, and those it refuses (with why)."""

    paths: tuple[str, ...]
    refused: tuple[tuple[str, str], ...] = ()


def list_catalog(data: bytes, prefix: Sequence[str]) -> Listing:
    """The item paths of images.json's bytes, checked (see check_path). A path below another
    listed path is refused too (a file cannot also be a directory). CatalogError when the
    bytes are too many, too deeply nested, not JSON, or not a catalog (model.py's reader)."""
    try:
        catalog = parse_catalog(data, MAX_CATALOG_BYTES)
    except ValueError as e:
        raise CatalogError(f"images.json: {e}") from None
    good: set[str] = set()
    refused: dict[str, str] = {}
    every = (
        item.path
        for product in catalog.products.values()
        for version in product.versions.values()
        for item in version.items.values()
    )
    for path in every:
        why = check_path(path, prefix)
        if why is None:
            good.add(str(path))
        else:
            refused[repr(path)[:120]] = why
    for path in sorted(good):
        parts = path.split("/")
        if any("/".join(parts[:n]) in good for n in range(len(prefix) + 1, len(parts))):
            good.discard(path)
            refused[repr(path)] = "below another listed file"
    return Listing(tuple(sorted(good)), tuple(sorted(refused.items())))


# -- the catalog, copied aside -------------------------------------------------------------------


def _copy_regular(name: str, dir_fd: int, dest: str) -> bool:
    """Copies the regular file `name` (in `dir_fd`) to `dest`, with its modification time.
    False when there is no such regular file; CatalogError when it is too large."""
    try:
        fd = open_regular(name, dir_fd=dir_fd)
    except (FileNotFoundError, NotRegularFile):
        return False
    try:
        st = os.fstat(fd)
        try:
            data = read_bounded(fd, MAX_CATALOG_BYTES)
        except TooLarge:
            raise CatalogError(f"{name} is larger than {MAX_CATALOG_BYTES} bytes") from None
    finally:
        os.close(fd)
    with open(dest, "wb") as f:
        f.write(data)
    os.utime(dest, ns=(st.st_mtime_ns, st.st_mtime_ns))
    return True


def copy_catalog(streams_dir: str, target: str) -> list[str]:
    """Copies the catalog page (streams/index.html) into `target`, and the catalog files into
    `target`/v1, replacing what an earlier copy left there. Returns the catalog files copied.

    The page goes first: the pipeline writes the catalog, then the page, so the page copied
    first never shows more than the catalog copied after it."""
    v1 = os.path.join(target, os.path.basename(streams_dir))
    os.makedirs(v1, exist_ok=True)
    for d in (target, v1):
        for entry in os.scandir(d):
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
    parent_fd = os.open(os.path.dirname(streams_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _copy_regular(PAGE_NAME, parent_fd, os.path.join(target, PAGE_NAME))
        streams_fd = open_dir(os.path.basename(streams_dir), dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    try:
        return [n for n in CATALOG_FILES if _copy_regular(n, streams_fd, os.path.join(v1, n))]
    finally:
        os.close(streams_fd)


def make_keep_tree(paths: Iterable[str], root: str) -> None:
    """Empty placeholders at each of `paths` (checked, relative) below `root`: what the
    deletions pass leaves on the mirror."""
    os.makedirs(root, exist_ok=True)
    for path in paths:
        dest = os.path.join(root, path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb"):
            pass


# -- the listed files, held open -----------------------------------------------------------------


@dataclass
class Batch:
    """Listed files whose directories are held open; `fds` go to rsync."""

    #: relative directory (below the root) -> its open descriptor
    dirs: dict[str, int] = field(default_factory=dict)
    #: relative paths (below the root) of files checked to be regular
    files: list[str] = field(default_factory=list)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self.dirs.values())

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()

    def stage(self, stage_dir: str, list_file: str) -> None:
        """The staging tree rsync reads from (`stage_dir`: real directories, and a link to
        /proc/self/fd/N for each held directory) and the NUL-separated list of files."""
        for rel, fd in self.dirs.items():
            link = os.path.join(stage_dir, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(f"/proc/self/fd/{fd}", link)
        with open(list_file, "wb") as f:
            f.write(b"".join(path.encode("ascii") + b"\0" for path in self.files))


def _reason(e: OSError) -> str:
    if isinstance(e, NotRegularFile):
        return e.strerror or "not a regular file"
    if isinstance(e, NotADirectoryError):
        return "a directory on its way is a link or not a directory"
    return e.strerror or type(e).__name__


@contextlib.contextmanager
def held_batches(
    paths: Sequence[str], img_dir: str, prefix: Sequence[str], skipped: list[tuple[str, str]]
) -> Iterator[Iterator[Batch]]:
    """Batches of the listed `paths` (checked, relative to the root, below `prefix`), each with
    its files' directories held open, at most PINS_PER_RUN of them. A file that cannot be sent
    (missing, a link, a FIFO, unreadable, behind a link) is added to `skipped` with why. Every
    descriptor is closed when the block ends."""
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        by_dir.setdefault(os.path.dirname(path), []).append(path)
    img_fd = os.open(img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    open_batches: list[Batch] = []

    def batches() -> Iterator[Batch]:
        pending = sorted(by_dir)
        while pending:
            batch, later = Batch(), []
            open_batches.append(batch)
            for rel_dir in pending:
                parts = rel_dir.split("/")
                ancestors = ("/".join(parts[:n]) for n in range(len(prefix), len(parts)))
                if len(batch.dirs) >= PINS_PER_RUN or any(a in batch.dirs for a in ancestors):
                    later.append(rel_dir)  # a held directory must not contain another one
                    continue
                _hold(batch, rel_dir, parts[len(prefix) :], by_dir[rel_dir], img_fd, skipped)
            pending = later
            try:
                if batch.files:
                    yield batch
            finally:
                batch.close()

    try:
        yield batches()
    finally:
        for batch in open_batches:
            batch.close()
        os.close(img_fd)


def _hold(
    batch: Batch,
    rel_dir: str,
    below: Sequence[str],
    files: list[str],
    img_fd: int,
    skipped: list[tuple[str, str]],
) -> None:
    try:
        dir_fd = open_dirs(img_fd, below)
    except OSError as e:
        skipped.extend((path, _reason(e)) for path in files)
        return
    good = []
    for path in files:
        try:
            os.close(open_regular(os.path.basename(path), dir_fd=dir_fd))
        except OSError as e:
            skipped.append((path, _reason(e)))
        else:
            good.append(path)
    if good:
        batch.dirs[rel_dir] = dir_fd
        batch.files.extend(good)
    else:
        os.close(dir_fd)
