"""`import` of several images in one command: which of the files given make up which image.

- One file, or two files (no directory): one image, as ever (a unified tarball; or a split
  image's metadata tarball and root, in any order, whatever their names).
- A directory among the paths, or three files or more: several images, told apart by the
  names `lxc image export` gives them: `meta-NAME.EXT` is the metadata tarball of the root
  `NAME.EXT2` (EXT, EXT2 among EXPORT_SUFFIXES; NAME is the image's fingerprint in lxc's
  exports), and every other file is a unified tarball on its own. A directory stands for its
  visible regular files (not its subdirectories). A `meta-` file without its root, or a
  name given twice, is an error: nothing is imported.
What each file is, is then read from its content (import_detect.py), as for one image.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from lxd_image_server.ops.import_errors import NamingError
from lxd_image_server.tree.layout import is_ignored_name

#: the file name suffixes of lxc's exports (longest first: .tar.xz before .xz)
EXPORT_SUFFIXES = (".tar.xz", ".tar.gz", ".tar.bz2", ".tar.zst", ".tar", ".squashfs", ".qcow2",
                   ".img")  # fmt: skip
META_PREFIX = "meta-"


def stem(name: str) -> str:
    """The name without its export suffix (the whole name if it has none)."""
    for suffix in EXPORT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def group_files(paths: Sequence[str]) -> list[tuple[str, ...]]:
    """The files of each image, in the order given (a directory's in name order).
    NamingError when the paths do not say which files belong together."""
    files: list[str] = []
    directories = False
    for path in paths:
        if _is_dir(path):
            directories = True
            files += _visible_files(path)
        else:
            files.append(path)
    if not files:
        raise NamingError(f"no image files in {', '.join(paths)}")
    seen: dict[str, str] = {}
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            raise NamingError(f"{path} was given twice")
        seen[real] = path
    if not directories and len(files) <= 2:
        return [tuple(files)]
    return _by_name(files)


def _by_name(files: list[str]) -> list[tuple[str, ...]]:
    by_stem: dict[str, str] = {}
    for path in files:
        name = os.path.basename(path)
        if not name.startswith(META_PREFIX):
            key = stem(name)
            if key in by_stem:
                raise NamingError(
                    f"{by_stem[key]} and {path} have the same name but for its suffix: "
                    "cannot tell which metadata tarball goes with which"
                )
            by_stem[key] = path
    groups: list[tuple[str, ...]] = []
    paired: set[str] = set()
    for path in files:
        name = os.path.basename(path)
        if name.startswith(META_PREFIX):
            root = by_stem.get(stem(name[len(META_PREFIX) :]))
            if root is None:
                raise NamingError(
                    f"{path}: no root file system named {stem(name[len(META_PREFIX) :])}.* "
                    "beside it (several images are paired by lxc's names: meta-NAME.tar.xz "
                    "with NAME.squashfs, NAME.tar.xz or NAME.qcow2)"
                )
            groups.append((path, root))
            paired.add(root)
    for path in files:
        if not os.path.basename(path).startswith(META_PREFIX) and path not in paired:
            groups.append((path,))
    order = {path: i for i, path in enumerate(files)}
    groups.sort(key=lambda g: min(order[p] for p in g))
    return groups


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _visible_files(directory: str) -> list[str]:
    """The visible regular files of `directory` (links to regular files included, as for
    a file named on the command line), in name order."""
    out = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if is_ignored_name(entry.name):
                    continue
                if entry.is_file(follow_symlinks=True):
                    out.append(entry.path)
    except OSError as e:
        raise NamingError(f"cannot read {directory}: {e.strerror or e}") from e
    return sorted(out)
