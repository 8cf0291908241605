"""`import` and `sync`: the digests computed while copying (or downloading) handed to the
catalog writer (handover.py), so that the running watcher (or the command's own publish) does
not read the files again.

A record names its file by (dev, inode, size, mtime_ns, ctime_ns), taken once the file has
its final name in the hidden staging directory, before the version appears: the watcher finds
the records as soon as it sees the version. Written as the writer reads them: started as root
on the package's tree, each record is made the catalog writer's (privileges.writer_of) through
its descriptor before it gets its name. A record that cannot be written costs only a hash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping

from lxd_image_server.config import Paths
from lxd_image_server.fsutil import open_dir
from lxd_image_server.ops.import_place import Placed
from lxd_image_server.privileges import writer_of
from lxd_image_server.tree import handover
from lxd_image_server.tree.layout import Role, classify

log = logging.getLogger(__name__)


#: file name -> (size, sha256)
Files = Mapping[str, tuple[int, str]]
#: root file name -> (metadata file name, sha256 of the metadata's bytes then the root's)
CombinedOf = Mapping[str, tuple[str, str]]


def combined_of(placed: Placed) -> dict[str, tuple[str, str]]:
    """The combined fingerprint of an imported split image, by its root's name."""
    roles = {name: classify(name) for name in placed.files}
    metas = [n for n, r in roles.items() if r is not None and r.role is Role.META]
    roots = [n for n, r in roles.items() if r is not None and r.role is Role.ROOT]
    if len(metas) == 1 and len(roots) == 1 and placed.fingerprint:
        return {roots[0]: (metas[0], placed.fingerprint)}
    return {}


def records_of(dir_fd: int, files: Files, combined: CombinedOf) -> list[handover.Record]:
    """The records of `files` in the directory `dir_fd` (their final names)."""
    keys: dict[str, handover.Key] = {}
    for name in files:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            keys[name] = handover.key_of(st)
    out = []
    for name, key in keys.items():
        pairs: tuple[handover.Combined, ...] = ()
        meta, fingerprint = combined.get(name, ("", ""))
        if meta in keys:
            pairs = (handover.Combined(meta, keys[meta], fingerprint),)
        out.append(handover.Record(key, files[name][1], pairs))
    return out


def hand_over_placed(paths: Paths, dir_fd: int, placed: Placed) -> None:
    """`hand_over` for an imported image."""
    hand_over(paths, dir_fd, placed.files, combined_of(placed))


def hand_over(paths: Paths, dir_fd: int, files: Files, combined: CombinedOf) -> None:
    """Writes the records of `files` (in the directory `dir_fd`) into the state directory's
    records directory (made if the state directory exists and it does not). Never raises for a
    record it cannot write (one debug line: the file is hashed instead)."""
    try:
        records = records_of(dir_fd, files, combined)
        directory = paths.state.upload_digests
        owner = writer_of(paths) if os.geteuid() == 0 else None
        rec_fd = _records_dir(directory, owner)
        if rec_fd is None:
            return
        try:
            for record in records:
                handover.write_record(rec_fd, record, owner)
        finally:
            os.close(rec_fd)
        log.debug("handed %d digest(s) to the catalog writer in %s", len(records), directory)
    except OSError as e:
        log.debug("digests not handed over (%s): the catalog writer hashes the files", e)


def _records_dir(directory: str, owner: tuple[int, int] | None) -> int | None:
    """The records directory, opened without following a link; made (0700, the writer's)
    when the state directory exists without it."""
    state_dir, name = os.path.split(directory)
    try:
        state_fd = open_dir(state_dir)
    except FileNotFoundError:
        return None
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=state_fd)
            if owner is not None:
                os.chown(name, *owner, dir_fd=state_fd, follow_symlinks=False)
        return open_dir(name, dir_fd=state_fd)
    finally:
        os.close(state_fd)
