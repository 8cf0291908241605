"""The catalog page after a publish, and who is told once it is written.

The pipeline tells it of every publish (`published`); the page is then due, and written when
the pipeline says (`write`): at once, or, for the watcher, once no publish is due, so the page
never delays a publish. The listeners (a push to the mirrors) are called after the page of a
publish that changed the catalog is written, whether or not writing it worked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from lxd_image_server.catalog.products import Products

if TYPE_CHECKING:
    from lxd_image_server.catalog.page import PageCache


class PageWriter:
    def __init__(
        self, root_dir: str, state_dir: str, on_publish: Iterable[Callable[[], None]] = ()
    ) -> None:
        self.root_dir = root_dir
        self.state_dir = state_dir
        self.on_publish = tuple(on_publish)
        #: the catalog was published since the page was last written
        self.due = False
        #: a publish since the listeners were last called changed the catalog
        self._notify = False
        #: what the last page found in each version, reused by the next (page.py)
        self._cache: PageCache | None = None

    def published(self, changed: bool) -> None:
        self.due = True
        self._notify = self._notify or changed

    def write(self, products: Products) -> None:
        """<root>/streams/index.html for `products`, when its bytes change or it is missing;
        then the listeners, if the catalog changed."""
        self.due = False
        try:
            # (imported here: a no-change `update` never renders the page)
            from lxd_image_server.catalog.page import PageCache, write_page

            if self._cache is None:
                self._cache = PageCache()
            write_page(self.root_dir, products, state_dir=self.state_dir, cache=self._cache)
        finally:
            if self._notify:
                self._notify = False
                for listener in self.on_publish:
                    listener()
