"""`import`: place what `lxc image export` produced into the image tree, atomically.

`lxc image export` (LXD 5.0) writes either
- one unified tarball `<fingerprint>.tar.gz` (metadata.yaml, templates/ and rootfs/ inside:
  what `lxc publish` makes), or
- a split image: `meta-<fingerprint>.tar.xz` (metadata.yaml, templates/) plus the root as
  `<fingerprint>.squashfs`, `<fingerprint>.tar.xz` (a root tarball) or `<fingerprint>.qcow2`
  (a VM's disk).

Files are told apart by their content, not their names. Whatever the naming options leave open
is read from metadata.yaml, streamed out of the (metadata or unified) tarball: nothing is ever
extracted to disk. The files are copied (or moved) into a hidden temporary directory inside the
variant directory, fsynced, and the whole version directory is renamed into place, so the
watcher never sees half of an image. Copying also hashes: the fingerprint in lxc's file names is
checked, and the digests go into the hash cache so publishing does not read the files again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml

from .fsutil import CHUNK_SIZE, NotRegularFile, open_dir, open_regular
from .hashing import HashCache, Hasher
from .layout import (
    KNOWN_ARCHES,
    LayoutError,
    Role,
    VersionKey,
    check_component,
    classify,
    valid_serial,
)
from .progress import Progress, no_progress
from .scan import Scanner

log = logging.getLogger(__name__)

DIR_MODE = 0o755
FILE_MODE = 0o644
#: metadata.yaml is a few hundred bytes (a few KB with many templates): bigger is not one
MAX_METADATA_YAML = 256 << 10
#: LXD's metadata.yaml nests three levels (templates -> path -> properties)
MAX_YAML_DEPTH = 16
#: Members read before a tarball must have told what it is: a metadata tarball has a handful,
#: a unified one may list its rootfs/ before metadata.yaml (a root filesystem has tens of
#: thousands of entries). Bounds the time and the member list tarfile keeps.
MAX_MEMBERS = 200_000

#: Kernel architecture names (metadata.yaml) -> the tree's (Debian) names.
ARCH_NAMES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "armhf",
    "armv8l": "armhf",
    "armv6l": "armel",
    "i686": "i386",
    "i586": "i386",
    "386": "i386",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loong64": "loongarch64",
}

META_NAME = "lxd.tar.xz"
ROOT_NAMES = {"squashfs": "rootfs.squashfs", "tarball": "root.tar.xz", "qcow2": "disk.qcow2"}

_FP = r"([0-9a-f]{64})"
_META_EXPORT_RE = re.compile(rf"meta-{_FP}\.[a-z0-9.]+", re.ASCII)
_ROOT_EXPORT_RE = re.compile(rf"{_FP}\.(?:squashfs|tar\.xz|qcow2|img)", re.ASCII)
_UNIFIED_EXPORT_RE = re.compile(rf"{_FP}\.tar\.gz", re.ASCII)


class ImportFailed(Exception):
    """The files cannot be imported; the message says why. Nothing was changed."""


class NamingError(ImportFailed):
    """A naming option (--os, --arch, ...) is unusable: a usage error."""


class VersionExists(ImportFailed):
    """The version directory exists and --force was not given."""


# -- what the files are -------------------------------------------------------------------------


@dataclass(frozen=True)
class Naming:
    """Naming options from the command line; None: read from metadata.yaml."""

    os: str | None = None
    release: str | None = None
    arch: str | None = None
    variant: str | None = None
    serial: str | None = None


@dataclass(frozen=True)
class Source:
    path: str
    role: Role
    #: name in the version directory; None for a unified tarball (<sha256>.tar.gz)
    target: str | None
    #: root filesystems: squashfs, tarball or qcow2
    kind: str = ""


@dataclass(frozen=True)
class ImagePlan:
    key: VersionKey
    #: metadata tarball first
    sources: tuple[Source, ...]
    metadata: dict[str, Any]
    #: the fingerprint lxc wrote into the file names, if it did
    export_fingerprint: str | None = None

    @property
    def unified(self) -> bool:
        return len(self.sources) == 1


@dataclass(frozen=True)
class TarballInfo:
    metadata: dict[str, Any] | None
    has_rootfs: bool
    #: members that belong neither to a metadata nor a unified tarball: a root tarball
    foreign: bool
    compression: str


def sniff(path: str) -> str:
    """'squashfs', 'qcow2', 'xz', 'gzip', 'bzip2', 'tar', 'zstd' or 'unknown'."""
    try:
        fd = _open_source(path)
        try:
            head = os.pread(fd, 512, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise ImportFailed(f"cannot read {path}: {e.strerror or e}") from e
    if head.startswith(b"hsqs"):
        return "squashfs"
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head[257:262] == b"ustar":
        return "tar"
    return "unknown"


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def inspect_tarball(path: str, compression: str) -> TarballInfo:
    """Streams through the tarball until it knows what it is; reads metadata.yaml if present.

    Nothing is extracted: only a regular-file member named metadata.yaml is read, into memory
    and at most MAX_METADATA_YAML bytes. Links, devices and odd paths are never followed.
    """
    metadata: dict[str, Any] | None = None
    has_rootfs = foreign = False
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for count, member in enumerate(tf, 1):
                if count > MAX_MEMBERS:
                    raise ImportFailed(
                        f"{path}: more than {MAX_MEMBERS} entries without telling what it is"
                    )
                name = _member_name(member.name)
                if name in ("", "."):
                    continue
                if name == "metadata.yaml":
                    if not member.isfile():
                        raise ImportFailed(f"{path}: metadata.yaml is not a regular file")
                    if member.size > MAX_METADATA_YAML:
                        raise ImportFailed(f"{path}: metadata.yaml is implausibly large")
                    stream = tf.extractfile(member)
                    if stream is None:
                        raise ImportFailed(f"{path}: cannot read metadata.yaml")
                    try:
                        metadata = parse_yaml(stream.read(MAX_METADATA_YAML + 1))
                    except ImportFailed as e:
                        raise ImportFailed(f"{path}: {e}") from None
                elif name == "rootfs" or name.startswith("rootfs/"):
                    has_rootfs = True
                elif name == "templates" or name.startswith("templates/"):
                    pass
                else:
                    foreign = True
                if foreign and metadata is None:
                    break  # a root file system tarball: its first entry tells
                if metadata is not None and has_rootfs:
                    break  # a unified tarball: no need to read the root file system
    except ImportFailed:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ImportFailed(f"cannot read {path} as a tarball: {e}") from e
    except Exception as e:  # lzma.LZMAError, zlib.error: corrupt compressed data
        raise ImportFailed(f"cannot read {path} as a tarball: {e}") from e
    return TarballInfo(metadata, has_rootfs, foreign, compression)


def plan_import(files: Sequence[str], naming: Naming = Naming()) -> ImagePlan:
    """What the files are and where they go. Raises ImportFailed / NamingError."""
    if not 1 <= len(files) <= 2:
        raise NamingError("give one unified tarball, or a metadata tarball and a root filesystem")
    if len(files) == 2 and os.path.realpath(files[0]) == os.path.realpath(files[1]):
        raise NamingError(f"{files[0]} was given twice")
    found: list[tuple[str, str, TarballInfo | None]] = []
    for path in files:
        kind = sniff(path)
        info = None
        if kind in ("xz", "gzip", "bzip2", "tar"):
            info = inspect_tarball(path, kind)
        elif kind == "zstd":
            raise ImportFailed(f"{path}: zstd-compressed; recompress it with xz (or gzip)")
        elif kind == "unknown":
            raise ImportFailed(
                f"{path}: not an image file (expected a tarball, a squashfs or a qcow2 disk)"
            )
        found.append((path, kind, info))

    if len(found) == 1:
        path, kind, info = found[0]
        if info is None:
            raise ImportFailed(f"{path} is a root filesystem; give its metadata tarball too")
        if info.metadata is None:
            raise ImportFailed(f"{path} has no metadata.yaml: not an image tarball")
        if not info.has_rootfs:
            raise ImportFailed(
                f"{path} is a metadata tarball (no rootfs/ inside); give the root filesystem too"
            )
        if kind != "gzip":
            raise ImportFailed(
                f"{path} is a {kind}-compressed unified tarball; the catalog serves unified "
                "images as <fingerprint>.tar.gz: recompress it with gzip"
            )
        m = _UNIFIED_EXPORT_RE.fullmatch(os.path.basename(path))
        return ImagePlan(
            key=_version_key(naming, info.metadata, path),
            sources=(Source(path, Role.UNIFIED, None),),
            metadata=info.metadata,
            export_fingerprint=m.group(1) if m else None,
        )

    metas: list[tuple[str, TarballInfo]] = []
    roots: list[Source] = []
    for path, kind, info in found:
        if info is None:
            roots.append(Source(path, Role.ROOT, ROOT_NAMES[kind], kind))
        elif info.has_rootfs:
            raise ImportFailed(f"{path} is a unified tarball (it holds rootfs/): import it alone")
        elif info.metadata is not None and not info.foreign:
            metas.append((path, info))
        elif info.foreign and info.metadata is None:
            if kind != "xz":
                raise ImportFailed(
                    f"{path} is a {kind}-compressed root tarball; the catalog serves root "
                    "tarballs as root.tar.xz: recompress it with xz"
                )
            roots.append(Source(path, Role.ROOT, ROOT_NAMES["tarball"], "tarball"))
        else:
            raise ImportFailed(f"{path}: neither a metadata tarball nor a root filesystem")
    if len(metas) != 1 or len(roots) != 1:
        what = "metadata tarballs" if len(metas) != 1 else "root filesystems"
        raise ImportFailed(f"{files[0]} and {files[1]} are both {what}")
    meta_path, meta_info = metas[0]
    assert meta_info.metadata is not None
    root = roots[0]
    fingerprint = _split_export_fingerprint(meta_path, root.path)
    return ImagePlan(
        key=_version_key(naming, meta_info.metadata, meta_path),
        sources=(Source(meta_path, Role.META, META_NAME), root),
        metadata=meta_info.metadata,
        export_fingerprint=fingerprint,
    )


def _split_export_fingerprint(meta: str, root: str) -> str | None:
    mm = _META_EXPORT_RE.fullmatch(os.path.basename(meta))
    mr = _ROOT_EXPORT_RE.fullmatch(os.path.basename(root))
    if mm and mr and mm.group(1) != mr.group(1):
        raise ImportFailed(
            f"{meta} and {root} come from different exports (their names carry different "
            "fingerprints)"
        )
    m = mm or mr
    return m.group(1) if m else None


# -- naming ----------------------------------------------------------------------------------


def tree_arch(arch: str) -> str:
    """An architecture name (kernel's or Debian's) -> the tree's name. Raises NamingError."""
    name = ARCH_NAMES.get(arch, arch)
    if name not in KNOWN_ARCHES:
        raise NamingError(f"unknown architecture {arch!r} (LXD and Incus would skip it)")
    return name


def serial_from_timestamp(value: Any) -> str:
    """metadata.yaml's creation_date (seconds since the epoch) -> YYYYMMDD_HH:MM in UTC."""
    try:
        seconds = int(str(value).strip())
        when = dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise NamingError(f"creation_date {value!r} in metadata.yaml is not a timestamp") from None
    return when.strftime("%Y%m%d_%H:%M")


def _version_key(naming: Naming, metadata: dict[str, Any], where: str) -> VersionKey:
    props = metadata.get("properties")
    props = props if isinstance(props, dict) else {}

    def pick(given: str | None, found: Any, what: str, option: str) -> str:
        if given is not None:
            return given
        if found is None or found == "" or isinstance(found, dict):
            raise NamingError(f"metadata.yaml in {where} has no {what}: give {option}")
        return str(found)

    os_name = pick(naming.os, props.get("os"), "properties.os", "--os")
    release = pick(naming.release, props.get("release"), "properties.release", "--release")
    variant = naming.variant if naming.variant is not None else str(props.get("variant") or "")
    variant = variant or "default"
    arch_raw = pick(naming.arch, metadata.get("architecture"), "architecture", "--arch")
    if naming.serial is not None:
        serial = naming.serial
    else:
        created = metadata.get("creation_date")
        if created is None:
            raise NamingError(f"metadata.yaml in {where} has no creation_date: give --serial")
        serial = serial_from_timestamp(created)
    try:
        check_component(os_name, "os")
        check_component(release, "release")
        check_component(variant, "variant")
    except LayoutError as e:
        raise NamingError(str(e)) from None
    if not valid_serial(serial):
        raise NamingError(
            f"bad serial {serial!r}: expected YYYYMMDD_HH:MM, YYYYMMDD_HHMM or YYYYMMDDHHMM"
        )
    return VersionKey(os_name, release, tree_arch(arch_raw), variant, serial)


# -- metadata.yaml ------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (the pure-Python one: a recursive parser in C could exhaust the
    stack), with every scalar left a string but null: a release `3.10` is not the float 3.1,
    a creation_date is read with int() anyway."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag == "tag:yaml.org,2002:null"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def parse_yaml(data: str | bytes) -> dict[str, Any]:
    """A metadata.yaml -> its mapping, or ImportFailed saying why in one line.

    Bounded before anything is built: at most MAX_METADATA_YAML bytes, nesting at most
    MAX_YAML_DEPTH levels, no anchors or aliases (LXD never writes them; they are how a few
    bytes expand into a huge document). Scalars stay strings (null is None).
    """
    if len(data) > MAX_METADATA_YAML:
        raise ImportFailed(f"metadata.yaml is larger than {MAX_METADATA_YAML} bytes")
    try:
        depth = 0
        for event in yaml.parse(data, Loader=_Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ImportFailed(f"metadata.yaml nests deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.AliasEvent) or (
                isinstance(event, yaml.NodeEvent) and event.anchor is not None
            ):
                raise ImportFailed("metadata.yaml uses anchors or aliases")
        doc = yaml.load(data, Loader=_Loader)
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())
        raise ImportFailed(f"metadata.yaml is not valid YAML: {reason[:200]}") from None
    except (RecursionError, ValueError, UnicodeDecodeError) as e:
        raise ImportFailed(f"metadata.yaml cannot be read: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise ImportFailed("metadata.yaml is not a mapping of keys to values")
    return doc


# -- placing the files -------------------------------------------------------------------------


@dataclass
class Placed:
    key: VersionKey
    version_dir: str
    #: name in the version directory -> (size, sha256)
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: the image's fingerprint as clients see it (combined for split images)
    fingerprint: str = ""
    replaced: bool = False
    moved: list[str] = field(default_factory=list)


def _makedirs(base_fd: int, base: str, parts: Sequence[str]) -> int:
    """mkdir -p below the directory `base_fd` (at `base`), each new directory 0755 whatever
    the umask, fsynced; every component is opened without following a link. -> the last
    directory's descriptor (the caller closes it)."""
    fd = os.dup(base_fd)
    path = base
    try:
        for component in parts:
            path = os.path.join(path, component)
            created = True
            try:
                os.mkdir(component, DIR_MODE, dir_fd=fd)
            except FileExistsError:
                created = False
            sub = _open_dir(component, fd, path)
            if created:
                os.fchmod(sub, DIR_MODE)
                os.fsync(fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir(name: str, dir_fd: int, path: str) -> int:
    try:
        return open_dir(name, dir_fd=dir_fd)
    except NotADirectoryError:
        raise ImportFailed(
            f"{path} exists and is not a directory (or is a symbolic link, never followed)"
        ) from None


def _open_source(path: str) -> int:
    """A file the operator named (links followed), if it is a regular file."""
    try:
        return open_regular(os.path.realpath(path))
    except NotRegularFile:
        raise ImportFailed(f"{path} is not a regular file") from None


def _feed(fd: int, sinks: Sequence[Hasher], progress: Progress, out: int | None = None) -> int:
    """Reads `fd` to its end into every sink (and writes it to `out`). -> bytes read.

    Each chunk is read once; the first sink and the write run in this thread, the other sinks
    in one thread each (hashlib and os.write release the GIL), while the next chunk is read
    into a second buffer: a root filesystem's sha256 and its combined fingerprint take the
    time of one on two cores."""
    helpers = ThreadPoolExecutor(len(sinks) - 1) if len(sinks) > 1 else None
    size = 0
    buffers = [bytearray(CHUNK_SIZE), bytearray(CHUNK_SIZE)]
    pending: list[Future[None]] = []
    try:
        while True:
            buf = buffers[0]  # not the one the helpers may still be reading
            n = os.readv(fd, [buf])
            for f in pending:
                f.result()
            pending = []
            if not n:
                return size
            chunk = memoryview(buf)[:n]
            if helpers is not None:
                pending = [helpers.submit(s.update, chunk) for s in sinks[1:]]
            if sinks:
                sinks[0].update(chunk)
            if out is not None:
                written = 0
                while written < n:
                    written += os.write(out, chunk[written:])
            size += n
            progress(n)
            buffers.reverse()
    finally:
        for f in pending:
            f.cancel()
        if helpers is not None:
            helpers.shutdown(wait=True)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Transfer:
    """Brings the plan's files to temporary names in one directory (a descriptor: nothing is
    resolved by path inside images/ again); undoes itself on failure."""

    def __init__(self, plan: ImagePlan, move: bool, progress: Progress) -> None:
        self.plan = plan
        self.move = move
        self.progress = progress
        self.dir_fd = -1
        #: temporary name -> the source it was moved from (to move back on failure)
        self.moved_from: dict[str, str] = {}
        self.created: list[str] = []
        self.copied_instead: list[str] = []

    def bring(self, src: Source, tmp: str, sinks: Sequence[Hasher]) -> int:
        if self.move:
            try:
                os.rename(src.path, tmp, dst_dir_fd=self.dir_fd)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise ImportFailed(f"cannot move {src.path}: {e.strerror or e}") from e
                log.info("%s is on another file system: copying it instead", src.path)
                self.copied_instead.append(src.path)
            else:
                self.moved_from[tmp] = src.path
                fd = open_regular(tmp, dir_fd=self.dir_fd)
                try:
                    os.fchmod(fd, FILE_MODE)
                    size = _feed(fd, sinks, self.progress)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return size
        self.created.append(tmp)
        fin = _open_source(src.path)
        try:
            out = os.open(tmp, _CREATE, FILE_MODE, dir_fd=self.dir_fd)
            try:
                os.fchmod(out, FILE_MODE)
                size = _feed(fin, sinks, self.progress, out)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(fin)
        return size

    def renamed(self, tmp: str, final: str, temporary: bool) -> None:
        """`tmp` is now `final`; still removed (or moved back) on failure if `temporary`."""
        if tmp in self.moved_from:
            self.moved_from[final] = self.moved_from.pop(tmp)
        if tmp in self.created:
            self.created.remove(tmp)
            if temporary:
                self.created.append(final)

    def done(self) -> list[str]:
        """The sources moved; nothing is undone any more."""
        moved = list(self.moved_from.values())
        self.moved_from.clear()
        self.created.clear()
        return moved

    def undo(self) -> None:
        for tmp, src in self.moved_from.items():
            with contextlib.suppress(OSError):
                os.rename(tmp, src, src_dir_fd=self.dir_fd)
        for tmp in self.created:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.dir_fd)
        self.moved_from.clear()
        self.created.clear()


def _check_fingerprint(plan: ImagePlan, fingerprint: str) -> None:
    if plan.export_fingerprint and plan.export_fingerprint != fingerprint:
        names = " and ".join(os.path.basename(s.path) for s in plan.sources)
        raise ImportFailed(
            f"{names}: the content does not match the fingerprint in the name "
            f"({plan.export_fingerprint[:12]}, content gives {fingerprint[:12]}): "
            "a damaged or altered export; nothing imported"
        )


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def place(
    plan: ImagePlan,
    img_dir: str,
    move: bool = False,
    force: bool = False,
    progress_start: Callable[[int], Progress] | None = None,
) -> Placed:
    """Puts the plan's files into images/<os>/<release>/<arch>/<variant>/<serial>/.

    New version: a hidden temporary directory in the variant directory, renamed into place.
    Existing version (only with `force`): each file through a hidden temporary name, then the
    version's other image files are removed (metadata.json is kept).

    Below images/ everything is done relative to directory descriptors opened without
    following links: a directory an uploader swapped for a symlink makes the import fail,
    it never leads outside images/.
    """
    key = plan.key
    img_dir = os.path.abspath(img_dir)
    parts = key.relpath.split("/")
    version_dir = os.path.join(img_dir, key.relpath)
    try:
        os.makedirs(img_dir, DIR_MODE, exist_ok=True)
        img_fd = os.open(img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImportFailed(f"cannot create {img_dir}: {e.strerror or e}") from e
    try:
        total = sum(os.path.getsize(s.path) for s in plan.sources)
    except OSError as e:
        os.close(img_fd)
        raise ImportFailed(f"cannot read {e.filename}: {e.strerror or e}") from e
    transfer = _Transfer(plan, move, no_progress)
    variant_fd = -1
    try:
        variant_fd = _makedirs(img_fd, img_dir, parts[:-1])
        exists = _exists(parts[-1], variant_fd)
        if exists and not force:
            raise VersionExists(f"{version_dir} already exists; --force replaces its files")
        transfer.progress = progress_start(total) if progress_start else no_progress
        placed = Placed(key=key, version_dir=version_dir, replaced=exists)
        if exists:
            transfer.dir_fd = _open_dir(parts[-1], variant_fd, version_dir)
            _fill(plan, transfer, placed, into_existing=True)
        else:
            tmp_name = f".import-{secrets.token_hex(6)}"
            os.mkdir(tmp_name, DIR_MODE, dir_fd=variant_fd)
            try:
                transfer.dir_fd = open_dir(tmp_name, dir_fd=variant_fd)
                os.fchmod(transfer.dir_fd, DIR_MODE)
                _fill(plan, transfer, placed, into_existing=False)
                os.fsync(transfer.dir_fd)
                if _exists(parts[-1], variant_fd):
                    raise VersionExists(f"{version_dir} appeared while importing; not replaced")
                os.rename(tmp_name, parts[-1], src_dir_fd=variant_fd, dst_dir_fd=variant_fd)
            except BaseException:
                transfer.undo()
                shutil.rmtree(tmp_name, dir_fd=variant_fd, ignore_errors=True)
                raise
            os.fsync(variant_fd)
    except OSError as e:
        transfer.undo()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ImportFailed(f"no space left in {img_dir}; nothing imported") from e
        raise ImportFailed(f"importing into {version_dir} failed: {e.strerror or e}") from e
    finally:
        for fd in (img_fd, variant_fd, transfer.dir_fd):
            if fd >= 0:
                os.close(fd)
    placed.moved = transfer.done()
    for src in transfer.copied_instead:
        log.info("%s was copied (another file system) and left where it was", src)
    return placed


def _fill(plan: ImagePlan, transfer: _Transfer, placed: Placed, into_existing: bool) -> None:
    """Brings every file of the plan into the transfer's directory under its final name."""
    directory = transfer.dir_fd
    staged: list[tuple[str, str]] = []  # (temporary name, final name)
    meta_hasher: Hasher | None = None
    try:
        for src in plan.sources:
            tmp = f".import-{secrets.token_hex(6)}.part"
            plain = hashlib.sha256()
            sinks: list[Hasher] = [plain]
            combined: Hasher | None = None
            if src.role is Role.ROOT and meta_hasher is not None:
                combined = meta_hasher.copy()
                sinks.append(combined)
            size = transfer.bring(src, tmp, sinks)
            digest = plain.hexdigest()
            if src.role is Role.META:
                meta_hasher = plain
            name = src.target or f"{digest}.tar.gz"
            if combined is not None:
                placed.fingerprint = combined.hexdigest()
            elif src.role is Role.UNIFIED:
                placed.fingerprint = digest
            placed.files[name] = (size, digest)
            staged.append((tmp, name))
        _check_fingerprint(plan, placed.fingerprint)
    except BaseException:
        transfer.undo()
        raise
    # every file is complete: give them their names
    for tmp, name in staged:
        os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        transfer.renamed(tmp, name, temporary=not into_existing)
    if into_existing:
        for stale in _other_image_files(directory, {name for _, name in staged}):
            log.info(
                "removing %s (replaced by the import)", os.path.join(placed.version_dir, stale)
            )
            os.unlink(stale, dir_fd=directory)
        os.fsync(directory)


def _other_image_files(dir_fd: int, keep: set[str]) -> Iterator[str]:
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        role = classify(entry.name)
        if (
            role is not None
            and role.role in (Role.META, Role.ROOT, Role.UNIFIED)
            and entry.name not in keep
            and entry.is_file(follow_symlinks=False)
        ):
            yield entry.name


def seed_cache(cache: HashCache, img_dir: str, placed: Placed) -> None:
    """Records the digests computed while copying, so publishing does not read the files again."""
    versions = Scanner(img_dir).scan(placed.key.relpath)
    if not versions:
        return
    files = versions[0].files
    plain = [(files[n], sha) for n, (_, sha) in placed.files.items() if n in files]
    combined = []
    metas = [f for f in files.values() if f.role.role is Role.META and f.name in placed.files]
    roots = [f for f in files.values() if f.role.role is Role.ROOT and f.name in placed.files]
    if len(metas) == 1 and len(roots) == 1 and placed.fingerprint:
        combined.append((metas[0], roots[0], placed.fingerprint))
    cache.put_many(plain, combined)


def describe(plan: ImagePlan) -> str:
    kinds = {"squashfs": "squashfs", "tarball": "root.tar.xz", "qcow2": "VM disk"}
    kind = "unified tarball" if plan.unified else f"metadata + {kinds[plan.sources[1].kind]}"
    return f"{plan.key.product} {plan.key.serial} ({kind})"
