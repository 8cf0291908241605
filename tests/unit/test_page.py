"""The catalog page: what it lists, how it escapes, that it is deterministic and self-contained."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import page as page_module
from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.model import Product, Version, version_from_json
from lxd_image_server.catalog.page import (
    OLDER_VERSIONS,
    OPEN_VERSIONS,
    PAGE_PATH,
    SCRIPT,
    STYLE,
    Image,
    PageCache,
    content_security_policy,
    human_size,
)
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.publish import publish
from lxd_image_server.config import Paths
from lxd_image_server.service.nginx import SiteSettings, render_locations
from lxd_image_server.tree.layout import serial_time

from .helpers import blob, model_products, sha, version_dir, write

UPDATED = "Fri, 05 Jan 2024 10:00:00 +0000"
FP_SQUASHFS, FP_VM, FP_ROOTXZ, FP_UNIFIED = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
META_SHA = "e" * 64  # the metadata tarball's own hash: never a fingerprint


def item(ftype: str, size: int, sha256: str = "f" * 64, **extra: str) -> dict[str, Any]:
    return {"ftype": ftype, "path": f"images/x/{ftype}", "size": size, "sha256": sha256, **extra}


def split_items(meta_size: int = 800, vm: bool = True) -> dict[str, Any]:
    meta = item("lxd.tar.xz", meta_size, META_SHA, combined_squashfs_sha256=FP_SQUASHFS)
    items = {"squashfs": item("squashfs", 1_234_567)}
    if vm:
        meta["combined_disk-kvm-img_sha256"] = FP_VM
        items["disk-kvm.img"] = item("disk-kvm.img", 512 * 1024 * 1024)
    items["lxd.tar.xz"] = meta
    items["incus.tar.xz"] = dict(meta, ftype="incus.tar.xz")
    return items


def rootxz_items() -> dict[str, Any]:
    meta = item(
        "lxd.tar.xz", 700, META_SHA, combined_rootxz_sha256=FP_ROOTXZ, combined_sha256=FP_ROOTXZ
    )
    return {"lxd.tar.xz": meta, "root.tar.xz": item("root.tar.xz", 2048)}


def unified_items() -> dict[str, Any]:
    return {
        "lxd_combined.tar.gz": item("lxd_combined.tar.gz", 99, FP_UNIFIED),
        "incus_combined.tar.gz": item("incus_combined.tar.gz", 99, FP_UNIFIED),
    }


def product(
    os_: str, release: str, arch: str, variant: str, aliases: str, versions: dict[str, Any]
) -> dict[str, Any]:
    return {
        "os": os_,
        "release": release,
        "release_title": release,
        "arch": arch,
        "variant": variant,
        "aliases": aliases,
        "versions": {s: {"items": i} for s, i in versions.items()},
    }


PRODUCTS = {
    "busybox:1.35:amd64:default": product(
        "busybox",
        "1.35",
        "amd64",
        "default",
        "busybox/1.35/default,busybox/1.35,busybox/1.35/amd64/default",
        {"20240105_10:00": split_items(), "20240101_1200": split_items(vm=False)},
    ),
    "busybox:1.35:amd64:rootxz": product(
        "busybox",
        "1.35",
        "amd64",
        "rootxz",
        "busybox/1.35/rootxz",
        {"202401031545": rootxz_items()},
    ),
    "alpine:3.19:arm64:unified": product(
        "alpine", "3.19", "arm64", "unified", "", {"20240102_0800": unified_items()}
    ),
}


def as_model(products: dict[str, Any]) -> dict[str, Product]:
    """The products the writer would hand to the page (those written here as images.json
    holds them, read into the model)."""
    return {
        k: p if isinstance(p, Product) else model_products({k: p})[k] for k, p in products.items()
    }


def render_page(products: dict[str, Any], **kwargs: Any) -> str:
    return page_module.render_page(as_model(products), **kwargs)


def write_page(root_dir: str, products: dict[str, Any], **kwargs: Any) -> bool:
    return page_module.write_page(root_dir, as_model(products), **kwargs)


def version_images(items: dict[str, Any]) -> list[Image]:
    return page_module.version_images(version_from_json("s", {"items": items}, "s"))


class Dom(HTMLParser):
    """Just enough of a DOM for the assertions: elements with attributes, and text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.texts: list[str] = []
        self.raw: dict[str, list[str]] = {"script": [], "style": []}
        self._in: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag in self.raw:
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self.raw[self._in].append(data)
        else:
            self.texts.append(data)

    def tags(self, name: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == name]

    def attr_values(self, attr: str) -> list[str]:
        return [a[attr] for _, a in self.elements if attr in a]

    @property
    def text(self) -> str:
        return "".join(self.texts)


def sha256_b64(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


# ---------------------------------------------------------------------------------------------
# what the page lists


def test_version_images_are_what_clients_see() -> None:
    assert version_images(split_items()) == [
        Image("container", "squashfs", FP_SQUASHFS, 800 + 1_234_567),
        Image("virtual-machine", "disk-kvm.img", FP_VM, 800 + 512 * 1024 * 1024),
    ]
    assert version_images(rootxz_items()) == [
        Image("container", "root.tar.xz", FP_ROOTXZ, 700 + 2048)
    ]
    assert version_images(unified_items()) == [Image("container", "unified", FP_UNIFIED, 99)]
    # an Incus-only metadata item still names the images; keys are free, ftype counts
    incus_only = {
        "m": item("incus.tar.xz", 5, META_SHA, combined_squashfs_sha256=FP_SQUASHFS),
        "r": item("squashfs", 7),
    }
    assert version_images(incus_only) == [Image("container", "squashfs", FP_SQUASHFS, 12)]
    # a root without its combined fingerprint is no image
    no_fp = {"lxd.tar.xz": item("lxd.tar.xz", 1), "squashfs": item("squashfs", 1)}
    assert version_images(no_fp) == []
    assert version_images({"lxd.tar.xz": item("lxd.tar.xz", 1)}) == []


def test_many_versions_list_the_newest_and_count_the_rest() -> None:
    """A product of thousands of versions (issue 13): the page shows the newest, folds a few
    older ones and says how many more there are; it does not grow with them."""

    def page_of(n: int) -> str:
        versions = {f"2024{i:08d}": split_items() for i in range(n)}
        return render_page(
            {
                "busybox:1.35:amd64:default": product(
                    "busybox", "1.35", "amd64", "default", "", versions
                )
            },
            updated=UPDATED,
        )

    dom = Dom(page_of(3000))
    serials = dom.attr_values("data-serial")
    assert serials == [
        f"2024{i:08d}" for i in range(2999, 2999 - OPEN_VERSIONS - OLDER_VERSIONS, -1)
    ]
    assert f"{2999} older versions" in dom.text
    assert f"{2999 - OLDER_VERSIONS} older versions not listed here" in dom.text
    assert "1 product, 3000 versions, 6000 images" in dom.text
    assert len(page_of(3000)) - len(page_of(30)) < 100
    # up to the limit, every version is there and nothing says otherwise
    few = Dom(page_of(OPEN_VERSIONS + OLDER_VERSIONS))
    assert len(few.attr_values("data-serial")) == OPEN_VERSIONS + OLDER_VERSIONS
    assert "not listed here" not in few.text


def test_a_cache_reads_again_only_the_versions_shown_and_those_changed(monkeypatch) -> None:
    """With a PageCache (the pipeline's), a render reads the images of the versions it shows
    and of those whose items are new since the last render; the rest come from the cache.
    The bytes are those of a render without it."""
    key = "busybox:1.35:amd64:default"
    raw = {f"2024{i:08d}": split_items() for i in range(100)}
    raw["202400000000"] = unified_items()  # the oldest: not shown, counted
    products = as_model({key: product("busybox", "1.35", "amd64", "", "", raw)})
    versions = dict(products[key].versions)
    reads: list[str] = []
    real = page_module.version_images

    def spy(version: Version) -> list[Image]:
        reads.append(version.serial)
        return real(version)

    monkeypatch.setattr(page_module, "version_images", spy)
    cache = PageCache()
    first = render_page(products, updated=UPDATED, cache=cache)
    assert len(reads) == 100 and first == render_page(products, updated=UPDATED)
    assert "1 product, 100 versions, 199 images" in first
    shown = OPEN_VERSIONS + OLDER_VERSIONS
    reads.clear()
    assert render_page(products, updated=UPDATED, cache=cache) == first
    assert sorted(reads) == sorted(versions)[-shown:]
    # an old version changed (new items) and a new version added: read, and counted right
    for serial, items in (("202400000001", split_items(vm=False)), ("202500000000", split_items())):
        versions[serial] = version_from_json(serial, {"items": items}, serial)
    changed = {key: dataclasses.replace(products[key], versions=versions)}
    expected = render_page(changed, updated=UPDATED)
    reads.clear()
    assert render_page(changed, updated=UPDATED, cache=cache) == expected
    assert "1 product, 101 versions, 200 images" in expected
    assert "202400000001" in reads and len(reads) == shown + 1


def test_page_lists_every_product_version_and_image() -> None:
    page = render_page(PRODUCTS, updated=UPDATED)
    dom = Dom(page)
    assert dom.attr_values("data-product") == sorted(PRODUCTS)
    serials = dom.attr_values("data-serial")
    assert sorted(serials) == sorted(s for p in PRODUCTS.values() for s in p["versions"])
    # newest first within a product
    assert serials.index("20240105_10:00") < serials.index("20240101_1200")
    fingerprints = [t for t in dom.texts if re.fullmatch(r"[0-9a-f]{64}", t)]
    assert fingerprints == [FP_UNIFIED, FP_SQUASHFS, FP_VM, FP_SQUASHFS, FP_ROOTXZ]
    assert META_SHA not in page
    text = dom.text
    assert "3 products, 4 versions, 5 images" in text
    assert UPDATED in text
    # sizes, human and exact; dates from the serials
    assert "1.2 MiB" in text and "1,235,367 bytes" in text
    assert "512.0 MiB" in text and f"{800 + 512 * 1024 * 1024:,} bytes" in text
    assert "99 B" in text and "99 bytes" in text
    times = [a["datetime"] for a in dom.tags("time")]
    assert times == ["2024-01-02T08:00", "2024-01-05T10:00", "2024-01-01T12:00", "2024-01-03T15:45"]
    # aliases, and launch lines by the shortest alias (VM line only where there is a VM)
    for alias in ("busybox/1.35/default", "busybox/1.35", "busybox/1.35/amd64/default"):
        assert alias in dom.texts
    assert "lxc launch myimages:busybox/1.35" in dom.texts
    assert "lxc launch myimages:busybox/1.35 --vm" in dom.texts
    assert "lxc launch myimages:busybox/1.35/rootxz" in dom.texts
    assert "lxc launch myimages:busybox/1.35/rootxz --vm" not in dom.texts
    # no alias at all: the product launches by its newest fingerprint
    assert f"lxc launch myimages:{FP_UNIFIED}" in dom.texts
    # per image, a copy button carries the exact launch line
    copies = dom.attr_values("data-copy")
    assert f"lxc launch myimages:{FP_VM} --vm" in copies
    assert f"lxc launch myimages:{FP_ROOTXZ}" in copies
    assert len(copies) == 5


def test_remote_add_line_has_a_fallback_the_script_replaces() -> None:
    dom = Dom(render_page(PRODUCTS, remote_name="lab"))
    assert "https://SERVER" in dom.texts
    origin_spans = [a for a in dom.tags("span") if a.get("class") == "origin"]
    assert len(origin_spans) == 1
    assert "lxc remote add lab https://SERVER --protocol simplestreams" in dom.text
    assert "lxc launch lab:busybox/1.35" in dom.texts
    assert "loc.origin" in SCRIPT


def test_requirements_codename_and_eol_are_shown() -> None:
    p = dict(PRODUCTS["busybox:1.35:amd64:rootxz"])
    p.update(
        release_codename="bookworm",
        support_eol="2028-06-30",
        requirements={"secureboot": "false", "nesting": "true"},
    )
    text = Dom(render_page({"debian:12:amd64:rootxz": p})).text
    assert "bookworm" in text and "2028-06-30" in text
    assert "nesting=true, secureboot=false" in text


def test_empty_catalog() -> None:
    page = render_page({}, updated=UPDATED)
    dom = Dom(page)
    assert "No images are published yet." in dom.text
    assert "0 products, 0 versions, 0 images" in dom.text
    assert dom.attr_values("data-product") == []
    assert "lxc remote add myimages https://SERVER --protocol simplestreams" in dom.text
    assert page.startswith("<!DOCTYPE html>")
    assert render_page({}) == render_page({})


# ---------------------------------------------------------------------------------------------
# escaping

HOSTILE = "<script>alert(\"x\")</script> & 'q' <img src=x onerror=alert(1)>"


def hostile_products() -> dict[str, Any]:
    p = product(
        '"><b>os',
        "1.0",
        "amd64",
        "v<i>",
        f"{HOSTILE},a&b",
        {'20240101_12:00"><b>': split_items(vm=False), "20240102_1200": unified_items()},
    )
    p["release_title"] = HOSTILE
    p["release_codename"] = "</dd><b>x</b>"
    p["support_eol"] = "'onmouseover='alert(1)"
    p["requirements"] = {"<k>": '"v"'}
    p["versions"]["20240102_1200"]["items"]["lxd_combined.tar.gz"]["sha256"] = '"><b>fp'
    return {'key"><b>:1.0:amd64:v': p}


def test_hostile_values_are_escaped() -> None:
    page = render_page(hostile_products(), updated="<b>updated</b>", title="<b>title</b>")
    dom = Dom(page)
    # the only elements are the page's own: no injected tag made it through
    assert {t for t, _ in dom.elements} <= {
        "html", "head", "meta", "link", "title", "style", "script", "body", "main", "header",
        "h1", "p", "div", "code", "span", "button", "input", "section", "h2", "a", "dl", "dt",
        "dd", "h3", "time", "ul", "li", "details", "summary", "footer",
    }  # fmt: skip
    assert len(dom.tags("script")) == 1
    assert not dom.tags("b") and not dom.tags("img") and not dom.tags("i")
    # no attribute was broken out of: every attribute name is one the page writes
    names = {k for _, a in dom.elements for k in a}
    assert names <= {
        "lang", "charset", "name", "content", "http-equiv", "rel", "href", "class", "type",
        "hidden", "id", "placeholder", "aria-label", "data-product", "data-search", "data-serial",
        "data-kind", "data-copy", "title", "datetime",
    }  # fmt: skip
    # and the values read back exactly as they were on disk
    text = dom.text
    assert HOSTILE in text
    assert "</dd><b>x</b>" in text and "'onmouseover='alert(1)" in text
    assert '<k>="v"' in text
    assert "<b>updated</b>" in text
    assert [a["content"] for a in dom.tags("meta") if a.get("name") == "viewport"]
    assert dom.attr_values("data-product") == ['key"><b>:1.0:amd64:v']
    assert '20240101_12:00"><b>' in dom.attr_values("data-serial")
    assert HOSTILE in dom.texts  # as an alias
    assert "lxc launch myimages:a&b" in dom.texts  # the shortest alias
    assert 'lxc launch myimages:"><b>fp' in dom.attr_values("data-copy")
    # nothing from the data is raw in the markup
    for raw in ("<script>alert", "<img", "<b>", "<i>", "'onmouseover='"):
        assert raw not in page.replace(f"<script>{SCRIPT}</script>", "")


def test_script_builds_no_html() -> None:
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in SCRIPT
    assert "textContent" in SCRIPT and "dataset" in SCRIPT


# ---------------------------------------------------------------------------------------------
# self-contained and deterministic


def test_csp_allows_exactly_the_inline_script_and_style() -> None:
    page = render_page(PRODUCTS, updated=UPDATED)
    dom = Dom(page)
    csp = [
        a["content"] for a in dom.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"
    ]
    assert len(csp) == 1
    directives = dict(d.strip().split(" ", 1) for d in csp[0].split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == f"'sha256-{sha256_b64(''.join(dom.raw['script']))}'"
    assert directives["style-src"] == f"'sha256-{sha256_b64(''.join(dom.raw['style']))}'"
    assert "unsafe-inline" not in csp[0] and "http" not in csp[0]
    # nothing loads from elsewhere: every link is a path on this server, an anchor or data:
    for _, attrs in dom.elements:
        for key in ("src", "href"):
            if key in attrs:
                assert (
                    not re.match(r"^[a-z][a-z0-9+.-]*:(?!,)", attrs[key]) or attrs[key] == "data:,"
                )
                assert not attrs[key].startswith("//")
    assert "@import" not in STYLE and "url(" not in STYLE


def test_the_assets_are_the_package_files_and_shipped() -> None:
    """The page's CSS and JS are the files of page_assets/, hashed as they are on disk, and
    setup.py's package_data names each of them (so the wheel and the .deb carry them)."""
    top = Path(__file__).resolve().parents[2]
    assets = top / "lxd_image_server" / "catalog" / "page_assets"
    files = sorted(p.name for p in assets.iterdir() if p.is_file())
    assert files == ["page.css", "page.js"]
    assert STYLE.encode() == (assets / "page.css").read_bytes()
    assert SCRIPT.encode() == (assets / "page.js").read_bytes()
    policy = content_security_policy()
    for name in files:
        digest = base64.b64encode(hashlib.sha256((assets / name).read_bytes()).digest())
        assert f"'sha256-{digest.decode()}'" in policy
    setup = (top / "setup.py").read_text()
    shipped = re.search(r'"lxd_image_server\.catalog": \[([^\]]*)\]', setup)
    assert shipped is not None
    for name in files:
        assert f'"page_assets/{name}"' in shipped.group(1)


def test_output_is_deterministic() -> None:
    first = render_page(PRODUCTS, updated=UPDATED)
    reordered = {k: PRODUCTS[k] for k in reversed(list(PRODUCTS))}
    reordered["busybox:1.35:amd64:default"] = dict(
        reordered["busybox:1.35:amd64:default"],
        versions=dict(reversed(list(PRODUCTS["busybox:1.35:amd64:default"]["versions"].items()))),
    )
    assert render_page(reordered, updated=UPDATED) == first
    assert render_page(json.loads(json.dumps(PRODUCTS)), updated=UPDATED) == first
    # the only timestamp is the catalog's own
    other = render_page(PRODUCTS, updated="Sat, 06 Jan 2024 10:00:00 +0000")
    assert other.replace("Sat, 06 Jan", "Fri, 05 Jan") == first
    assert str(dt.date.today().year) not in render_page({}, updated=None)


@pytest.mark.parametrize(
    ("n", "shown"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB")],
)
def test_human_size(n: int, shown: str) -> None:
    assert human_size(n) == shown


def test_serial_time() -> None:
    assert serial_time("20240105_10:00") == dt.datetime(2024, 1, 5, 10, 0)
    assert serial_time("20240105_1000") == dt.datetime(2024, 1, 5, 10, 0)
    assert serial_time("202401051000") == dt.datetime(2024, 1, 5, 10, 0)
    assert serial_time("20240105") == dt.datetime(2024, 1, 5)
    assert serial_time("20241399") is None


# ---------------------------------------------------------------------------------------------
# writing


def test_write_page_is_atomic_and_only_when_changed(tmp_path: Path) -> None:
    streams = tmp_path / "streams" / "v1"
    state = str(tmp_path / "state")
    when = dt.datetime(2024, 1, 5, 10, 0, tzinfo=dt.UTC)
    publish(str(streams), as_model(PRODUCTS), when, state_dir=state)
    assert write_page(str(tmp_path), PRODUCTS, state_dir=state)
    page = tmp_path / "streams" / "index.html"
    assert page.read_text() == render_page(PRODUCTS, updated=UPDATED)
    assert page.stat().st_mode & 0o777 == 0o644
    mtime = page.stat().st_mtime_ns
    assert not write_page(str(tmp_path), PRODUCTS, state_dir=state)
    assert page.stat().st_mtime_ns == mtime
    assert write_page(str(tmp_path), {}, state_dir=state)
    assert "No images are published yet." in page.read_text()
    # nothing at the root, which the catalog writer may not own (the package's is root's)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "streams"]
    assert sorted(p.name for p in (tmp_path / "streams").iterdir()) == ["index.html", "v1"]


def test_write_page_makes_streams_when_missing(tmp_path: Path) -> None:
    assert write_page(str(tmp_path), {}, updated=None)
    assert (tmp_path / "streams" / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streams"]


def test_nginx_serves_the_page_at_the_root() -> None:
    conf = render_locations(SiteSettings(root_dir="/srv/root", upload_socket="/run/u.sock"))
    block = conf.split("location = / {", 1)[1].split("\n}", 1)[0]
    assert f"try_files /{PAGE_PATH} @about;" in block


def test_pipeline_writes_the_page_and_restores_it(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    meta, root = blob(300, 1), blob(5000, 2)
    d = version_dir(tmp_path / "images")
    write(d / "lxd.tar.xz", meta)
    write(d / "rootfs.squashfs", root)
    paths = Paths.resolve(root_dir=str(tmp_path), state_dir=str(tmp_path / "state"))
    cache = HashCache(None)
    request.addfinalizer(cache.close)
    pipeline = Pipeline(paths, cache)
    assert pipeline.update_all()
    page = tmp_path / "streams" / "index.html"
    dom = Dom(page.read_text())
    assert dom.attr_values("data-product") == ["busybox:1.35:amd64:default"]
    assert sha(meta, root) in dom.texts
    updated = json.loads((tmp_path / "streams/v1/images.json").read_text())["updated"]
    assert updated in dom.text
    # an unchanged catalog still brings back a missing page, with the same bytes
    before = page.read_bytes()
    page.unlink()
    assert not pipeline.update_all()
    assert page.read_bytes() == before


# -- what the page reads is bounded (issue 9, finding 3) -----------------------------------------


@pytest.mark.parametrize("kind", ["nested", "dev-zero", "fifo"])
def test_hostile_record_or_images_json_does_not_stop_the_page(
    tmp_path: Path, kind: str, caplog
) -> None:
    """The page takes the catalog's `updated` from the writer's record (published.py), never
    from images.json; neither, made hostile, stops it."""
    streams = tmp_path / "streams" / "v1"
    streams.mkdir(parents=True)
    state = tmp_path / "state"
    state.mkdir()
    for target in (streams / "images.json", state / "published.json"):
        if kind == "nested":
            target.write_text('{"updated": ' + "[" * 100_000)
        elif kind == "dev-zero":
            target.symlink_to("/dev/zero")
        else:
            os.mkfifo(target)
    assert write_page(str(tmp_path), {}, state_dir=str(state)) is True
    assert "catalog updated" not in (tmp_path / PAGE_PATH).read_text()
    assert (tmp_path / PAGE_PATH).is_file()
