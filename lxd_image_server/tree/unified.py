"""What a unified tarball holds, a container (rootfs/) or a virtual machine (rootfs.img), read
from its first entries: the catalog writer lists a VM's with `combined_type: virtual-machine`
(Incus 7.0.1+ takes a unified tarball without it for a container), and `verify` checks the
published `combined_type` against it.

Bounded: the tarball is a file an uploader wrote. The stream is read only until the first
root entry (after metadata.yaml and templates/, which are small), at most PEEK_MEMBERS entries
and `limit` bytes of the file (PEEK_BYTES for `verify`, WRITER_PEEK_BYTES for the catalog
writer, which reads it at every build of a changed version); nothing is extracted, no link
followed (the file is opened below the served root without following one, as nginx serves it).
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from typing import BinaryIO, cast

from lxd_image_server.tree.scan import open_below

#: the image types a unified tarball may hold, as `combined_type` names them
CONTAINER_TYPE = "container"
VM_TYPE = "virtual-machine"
PEEK_MEMBERS = 10_000
PEEK_BYTES = 256 << 20
#: the catalog writer reads at most this much of a tarball to tell (metadata.yaml and
#: templates/ come first and are a few KiB in what LXD and Incus export)
WRITER_PEEK_BYTES = 16 << 20


class _Bounded:
    """A read-only file over a descriptor that refuses to read past `limit` bytes."""

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self._left = limit

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = 1 << 20
        if self._left <= 0:
            raise ValueError(f"no root entry in the first {self._limit} bytes")
        data = os.read(self._fd, min(n, self._left))
        self._left -= len(data)
        return data


def _name(member: str) -> str:
    while member.startswith("./"):
        member = member[2:]
    return member.strip("/")


def unified_holds(root_dir: str, rel: str, limit: int = PEEK_BYTES) -> str:
    """ "container" or "virtual-machine": what the unified tarball `rel` below `root_dir`
    holds. ValueError (one line) when that cannot be told; OSError when it cannot be opened."""
    fd = open_below(root_dir, rel)
    try:
        stream = cast(BinaryIO, _Bounded(fd, limit))
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for count, member in enumerate(tf, 1):
                if count > PEEK_MEMBERS:
                    break
                name = _name(member.name)
                if name == "rootfs.img":
                    return VM_TYPE
                if name == "rootfs" or name.startswith("rootfs/"):
                    return CONTAINER_TYPE
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise ValueError(f"cannot read it as a tarball: {e}") from None
    finally:
        os.close(fd)
    raise ValueError("neither rootfs/ nor rootfs.img among its first entries")
