"""Delta updates: which deltas a version offers, and which are still to be made or checked.

A delta (VCDIFF, made by xdelta3) turns an older version's root (its base) into this
version's root. Both clients download it instead of the full root when they hold the base's
image and have xdelta3, then check the fingerprint of what they rebuilt. They do not fall back
to the full root when applying a delta fails: a wrong delta breaks the refresh of every client
holding its base. So a delta is listed only once the server has checked that it turns the
base's root, as it is now, into this version's root, as it is now (deltagen.py runs the check;
a delta the server made was checked when it was made). The record of each check lives in
<state_dir>/deltas.json, keyed by the delta's path and tied to the identity (device, inode,
size, mtime, ctime) of the delta, the base's root and this version's root: replace any of
the three and the delta is checked again before it is listed again.

Each record also says when xdelta3 last ran for that path (`at`), how often in a row it
FAILED (`tries`) and in what environment (`env`: this program's version and the xdelta3
binary). The watcher runs xdelta3 for one path at most once per `check_interval`, whatever
the files' identities (`due`): an uploader renaming a delta back and forth buys one check
per interval, not one per rename. A FAILED run (time limit, killed, the system refusing) is
tried again after that interval, doubled after each failure up to a day, and at once in
another environment (an upgrade of this program or of xdelta3): so are WRONG records of
another environment, which may have been the environment's fault.

Everything here is pure apart from reading and writing that state file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lxd_image_server.config import StateDir
from lxd_image_server.fsutil import (
    TooLarge,
    exclusive_lock,
    load_json_bounded,
    open_dir,
    read_regular,
    write_atomic,
)
from lxd_image_server.settings import DEFAULT_DELTA_MIN_SIZE
from lxd_image_server.tree.layout import DELTA_PREFIXES, Role, delta_name, delta_token
from lxd_image_server.tree.scan import FileStat, ScannedVersion

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 16 << 20
MAX_STATE_DEPTH = 6
FORMAT = 1

#: results recorded for a delta path
OK = "ok"  # checked: lists
WRONG = "wrong"  # checked: does not rebuild the root (or xdelta3 refused it)
TOO_BIG = "too-big"  # made, larger than max_ratio of the root: not kept
FAILED = "failed"  # the run failed (timeout, killed, refused): tried again later (due)
RESULTS = frozenset({OK, WRONG, TOO_BIG, FAILED})
#: the longest a delta that keeps failing waits for its next try (seconds)
MAX_BACKOFF = 86400.0

#: the root ftype whose base must not also have a squashfs root (see listable_base)
_DISK = "disk-kvm.img"


def ident(f: FileStat) -> str:
    """What a record is tied to: the file's path and identity."""
    return ":".join(str(x) for x in f.identity)


@dataclass(frozen=True)
class Record:
    result: str
    base: str
    target: str
    #: the delta file's ident (OK and WRONG), else ""
    delta: str = ""
    size: int = 0
    detail: str = ""
    #: when xdelta3 ran (time.time()); 0: unknown (a record of 0.2.0)
    at: float = 0.0
    #: FAILED runs in a row for this path (0 unless FAILED)
    tries: int = 0
    #: deltagen.environment() of the run; "": unknown
    env: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "base": self.base,
            "target": self.target,
            "delta": self.delta,
            "size": self.size,
            "detail": self.detail,
            "at": self.at,
            "tries": self.tries,
            "env": self.env,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Record | None:
        if not isinstance(doc, dict):
            return None
        fields = [doc.get(k) for k in ("result", "base", "target", "delta", "detail")]
        size, tries, at = doc.get("size"), doc.get("tries", 0), doc.get("at", 0.0)
        env = doc.get("env", "")
        if not all(isinstance(x, str) for x in fields) or doc.get("result") not in RESULTS:
            return None
        if not (isinstance(size, int) and isinstance(tries, int)):
            return None
        if isinstance(size, bool) or isinstance(tries, bool):
            return None
        if not isinstance(at, int | float) or isinstance(at, bool) or not isinstance(env, str):
            return None
        result, base, target, delta, detail = (str(x) for x in fields)
        return cls(result, base, target, delta, size, detail, float(at), tries, env)

    def final(self, env: str) -> bool:
        """Running xdelta3 again on the same files would tell nothing new: OK and TOO_BIG,
        and WRONG said in this environment (in another, xdelta3 may have been at fault)."""
        return self.result in (OK, TOO_BIG) or (self.result == WRONG and self.env == env)


def due(rec: Record | None, interval: float, env: str) -> float:
    """When (time.time()) xdelta3 may run again for the path `rec` is the record of: at once
    without a record, or after a FAILED or WRONG run in another environment; `interval`
    seconds after the last run, or for a FAILED one that interval doubled after each failure
    in a row (at most MAX_BACKOFF, or the interval if longer)."""
    if rec is None or (rec.result in (FAILED, WRONG) and rec.env != env):
        return 0.0
    wait = interval
    if rec.result == FAILED:
        wait = min(max(interval, MAX_BACKOFF), interval * 2.0 ** min(max(rec.tries, 1) - 1, 30))
    return rec.at + wait


# -- the state file ---------------------------------------------------------------------------


def state_path(state_dir: str) -> str:
    return StateDir(state_dir).deltas


def load(state_dir: str) -> dict[str, Record]:
    """The records (none when the file is missing or damaged: then deltas are checked again)."""
    path = state_path(state_dir)
    try:
        doc = load_json_bounded(read_regular(path, MAX_STATE_BYTES), MAX_STATE_BYTES, 8)
    except FileNotFoundError:
        return {}
    except (OSError, TooLarge, ValueError) as e:
        log.warning("%s is unusable (%s); checking deltas again", path, e)
        return {}
    entries = doc.get("deltas") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        return {}
    out = {}
    for key, value in entries.items():
        rec = Record.from_json(value)
        if rec is not None:
            out[str(key)] = rec
    return out


def save(state_dir: str, records: Mapping[str, Record]) -> None:
    doc = {"format": FORMAT, "deltas": {k: records[k].as_json() for k in sorted(records)}}
    os.makedirs(state_dir, exist_ok=True)
    write_atomic(state_path(state_dir), (json.dumps(doc, indent=1) + "\n").encode())


@contextlib.contextmanager
def state_lock(state_dir: str) -> Iterator[None]:
    """Held while deltas are made or checked and their records written: `update` run by hand
    and the watcher never run xdelta3 on the same files at once."""
    with exclusive_lock(StateDir(state_dir).deltas_lock):
        yield


class Records:
    """The pipeline's view of deltas.json: re-read only when the file changed."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self._seen: tuple[int, int, int] | None = None
        self._records: dict[str, Record] = {}

    @property
    def seen(self) -> tuple[int, int, int] | None:
        """The identity of deltas.json when last read (None: missing)."""
        return self._seen

    def __call__(self) -> dict[str, Record]:
        try:
            st = os.stat(state_path(self.state_dir))
        except OSError:
            self._seen, self._records = None, {}
            return self._records
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            self._records = load(self.state_dir)
            self._seen = seen
        return self._records


# -- which deltas a version may list ----------------------------------------------------------


def _serial_key(serial: str) -> tuple[str, str]:
    return ("".join(c for c in serial if c.isdigit()), serial)


@dataclass(frozen=True)
class Candidate:
    """A delta file found in `version`, with the base version it names in the same product."""

    version: ScannedVersion
    delta: FileStat
    base: ScannedVersion
    #: the root ftype it rebuilds (squashfs or disk-kvm.img)
    root_ftype: str
    target_root: FileStat
    base_root: FileStat

    def record_matches(self, rec: Record | None) -> bool:
        return (
            rec is not None
            and rec.delta == ident(self.delta)
            and rec.base == ident(self.base_root)
            and rec.target == ident(self.target_root)
        )


def root_of(v: ScannedVersion, root_ftype: str) -> FileStat | None:
    """The file a client downloads as `v`'s root of `root_ftype` (catalog.build_version's
    choice: the preferred name)."""
    roots = [f for f in v.files.values() if f.role.role is Role.ROOT and f.role.ftype == root_ftype]
    return min(roots, key=lambda f: (f.role.preference, f.name)) if roots else None


def listable_base(base: ScannedVersion, root_ftype: str) -> FileStat | None:
    """The base's root a delta of `root_ftype` starts from, or None when clients cannot use one.

    A disk-kvm.img delta is never listed on a base that also has a squashfs root: Incus (and
    LXD before 5.21) look the base image up by its combined_squashfs_sha256 whatever the
    delta's kind, so they would patch the container image's squashfs with the VM disk's delta
    and fail the refresh. On a base without squashfs they find no base and ignore the delta;
    current LXD uses it."""
    if root_ftype == _DISK and root_of(base, "squashfs") is not None:
        return None
    return root_of(base, root_ftype)


def candidates(versions: Iterable[ScannedVersion]) -> list[Candidate]:
    """Every delta file whose base is among `versions` (the published ones) in the same
    product, older, with a root of the delta's kind, as is the delta's own version."""
    by_product: dict[str, list[ScannedVersion]] = {}
    for v in versions:
        by_product.setdefault(v.key.product, []).append(v)
    out: list[Candidate] = []
    for group in by_product.values():
        tokens: dict[str, list[ScannedVersion]] = {}
        for v in group:
            tokens.setdefault(delta_token(v.key.serial), []).append(v)
        for v in group:
            for f in sorted(v.files.values(), key=lambda f: f.name):
                if f.role.role is not Role.DELTA:
                    continue
                bases = tokens.get(f.role.base, [])
                if len(bases) != 1:
                    if bases:
                        log.warning(
                            "%s: several versions are spelled %s; not listing it",
                            f.path,
                            f.role.base,
                        )
                    continue
                base = bases[0]
                if _serial_key(base.key.serial) >= _serial_key(v.key.serial):
                    continue
                root_ftype = next(r for r, d in DELTA_PREFIXES.values() if d == f.role.ftype)
                target_root = root_of(v, root_ftype)
                base_root = listable_base(base, root_ftype)
                if target_root is None or base_root is None:
                    continue
                out.append(Candidate(v, f, base, root_ftype, target_root, base_root))
    return out


def listable(cands: Iterable[Candidate], records: Mapping[str, Record]) -> frozenset[str]:
    """Paths of the deltas checked for exactly the files they are now."""
    return frozenset(
        c.delta.path
        for c in cands
        if c.record_matches(rec := records.get(c.delta.path))
        and rec is not None
        and rec.result == OK
    )


# -- what to make or check --------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Make (delta None) or check (delta given) the delta `name` in `target_dir`."""

    target_dir: str
    name: str
    base_root: FileStat
    target_root: FileStat
    #: sha256 of the target root, from the catalog: what the delta must rebuild
    target_sha256: str
    delta: FileStat | None = None

    #: when it was planned (time.time()): a record newer than that says it ran since
    planned: float = field(default=0.0, compare=False)

    @property
    def path(self) -> str:
        return os.path.join(self.target_dir, self.name)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (
            self.path,
            ident(self.base_root),
            ident(self.target_root),
            ident(self.delta) if self.delta else "",
        )


def plan(
    versions: Iterable[ScannedVersion],
    sha256: Mapping[str, str],
    records: Mapping[str, Record],
    bases: int,
    make: bool,
    env: str = "",
    min_size: int = DEFAULT_DELTA_MIN_SIZE,
    now: float = 0.0,
) -> list[Job]:
    """Deltas to check (present, not checked for what they are now, in environment `env`)
    and, if `make`, deltas to make: for the newest version of each product whose root has at
    least `min_size` bytes, one per root kind (squashfs, disk) from each of its `bases` newest
    older versions that have that kind of root (unless already made, or found TOO_BIG, for
    those roots). `sha256` maps a root's path to its digest; a root without one (not hashed
    yet) is left for later. Uploaded deltas are checked whatever their root's size. FAILED
    ones are among the jobs: when to run them is the caller's (`due`). `now`: the jobs'
    `planned`."""
    versions = list(versions)
    jobs: list[Job] = []
    for c in candidates(versions):
        rec = records.get(c.delta.path)
        if rec is not None and c.record_matches(rec) and rec.final(env):
            continue
        if c.target_root.path not in sha256:
            continue
        jobs.append(
            Job(
                c.version.path,
                c.delta.name,
                c.base_root,
                c.target_root,
                sha256[c.target_root.path],
                c.delta,
                now,
            )
        )
    if not make or bases < 1:
        return jobs
    by_product: dict[str, list[ScannedVersion]] = {}
    for v in versions:
        by_product.setdefault(v.key.product, []).append(v)
    for group in by_product.values():
        newest = max(group, key=lambda v: _serial_key(v.key.serial))
        older: list[ScannedVersion] | None = None
        for root_ftype in (r for r, _ in DELTA_PREFIXES.values()):
            target_root = root_of(newest, root_ftype)
            if target_root is None or target_root.path not in sha256:
                continue
            if target_root.size < min_size:
                continue  # too small for a delta to save anything worth a request
            if older is None:
                older = sorted(group, key=lambda v: _serial_key(v.key.serial))[:-1]
            found = 0
            for base in reversed(older):
                if found >= bases:
                    break
                base_root = listable_base(base, root_ftype)
                if base_root is None:
                    continue
                found += 1
                name = delta_name(root_ftype, base.key.serial)
                if name in newest.files:
                    continue  # there already (checked above)
                rec = records.get(os.path.join(newest.path, name))
                if (
                    rec is not None
                    and rec.base == ident(base_root)
                    and rec.target == ident(target_root)
                    and rec.result == TOO_BIG
                ):
                    continue
                jobs.append(
                    Job(
                        newest.path, name, base_root, target_root, sha256[target_root.path],
                        planned=now,
                    )
                )  # fmt: skip
    return jobs


def drop_deltas_on(product_fd: int, serial: str) -> list[str]:
    """Deletes the deltas on version `serial` (just deleted) from the other versions of its
    product, the directory `product_fd`: rootfs.<serial>.vcdiff and disk.<serial>.vcdiff.
    Each version directory is opened without following a link; unlinking a name never follows
    one. Returns the deleted paths, relative to the product directory."""
    token = delta_token(serial)
    try:
        siblings = sorted(os.listdir(product_fd))
    except OSError:
        return []
    if any(delta_token(s) == token for s in siblings if s != serial and not s.startswith(".")):
        return []  # another spelling of the same time is still there: the deltas are its own
    deleted = []
    for s in siblings:
        if s == serial or s.startswith("."):
            continue
        try:
            vfd = open_dir(s, dir_fd=product_fd)
        except OSError:
            continue
        try:
            for prefix in DELTA_PREFIXES:
                name = f"{prefix}.{token}.vcdiff"
                try:
                    os.unlink(name, dir_fd=vfd)
                except OSError:
                    continue
                deleted.append(f"{s}/{name}")
        finally:
            os.close(vfd)
    return deleted
