"""Operator commands started as root act on the package's tree as its catalog writer.

streams/ and the state directory belong to one user (the package's `lxd-image-server`); a
command that wrote them as root would leave files of root's there: a catalog, its record, a
hash cache journal the writer can no longer replace or read. So a command that publishes
(`update`, `import`, `prune`, `remove`), started as root on a tree whose streams/ (or, before
the first publish, state directory) is another user's, becomes that user, with its group and
supplementary groups (the package's writer is in group lxdadm, to read and delete in
images/), before it writes anything of the catalog side, for good. A tree that is root's own
is left as it is.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat

from lxd_image_server.config import Paths

log = logging.getLogger(__name__)


def writer_of(paths: Paths) -> tuple[int, int] | None:
    """(uid, gid) of the owner of streams/, or of the state directory when there is no
    streams/ yet; None when that is root or neither exists. Links are not followed."""
    for directory in (paths.streams_dir, paths.state_dir):
        try:
            st = os.stat(directory, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
            return None
        return st.st_uid, st.st_gid
    return None


def become_writer(paths: Paths) -> str | None:
    """As root, becomes the catalog writer of `paths` (writer_of); returns its name, or None
    when nothing changed (not root, or a tree of root's)."""
    if os.geteuid() != 0:
        return None
    owner = writer_of(paths)
    if owner is None:
        return None
    uid, gid = owner
    try:
        name = pwd.getpwuid(uid).pw_name
        groups = os.getgrouplist(name, gid)
    except KeyError:
        name, groups = str(uid), [gid]
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    log.debug("running as %s, the owner of %s", name, paths.streams_dir)
    return name
