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

The pipeline's side of it is here too: `Shortcut` (the digest of its last full scan, and the
inputs to record once the page is written), `OnDemand` (the digests of a full `update` that
found the catalog published already, looked up only if something asks) and `CachedDigests`
(the few the deltas' plans ask for then, from the hash cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from typing import Any

from lxd_image_server import __version__
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import Digests
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


class Shortcut:
    """One pipeline's side of the record: the digest of its last full scan, and the inputs
    digest to record once the page of the publish it belongs to is written."""

    def __init__(self, state_dir: str, root_dir: str) -> None:
        self.state_dir = state_dir
        self.root_dir = root_dir
        #: versions_digest of the last full scan (None once part of the tree was scanned
        #: again, or when no publish may be skipped)
        self._scanned: str | None = None
        #: the inputs digest to record with the page (`record_due`)
        self._due: str | None = None

    def full_scan(self, found: Iterable[ScannedVersion] | None) -> None:
        """A full scan found `found` (None: no publish of it may be skipped)."""
        self._scanned = None if found is None else versions_digest(found, self.root_dir)

    def partial_scan(self) -> None:
        self._scanned = None

    def inputs(
        self, versions: Callable[[], Iterable[ScannedVersion]], hidden: Set[str], listed: Set[str]
    ) -> str:
        """The inputs digest of a publish of every version scanned (`versions`, in the
        scan's order; asked for only when no full scan's digest is at hand)."""
        scanned = self._scanned
        if scanned is None:
            scanned = versions_digest(versions(), self.root_dir)
        return inputs_digest(scanned, hidden, listed)

    def scanned_inputs(self, hidden: Set[str], listed: Set[str]) -> str | None:
        """The inputs digest of the last full scan, if it may skip its publish."""
        if self._scanned is None:
            return None
        return inputs_digest(self._scanned, hidden, listed)

    def is_published(self, inputs: str | None) -> bool:
        return inputs is not None and is_published(self.state_dir, self.root_dir, inputs)

    def forget(self) -> None:
        """What is published from here on is not what the record vouches for."""
        self._due = None
        record(self.state_dir, self.root_dir, None)

    def record_later(self, inputs: str | None) -> None:
        """`inputs` is recorded with the page (`record_due`)."""
        self._due = inputs

    def record_now(self, inputs: str | None) -> None:
        """Records `inputs` (None: nothing) now: the page of its publish is written."""
        self._due = inputs
        self.record_due()

    def record_due(self) -> None:
        if self._due is not None:
            record(self.state_dir, self.root_dir, self._due)
            self._due = None


class OnDemand(Digests):
    """The digests of a full scan, computed (from the hash cache, hashing what it lacks) when
    first read: a no-change `update` reads none. They are read only if the tree or the catalog
    changed between the check before the catalog lock and the one under it; then under the
    lock, but the files are those of the last publish, all in the cache."""

    def __init__(self, load: Callable[[], Digests]) -> None:
        # no Digests.__init__: files, combined and failed are set by the first read
        self._load: Callable[[], Digests] | None = load

    @property
    def loaded(self) -> bool:
        return self._load is None

    def __getattr__(self, name: str) -> Any:
        # only called for an attribute not set yet
        load = self.__dict__.get("_load")
        if load is None or name not in ("files", "combined", "failed"):
            raise AttributeError(name)
        d = load()
        self.files, self.combined, self.failed = d.files, d.combined, d.failed
        self._load = None
        return getattr(self, name)


def deferred(digests: Digests) -> bool:
    """`digests` are not looked up yet (OnDemand): nothing is known of failures."""
    return isinstance(digests, OnDemand) and not digests.loaded


class CachedDigests(Mapping[str, str]):
    """sha256 by path of the files of `versions`, each looked up in the hash cache when asked
    for (the deltas ask for a few roots of a no-change `update`)."""

    def __init__(self, cache: HashCache, versions: list[ScannedVersion]) -> None:
        self._cache = cache
        self._versions = versions
        self._by_dir: dict[str, ScannedVersion] | None = None

    def _file(self, path: str) -> FileStat | None:
        if self._by_dir is None:
            self._by_dir = {v.path: v for v in self._versions}
        directory, _, name = path.rpartition("/")
        v = self._by_dir.get(directory)
        return None if v is None else v.files.get(name)

    def __getitem__(self, path: str) -> str:
        f = self._file(path)
        digest = None if f is None else self._cache.get(f)
        if digest is None:
            raise KeyError(path)
        return digest

    def __iter__(self) -> Iterator[str]:
        return (
            f.path
            for v in self._versions
            for f in v.files.values()
            if self._cache.get(f) is not None
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)
