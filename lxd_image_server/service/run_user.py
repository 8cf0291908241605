"""`run` started as root: the upload server and the watcher run as an unprivileged user.

Which user: `--user USER` (or LXD_IMAGE_SERVER_RUN_USER), else the owner of the tree (the root
directory) when that is not root; else `run` refuses, saying so in one line. Never uid 0.

What stays root's, and what the user gets:
- root: nginx's master (its workers are www-data, as before), its configuration (STATE/nginx),
  its prefix with the pid file and the URL `health` reads (STATE/run), the certificate
  (STATE/ssl) and the credentials file;
- the user: the tree (it owns the root directory: uploads and the catalog are its files), its
  own files in the state directory, STATE/upload-digests, and STATE/run/upload (the upload
  socket and the slots; USER:www-data 2750, so nginx's workers connect).
The state directory becomes root's, group the user's, mode 1775: the watcher makes and replaces
its own files there, and cannot rename or replace root's (the sticky bit).

Root never acts on a path the user could swap under it: every directory above the tree, the
state directory, the credentials and the certificate must be root's and not writable by
anyone else (sticky ones, such as /var/tmp, aside), and what root writes in the state directory
lies in directories it owns. The tree itself is prepared by the watcher, as the user.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lxd_image_server import envnames
from lxd_image_server.config import Paths, ServiceError

#: names the user when --user does not
USER_ENV = envnames.RUN_USER
STATE_MODE = 0o1775
UPLOAD_DIR_MODE = 0o2750


class RunUserError(ServiceError):
    """`run` as root cannot hand the parts to an unprivileged user this way; one line says why."""


@dataclass(frozen=True)
class Identity:
    """Who a child process runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def popen(self) -> dict[str, Any]:
        """subprocess.Popen's arguments for it."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


@dataclass(frozen=True)
class RunUser:
    name: str
    uid: int
    gid: int
    home: str
    #: the upload server: the user, with nginx's workers' group as its own (its socket and the
    #: files it stores are theirs to reach) and the group that reads the credentials
    upload: Identity
    #: the watcher: the user, with its own groups
    watcher: Identity


def choose(named: str | None, root_dir: str) -> pwd.struct_passwd:
    """The user the parts run as. Raises RunUserError."""
    if not named:
        try:
            st = os.lstat(root_dir)
        except FileNotFoundError:
            st = None
        if st is not None and st.st_uid != 0 and stat.S_ISDIR(st.st_mode):
            try:
                named = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                raise RunUserError(
                    f"{root_dir} belongs to uid {st.st_uid}, which has no name: give --user"
                ) from None
    if not named:
        raise RunUserError(
            "started as root, `run` would run the upload server and the watcher as root: name "
            f"the unprivileged user they run as with --user USER (or {USER_ENV}), or make it "
            "the owner of --root-dir, or start `run` as that user"
        )
    try:
        pw = pwd.getpwnam(named)
    except KeyError:
        raise RunUserError(f"--user {named}: no such user") from None
    if pw.pw_uid == 0:
        raise RunUserError(
            f"--user {named}: uid 0; the upload server and the watcher need an unprivileged user"
        )
    return pw


def identities(pw: pwd.struct_passwd, worker_group: str, extra: Iterable[int]) -> RunUser:
    own = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    worker_gid = grp.getgrnam(worker_group).gr_gid
    upload_groups = tuple(sorted({*own, *extra} - {worker_gid}))
    return RunUser(
        name=pw.pw_name,
        uid=pw.pw_uid,
        gid=pw.pw_gid,
        home=pw.pw_dir,
        upload=Identity(pw.pw_name, pw.pw_uid, worker_gid, upload_groups),
        watcher=Identity(pw.pw_name, pw.pw_uid, pw.pw_gid, own),
    )


def swappable_above(path: str) -> str | None:
    """The first directory above `path` (resolved) that someone but root could change (so
    rename what lies below it), or None."""
    current = os.path.dirname(os.path.realpath(path))
    while True:
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            st = None
        if st is not None:
            sticky = bool(st.st_mode & stat.S_ISVTX)
            if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky):
                return current
        if current == "/":
            return None
        current = os.path.dirname(current)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def root_dir_of_its_own(path: str, mode: int = 0o755) -> None:
    """`path` is a real directory of root's (made if missing, never through a link)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RunUserError(f"{path} is not a directory (a link?): started as root, `run` wants it")
    if st.st_uid != 0:
        raise RunUserError(
            f"{path} belongs to {_owner(st.st_uid)}: started as root, `run` needs it root's "
            "(remove it: `run` makes it again)"
        )


def _fix_dir(path: str, uid: int, gid: int, mode: int) -> None:
    """Owner and mode of the directory `path`, changed through a descriptor opened without
    following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def prepare(paths: Paths, user: RunUser, worker_gid: int, owned_paths: Iterable[str]) -> None:
    """Makes the tree the user's and the state directory root's (group the user's, sticky),
    with the directories root keeps (run/, nginx/) and those the user gets (upload-digests/,
    run/upload/). `owned_paths`: further files and directories root reads or writes (the
    certificate's directory, the credentials): they must sit where only root can rename.
    Raises RunUserError."""
    for path in (paths.root_dir, paths.state_dir, *owned_paths):
        above = swappable_above(path)
        if above is not None:
            raise RunUserError(
                f"{above} may be changed by others than root: started as root, `run` acts on "
                f"{path} below it; make it root's and not writable by others, or start `run` "
                f"as {user.name}"
            )
    root = paths.root_dir
    for path in (os.path.dirname(os.path.realpath(root)), os.path.realpath(paths.state_dir)):
        os.makedirs(path, mode=0o755, exist_ok=True)
    st = _lstat(root)
    if st is None:
        os.mkdir(root, 0o755)
        os.chown(root, user.uid, user.gid, follow_symlinks=False)
    elif not stat.S_ISDIR(st.st_mode):
        raise RunUserError(f"{root} is not a directory (a link?)")
    elif st.st_uid != user.uid:
        raise RunUserError(
            f"{root} belongs to {_owner(st.st_uid)}, not {user.name}, who runs the upload server "
            f"and the watcher: chown -R {user.name}: {root}, or name its owner with --user"
        )
    state = paths.state_dir
    if not stat.S_ISDIR(os.lstat(state).st_mode):
        raise RunUserError(f"{state} is not a directory (a link?)")
    leftover = _roots_leftover(state, paths)
    if leftover is not None:
        raise RunUserError(
            f"{leftover} is root's (an earlier `run` as root?): the watcher runs as {user.name} "
            f"now; give it its files (chown -R {user.name}: all in {state} but nginx/, run/, "
            "ssl/, htpasswd)"
        )
    _fix_dir(state, 0, user.gid, STATE_MODE)
    run_dir = paths.state.run_dir
    for d in (run_dir, paths.state.nginx_dir):
        root_dir_of_its_own(d)
    _fix_dir(run_dir, 0, worker_gid, 0o750)
    upload_dir = paths.state.upload_run_dir
    with contextlib.suppress(FileExistsError):
        os.mkdir(upload_dir, 0o750)
    if not stat.S_ISDIR(os.lstat(upload_dir).st_mode):
        raise RunUserError(f"{upload_dir} is not a directory (a link?)")
    _fix_dir(upload_dir, user.uid, worker_gid, UPLOAD_DIR_MODE)
    # the user's, made by root if missing: in a sticky directory of root's, the user cannot
    # swap it between the mkdir and the chown; one the user made stays as it is
    digests = paths.state.upload_digests
    try:
        os.mkdir(digests, 0o700)
        os.chown(digests, user.uid, user.gid, follow_symlinks=False)
    except FileExistsError:
        st = os.lstat(digests)
        if not stat.S_ISDIR(st.st_mode):
            raise RunUserError(f"{digests} is not a directory (a link?)") from None
        if st.st_uid == 0:
            os.chown(digests, user.uid, user.gid, follow_symlinks=False)


def _roots_leftover(state: str, paths: Paths) -> str | None:
    """An entry of the state directory that is root's but the watcher's to write (an earlier
    `run` as root made it so), or None."""
    s = paths.state
    kept = {os.path.basename(p) for p in (s.run_dir, s.nginx_dir, s.ssl_dir, s.htpasswd)}
    kept.add(os.path.basename(s.upload_digests))
    with os.scandir(state) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name not in kept and entry.stat(follow_symlinks=False).st_uid == 0:
                return entry.path
    return None


def root_file(path: str) -> None:
    """A file root reads or writes for `run` (the credentials): root's and not a link, if it
    exists. Raises RunUserError."""
    st = _lstat(path)
    if st is None:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
        what = "not a regular file (a link?)" if not stat.S_ISREG(st.st_mode) else "not root's"
        raise RunUserError(f"{path} is {what}: started as root, `run` reads it as root")


def can_read(path: str, who: Identity) -> bool:
    st = os.stat(path)
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == who.gid or st.st_gid in who.groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)
