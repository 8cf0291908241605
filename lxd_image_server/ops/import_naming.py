"""`import`: the version an export becomes (os, release, arch, variant, serial), from the
naming options, or else from its metadata.yaml."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from lxd_image_server.ops.import_errors import NamingError
from lxd_image_server.tree.layout import (
    KNOWN_ARCHES,
    LayoutError,
    VersionKey,
    check_component,
    check_serial_not_ahead,
    valid_serial,
)

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


@dataclass(frozen=True)
class Naming:
    """Naming options from the command line; None: read from metadata.yaml."""

    os: str | None = None
    release: str | None = None
    arch: str | None = None
    variant: str | None = None
    serial: str | None = None


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


def version_key(naming: Naming, metadata: dict[str, Any], where: str) -> VersionKey:
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
    try:
        check_serial_not_ahead(serial, time.time())
    except LayoutError as e:
        raise NamingError(f"{e}: give --serial") from None
    return VersionKey(os_name, release, tree_arch(arch_raw), variant, serial)
