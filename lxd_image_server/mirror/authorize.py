"""The receiving side: `mirror authorize`, run as root on a mirror.

It makes a push user whose key may only run rrsync, write-only, in the served tree: the user,
its ~/.ssh (root-owned, never through a link), authorized_keys with the forced command, and the
push user's directories in the tree. See docs/mirrors.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from lxd_image_server.config import DEFAULT_MIRROR_USER
from lxd_image_server.fsutil import can_traverse, open_dir

log = logging.getLogger(__name__)

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: The account comment of the push users `authorize` creates. An existing user is taken only
#: with it, or with the home an earlier `authorize` already made root's: any other account's
#: home and ~/.ssh would be taken from it (root's, 0755: readable by everyone).
PUSH_USER_COMMENT = "lxd-image-server mirror push"


class AuthorizeError(Exception):
    """The mirror cannot be prepared; the message says why."""


@dataclass(frozen=True)
class PublicKey:
    kind: str
    blob: str
    comment: str = ""

    def line(self, options: str) -> str:
        return " ".join(p for p in (options, self.kind, self.blob, self.comment) if p)


def parse_public_keys(text: str) -> list[PublicKey]:
    """The keys of a .pub file (one per line; no options: this command sets them)."""
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if parts[0] not in KEY_TYPES:
            raise AuthorizeError(
                f"line {number}: expected a public key (ssh-ed25519 AAAA... comment), "
                f"not {line[:40]!r}"
            )
        if len(parts) < 2:
            raise AuthorizeError(f"line {number}: the key itself is missing")
        try:
            decoded = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raise AuthorizeError(f"line {number}: the key is not base64") from None
        length = int.from_bytes(decoded[:4], "big")
        if decoded[4 : 4 + length] != parts[0].encode():
            raise AuthorizeError(f"line {number}: the key does not match its type {parts[0]}")
        keys.append(PublicKey(parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    if not keys:
        raise AuthorizeError("no public key found")
    return keys


def key_options(rrsync: str, root: str, absolute: bool) -> str:
    """The authorized_keys options: no pty, forwarding or rc (`restrict`), and rrsync in the
    tree, write-only (no reads at all), symlinks munged (a push cannot plant a live one)."""
    flags = "-wo -munge -absolute" if absolute else "-wo -munge"
    command = f"{shlex.quote(rrsync)} {flags} {shlex.quote(root)}"
    escaped = command.replace("\\", "\\\\").replace('"', '\\"')
    return f'restrict,command="{escaped}"'


def _key_of(line: str) -> tuple[str, str] | None:
    """(type, base64) of an authorized_keys line, whatever its options."""
    try:
        parts = shlex.split(line, comments=False, posix=True)
    except ValueError:
        parts = line.split()
    for i, part in enumerate(parts[:-1]):
        if part in KEY_TYPES:
            return part, parts[i + 1]
    return None


def merge_authorized_keys(existing: str, keys: Sequence[PublicKey], options: str) -> str:
    """`existing` with each key present once, with `options` (replacing older options)."""
    wanted = {(k.kind, k.blob): k.line(options) for k in keys}
    out: list[str] = []
    placed: set[tuple[str, str]] = set()
    for line in existing.splitlines():
        key = _key_of(line) if line.strip() and not line.lstrip().startswith("#") else None
        if key in wanted:
            if key not in placed:
                out.append(wanted[key])
                placed.add(key)
            continue
        out.append(line)
    out += [line for key, line in wanted.items() if key not in placed]
    return "\n".join(out) + "\n" if out else ""


def rrsync_path() -> str:
    found = shutil.which("rrsync") or (
        "/usr/bin/rrsync" if os.path.exists("/usr/bin/rrsync") else None
    )
    if found is None:
        raise AuthorizeError(
            "rrsync is missing: apt install rsync (Debian ships it as /usr/bin/rrsync)"
        )
    return found


def rrsync_has_absolute(rrsync: str) -> bool:
    """rsync >= 3.5's rrsync accepts the tree's absolute path with -absolute."""
    try:
        out = subprocess.run(
            [rrsync, "-help"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return "-absolute" in out.stdout + out.stderr


@dataclass
class AuthorizeReport:
    changes: list[str] = field(default_factory=list)
    user: str = DEFAULT_MIRROR_USER
    #: the `path` the master must use for this mirror
    path: str = ""


def _ensure_user(name: str, report: AuthorizeReport) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        # --system: no aging; a home for ~/.ssh; '*': no password, yet not "locked" (sshd
        # refuses locked accounts without PAM); a real shell: sshd runs the forced command
        # through it (nologin would refuse)
        cmd = [
            "useradd",
            "--system",
            "--create-home",
            "--home-dir",
            f"/home/{name}",
            "--shell",
            "/bin/sh",
            "--user-group",
            "--password",
            "*",
            "--comment",
            PUSH_USER_COMMENT,
            name,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise AuthorizeError(f"useradd {name} failed: {proc.stderr.strip()}") from None
        report.changes.append(f"created the system user {name} (home /home/{name})")
        pw = pwd.getpwnam(name)
    if os.path.basename(pw.pw_shell) in ("nologin", "false"):
        raise AuthorizeError(
            f"{name}'s shell is {pw.pw_shell}: sshd runs rrsync through the login shell; "
            f"give it one (chsh -s /bin/sh {name}) or pick another --user"
        )
    return pw


def _locked_before(pw: pwd.struct_passwd) -> bool:
    """Whether an earlier `authorize` made this user's home (/home/NAME) and ~/.ssh root's."""
    if pw.pw_dir != f"/home/{pw.pw_name}":
        return False
    try:
        home = os.lstat(pw.pw_dir)
        ssh = os.lstat(os.path.join(pw.pw_dir, ".ssh"))
    except OSError:
        return False
    return all(
        stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755
        for st in (home, ssh)
    )


def check_existing_user(name: str) -> None:
    """AuthorizeError unless `name` is missing (it will be created) or a push user made by
    `authorize`: never root, a system account or anybody's login, whose home and ~/.ssh it
    would give to root, readable by all."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return
    if pw.pw_uid == 0:
        raise AuthorizeError(
            f"--user {name}: uid 0; the push user must be an account of its own (a missing "
            f"one, such as the default {DEFAULT_MIRROR_USER}, is created)"
        )
    if pw.pw_gecos.split(",")[0] == PUSH_USER_COMMENT or _locked_before(pw):
        return
    raise AuthorizeError(
        f"--user {name}: an existing account that `mirror authorize` did not make; its home "
        f"{pw.pw_dir} and ~/.ssh would become root's and readable by all: name a new user "
        "(it is created)"
    )


def _root_owns(fd: int, mode: int) -> bool:
    """Makes the open file root's, with `mode`; True if that changed anything."""
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode):
        return False
    os.fchown(fd, 0, 0)
    os.fchmod(fd, mode)
    return True


def _lock_ssh_dir(pw: pwd.struct_passwd) -> bool:
    """The push user's home, ~/.ssh and authorized_keys become root's (0755, 0755, 0644, as
    sshd's StrictModes accepts): whatever the push user may run, it cannot change its key's
    restrictions. Links there are refused, never followed. True if anything changed."""
    try:
        home_fd = os.open(pw.pw_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise AuthorizeError(f"{pw.pw_name}'s home {pw.pw_dir} is not a directory") from None
    try:
        changed = _root_owns(home_fd, 0o755)
        try:
            ssh_fd = open_dir(".ssh", dir_fd=home_fd)
        except FileNotFoundError:
            os.mkdir(".ssh", 0o755, dir_fd=home_fd)
            ssh_fd = open_dir(".ssh", dir_fd=home_fd)
        except NotADirectoryError:
            raise AuthorizeError(
                f"{pw.pw_dir}/.ssh is a symlink or not a directory; refusing to write through it"
            ) from None
    finally:
        os.close(home_fd)
    try:
        changed = _root_owns(ssh_fd, 0o755) or changed
        try:
            keys_fd = os.open(
                "authorized_keys", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ssh_fd
            )
        except FileNotFoundError:
            return changed
        except OSError as e:
            raise AuthorizeError(f"cannot open {pw.pw_dir}/.ssh/authorized_keys: {e}") from e
        try:
            return _root_owns(keys_fd, 0o644) or changed
        finally:
            os.close(keys_fd)
    finally:
        os.close(ssh_fd)


def _install_keys(pw: pwd.struct_passwd, keys: Sequence[PublicKey], options: str) -> bool:
    """Merges `keys` with `options` into the push user's authorized_keys (root's, 0644, see
    _lock_ssh_dir, which must have run). True if the file changed."""
    ssh_dir = os.path.join(pw.pw_dir, ".ssh")
    path = os.path.join(ssh_dir, "authorized_keys")
    existing = ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise AuthorizeError(f"cannot read {path}: {e.strerror}") from e
    else:
        with os.fdopen(fd, encoding="utf-8", errors="surrogateescape") as f:
            existing = f.read()
    merged = merge_authorized_keys(existing, keys, options)
    if merged == existing:
        return False
    fd, tmp = tempfile.mkstemp(prefix=".authorized_keys.", dir=ssh_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(merged)
            f.flush()
            _root_owns(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a symlink at `path` is replaced, never followed
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _own_tree(top: str, uid: int, gid: int) -> int:
    """Makes everything below `top` the push user's, through directory descriptors opened
    without following links (os.fwalk): a link, or a directory swapped for one meanwhile, is
    never followed out of the tree. Returns the number of entries changed."""
    changed = 0
    for _, dirnames, filenames, dir_fd in os.fwalk(top, follow_symlinks=False):
        for name in [*dirnames, *filenames]:
            try:
                st = os.lstat(name, dir_fd=dir_fd)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                    changed += 1
            except FileNotFoundError:
                continue  # gone meanwhile
    return changed


def _home_inside(real_root: str, user: str) -> str | None:
    """The push user's home (existing, or the one useradd will make) if `real_root` holds it:
    rrsync there could replace ~/.ssh/authorized_keys and lift the key's restrictions."""
    try:
        home = pwd.getpwnam(user).pw_dir
    except KeyError:
        home = f"/home/{user}"
    real_home = os.path.realpath(home)
    if real_home == real_root or real_home.startswith(real_root.rstrip("/") + "/"):
        return home
    return None


def _push_dir(root_fd: int, rel: str, pw: pwd.struct_passwd, shown: str) -> str | None:
    """Makes `rel` (below the tree) a real directory of the push user's, mode 0755, through
    descriptors (a link there is refused, never followed). Returns what changed, if anything."""
    parent, name = os.path.split(rel)
    parent_fd = open_dir(parent, dir_fd=root_fd) if parent else os.dup(root_fd)
    try:
        made = None
        try:
            fd = open_dir(name, dir_fd=parent_fd)
        except FileNotFoundError:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            fd = open_dir(name, dir_fd=parent_fd)
            made = f"created {shown}, owned by {pw.pw_name}"
    except NotADirectoryError:
        raise AuthorizeError(
            f"{shown} is a symlink or not a directory; the push writes into a real directory"
        ) from None
    finally:
        os.close(parent_fd)
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid) or stat.S_IMODE(st.st_mode) != 0o755:
            os.fchown(fd, pw.pw_uid, pw.pw_gid)
            os.fchmod(fd, 0o755)
            made = made or f"{shown}: owned by {pw.pw_name}, mode 0755"
    finally:
        os.close(fd)
    return made


def authorize(key_text: str, user: str, root: str) -> AuthorizeReport:
    """Prepares this machine (as root) to receive pushes for `root` from the holder of the
    keys in `key_text`. Idempotent."""
    if not _USER_NAME.fullmatch(user):
        raise AuthorizeError(f"{user!r} is not a valid user name")
    keys = parse_public_keys(key_text)
    if os.geteuid() != 0:
        raise AuthorizeError("run it as root (it creates a user and changes owners)")
    rrsync = rrsync_path()
    report = AuthorizeReport(user=user)
    real_root = os.path.realpath(root)
    home = _home_inside(real_root, user)
    if home is not None:
        raise AuthorizeError(
            f"{real_root} holds {user}'s home {home}: a push there could replace "
            "~/.ssh/authorized_keys and lift the key's restrictions; choose another --root "
            "or --user"
        )
    check_existing_user(user)
    if not os.path.isdir(root):
        os.makedirs(root, mode=0o755)
        report.changes.append(f"created {root}")
    pw = _ensure_user(user, report)
    gids = {pw.pw_gid, *os.getgrouplist(user, pw.pw_gid)}
    if not can_traverse(real_root, pw.pw_uid, gids):
        raise AuthorizeError(
            f"{user} cannot reach {real_root}: make it and its parents traversable "
            "(chmod o+x), then run this again"
        )
    root_fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for rel in ("images", "streams", "streams/v1"):
            change = _push_dir(root_fd, rel, pw, os.path.join(real_root, rel))
            if change:
                report.changes.append(change)
    finally:
        os.close(root_fd)
    for rel in ("images", "streams"):
        n = _own_tree(os.path.join(real_root, rel), pw.pw_uid, pw.pw_gid)
        if n:
            report.changes.append(f"{real_root}/{rel}: {n} entries given to {user}")
    absolute = rrsync_has_absolute(rrsync)
    report.path = real_root if absolute else "/"
    if _lock_ssh_dir(pw):
        report.changes.append(
            f"{pw.pw_dir}, its .ssh/ and authorized_keys: root's, so {user} cannot change "
            "its key's restrictions"
        )
    if _install_keys(pw, keys, key_options(rrsync, real_root, absolute)):
        report.changes.append(
            f"{pw.pw_dir}/.ssh/authorized_keys: {len(keys)} key(s) limited to "
            f"`rrsync -wo` in {real_root}"
        )
    return report
