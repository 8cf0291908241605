"""One version as the catalog writer knows it: what was scanned, the digests it has, and what
it may be published as. Every fact the writer keeps about a version lives in its record, and
every change to a record goes through the methods below, which say beside each change which
derived values it invalidates.

A record holds:
- `scanned`: the version as the last scan found it, and `ident`, its files' identities;
- `ready`: digests for the files of identity `ready.ident`; the same as `ident` once hashed,
  a part of it while some files are still being hashed, None before anything is known;
- two derived values, each recomputed when first asked for after a change:
  - `shown()`: the version as it may be published: all its files once hashed; without its
    deltas while only they are still being hashed (a delta never holds its version back);
    None while anything else is (a new version does not appear yet, a changed one is
    withdrawn: its old digests are wrong). Depends on `scanned` and `ready`.
  - `entry()`: its catalog entry (products.BuiltVersion, None: not publishable; its model
    Version keeps its encoded JSON, encode.py). Depends on the files shown and `ready`: kept
    while a rescan finds the same files (their overrides are the product's, read from
    `scanned` when the products are made), dropped when the files or the digests change.
Only `Versions` (versions.py) changes a record, and with it the stamp of the record's
product, which what is kept per product compares (no object identity involved).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from lxd_image_server.catalog.hashing import Digests
from lxd_image_server.catalog.hashjobs import Identity, identity
from lxd_image_server.catalog.products import BuiltVersion, build_version
from lxd_image_server.catalog.unchanged import deferred
from lxd_image_server.tree.layout import Role
from lxd_image_server.tree.scan import FileStat, ScannedVersion
from lxd_image_server.tree.unified import CONTAINER_TYPE, WRITER_PEEK_BYTES, unified_holds

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ready:
    """A version's digests, valid while its files have identity `ident`."""

    ident: Identity
    digests: Digests


#: a derived value not computed since the last change
_UNSET = object()


class VersionRecord:
    __slots__ = ("_entry", "_shown", "ident", "ready", "rel", "scanned")

    def __init__(self, rel: str, scanned: ScannedVersion) -> None:
        self.rel = rel
        self.scanned = scanned
        self.ident: Identity = identity(scanned)
        self.ready: Ready | None = None
        self._shown: object = _UNSET
        self._entry: object = _UNSET

    # -- changes (only Versions makes them: it tells the record's product, versions.py) ------

    def rescanned(self, scanned: ScannedVersion) -> None:
        """The version as a new scan found it (not equal to what it was)."""
        ident = identity(scanned)
        if ident != self.ident:
            self._entry = _UNSET  # other files: another entry
        self.scanned, self.ident = scanned, ident
        self._shown = _UNSET  # made of `scanned` (its overrides, its files)

    def hashed(self, ready: Ready) -> None:
        """New digests, for the files of identity `ready.ident`."""
        self.ready = ready
        self._shown = self._entry = _UNSET  # other digests: other files shown, another entry

    # -- reading ------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """The digests are those of exactly the files scanned, and none of them failed (a
        failure is tried again at the next scan)."""
        if self.ready is None or self.ready.ident != self.ident:
            return False
        d = self.ready.digests
        if deferred(d):
            return True  # looked up from the hash cache only if asked for (unchanged.py)
        return not any(f.path in d.failed for f in self.scanned.files.values())

    def whole(self) -> bool:
        """Shown with every file scanned, each with its sha256 (none failed)."""
        if self.ready is None or self.ready.ident != self.ident:
            return False
        d = self.ready.digests
        if d.failed and any(f.path in d.failed for f in self.scanned.files.values()):
            return False
        return all(f.path in d.files for f in self.scanned.files.values())

    def shown(self) -> ScannedVersion | None:
        """The version as it may be published now (see the module's text)."""
        if self._shown is _UNSET:
            self._shown = self._show()
        return self._shown  # type: ignore[return-value]

    def _show(self) -> ScannedVersion | None:
        ready, v = self.ready, self.scanned
        if ready is None:
            return None
        if ready.ident == self.ident:
            return v
        done = set(ready.ident)
        if any(f not in done for f in v.files.values() if f.role.role is not Role.DELTA):
            return None
        return replace(v, files={n: f for n, f in v.files.items() if f in done})

    def entry(self, root_dir: str) -> BuiltVersion | None:
        """The catalog entry of `shown()` (None: not publishable; logged once per change)."""
        if self._entry is _UNSET:
            shown = self.shown()
            if shown is None or self.ready is None:
                return None
            self._entry = build_version(shown, self.ready.digests, root_dir, _unified_type)
        return self._entry  # type: ignore[return-value]

    def sha256(self, path: str) -> str | None:
        """The digest of the file `path` of this version, if hashed (and not failed)."""
        if self.ready is None:
            return None
        d = self.ready.digests
        digest = d.files.get(path)
        return None if digest is None or path in d.failed else digest


def _unified_type(f: FileStat) -> str:
    """What the unified tarball `f` holds (tree/unified.py), read bounded from its first
    entries when its version is built (again only once its files change: VersionRecord)."""
    try:
        return unified_holds(f.base, f.rel, WRITER_PEEK_BYTES)
    except (OSError, ValueError) as e:
        log.warning("%s: cannot tell a container from a VM (%s); listed as a container", f.path, e)
        return CONTAINER_TYPE
