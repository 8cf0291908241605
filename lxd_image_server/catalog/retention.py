"""Pruned versions: they leave the catalog at once, their files after a grace period.

Clients and the LXD daemon cache images.json (the daemon for about an hour), so a version's
files must stay downloadable for a while after the catalog stops listing it. A pruned version
is recorded in <state_dir>/pruned.json with its expiry; every catalog build (the `update`
command, the watcher, `prune` and `remove`; all through Pipeline) leaves recorded versions out, and
`update` (the daily timer) deletes the files of those whose expiry has passed.

    {"format": 1, "pending": [{"path": "/var/www/simplestreams/images/os/rel/arch/var/serial",
      "product": "os:rel:arch:var", "serial": "...", "pruned": 1700000000,
      "expires": 1700003600, "expires_utc": "2023-11-14 23:13 UTC"}]}

`path` is the absolute version directory, so one state directory can serve several trees.
Changes are made under a lock and written atomically (temporary file + rename).

This module sits below the pipeline (which reads the record and applies [retention]); the
`prune` and `remove` use cases, which run the pipeline, are in pruning.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lxd_image_server.catalog.deltas import drop_deltas_on
from lxd_image_server.catalog.products import Products
from lxd_image_server.catalog.publish import write_atomic
from lxd_image_server.config import Paths, StateDir
from lxd_image_server.fsutil import (
    DirChain,
    TooLarge,
    delete_tree,
    exclusive_lock,
    load_json_bounded,
    open_dir,
    read_regular,
)
from lxd_image_server.retention_policy import RetentionPolicy
from lxd_image_server.tree.layout import (
    VERSION_DEPTH,
    LayoutError,
    Role,
    check_component,
    parse_version_dir,
    serial_sort_key,
    valid_serial,
)

if TYPE_CHECKING:
    from lxd_image_server.tree.scan import ScannedVersion

log = logging.getLogger(__name__)

#: pruned.json holds one short entry per pruned version
MAX_STATE_BYTES = 64 << 20
MAX_STATE_DEPTH = 8
FORMAT = 1


class RetentionError(Exception):
    """prune/remove cannot proceed; the message says why. Nothing was changed."""


@dataclass(frozen=True)
class Pending:
    """A version out of the catalog whose files are deleted once `expires` has passed."""

    path: str
    product: str
    serial: str
    pruned: int
    expires: int

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "product": self.product,
            "serial": self.serial,
            "pruned": self.pruned,
            "expires": self.expires,
            "expires_utc": utc_text(self.expires),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Pending:
        if not isinstance(doc, dict):
            raise ValueError("an entry is not an object")
        path, product, serial = doc.get("path"), doc.get("product"), doc.get("serial")
        pruned, expires = doc.get("pruned"), doc.get("expires")
        if not (isinstance(path, str) and isinstance(product, str) and isinstance(serial, str)):
            raise ValueError("path, product and serial must be strings")
        if not (_seconds(pruned) and _seconds(expires)):
            raise ValueError("pruned and expires must be numbers of seconds")
        assert isinstance(pruned, int) and isinstance(expires, int)
        return cls(path, product, serial, pruned, expires)


def _seconds(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def utc_text(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- the state file -----------------------------------------------------------------------------


def state_path(state_dir: str) -> str:
    return StateDir(state_dir).pruned


def _parse(data: bytes, where: str) -> list[Pending]:
    try:
        doc = load_json_bounded(data, MAX_STATE_BYTES, MAX_STATE_DEPTH)
        if not isinstance(doc, dict) or not isinstance(doc.get("pending"), list):
            raise ValueError('expected {"format": 1, "pending": [...]}')
        return [Pending.from_json(e) for e in doc["pending"]]
    except ValueError as e:
        raise RetentionError(f"{where} is damaged ({e}); fix or remove it") from None


def load(state_dir: str) -> list[Pending]:
    """The recorded versions (none if the file does not exist). Raises RetentionError."""
    path = state_path(state_dir)
    try:
        data = read_regular(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return []
    except TooLarge:
        raise RetentionError(f"{path} is damaged (larger than {MAX_STATE_BYTES} bytes)") from None
    except OSError as e:
        raise RetentionError(f"cannot read {path}: {e.strerror or e}") from e
    return _parse(data, path)


def save(state_dir: str, entries: Iterable[Pending]) -> None:
    ordered = sorted(entries, key=lambda p: (p.expires, p.path))
    doc = {"format": FORMAT, "pending": [p.as_json() for p in ordered]}
    os.makedirs(state_dir, exist_ok=True)
    write_atomic(state_path(state_dir), (json.dumps(doc, indent=1) + "\n").encode())


@contextlib.contextmanager
def state_lock(state_dir: str) -> Iterator[None]:
    """Serializes changes to pruned.json (readers need no lock: writes are atomic)."""
    with exclusive_lock(StateDir(state_dir).pruned_lock):
        yield


class PendingVersions:
    """The pipeline's view: absolute version directories to leave out of the catalog.

    Re-reads pruned.json only when it changed. A damaged file hides nothing (logged): the
    versions come back into the catalog rather than the catalog failing to publish.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = state_path(state_dir)
        self._seen: tuple[int, int, int] | None = None
        self._paths: frozenset[str] = frozenset()

    def __call__(self) -> frozenset[str]:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._paths = None, frozenset()
            return self._paths
        ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        if ident != self._seen:
            try:
                entries = _parse(read_regular(self.path, MAX_STATE_BYTES), self.path)
            except TooLarge:
                log.warning(
                    "%s is larger than %d bytes; not hiding pruned versions",
                    self.path,
                    MAX_STATE_BYTES,
                )
                entries = []
            except (OSError, RetentionError) as e:
                log.warning("%s; not hiding pruned versions", e)
                entries = []
            self._seen = ident
            self._paths = frozenset(p.path for p in entries)
        return self._paths


# -- choosing ------------------------------------------------------------------------------------


#: (product, serial) -> when that version was published (ns since the epoch), if known
Arrivals = Mapping[tuple[str, str], int]


def published_at(version: ScannedVersion) -> int:
    """When `version` was published, as its files tell: the newest change time (ctime, which no
    uploader can set or move back) of its metadata and roots. Deltas are left aside: the writer
    adds them to a version after it was published."""
    times = [f.ctime_ns for f in version.files.values() if f.role.role is not Role.DELTA]
    return max(times, default=0)


def arrivals(versions: Iterable[ScannedVersion]) -> dict[tuple[str, str], int]:
    return {(v.key.product, v.key.serial): published_at(v) for v in versions}


class Versioned(Protocol):
    """What choosing needs of a product: its versions by serial (model.Product has them)."""

    @property
    def versions(self) -> Mapping[str, object]: ...


def select_prunable(
    products: Mapping[str, Versioned],
    keep: int | Callable[[str], int],
    published: Arrivals | None = None,
    spared: Callable[[str, str, str], None] | None = None,
) -> list[tuple[str, str]]:
    """(product, serial) of every version beyond the newest `keep` of its product.

    `keep` is a number for every product (`prune --keep`), or a function of the product key
    (a [retention] policy) where 0 keeps every version. The newest version always stays, and a
    version whose serial does not parse is neither counted nor chosen (the layout refuses such
    serials, so the catalog should hold none).

    With `published` (when each version was published), a version published after the newest
    one kept is never chosen: a serial far ahead of the others (one uploaded before such
    serials were refused, or a clock that was wrong) must not push out the real versions that
    came after it. `spared(product, serial, newest_kept)` is told of each.
    """
    if not callable(keep) and keep < 1:
        raise ValueError("keep must be at least 1")
    out: list[tuple[str, str]] = []
    for pkey in sorted(products):
        n = keep(pkey) if callable(keep) else keep
        if n < 1:
            continue
        serials = []
        for s in products[pkey].versions:
            if valid_serial(s):
                serials.append(s)
            else:
                log.warning("%s: version %r has no valid serial; never pruned", pkey, s)
        serials.sort(key=serial_sort_key)
        beyond = serials[:-n]
        if published is not None and beyond:
            newest = serials[-1]
            limit = published.get((pkey, newest))
            if limit is not None:
                later = [s for s in beyond if published.get((pkey, s), 0) > limit]
                for s in later:
                    if spared is not None:
                        spared(pkey, s, newest)
                beyond = [s for s in beyond if s not in later]
        out.extend((pkey, s) for s in beyond)
    return out


def parse_product(text: str) -> tuple[str, str, str, str]:
    """'os:release:arch:variant' -> its parts. Raises RetentionError."""
    parts = text.split(":")
    if len(parts) != 4:
        raise RetentionError(
            f"{text!r} is not a product: expected os:release:arch:variant "
            "(the keys `lxd-image-server list` shows)"
        )
    for value, what in zip(parts, ("os", "release", "arch", "variant"), strict=True):
        try:
            check_component(value, what)
        except LayoutError as e:
            raise RetentionError(str(e)) from None
    return parts[0], parts[1], parts[2], parts[3]


# -- recording ----------------------------------------------------------------------------------


def schedule(
    state_dir: str,
    versions: Iterable[ScannedVersion],
    grace: int,
    now: float | None = None,
) -> tuple[list[Pending], list[Pending]]:
    """Records `versions` as pruned, expiring `grace` seconds from now.

    Returns (newly recorded, already recorded: their expiry is left as it was).
    """
    now_s = int(now if now is not None else time.time())
    new: list[Pending] = []
    already: list[Pending] = []
    with state_lock(state_dir):
        entries = {p.path: p for p in load(state_dir)}
        for v in versions:
            if v.path in entries:
                already.append(entries[v.path])
                continue
            p = Pending(v.path, v.key.product, v.key.serial, now_s, now_s + max(0, grace))
            entries[v.path] = p
            new.append(p)
        if new:
            save(state_dir, entries.values())
    return new, already


def unschedule(state_dir: str, version_paths: Iterable[str]) -> list[Pending]:
    """Forgets the given versions (they were imported again). Returns those forgotten."""
    wanted = set(version_paths)
    with state_lock(state_dir):
        entries = load(state_dir)
        dropped = [p for p in entries if p.path in wanted]
        if dropped:
            save(state_dir, [p for p in entries if p.path not in wanted])
    return dropped


def pending_for(state_dir: str, version_path: str) -> Pending | None:
    try:
        entries = load(state_dir)
    except RetentionError:
        return None
    return next((p for p in entries if p.path == version_path), None)


# -- deleting ------------------------------------------------------------------------------------


def _is_version_dir(img_dir: str, path: str) -> bool:
    """Whether `path` names a version directory inside `img_dir` (never anything else)."""
    if os.path.commonpath([img_dir, path]) != img_dir or path == img_dir:
        return False
    parts = os.path.relpath(path, img_dir).split(os.sep)
    if len(parts) != VERSION_DEPTH:
        return False
    try:
        parse_version_dir(parts)
    except LayoutError:
        return False
    return True


class _Gone(Exception):
    """The version directory no longer exists."""


def _delete_version(img_dir: str, path: str) -> None:
    """One rename makes the version vanish at once, then its files go; empty parents too.

    Everything happens relative to directory descriptors opened from `img_dir` down without
    following a link (fsutil.DirChain, fsutil.delete_tree), so a directory an uploader swaps for
    a symlink on the way leads nowhere outside images/ (NotADirectoryError).
    Raises _Gone when the version directory is missing, OSError when it cannot be deleted.
    """
    parts = os.path.relpath(path, img_dir).split(os.sep)
    with DirChain(os.open(img_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as chain:
        try:
            for name in parts[:-1]:
                chain.down(name)
            os.close(open_dir(parts[-1], dir_fd=chain.fd))
            delete_tree(parts[-1], chain.fd)
        except FileNotFoundError:
            raise _Gone() from None
        # deltas on this version, in the others of its product, go with it
        for rel in drop_deltas_on(chain.fd, parts[-1]):
            log.info("deleted %s/%s (its base is gone)", os.path.dirname(path), rel)
        chain.prune()  # empty parents go too, up to (not including) images/


def delete_expired(paths: Paths, now: float | None = None) -> list[Pending]:
    """Deletes the files of recorded versions of this tree whose grace period is over, and
    forgets versions whose directory is already gone. Returns those deleted."""
    now_s = now if now is not None else time.time()
    img_dir = os.path.abspath(paths.img_dir)
    deleted: list[Pending] = []
    with state_lock(paths.state_dir):
        entries = load(paths.state_dir)
        if not entries:
            return []
        keep: list[Pending] = []
        for p in entries:
            if not _is_version_dir(img_dir, p.path):
                keep.append(p)  # another tree's (or not ours to touch)
                continue
            if p.expires > now_s:
                keep.append(p)
                continue
            try:
                _delete_version(img_dir, p.path)
            except _Gone:
                log.info("%s %s: already gone", p.product, p.serial)
                continue
            except NotADirectoryError:
                log.warning(
                    "not deleting %s: it or a directory on the way is a symbolic link or a file "
                    "(links are never followed); kept for the next run",
                    p.path,
                )
                keep.append(p)
                continue
            except OSError as e:
                log.error("cannot delete %s: %s", p.path, e.strerror or e)
                keep.append(p)
                continue
            log.info("deleted %s %s (pruned %s)", p.product, p.serial, utc_text(p.pruned))
            deleted.append(p)
        if len(keep) != len(entries):
            save(paths.state_dir, keep)
    return deleted


def next_expiry(paths: Paths) -> int | None:
    """When the first recorded version of this tree is due for deletion (seconds since the
    epoch), or None. A damaged state file: None (logged by whoever reads it next)."""
    img_dir = os.path.abspath(paths.img_dir)
    try:
        entries = load(paths.state_dir)
    except RetentionError:
        return None
    due = [p.expires for p in entries if _is_version_dir(img_dir, p.path)]
    return min(due) if due else None


# -- the policy: applied by the catalog writer at every publish ---------------------------------


@dataclass(frozen=True)
class Retention:
    """`[retention]` and the grace period, as the pipeline applies them."""

    policy: RetentionPolicy
    grace: int
    #: versions already said to be spared (published after the newest kept): said once
    _told: set[tuple[str, str]] = field(default_factory=set, compare=False, repr=False)

    def apply(
        self,
        state_dir: str,
        products: Products,
        versions: Iterable[ScannedVersion],
        now: float | None = None,
    ) -> set[str]:
        """Records the published versions beyond the policy as pruned, exactly as `prune`
        does; returns their directories, to leave out of the catalog being written.

        Called under the catalog lock (the one writer). If the record cannot be written,
        nothing is left out (logged): a version hidden but not recorded would never go.
        """
        if not self.policy.active:
            return set()
        versions = list(versions)
        chosen = set(
            select_prunable(products, self.policy.keep_for, arrivals(versions), self._spare)
        )
        if not chosen:
            return set()
        doomed = [v for v in versions if (v.key.product, v.key.serial) in chosen]
        try:
            new, _ = schedule(state_dir, doomed, self.grace, now=now)
        except (RetentionError, OSError) as e:
            log.error("retention: cannot record what leaves the catalog (%s); keeping it", e)
            return set()
        for p in new:
            log.info(
                "retention: %s %s leaves the catalog (keep %d); its files go after %s",
                p.product,
                p.serial,
                self.policy.keep_for(p.product),
                utc_text(p.expires),
            )
        return {v.path for v in doomed}

    def _spare(self, product: str, serial: str, newest: str) -> None:
        if (product, serial) in self._told:
            return
        self._told.add((product, serial))
        log.warning(
            "retention: %s %s stays although beyond keep %d: it was published after %s, "
            "the newest version kept",
            product,
            serial,
            self.policy.keep_for(product),
            newest,
        )
