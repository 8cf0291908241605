"""The catalog page in a real browser: `lxd-image-server update` writes it, nginx serves it over
TLS, headless Chromium (driven over the DevTools protocol, see cdp.py) loads it.

The certificate comes from the same test CA code as the LXD tests (make_pki) but is not put in
any trust store: Chromium keeps its own (NSS), so it runs with --ignore-certificate-errors. The
page is still a secure context (https), which the clipboard API needs. No LXD daemon involved.

Screenshots land in tests/artifacts/ (gitignored) at desktop and phone widths.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog.page import SCRIPT

from .cdp import Cdp, Chromium, Tab
from .servers import REPO, Nginx, free_port, make_pki, run
from .verified import assert_verifies

BIN = Path(sys.executable).parent / "lxd-image-server"
ARTIFACTS = REPO / "tests" / "artifacts"
HOSTILE_TITLE = "<img src=x onerror=alert(1)> & \"friends\" 'too'"
HOSTILE_OS = "Busy</span><b>box"


def sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def fake(label: str, size: int) -> bytes:
    """Small distinct bytes: the catalog hashes files, it never opens them as images."""
    return (label.encode() * (size // len(label) + 1))[:size]


def fake_unified(rootfs_file: bytes) -> bytes:
    """A unified tarball's shape (metadata.yaml, rootfs/): `verify` reads its first entries."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for name, data in (("metadata.yaml", b"architecture: x86_64\n"), ("rootfs/f", rootfs_file)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Site:
    root: Path
    url: str
    catalog: dict[str, Any]
    #: product key -> fingerprints of its images, as clients compute them
    fingerprints: dict[str, set[str]]
    nginx: Nginx

    @property
    def page(self) -> str:
        # streams/index.html, served at / as by the real site (nginx/locations.conf.in)
        return f"{self.url}/"


def write_tree(root: Path) -> dict[str, set[str]]:
    img = root / "images"
    fps: dict[str, set[str]] = {}

    def version(product: str, serial: str, files: dict[str, bytes]) -> None:
        d = img.joinpath(*product.split(":"), serial)
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)

    meta, squashfs, qcow2 = fake("meta1", 700), fake("squash", 150_000), fake("qcow", 300_000)
    version(
        "busybox:1.35:amd64:default",
        "20240105_10:00",
        {"lxd.tar.xz": meta, "rootfs.squashfs": squashfs, "disk.qcow2": qcow2},
    )
    old_meta, old_squashfs = fake("meta0", 650), fake("squash0", 140_000)
    version(
        "busybox:1.35:amd64:default",
        "20240101_1200",
        {"lxd.tar.xz": old_meta, "rootfs.squashfs": old_squashfs},
    )
    fps["busybox:1.35:amd64:default"] = {
        sha256(meta, squashfs),
        sha256(meta, qcow2),
        sha256(old_meta, old_squashfs),
    }

    xz_meta, rootxz = fake("meta2", 600), fake("rootxz", 90_000)
    overrides = {"os": HOSTILE_OS, "release_title": HOSTILE_TITLE, "aliases": ["bb-arm"]}
    version(
        "busybox:1.35:arm64:rootxz",
        "202401031545",
        {
            "lxd.tar.xz": xz_meta,
            "root.tar.xz": rootxz,
            "metadata.json": json.dumps(overrides).encode(),
        },
    )
    fps["busybox:1.35:arm64:rootxz"] = {sha256(xz_meta, rootxz)}

    unified = fake_unified(fake("unified", 120_000))
    fp = sha256(unified)
    version("alpine:3.19:amd64:unified", "20240102_0800", {f"{fp}.tar.gz": unified})
    fps["alpine:3.19:amd64:unified"] = {fp}
    return fps


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("page-site")
    root = work / "root"
    fps = write_tree(root)
    proc = run(
        [BIN, "--state-dir", work / "state", "update", "--root-dir", root], timeout=120, check=False
    )
    assert proc.returncode == 0, f"update exited {proc.returncode}:\n{proc.stderr}"
    assert (root / "streams" / "index.html").is_file(), "update wrote no streams/index.html"
    assert not (root / "index.html").exists()
    catalog = json.loads((root / "streams/v1/images.json").read_text())
    assert sorted(catalog["products"]) == sorted(fps)
    assert_verifies(root)

    pki = make_pki(work / "pki", "page")
    nginx = Nginx(root, pki, work / "nginx", free_port())
    nginx.start()
    try:
        yield Site(root, nginx.url, catalog, fps, nginx)
    finally:
        nginx.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cdp]:
    chromium = Chromium(tmp_path_factory.mktemp("chromium"), ("--ignore-certificate-errors",))
    try:
        yield chromium.start()
    finally:
        chromium.stop()


@pytest.fixture
def tab(browser: Cdp) -> Iterator[Tab]:
    t = Tab(browser)
    try:
        yield t
    finally:
        t.close()


def open_page(tab: Tab, url: str) -> None:
    tab.navigate(url)
    # the script has run: it shows the copy buttons it can drive
    tab.wait_for("document.querySelectorAll('button.copy:not([hidden])').length > 0")


def test_page_loads_cleanly_and_lists_the_catalog(site: Site, tab: Tab) -> None:
    seen = len(site.nginx.requests())
    open_page(tab, site.page)
    assert tab.problems() == []
    dom = tab.evaluate(
        """(() => ({
        products: [...document.querySelectorAll('[data-product]')].map(p => ({
            key: p.dataset.product,
            serials: [...p.querySelectorAll('[data-serial]')].map(v => v.dataset.serial),
            fingerprints: [...p.querySelectorAll('.fp code')].map(c => c.textContent),
            heading: p.querySelector('h2').textContent,
        })),
        remoteAdd: document.querySelector('header .cmd code').textContent,
        injected: document.querySelectorAll('img, b, main script').length,
        secure: window.isSecureContext,
        title: document.title,
        catalogLinks: [...document.querySelectorAll('footer a')].map(a => a.href),
    }))()"""
    )
    products = {p["key"]: p for p in dom["products"]}
    assert sorted(products) == sorted(site.catalog["products"])
    for key, product in site.catalog["products"].items():
        assert sorted(products[key]["serials"]) == sorted(product["versions"]), key
        assert set(products[key]["fingerprints"]) == site.fingerprints[key], key
    # the URL is the page's own origin, filled in by the script
    assert dom["remoteAdd"] == f"lxc remote add myimages {site.url} --protocol simplestreams"
    # hostile overrides from metadata.json show as text, and nothing was injected
    assert HOSTILE_TITLE in products["busybox:1.35:arm64:rootxz"]["heading"]
    assert HOSTILE_OS in products["busybox:1.35:arm64:rootxz"]["heading"]
    assert dom["injected"] == 0
    assert dom["secure"] is True
    assert dom["title"] == "LXD image server"
    # self-contained: the page was the only thing fetched (no favicon, font, script or style);
    # the log shows the file / was mapped to
    assert site.nginx.requests()[seen:] == [("GET", 200, "/streams/index.html")]
    # the footer's links lead to the catalog, whether the page is read at / or at its own path
    links = [f"{site.url}/streams/v1/index.json", f"{site.url}/streams/v1/images.json"]
    assert dom["catalogLinks"] == links
    open_page(tab, f"{site.url}/streams/index.html")
    assert tab.evaluate("[...document.querySelectorAll('footer a')].map(a => a.href)") == links
    assert tab.problems() == []


def copy_and_read(tab: Tab, selector: str) -> str:
    tab.evaluate("navigator.clipboard.writeText('-')", await_promise=True)
    tab.click(selector)
    tab.wait_for(f"document.querySelector({json.dumps(selector)}).textContent === 'copied'")
    text: str = tab.evaluate("navigator.clipboard.readText()", await_promise=True)
    return text


def test_copy_buttons_put_the_lines_on_the_clipboard(site: Site, tab: Tab) -> None:
    tab.cdp.call(
        "Browser.grantPermissions",
        {"origin": site.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    # a focused page: the clipboard API refuses documents without focus
    tab.call("Emulation.setFocusEmulationEnabled", {"enabled": True})
    open_page(tab, site.page)
    default = "[data-product='busybox:1.35:amd64:default']"
    launch = f"{default} > .cmd:nth-of-type(1) button.copy"
    assert copy_and_read(tab, launch) == "lxc launch myimages:busybox/1.35"
    vm_launch = f"{default} > .cmd:nth-of-type(2) button.copy"
    assert copy_and_read(tab, vm_launch) == "lxc launch myimages:busybox/1.35 --vm"
    newest = site.catalog["products"]["busybox:1.35:amd64:default"]["versions"]["20240105_10:00"]
    vm_fp = newest["items"]["lxd.tar.xz"]["combined_disk-kvm-img_sha256"]
    assert vm_fp in site.fingerprints["busybox:1.35:amd64:default"]
    exact = f"{default} [data-kind='virtual-machine'] button.copy"
    assert copy_and_read(tab, exact) == f"lxc launch myimages:{vm_fp} --vm"
    remote_add = "header .cmd button.copy"
    assert (
        copy_and_read(tab, remote_add)
        == f"lxc remote add myimages {site.url} --protocol simplestreams"
    )
    # the label comes back
    tab.wait_for(f"document.querySelector({json.dumps(launch)}).textContent === 'copy'")
    assert tab.problems() == []


def test_filter_narrows_the_list(site: Site, tab: Tab) -> None:
    open_page(tab, site.page)
    tab.click("#filter")
    tab.call("Input.insertText", {"text": "alpine"})
    shown = tab.wait_for(
        "(() => { const v = [...document.querySelectorAll('[data-product]')]"
        ".filter(p => !p.hidden).map(p => p.dataset.product);"
        " return v.length === 1 ? v : null; })()"
    )
    assert shown == ["alpine:3.19:amd64:unified"]
    assert tab.problems() == []


@pytest.mark.parametrize(
    ("name", "width", "mobile", "scale"), [("desktop", 1280, False, 1), ("phone", 390, True, 2)]
)
def test_screenshots(
    site: Site, tab: Tab, name: str, width: int, mobile: bool, scale: float
) -> None:
    metrics = {"width": width, "height": 900, "deviceScaleFactor": scale, "mobile": mobile}
    tab.call("Emulation.setDeviceMetricsOverride", metrics)
    open_page(tab, site.page)
    # nothing sticks out sideways: readable without horizontal scrolling
    widths = tab.evaluate("({page: document.documentElement.scrollWidth, view: window.innerWidth})")
    assert widths["page"] <= widths["view"], widths
    tab.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"catalog-page-{name}.png"
    tab.screenshot(path, width, mobile, scale)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tab.problems() == []


def test_harness_sees_errors(site: Site, tab: Tab) -> None:
    """Control: a page whose script no longer matches its CSP hash is reported, so a clean
    report above means a clean page, not a deaf listener."""
    page = (site.root / "streams" / "index.html").read_text()
    tampered = SCRIPT.replace('"use strict";', '"use strict"; console.log("tampered");')
    assert tampered != SCRIPT
    (site.root / "tampered.html").write_text(page.replace(SCRIPT, tampered))
    tab.navigate(site.url + "/tampered.html")
    deadline = time.monotonic() + 30
    while not any("Content Security Policy" in p for p in tab.problems()):
        assert time.monotonic() < deadline, f"no CSP error reported: {tab.problems()}"
        tab.evaluate("0")  # reads the events that arrived meanwhile
    problems = tab.problems()
    assert not any("tampered" in p and p.startswith("console") for p in problems)
    assert tab.evaluate("document.querySelectorAll('button.copy:not([hidden])').length") == 0
