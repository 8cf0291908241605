"""`import`: what `lxc image export` produced, told apart by content, and where it goes.

`lxc image export` (LXD 5.0) writes either
- one unified tarball `<fingerprint>.tar.gz` (metadata.yaml, templates/ and rootfs/ inside:
  what `lxc publish` makes), or
- a split image: `meta-<fingerprint>.tar.xz` (metadata.yaml, templates/) plus the root as
  `<fingerprint>.squashfs`, `<fingerprint>.tar.xz` (a root tarball) or `<fingerprint>.qcow2`
  (a VM's disk).

Files are told apart by their content, not their names. Whatever the naming options leave open
is read from metadata.yaml (import_naming.py), streamed out of the (metadata or unified)
tarball: nothing is ever extracted to disk. `plan_import` gives the plan; import_place.py
carries it out.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from lxd_image_server.fsutil import NotRegularFile, open_regular
from lxd_image_server.ops.import_errors import ImportFailed, NamingError
from lxd_image_server.ops.import_naming import Naming, version_key
from lxd_image_server.tree.layout import Role, VersionKey

#: metadata.yaml is a few hundred bytes (a few KB with many templates): bigger is not one
MAX_METADATA_YAML = 256 << 10
#: LXD's metadata.yaml nests three levels (templates -> path -> properties)
MAX_YAML_DEPTH = 16
#: Members read before a tarball must have told what it is: a metadata tarball has a handful,
#: a unified one may list its rootfs/ before metadata.yaml (a root filesystem has tens of
#: thousands of entries). Bounds the time and the member list tarfile keeps.
MAX_MEMBERS = 200_000

META_NAME = "lxd.tar.xz"
ROOT_NAMES = {"squashfs": "rootfs.squashfs", "tarball": "root.tar.xz", "qcow2": "disk.qcow2"}

_FP = r"([0-9a-f]{64})"
_META_EXPORT_RE = re.compile(rf"meta-{_FP}\.[a-z0-9.]+", re.ASCII)
_ROOT_EXPORT_RE = re.compile(rf"{_FP}\.(?:squashfs|tar\.xz|qcow2|img)", re.ASCII)
_UNIFIED_EXPORT_RE = re.compile(rf"{_FP}\.tar\.gz", re.ASCII)


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
        fd = open_source(path)
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


def plan_import(files: Sequence[str], naming: Naming | None = None) -> ImagePlan:
    """What the files are and where they go (`naming`: the options given, by default none).
    Raises ImportFailed / NamingError."""
    naming = naming or Naming()
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
            key=version_key(naming, info.metadata, path),
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
        key=version_key(naming, meta_info.metadata, meta_path),
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


def open_source(path: str) -> int:
    """A file the operator named (links followed), if it is a regular file."""
    try:
        return open_regular(os.path.realpath(path))
    except NotRegularFile:
        raise ImportFailed(f"{path} is not a regular file") from None


def describe(plan: ImagePlan) -> str:
    kinds = {"squashfs": "squashfs", "tarball": "root.tar.xz", "qcow2": "VM disk"}
    kind = "unified tarball" if plan.unified else f"metadata + {kinds[plan.sources[1].kind]}"
    return f"{plan.key.product} {plan.key.serial} ({kind})"
