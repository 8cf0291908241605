"""Whether the published catalog is already the one a full `update` would write (issue 13).

A no-change `update` of 20,000 versions spends most of its time building, encoding and
comparing a 20 MB document and rendering the page, all to write nothing. Instead, after each
publish of a whole tree whose every file was hashed, the catalog writer records in its state
directory a digest of what the catalog and the page are made of, together with the identity
(inode, size, mtime) of each file it published. The next full update with the same digest
finds those files untouched and skips looking up the digests, building, encoding and the page.

The digest covers every version scanned: its path, its files' names, roles and identities
(path, device, inode, size, mtime, ctime), its overrides; what is hidden and which deltas may be
listed; the served root; this program's version and FORMAT. Not the sha256 digests: they are a
function of the identities (the hash cache's own rule), provided none failed; so a publish with
a file that could not be hashed records nothing, and the next update publishes again.

Anything else (a file edited, replaced or removed in streams/, another digest, another
version of the program, a missing or unreadable record) means: publish as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Set

from lxd_image_server import __version__
from lxd_image_server.config import StateDir
from lxd_image_server.fsutil import TooLarge, read_regular, write_atomic
from lxd_image_server.tree.overrides import NO_OVERRIDES
from lxd_image_server.tree.scan import FileStat, ScannedVersion

log = logging.getLogger(__name__)

#: bump when the same inputs give other bytes (catalog, gzip or page)
FORMAT = 1
#: the published files the record vouches for, relative to the served root
PUBLISHED = (
    "streams/v1/images.json",
    "streams/v1/images.json.gz",
    "streams/v1/index.json",
    "streams/v1/index.json.gz",
    "streams/index.html",
)
_MAX_RECORD = 64 * 1024


def versions_digest(versions: Iterable[ScannedVersion], root_dir: str) -> str:
    """A digest of `versions` as scanned (in this order) below the served root `root_dir`.

    One line of text per version: fields separated by NUL (no path holds one, overrides are
    written with repr, which escapes it), each record with a fixed number of fields, so two
    different inputs never write the same text. Stable across runs: no hash() or id() reaches
    the text."""
    h = hashlib.sha256(f"{__version__}\0{FORMAT}\0{root_dir}\0".encode())
    roles: dict[int, str] = {}
    for v in versions:
        ov = v.overrides
        out = ["V", v.path, v.key.relpath, "-" if ov is NO_OVERRIDES else repr(ov)]
        for f in sorted(v.files.values(), key=_name):
            role = roles.get(id(f.role))
            if role is None:
                r = f.role
                role = roles[id(r)] = f"{r.role.name}/{r.ftype}/{r.preference}/{r.base}"
            out += ("F", f.path, f"{f.dev} {f.inode} {f.size} {f.mtime_ns} {f.ctime_ns}", role)
        out.append("\n")
        h.update("\0".join(out).encode())
    return h.hexdigest()


def inputs_digest(versions: str, hidden: Set[str], listed: Set[str]) -> str:
    """The digest of a full publish's inputs: `versions` (versions_digest of every version
    scanned), the versions `hidden` and the deltas `listed`."""
    text = "\0".join(["I", versions, *sorted(hidden), "L", *sorted(listed)])
    return hashlib.sha256(text.encode()).hexdigest()


def _name(f: FileStat) -> str:
    return f.name


def _identities(root_dir: str) -> list[list[int]] | None:
    out = []
    for rel in PUBLISHED:
        try:
            st = os.lstat(os.path.join(root_dir, rel))
        except OSError:
            return None
        out.append([st.st_ino, st.st_size, st.st_mtime_ns])
    return out


def is_published(state_dir: str, root_dir: str, digest: str) -> bool:
    """Whether the record says `digest` was published and the published files are untouched."""
    try:
        record = json.loads(read_regular(StateDir(state_dir).catalog_inputs, _MAX_RECORD))
    except (OSError, TooLarge, ValueError):
        return False
    if not isinstance(record, dict) or record.get("inputs") != digest:
        return False
    current = _identities(root_dir)
    return current is not None and record.get("published") == current


def record(state_dir: str, root_dir: str, digest: str | None) -> None:
    """Records that the files now in streams/ were published from `digest` (None: forgets)."""
    path = StateDir(state_dir).catalog_inputs
    current = _identities(root_dir) if digest is not None else None
    try:
        if current is None:
            if os.path.lexists(path):
                os.unlink(path)
            return
        data = json.dumps({"inputs": digest, "published": current}).encode()
        write_atomic(path, data)
    except OSError as e:
        log.warning("cannot record what was published in %s: %s", path, e.strerror or e)
