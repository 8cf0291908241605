"""`verify`: read every published file again and compare it with the catalog.

Checks each item's size and sha256, and each combined fingerprint (sha256 of metadata + root)
carried on the metadata items, ignoring the hash cache: this is the check for bit rot, a
truncated copy or a file replaced behind the catalog's back. Each file is read once; a root
filesystem is fed to its own sha256 and to every combined fingerprint in the same pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from lxd_image_server.catalog.hashing import FileChanged, Hasher, hash_file
from lxd_image_server.catalog.model import COMBINED_ATTRS, Catalog, Client
from lxd_image_server.fsutil import NotRegularFile
from lxd_image_server.progress import Progress, no_progress
from lxd_image_server.tree.layout import COMBINED_FIELDS, FileRole, Role, classify
from lxd_image_server.tree.scan import FileStat, open_below

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    #: missing, outside, unreadable, size, sha256, fingerprint or delta
    kind: str
    #: the file's path relative to the root (for fingerprints: "product version")
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.upper():<11} {self.where}: {self.detail}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    fingerprints: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Expect:
    rel: str
    size: int
    sha256: str


@dataclass
class _Combined:
    where: str
    field_name: str
    meta: str
    root: str
    expected: str


#: a combined-fingerprint field's JSON name -> the root ftype it is the fingerprint with
_ROOT_OF_FIELD = {name: ftype for ftype, names in COMBINED_FIELDS.items() for name in names}
_META_FTYPES = frozenset(c.meta_ftype for c in Client)


def _collect(
    catalog: Catalog, bad_deltas: list[Problem]
) -> tuple[dict[str, list[_Expect]], list[_Combined]]:
    """Every file the catalog names (with each listing of it: deltas too) and every combined
    fingerprint; deltas whose base is not in their product go to `bad_deltas`."""
    files: dict[str, list[_Expect]] = {}
    combined: list[_Combined] = []
    for pkey in sorted(catalog.products):
        versions = catalog.products[pkey].versions
        for serial in sorted(versions):
            items = versions[serial].items
            for item in items.values():
                base = item.delta_base
                if base is not None and base not in versions:
                    bad_deltas.append(
                        Problem(
                            "delta",
                            f"{pkey} {serial}",
                            f"{item.path} is a delta from {base!r}, not a version here",
                        )
                    )
                files.setdefault(item.path, []).append(_Expect(item.path, item.size, item.sha256))
            roots = {i.ftype: i.path for i in items.values() if i.ftype in COMBINED_FIELDS}
            for item in items.values():
                if item.ftype not in _META_FTYPES:
                    continue
                for name, attr in COMBINED_ATTRS.items():
                    value = getattr(item, attr)
                    if value is None:
                        continue
                    root = roots.get(_ROOT_OF_FIELD[name], "")
                    combined.append(
                        _Combined(f"{pkey} {serial}", name, item.path, root, value if root else "")
                    )
    unique = {(c.where, c.field_name, c.meta, c.root, c.expected): c for c in combined}
    return files, list(unique.values())


def _stat(root_dir: str, rel: str) -> tuple[FileStat | None, Problem | None]:
    """The file `rel` below `root_dir`, opened without following a link below the root (as
    nginx serves it: regular files only), described by fstat of the opened descriptor."""
    if not rel or os.path.isabs(rel) or ".." in rel.split("/"):
        return None, Problem("outside", rel, "the path leaves the served root")
    try:
        fd = open_below(root_dir, rel)
    except FileNotFoundError:
        return None, Problem("missing", rel, "listed in the catalog, not on disk")
    except NotRegularFile as e:
        return None, Problem("unreadable", rel, f"not a regular file ({e.strerror})")
    except NotADirectoryError:
        return None, Problem("unreadable", rel, "a directory on the way is a symbolic link")
    except OSError as e:
        return None, Problem("unreadable", rel, e.strerror or str(e))
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    name = rel.rsplit("/", 1)[-1]
    role = classify(name) or FileRole(Role.ROOT, "")
    return FileStat.of(os.path.join(root_dir, rel), name, role, st, root_dir), None


def verify(
    root_dir: str,
    catalog: Catalog,
    progress_start: Callable[[int], Progress] | None = None,
) -> Report:
    """Rehashes every file `catalog` (images.json) lists below `root_dir`."""
    report = Report()
    files, combined = _collect(catalog, report.problems)
    stats: dict[str, FileStat] = {}
    for rel in sorted(files):
        fs, problem = _stat(root_dir, rel)
        if problem is not None:
            report.problems.append(problem)
            continue
        assert fs is not None
        wrong_size = [e for e in files[rel] if e.size != fs.size]
        if wrong_size:
            report.problems.append(
                Problem(
                    "size",
                    rel,
                    f"the catalog says {wrong_size[0].size} bytes, the file has {fs.size}",
                )
            )
            continue
        stats[rel] = fs
    total = sum(f.size for f in stats.values())
    progress = progress_start(total) if progress_start and stats else no_progress

    # combined fingerprints need the metadata's hash state before the root is read
    metas = {c.meta for c in combined if c.meta in stats}
    order = sorted(stats, key=lambda r: (r not in metas, r))
    states: dict[str, Hasher] = {}
    digests: dict[str, str] = {}
    results: dict[tuple[str, str], str] = {}
    for rel in order:
        plain = hashlib.sha256()
        sinks: list[Hasher] = [plain]
        pending = {
            (c.meta, c.root): states[c.meta].copy()
            for c in combined
            if c.root == rel and c.meta in states
        }
        sinks.extend(pending.values())
        try:
            hash_file(stats[rel], sinks, progress)
        except FileChanged as e:
            report.problems.append(Problem("unreadable", rel, str(e)))
            continue
        digests[rel] = plain.hexdigest()
        if rel in metas:
            states[rel] = plain.copy()
        for pair, h in pending.items():
            results[pair] = h.hexdigest()
        report.files += 1
        report.bytes += stats[rel].size
        expected = {e.sha256 for e in files[rel]}
        if expected != {digests[rel]}:
            report.problems.append(
                Problem(
                    "sha256",
                    rel,
                    f"the catalog says {sorted(expected)[0]}, the file gives {digests[rel]}",
                )
            )
    for c in combined:
        if not c.root:
            report.problems.append(
                Problem("fingerprint", c.where, f"{c.field_name} names no root file in the version")
            )
            continue
        got = results.get((c.meta, c.root))
        if got is None:
            continue  # a file is missing or unreadable: already reported
        report.fingerprints += 1
        if got != c.expected:
            report.problems.append(
                Problem(
                    "fingerprint",
                    c.where,
                    f"{c.field_name} is {c.expected}, {c.meta} + {c.root} give {got}",
                )
            )
    return report
