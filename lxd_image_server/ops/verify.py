"""`verify`: hold the published catalog to the clients' rules and read every file it lists.

Three parts, each problem one line (catalog/rules.py's Problem):
- the rules of every client, on the documents alone (catalog/rules.py): no empty catalog,
  64-lowercase-hex hashes, relative paths, requirements, deltas, combined_type;
- every file the catalog lists, opened as nginx serves it (below the root, no link followed,
  regular files only): present, of the exact `size`; a unified tarball's first entries tell
  whether it holds a VM, which its `combined_type` must say;
- unless `full=False` (`verify --quick`), every file read again and its sha256 and each
  combined fingerprint (sha256 of metadata + root) carried on the metadata items compared
  with the catalog, ignoring the hash cache: the check for bit rot, a truncated copy or a
  file replaced behind the catalog's back. Each file is read once; a root filesystem is fed
  to its own sha256 and to every combined fingerprint in the same pass.

The quick mode costs a stat per file and a few KB per unified tarball, whatever the bytes on
disk: the check to run after every publish. The full one reads every byte.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from lxd_image_server.catalog.hashpool import hash_file
from lxd_image_server.catalog.hashread import FileChanged, Hasher
from lxd_image_server.catalog.model import (
    COMBINED_ATTRS,
    Catalog,
    Client,
    Index,
    read_index,
)
from lxd_image_server.catalog.rules import (
    HEX64,
    INDEX_JSON,
    Problem,
    check_catalog,
    check_index,
    check_unified_types,
    path_problem,
)
from lxd_image_server.fsutil import NotRegularFile
from lxd_image_server.progress import Progress, no_progress
from lxd_image_server.tree.layout import COMBINED_FIELDS, FileRole, Role, classify
from lxd_image_server.tree.scan import FileStat, open_below
from lxd_image_server.tree.unified import unified_holds

log = logging.getLogger(__name__)

__all__ = ["Problem", "Report", "read_index_problems", "verify"]


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    #: files found and of the right size (and, in the full mode, read)
    files: int = 0
    bytes: int = 0
    fingerprints: int = 0
    #: whether the files were read (sha256, fingerprints) or only their sizes checked
    full: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if not self.full:
            return f"{self.files} files ({self.bytes} bytes) checked by size, not read (--quick)"
        return (
            f"{self.files} files ({self.bytes} bytes) and {self.fingerprints} fingerprints checked"
        )


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
_UNIFIED_FTYPES = frozenset(c.unified_ftype for c in Client)


def read_index_problems(streams_dir: str, catalog: Catalog) -> list[Problem]:
    """index.json below `streams_dir` read and held to the rules (check_index); a missing,
    empty or unreadable one is a problem too: clients find images.json only through it."""
    path = os.path.join(streams_dir, "index.json")
    try:
        if os.lstat(path).st_size == 0:
            return [Problem("empty", INDEX_JSON, "an empty file: clients refuse it")]
        index: Index = read_index(path)
    except FileNotFoundError:
        return [Problem("missing", INDEX_JSON, "clients find images.json only through it")]
    except OSError as e:
        return [Problem("unreadable", INDEX_JSON, e.strerror or str(e))]
    except ValueError as e:
        return [Problem("index", INDEX_JSON, str(e))]
    return check_index(index, catalog)


def _collect(catalog: Catalog) -> tuple[dict[str, list[_Expect]], list[_Combined]]:
    """Every file the catalog names at a path inside the root (with each listing of it:
    deltas too) and every combined fingerprint worth computing (well formed, the rules report
    the others)."""
    files: dict[str, list[_Expect]] = {}
    combined: list[_Combined] = []
    for pkey in sorted(catalog.products):
        versions = catalog.products[pkey].versions
        for serial in sorted(versions):
            items = versions[serial].items
            for item in items.values():
                if path_problem(item.path) is None:
                    files.setdefault(item.path, []).append(
                        _Expect(item.path, item.size, item.sha256)
                    )
            roots = {i.ftype: i.path for i in items.values() if i.ftype in COMBINED_FIELDS}
            for item in items.values():
                if item.ftype not in _META_FTYPES:
                    continue
                for name, attr in COMBINED_ATTRS.items():
                    value = getattr(item, attr)
                    if value is None or not HEX64.fullmatch(value):
                        continue
                    root = roots.get(_ROOT_OF_FIELD[name], "")
                    if root and (path_problem(root) or path_problem(item.path)):
                        continue
                    combined.append(
                        _Combined(f"{pkey} {serial}", name, item.path, root, value if root else "")
                    )
    unique = {(c.where, c.field_name, c.meta, c.root, c.expected): c for c in combined}
    return files, list(unique.values())


def _unified_paths(catalog: Catalog) -> set[str]:
    return {
        item.path
        for product in catalog.products.values()
        for version in product.versions.values()
        for item in version.items.values()
        if item.ftype in _UNIFIED_FTYPES
    }


def _stat(root_dir: str, rel: str) -> tuple[FileStat | None, Problem | None]:
    """The file `rel` below `root_dir`, opened without following a link below the root (as
    nginx serves it: regular files only), described by fstat of the opened descriptor."""
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
    *,
    full: bool = True,
) -> Report:
    """Holds `catalog` (images.json) to the clients' rules and checks every file it lists
    below `root_dir`: size and type always, sha256 and fingerprints when `full`. (index.json:
    read_index_problems.)"""
    report = Report(full=full)
    report.problems.extend(check_catalog(catalog))
    files, combined = _collect(catalog)
    stats = _present(root_dir, files, report)
    _check_unified(root_dir, catalog, stats, report)
    if not full:
        report.files = len(stats)
        report.bytes = sum(f.size for f in stats.values())
        return report
    _rehash(stats, files, combined, progress_start, report)
    return report


def _present(root_dir: str, files: dict[str, list[_Expect]], report: Report) -> dict[str, FileStat]:
    """The listed files that are there, reachable as nginx serves them and of the listed
    size; the others reported."""
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
    return stats


def _check_unified(
    root_dir: str, catalog: Catalog, stats: dict[str, FileStat], report: Report
) -> None:
    """Each unified tarball's combined_type against what its first entries hold."""
    holds: dict[str, str] = {}
    for rel in sorted(_unified_paths(catalog) & set(stats)):
        try:
            holds[rel] = unified_holds(root_dir, rel)
        except (OSError, ValueError) as e:
            kind = "unreadable" if isinstance(e, OSError) else "type"
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            report.problems.append(Problem(kind, rel, f"a unified tarball: {detail}"))
    report.problems.extend(check_unified_types(catalog, holds))


def _rehash(
    stats: dict[str, FileStat],
    files: dict[str, list[_Expect]],
    combined: list[_Combined],
    progress_start: Callable[[int], Progress] | None,
    report: Report,
) -> None:
    """Reads every file in `stats` once: its sha256 and the combined fingerprints it is the
    root of, compared with the catalog."""
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
        expected = {e.sha256 for e in files[rel] if HEX64.fullmatch(e.sha256)}
        if expected and expected != {digests[rel]}:
            report.problems.append(
                Problem(
                    "sha256",
                    rel,
                    f"the catalog says {sorted(expected)[0]}, the file gives {digests[rel]}",
                )
            )
    for c in combined:
        if not c.root:
            continue  # no root of its type: a rule (catalog/rules.py) reports it
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
