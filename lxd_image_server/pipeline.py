"""The catalog pipeline: scan -> hash -> catalog -> publish, the one writer of streams/.

`update` runs it over the whole tree; `watch` keeps one instance and re-runs it over the
directories that changed. Every run holds the catalog lock from scan to publish, so two
writers never interleave and the last one to publish saw the newest tree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Set

from .catalog import Products, build_products
from .config import Paths
from .hashing import Digests, HashCache, HashEngine, Progress
from .page import write_page
from .publish import catalog_lock, publish
from .retention import PendingVersions
from .scan import Exclude, ScannedVersion, Scanner

log = logging.getLogger(__name__)

ProgressStart = Callable[[int], Progress]


def _never(_: str) -> bool:
    return False


class Pipeline:
    def __init__(
        self,
        paths: Paths,
        cache: HashCache,
        progress_start: ProgressStart | None = None,
        exclude: Exclude = _never,
        hidden: Callable[[], Set[str]] | None = None,
    ) -> None:
        self.paths = paths
        self.hasher = HashEngine(cache)
        self.scanner = Scanner(paths.img_dir, exclude)
        self.progress_start = progress_start
        #: version directory (relative to images/) -> what was found there
        self.versions: dict[str, ScannedVersion] = {}
        self.digests = Digests()
        self.products: Products = {}
        #: absolute version directories left out of the catalog: pruned or removed, files
        #: kept until their grace period is over (retention.py)
        self.hidden = hidden if hidden is not None else PendingVersions(paths.state_dir)
        #: called after every publish that changed the catalog (e.g. to push to mirrors)
        self.on_publish: list[Callable[[], None]] = []

    def update_all(self, rehash: bool = False) -> bool:
        """Rescans and republishes everything. True if the catalog changed."""
        with catalog_lock(self.paths.streams_dir):
            found = self.scanner.scan()
            self.versions = {v.key.relpath: v for v in found}
            self.digests = self.hasher.digest(found, rehash, self.progress_start)
            self.hasher.cache.forget_except({f.path for v in found for f in v.files.values()})
            return self._publish()

    def refresh(self, prefixes: Iterable[str]) -> bool:
        """Rescans the directories `prefixes` (relative to images/) and republishes."""
        with catalog_lock(self.paths.streams_dir):
            rescanned: list[ScannedVersion] = []
            for prefix in _outermost(prefixes):
                for rel in [r for r in self.versions if _under(r, prefix)]:
                    del self.versions[rel]
                rescanned.extend(self.scanner.scan(prefix))
            for v in rescanned:
                self.versions[v.key.relpath] = v
            fresh = self.hasher.digest(rescanned, False, self.progress_start)
            self._merge(fresh, rescanned)
            return self._publish()

    def _merge(self, fresh: Digests, rescanned: list[ScannedVersion]) -> None:
        live = {f.path for v in self.versions.values() for f in v.files.values()}
        redone = {f.path for v in rescanned for f in v.files.values()}
        files = {p: d for p, d in self.digests.files.items() if p in live and p not in redone}
        files.update(fresh.files)
        combined = {
            k: d
            for k, d in self.digests.combined.items()
            if k[0] in live and k[1] in live and k[1] not in redone and k[0] not in redone
        }
        combined.update(fresh.combined)
        self.digests = Digests(files=files, combined=combined, failed=set(fresh.failed))

    def _publish(self) -> bool:
        hidden = self.hidden()
        shown = [v for v in self.versions.values() if v.path not in hidden]
        self.products = build_products(shown, self.digests, self.paths.root_dir)
        changed = publish(self.paths.streams_dir, self.products)
        # <root>/streams/index.html, when its bytes change or it is missing
        write_page(self.paths.root_dir, self.products)
        if changed:
            for listener in self.on_publish:
                listener()
        return changed


def _under(rel: str, prefix: str) -> bool:
    return prefix == "" or rel == prefix or rel.startswith(prefix + "/")


def _outermost(prefixes: Iterable[str]) -> list[str]:
    """Drops prefixes inside others: rescanning the outer one covers them."""
    out: list[str] = []
    for p in sorted(set(prefixes), key=lambda p: (p.count("/"), p)):
        p = p.strip("/")
        if not any(_under(p, o) for o in out):
            out.append(p)
    return out
