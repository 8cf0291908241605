"""The catalog page: the writer's products (model.Product) -> one static, self-contained
index.html.

It lives in <root>/streams/ (streams/index.html), next to the catalog it shows: streams/ is the
catalog writer's everywhere, while the root itself may belong to root alone (the Debian
package's root is lxdadm's sftp chroot). nginx serves it at `/` (locations.conf.in), and a
push carries it to the mirrors with the catalog.

`render_page` is a pure function of its arguments (same input, same bytes): it lists every
product with its versions and, per version, the images a client sees (one per root
filesystem, or the unified tarball) with their fingerprints, sizes and ready-to-copy `lxc`
lines. Every value taken from the catalog goes through `html.escape(quote=True)`.

The page loads nothing from anywhere: CSS and JS (the package files page_assets/page.css and
page.js) are inline and allowed by their sha256 in a Content-Security-Policy that forbids
everything else. The remote URL cannot be known when the
file is written (nginx may be reached under any name), so a tiny script fills it in from
`window.location.origin`; without JS the page still reads well, with a placeholder URL.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import html
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources

from lxd_image_server.catalog import published
from lxd_image_server.catalog.model import Product, Version
from lxd_image_server.catalog.publish import PublishError, write_atomic
from lxd_image_server.fsutil import holds
from lxd_image_server.tree.layout import serial_sort_key, serial_time

log = logging.getLogger(__name__)

PAGE_NAME = "index.html"
#: Where the page is, relative to the served root.
PAGE_PATH = f"streams/{PAGE_NAME}"
DEFAULT_TITLE = "LXD image server"
#: The remote name the page suggests; not "images", which LXD already defines.
DEFAULT_REMOTE = "myimages"
#: Shown where the remote URL goes until the script replaces it with the page's origin.
URL_PLACEHOLDER = "https://SERVER"
#: Versions shown open per product; older ones are folded into a <details>.
OPEN_VERSIONS = 1
#: Older versions listed in that <details>; beyond them, one line says how many more there
#: are (`lxc image list` shows them all). The page stays readable, and as cheap to write at
#: 20,000 versions as at 200.
OLDER_VERSIONS = 9

CONTAINER = "container"
VM = "virtual-machine"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Image:
    """One image of a version, as `lxc image list` shows it."""

    #: "container" or "virtual-machine"
    kind: str
    #: what the root is: "squashfs", "root.tar.xz", "disk-kvm.img" or "unified"
    form: str
    fingerprint: str
    #: metadata + root (or the unified tarball), what the client downloads; None if unknown
    size: int | None


def version_images(version: Version) -> list[Image]:
    """The images a client builds from one version (model.Version.client_images: a metadata
    item with a combined fingerprint for a root present gives one image per root, a unified
    tarball one image)."""
    return [Image(i.type, i.root, i.fingerprint, i.size) for i in version.client_images()]


#: what the page needs of a version it does not show: how many images, of which kinds
Summary = tuple[int, frozenset[str]]


class PageCache:
    """What each version gave at the last render (how many images, which kinds), kept with the
    Version itself (model.Version.derived: a Version is not changed once built, a changed
    version is a new one, and the writer keeps a version's model as it is between publishes),
    so the watcher's page reads only the versions that changed, and those it shows. Nothing is
    kept here per version (a version no longer published takes its summary with it); equal
    summaries are one object (a catalog holds a handful of different ones)."""

    def __init__(self) -> None:
        self._summaries: dict[Summary, Summary] = {}

    def summary(self, version: Version, images: Callable[[], list[Image]]) -> Summary:
        def make(_: Version) -> Summary:
            found = images()
            summary = (len(found), frozenset(i.kind for i in found))
            return self._summaries.setdefault(summary, summary)

        return version.derived("page", make)


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _aliases(product: Product) -> list[str]:
    return [a.strip() for a in product.aliases if a.strip()]


# ---------------------------------------------------------------------------------------------
# Inline assets: package files (page_assets/), emitted byte for byte as they are, since their
# sha256 (of those same bytes) goes into the Content-Security-Policy.


def _asset(name: str) -> str:
    return (
        (resources.files(__package__ or __name__) / "page_assets" / name)
        .read_bytes()
        .decode("utf-8")
    )


STYLE = _asset("page.css")
SCRIPT = _asset("page.js")


def csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def content_security_policy(script: str = SCRIPT, style: str = STYLE) -> str:
    """Nothing may load from anywhere; only these exact inline script and style may run."""
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {csp_hash(script)}",
            f"style-src {csp_hash(style)}",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Rendering


def _cmd(code_html: str) -> str:
    """A command line and its copy button (hidden until the script can make it work)."""
    return (
        f'<div class="cmd"><code>{code_html}</code>'
        '<button type="button" class="copy" hidden>copy</button></div>'
    )


def _launch_line(remote: str, target: str, kind: str) -> str:
    return f"lxc launch {remote}:{target}" + (" --vm" if kind == VM else "")


def _render_image(image: Image, remote: str) -> str:
    tag = "vm" if image.kind == VM else "ct"
    label = "VM" if image.kind == VM else "container"
    if image.size is None:
        size = '<span class="size">size unknown</span>'
    else:
        size = (
            f'<span class="size">{esc(human_size(image.size))}'
            f'<span class="exact muted">{image.size:,} bytes</span></span>'
        )
    line = _launch_line(remote, image.fingerprint, image.kind)
    return (
        f'<li class="image" data-kind="{esc(image.kind)}">'
        f'<span><span class="tag {tag}">{label}</span> '
        f'<span class="muted mono">{esc(image.form)}</span></span>'
        f"{size}"
        f'<span class="fp"><span class="muted">fingerprint </span>'
        f"<code>{esc(image.fingerprint)}</code></span>"
        f'<button type="button" class="copy" hidden data-copy="{esc(line)}" '
        f'title="{esc(line)}">copy launch</button>'
        "</li>"
    )


def _render_version(serial: str, images: list[Image], remote: str, newest: bool) -> str:
    when = serial_time(serial)
    if when is None:
        date = '<span class="muted">no date</span>'
    else:
        shown = when.strftime("%Y-%m-%d %H:%M") if len(serial) > 8 else when.strftime("%Y-%m-%d")
        date = f'<time datetime="{esc(when.isoformat(timespec="minutes"))}">{esc(shown)}</time>'
    rows = "".join(_render_image(i, remote) for i in images)
    if not rows:
        rows = '<li class="image muted">no image a client can use</li>'
    badge = ' <span class="tag">newest</span>' if newest else ""
    return (
        f'<div class="version" data-serial="{esc(serial)}">'
        f'<h3><span class="serial mono">{esc(serial)}</span> '
        f'<span class="muted">{date}</span>{badge}</h3>'
        f'<ul class="images">{rows}</ul></div>'
    )


class _Product:
    """A product's versions as the page sees them: serials newest first, the images of a
    version read when asked (only those shown, or from `cache`'s summary otherwise)."""

    def __init__(self, product: Product, cache: PageCache | None) -> None:
        self.versions = product.versions
        self.serials = sorted(self.versions, key=serial_sort_key, reverse=True)
        self._images: dict[str, list[Image]] = {}
        self.count = 0
        kinds: set[str] = set()
        for s in self.serials:
            if cache is None:
                found = self.images(s)
                self.count += len(found)
                kinds.update(i.kind for i in found)
            else:
                n, k = cache.summary(self.versions[s], functools.partial(self.images, s))
                self.count += n
                kinds |= k
        self.kinds = sorted(kinds)

    def images(self, serial: str) -> list[Image]:
        found = self._images.get(serial)
        if found is None:
            found = self._images[serial] = version_images(self.versions[serial])
        return found


def _render_product(key: str, product: Product, view: _Product, remote: str) -> str:
    title = product.release_title or product.release
    os_name = product.os
    aliases = _aliases(product)
    serials = view.serials
    kinds = view.kinds

    facts = [
        ("OS", os_name),
        ("release", product.release),
        ("codename", product.release_codename or ""),
        ("architecture", product.arch),
        ("variant", product.variant),
        ("end of support", product.support_eol or ""),
    ]
    requirements = product.requirements
    if requirements:
        facts.append(
            ("requires", ", ".join(f"{k}={requirements[k]}" for k in sorted(requirements)))
        )
    facts_html = "".join(
        f"<div><dt>{esc(name)}</dt><dd>{esc(value)}</dd></div>" for name, value in facts if value
    )
    if aliases:
        alias_html = "".join(f"<code>{esc(a)}</code>" for a in aliases)
        aliases_html = f'<p class="aliases"><span class="muted">aliases </span>{alias_html}</p>'
    else:
        aliases_html = '<p class="aliases muted">no aliases: launch by fingerprint</p>'

    launches = []
    for kind in kinds:
        # the shortest alias is what people type; it names the newest version
        target = min(aliases, key=len) if aliases else _newest(view, kind)
        if target:
            launches.append(_cmd(esc(_launch_line(remote, target, kind))))

    shown = [
        _render_version(s, view.images(s), remote, i == 0)
        for i, s in enumerate(serials[:OPEN_VERSIONS])
    ]
    older = [
        _render_version(s, view.images(s), remote, False)
        for s in serials[OPEN_VERSIONS : OPEN_VERSIONS + OLDER_VERSIONS]
    ]
    if older:
        n = len(serials) - OPEN_VERSIONS
        more = n - len(older)
        if more:
            older.append(
                f'<p class="muted">{more} older version{"s" if more != 1 else ""} not listed '
                f"here: <code>lxc image list {esc(remote)}:</code> shows every image.</p>"
            )
        shown.append(
            f"<details><summary>{n} older version{'s' if n != 1 else ''}</summary>"
            + "".join(older)
            + "</details>"
        )
    search = " ".join([key, title, os_name, *aliases]).lower()
    anchor = "p-" + key
    prefix = os_name if os_name and os_name.lower() not in title.lower() else ""
    heading = f"{prefix} {title}".strip()
    return (
        f'<section class="product" id="{esc(anchor)}" data-product="{esc(key)}" '
        f'data-search="{esc(search)}">'
        f'<h2><a href="#{esc(anchor)}">{esc(heading or key)}</a> '
        f'<span class="key mono">{esc(key)}</span></h2>'
        f'<dl class="facts">{facts_html}</dl>'
        f"{aliases_html}"
        + "".join(launches)
        + '<div class="versions">'
        + "".join(shown)
        + "</div></section>"
    )


def _newest(view: _Product, kind: str) -> str:
    for s in view.serials:
        for image in view.images(s):
            if image.kind == kind:
                return image.fingerprint
    return ""


def render_page(
    products: Mapping[str, Product],
    *,
    updated: str | None = None,
    title: str = DEFAULT_TITLE,
    remote_name: str = DEFAULT_REMOTE,
    cache: PageCache | None = None,
) -> str:
    """The whole page. `updated` is the catalog's own timestamp (the only one shown).
    `cache`: what the last render found in the versions not shown, reused (PageCache)."""
    return "".join(
        _page_parts(products, updated=updated, title=title, remote_name=remote_name, cache=cache)
    )


def _page_parts(
    products: Mapping[str, Product],
    *,
    updated: str | None,
    title: str,
    remote_name: str,
    cache: PageCache | None,
) -> list[str]:
    """render_page's text in pieces: the head, each product's section, the tail."""
    remote = remote_name
    keys = sorted(products)
    per_product = {k: _Product(products[k], cache) for k in keys}
    n_versions = sum(len(p.serials) for p in per_product.values())
    n_images = sum(p.count for p in per_product.values())
    body = [_render_product(k, products[k], per_product.pop(k), remote) for k in keys]
    if not keys:
        body = ['<p class="empty">No images are published yet.</p>']

    remote_add = (
        f'lxc remote add {esc(remote)} <span class="origin">{esc(URL_PLACEHOLDER)}</span> '
        "--protocol simplestreams"
    )
    counts = (
        f"{len(keys)} product{'s' if len(keys) != 1 else ''}, "
        f"{n_versions} version{'s' if n_versions != 1 else ''}, "
        f"{n_images} image{'s' if n_images != 1 else ''}"
    )
    updated_html = f", catalog updated {esc(updated)}" if updated else ""
    search = (
        '<p><input type="search" id="filter" hidden placeholder="Filter: name, alias, arch…" '
        'aria-label="Filter the images"></p>'
        if keys
        else ""
    )
    head = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(content_security_policy())}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n"
        f"<style>{STYLE}</style>\n"
        "</head>\n<body>\n<main>\n"
        f"<header><h1>{esc(title)}</h1>"
        f'<p class="summary muted">{counts}{updated_html}</p>'
        "<p>Add this server as a remote (once per client machine):</p>"
        f"{_cmd(remote_add)}"
        '<p class="muted">With Incus, type <code>incus</code> instead of <code>lxc</code>. '
        "Launch the newest version of an image by its alias, or an exact image by its "
        "fingerprint.</p>"
        f"{search}</header>\n"
        '<div id="products">'
    )
    tail = (
        "</div>\n"
        # absolute: the same page is served at / and at /streams/index.html
        '<footer class="muted">Catalog: <a href="/streams/v1/index.json">streams/v1/index.json'
        '</a>, <a href="/streams/v1/images.json">streams/v1/images.json</a></footer>\n'
        "</main>\n"
        f"<script>{SCRIPT}</script>\n"
        "</body>\n</html>\n"
    )
    return [head, *body, tail]


def page_path(root_dir: str) -> str:
    """The page's file below the served root `root_dir`."""
    return os.path.join(root_dir, *PAGE_PATH.split("/"))


def write_page(
    root_dir: str,
    products: Mapping[str, Product],
    *,
    updated: str | None = None,
    state_dir: str | None = None,
    title: str = DEFAULT_TITLE,
    remote_name: str = DEFAULT_REMOTE,
    cache: PageCache | None = None,
) -> bool:
    """Writes <root>/streams/index.html atomically if its content changed (or it is missing).

    `updated` defaults to the published catalog's own, as the writer's state directory
    `state_dir` records it (published.py). Returns True when written. The caller holds
    `catalog_lock`, as for the catalog. `cache`: see render_page.
    """
    if updated is None and state_dir is not None:
        updated = published.read_updated(state_dir)
    # (in pieces, each product's section on its own: the page is never held whole, as text
    # nor as bytes, nor read back whole to compare)
    data = [
        part.encode()
        for part in _page_parts(
            products, updated=updated, title=title, remote_name=remote_name, cache=cache
        )
    ]
    path = page_path(root_dir)
    if holds(path, data):
        return False  # (missing, not a regular file or other bytes: replaced)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, data)
    except OSError as e:
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise PublishError(f"cannot write the catalog page {path}: {reason}") from e
    log.info("wrote the catalog page %s", path)
    return True
