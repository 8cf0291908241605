"""The image tree's layout: path <-> version key, file name -> role.

images/<os>/<release>/<arch>/<variant>/<serial>/<file>

Everything here is pure: no file system access.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import Enum

#: Number of directory levels between images/ and a version's files.
VERSION_DEPTH = 5

#: Architecture names the LXD and Incus clients understand (shared/osarch in both). A product
#: with any other arch is silently dropped by the clients, so we refuse it loudly instead.
KNOWN_ARCHES = frozenset(
    {
        "amd64", "x86_64",
        "arm64", "aarch64",
        "armhf", "armel", "arm", "armv6l", "armv7l", "armv8l",
        "i386", "i686", "386",
        "ppc", "powerpc", "ppc64", "ppc64el", "ppc64le",
        "s390x",
        "mips", "mips64", "mipsel", "mips64el",
        "riscv32", "riscv64",
        "loongarch64", "loong64",
    }
)  # fmt: skip

# Names an uploader chooses are matched whole (re.fullmatch: `$` would accept a trailing
# newline), ASCII only (re.ASCII, and [0-9] rather than \d, which matches any script's digits:
# a serial of full-width digits would sort as the newest).
#: YYYYMMDD_HH:MM (the seeds'), YYYYMMDD_HHMM, YYYYMMDDHHMM.
_SERIAL_RE = re.compile(
    r"(?P<y>[0-9]{4})(?P<m>[0-9]{2})(?P<d>[0-9]{2})"
    r"(?:_(?P<h1>[0-9]{2}):?(?P<n1>[0-9]{2})|(?P<h2>[0-9]{2})(?P<n2>[0-9]{2}))",
    re.ASCII,
)
_NON_DIGITS = re.compile(r"[^0-9]", re.ASCII)
#: Longest directory or file name accepted below images/ (a unified tarball's name is 71).
MAX_NAME = 128
_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+~-]{{0,{MAX_NAME - 1}}}", re.ASCII)

#: Suffixes of files still being written by some tool; never published.
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".filepart", ".swp")


class LayoutError(ValueError):
    """A path under images/ that does not fit the layout; the message says why."""


class Role(Enum):
    """What a file in a version directory is for."""

    META = "metadata tarball"
    ROOT = "root filesystem"
    UNIFIED = "unified tarball"
    OVERRIDES = "metadata.json"
    DELTA = "delta from an older version's root"


@dataclass(frozen=True, slots=True)
class FileRole:
    role: Role
    #: The simplestreams ftype (for META: the client the file was named for).
    ftype: str
    #: Lower sorts first when several files could fill the same slot.
    preference: int = 0
    #: DELTA only: the base version's serial as spelled in the name (delta_token of it).
    base: str = ""


# Metadata tarballs: one file serves both clients (listed once per ftype).
_META = {"lxd.tar.xz": 0, "incus.tar.xz": 1}
# Root filesystems: file name -> (ftype, preference among names of that ftype).
_ROOTS = {
    "rootfs.squashfs": ("squashfs", 0),
    "root.squashfs": ("squashfs", 1),
    "root.tar.xz": ("root.tar.xz", 0),
    "rootfs.tar.xz": ("root.tar.xz", 1),
    "disk.qcow2": ("disk-kvm.img", 0),
    "disk-kvm.img": ("disk-kvm.img", 1),
    "rootfs.img": ("disk-kvm.img", 2),
}
OVERRIDES_NAME = "metadata.json"

#: Item key prefix and combined-fingerprint fields on the metadata item, per root ftype.
COMBINED_FIELDS: dict[str, tuple[str, ...]] = {
    "squashfs": ("combined_squashfs_sha256",),
    "root.tar.xz": ("combined_rootxz_sha256", "combined_sha256"),
    "disk-kvm.img": ("combined_disk-kvm-img_sha256",),
}
VM_FTYPES = frozenset({"disk-kvm.img"})

#: Deltas (VCDIFF, made by xdelta3) of a root from an older version's root of the same kind:
#: file name prefix -> (the root's ftype, the delta item's ftype). The name says the base:
#: rootfs.<base serial without ':'>.vcdiff, e.g. rootfs.20240101_1200.vcdiff (':' is not a
#: file name character here).
DELTA_PREFIXES: dict[str, tuple[str, str]] = {
    "rootfs": ("squashfs", "squashfs.vcdiff"),
    "disk": ("disk-kvm.img", "disk-kvm.img.vcdiff"),
}
DELTA_PREFIX_OF = {root: prefix for prefix, (root, _) in DELTA_PREFIXES.items()}
_DELTA_RE = re.compile(r"(?P<prefix>rootfs|disk)\.(?P<base>[0-9_]{12,13})\.vcdiff", re.ASCII)


@dataclass(frozen=True, order=True, slots=True)
class VersionKey:
    """Where one image version lives: images/<os>/<release>/<arch>/<variant>/<serial>/."""

    os: str
    release: str
    arch: str
    variant: str
    serial: str

    @property
    def product(self) -> str:
        return f"{self.os}:{self.release}:{self.arch}:{self.variant}"

    @property
    def relpath(self) -> str:
        """Path of the version directory relative to images/."""
        return "/".join((self.os, self.release, self.arch, self.variant, self.serial))


def is_ignored_name(name: str) -> bool:
    """Hidden names and temporary suffixes are never published (uploads in progress)."""
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES) or name.startswith("~")


def valid_serial(serial: str) -> bool:
    m = _SERIAL_RE.fullmatch(serial)
    if not m:
        return False
    month, day = int(m["m"]), int(m["d"])
    hour = int(m["h1"] or m["h2"])
    minute = int(m["n1"] or m["n2"])
    return 1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59


def serial_sort_key(serial: str) -> tuple[str, str]:
    """Orders serials of any accepted spelling by the time they name (the digits, then the
    spelling): the one order of versions everywhere (catalog, page, listing, retention)."""
    return (_NON_DIGITS.sub("", serial), serial)


def serial_time(serial: str) -> dt.datetime | None:
    """The build time a serial names (YYYYMMDD, then optionally HHMM), or None."""
    digits = _NON_DIGITS.sub("", serial)
    for length, fmt in ((12, "%Y%m%d%H%M"), (8, "%Y%m%d")):
        if len(digits) >= length:
            try:
                return _digits_time(digits[:length], fmt)
            except ValueError:
                continue
    return None


def _digits_time(digits: str, fmt: str) -> dt.datetime:
    """datetime.strptime(digits, fmt), `fmt` being %Y%m%d or %Y%m%d%H%M: read at fixed widths
    when each field's two digits are in its range (strptime reads those the same way), which
    is what every serial scanned has and 20 times faster than strptime (the scan checks each
    version's); by strptime otherwise (it may read a field of one digit). ValueError as
    strptime's (a day the month lacks: the datetime refuses it)."""
    month, day = int(digits[4:6]), int(digits[6:8])
    if 1 <= month <= 12 and 1 <= day <= 31:
        if len(digits) == 8:
            return dt.datetime(int(digits[:4]), month, day)
        hour, minute = int(digits[8:10]), int(digits[10:12])
        if len(digits) == 12 and hour <= 23 and minute <= 59:
            return dt.datetime(int(digits[:4]), month, day, hour, minute)
    return dt.datetime.strptime(digits, fmt)


#: How far ahead of the server's clock a serial may name its build time (clocks a little off,
#: a build machine's time zone). Further ahead, it is refused at upload and import and skipped
#: by the scanner: a serial of 99991231_2359 would otherwise be the newest version for good
#: (its alias pinned, every real version beyond [retention]'s count).
MAX_SERIAL_AHEAD = dt.timedelta(days=1)


def serial_ahead(serial: str, now: float) -> bool:
    """Whether `serial` names a time more than MAX_SERIAL_AHEAD after `now` (seconds since the
    epoch; serials are UTC)."""
    when = serial_time(serial)
    if when is None:
        return False
    clock = dt.datetime.fromtimestamp(now, dt.UTC).replace(tzinfo=None)
    return when - clock > MAX_SERIAL_AHEAD


def check_serial_not_ahead(serial: str, now: float) -> None:
    """LayoutError if `serial` is more than MAX_SERIAL_AHEAD ahead of `now`."""
    if serial_ahead(serial, now):
        clock = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise LayoutError(
            f"serial {serial!r} is more than a day ahead of this server's clock ({clock})"
        )


def delta_token(serial: str) -> str:
    """How a delta's file name spells its base serial: without ':' (20240101_12:00 ->
    20240101_1200)."""
    return serial.replace(":", "")


def delta_name(root_ftype: str, base_serial: str) -> str:
    """The file name of the delta of a `root_ftype` root from version `base_serial`."""
    return f"{DELTA_PREFIX_OF[root_ftype]}.{delta_token(base_serial)}.vcdiff"


def valid_name(value: str) -> bool:
    """An ASCII name of at most MAX_NAME letters, digits and . _ + ~ -, starting with a letter
    or digit: no control characters, no look-alikes from other scripts."""
    return _NAME_RE.fullmatch(value) is not None


def check_component(value: str, what: str) -> None:
    if not valid_name(value):
        shown = value if len(value) <= 2 * MAX_NAME else value[: 2 * MAX_NAME] + "..."
        raise LayoutError(
            f"{what} {shown!r} is not a valid name "
            f"(at most {MAX_NAME} ASCII letters, digits, . _ + ~ -)"
        )


def parse_version_dir(parts: tuple[str, ...] | list[str]) -> VersionKey:
    """Path components below images/ of a version directory -> its key, or LayoutError."""
    if len(parts) != VERSION_DEPTH:
        raise LayoutError(
            f"expected os/release/arch/variant/serial ({VERSION_DEPTH} levels), got {len(parts)}"
        )
    os_, release, arch, variant, serial = parts
    for value, what in ((os_, "os"), (release, "release"), (variant, "variant")):
        check_component(value, what)
    if arch not in KNOWN_ARCHES:
        raise LayoutError(f"unknown architecture {arch!r} (LXD and Incus would skip it)")
    check_serial(serial)
    return VersionKey(os_, release, arch, variant, serial)


def check_serial(serial: str) -> None:
    """LayoutError unless `serial` is a valid serial (what parse_version_dir says of it)."""
    if not valid_serial(serial):
        raise LayoutError(
            f"bad serial {serial!r}: expected YYYYMMDD_HH:MM, YYYYMMDD_HHMM or YYYYMMDDHHMM"
        )


def parse_file_path(relpath: str) -> tuple[VersionKey, str]:
    """'os/release/arch/variant/serial/file' -> (key, file name), or LayoutError.

    Used by the upload paths: refuses anything that could leave the tree.
    """
    if "\x00" in relpath:
        raise LayoutError("path contains a NUL byte")
    if relpath.startswith("/"):
        raise LayoutError("path must be relative to images/")
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise LayoutError("path has an empty, '.' or '..' component")
    if any(p.startswith(".") for p in parts):
        raise LayoutError("path has a hidden component")
    if len(parts) != VERSION_DEPTH + 1:
        raise LayoutError("expected os/release/arch/variant/serial/file")
    key = parse_version_dir(parts[:-1])
    name = parts[-1]
    if is_ignored_name(name) or "/" in name:
        raise LayoutError(f"file name {name!r} is reserved for temporary files")
    check_component(name, "file name")
    return key, name


#: the role of each fixed name (one object each, shared by every file of that name)
_ROLES: dict[str, FileRole] = {
    **{name: FileRole(Role.META, name, pref) for name, pref in _META.items()},
    **{name: FileRole(Role.ROOT, ftype, pref) for name, (ftype, pref) in _ROOTS.items()},
    OVERRIDES_NAME: FileRole(Role.OVERRIDES, ""),
}
_UNIFIED = FileRole(Role.UNIFIED, "combined")


#: each fixed name, as one string (`fixed_name`)
_FIXED_NAMES = {name: name for name in _ROLES}


def fixed_name(name: str) -> str:
    """`name` as the layout's own string when it is a fixed name (lxd.tar.xz, rootfs.squashfs,
    ...): one object for that file of every version, rather than one per file scanned."""
    return _FIXED_NAMES.get(name, name)


def classify(name: str) -> FileRole | None:
    """File name -> its role in a version, or None for files we do not publish."""
    role = _ROLES.get(name)
    if role is not None:
        return role  # fixed names are valid names, never ignored ones
    if is_ignored_name(name) or not valid_name(name):
        return None
    if name.endswith(".tar.gz"):
        return _UNIFIED
    m = _DELTA_RE.fullmatch(name)
    if m and valid_serial(m["base"]):
        return FileRole(Role.DELTA, DELTA_PREFIXES[m["prefix"]][1], base=m["base"])
    return None
