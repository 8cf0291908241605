"""The nginx site as rendered from nginx/*.in: headers on every location, symlinks refused,
upload limits, HTTP/2 in the syntax of the nginx it runs on. nginx itself checks the result in
tests/integration (test_init.py, test_nginx_site.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lxd_image_server.catalog import page
from lxd_image_server.service import nginx
from lxd_image_server.service.nginx import (
    PAGE_CSP,
    STRICT_CSP,
    NginxError,
    SiteSettings,
    parse_version,
    render,
    render_locations,
    render_site,
)

SETTINGS = SiteSettings(root_dir="/srv/root", upload_socket="/run/u.sock")
NOSNIFF = 'add_header X-Content-Type-Options "nosniff" always;'
DOWNLOAD = 'add_header Content-Disposition "attachment" always;'
DEBIAN_12 = (1, 22, 1)
DEBIAN_13 = (1, 26, 3)


def locations(conf: str) -> dict[str, str]:
    """Location argument -> its block (top-level blocks of the snippet)."""
    blocks = re.findall(r"^location ([^{]+?) \{\n(.*?)^\}", conf, re.MULTILINE | re.DOTALL)
    return {name: body for name, body in blocks}


def csp(block: str) -> list[str]:
    return re.findall(r'add_header Content-Security-Policy "([^"]*)" always;', block)


def test_every_location_sends_nosniff_and_a_policy() -> None:
    found = locations(render_locations(SETTINGS))
    assert set(found) == {
        "= /",
        "= /streams/index.html",
        "@about",
        "/streams/v1/",
        "/images/",
        "= /images",
        "@upload",
        r"~ /\.",
        "/",
    }
    for name, block in found.items():
        assert NOSNIFF in block, name
        page_location = name in ("= /", "= /streams/index.html")
        assert csp(block) == [PAGE_CSP if page_location else STRICT_CSP], name


def test_the_server_level_has_them_too() -> None:
    conf = render_locations(SETTINGS)
    top = conf.split("\nlocation ", 1)[0]
    assert NOSNIFF in top and csp(top) == [STRICT_CSP]


def test_downloads_and_html() -> None:
    conf = render_locations(SETTINGS)
    found = locations(conf)
    assert DOWNLOAD in found["/images/"] and DOWNLOAD in found["/"]
    assert DOWNLOAD not in found["= /"] and DOWNLOAD not in found["= /streams/index.html"]
    # nothing but the page maps to text/html; the server's own mime.types are not used
    assert conf.count("text/html") == 2
    assert "types { }\ndefault_type application/octet-stream;" in conf
    for name in ("= /", "= /streams/index.html"):
        assert "types { text/html html; }" in found[name]


def test_strict_policy_forbids_everything() -> None:
    assert STRICT_CSP.startswith("default-src 'none';")
    assert "frame-ancestors 'none'" in STRICT_CSP


def directives(policy: str) -> dict[str, set[str]]:
    out = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        out[name] = set(sources)
    return out


def test_page_header_lets_through_what_the_page_allows_and_nothing_else() -> None:
    """Both policies apply: the page works only if the header allows every source the page's
    <meta> policy allows (its hashes through 'unsafe-inline')."""
    header, meta = directives(PAGE_CSP), directives(page.content_security_policy())
    assert header["default-src"] == {"'none'"}
    assert header["frame-ancestors"] == {"'none'"}
    for name, sources in meta.items():
        allowed = header.get(name, header["default-src"])
        for source in sources:
            if source.startswith("'sha256-"):
                assert "'unsafe-inline'" in allowed, name
            else:
                assert source in allowed, (name, source)
    # and the header allows nothing the page does not need
    for name, sources in header.items():
        if name == "frame-ancestors":
            continue
        extra = sources - meta.get(name, set()) - {"'unsafe-inline'"}
        assert not extra, (name, extra)


def test_symlinks_are_refused_for_the_whole_resolved_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    conf = render_locations(SiteSettings(root_dir=str(tmp_path / "link"), upload_socket="/s"))
    assert f"root {real};" in conf
    assert re.search(r"^disable_symlinks on;$", conf, re.MULTILINE)
    assert "from=" not in conf


def test_uploads_time_out_and_are_not_limited_per_address() -> None:
    """Issue 18: a CI job's `xargs -P8 curl`, or a team behind one NAT address, got 429 from
    nginx's per-address limit. The upload app counts per credential (upload_slots.py), anonymous
    uploads per the X-Real-IP nginx sets (replacing any the client sent)."""
    up = locations(render_locations(SETTINGS))["@upload"]
    assert "limit_conn" not in render_locations(SETTINGS)
    assert "proxy_set_header X-Real-IP $remote_addr;" in up
    assert "client_body_timeout 60s;" in up
    assert "proxy_send_timeout 60s;" in up
    assert "proxy_read_timeout 120s;" in up
    assert "1h" not in render_locations(SETTINGS)
    assert "limit_conn" not in render_site(SETTINGS, "/snippet", DEBIAN_12)


def test_uploads_stream_through_an_http2_window_of_8_mib() -> None:
    """nginx passes the body on as it comes (proxy_request_buffering off), through a buffer
    that is also the HTTP/2 receive window: 1m made HTTP/2 clients wait for it (issue 13)."""
    up = locations(render_locations(SETTINGS))["@upload"]
    assert "proxy_request_buffering off;" in up
    assert re.search(r"^\s*client_body_buffer_size 8m;$", up, re.MULTILINE)


def test_private_needs_credentials() -> None:
    conf = render_locations(SiteSettings(root_dir="/r", upload_socket="/s", private=True))
    top = conf.split("\nlocation ", 1)[0]
    assert "auth_basic_user_file /etc/lxd-image-server/htpasswd;" in top
    with pytest.raises(NginxError, match="--private"):
        SiteSettings(root_dir="/r", upload_socket="/s", private=True, htpasswd=None)


def test_anonymous_uploads_render_auth_off() -> None:
    conf = render_locations(SiteSettings(root_dir="/r", upload_socket="/s", htpasswd=None))
    assert "auth_basic off;" in locations(conf)["@upload"]
    assert "auth_basic_user_file" not in conf


@pytest.mark.parametrize("version", [DEBIAN_12, (1, 25, 0)])
def test_http2_on_the_listen_line_before_1_25_1(version: tuple[int, int, int]) -> None:
    s = SiteSettings(root_dir="/r", upload_socket="/s", listen=("8443", "[::]:8443"))
    site = render_site(s, "/snippet", version)
    assert "    listen 8443 ssl http2;\n    listen [::]:8443 ssl http2;\n" in site
    assert "http2 on;" not in site


@pytest.mark.parametrize("version", [(1, 25, 1), DEBIAN_13, (2, 0, 0)])
def test_http2_directive_from_1_25_1(version: tuple[int, int, int]) -> None:
    s = SiteSettings(root_dir="/r", upload_socket="/s", listen=("8443", "[::]:8443"))
    site = render_site(s, "/snippet", version)
    assert "    listen 8443 ssl;\n    listen [::]:8443 ssl;\n    http2 on;\n" in site
    assert "ssl http2" not in site


def test_plain_http_has_no_http2() -> None:
    s = SiteSettings(root_dir="/r", upload_socket="/s", tls=False)
    for version in (DEBIAN_12, DEBIAN_13):
        site = render_site(s, "/snippet", version)
        assert "    listen 8443;\n" in site
        assert "http2" not in site and "ssl_certificate" not in site


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx version: nginx/1.22.1\n", (1, 22, 1)),
        ("nginx version: nginx/1.26.3 (Debian)\n", (1, 26, 3)),
        ("nginx version: openresty/1.25.3.1\n", None),
        ("nginx version: nginx/1.\uff126.0\n", None),
        ("", None),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_version(text) == expected


def test_multiline_values_keep_the_placeholder_indentation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "t.in").write_text("a {\n    @X@\n}\nb @Y@ c\n@X@\n")
    monkeypatch.setenv("LXD_IMAGE_SERVER_TEMPLATES", str(tmp_path))
    assert render("t.in", {"X": "one;\ntwo;", "Y": "y"}) == (
        "a {\n    one;\n    two;\n}\nb y c\none;\ntwo;\n"
    )
    with pytest.raises(NginxError, match="@Y@"):
        render("t.in", {"X": ""})


# -- issue 12: cache headers and the plain-HTTP listener ----------------------------------------

IMAGE_CACHE_LINE = f'add_header Cache-Control "{nginx.IMAGE_CACHE}";'


@pytest.mark.parametrize("private", [False, True])
def test_image_files_revalidate_never_immutable(private: bool) -> None:
    """An sftp upload (or `import --force`) rewrites a file in place whatever ALLOW_OVERWRITES
    says: caches must ask again (304 while unchanged), never keep the old bytes for a year; and
    never `public`, which would let a shared cache keep a private server's files."""
    settings = SiteSettings("/r", "/s", htpasswd="/h", private=private)
    text = render_locations(settings) + nginx.render_http_locations(HTTP)
    found = locations(render_locations(settings))
    assert IMAGE_CACHE_LINE in found["/images/"]
    assert nginx.IMAGE_CACHE == "no-cache"
    for word in ("immutable", "max-age", "public"):
        assert word not in text, word
    # never `always`: a 404 must not be stored at all
    assert f'"{nginx.IMAGE_CACHE}";' in found["/images/"]
    assert f'"{nginx.IMAGE_CACHE}" always' not in found["/images/"]


def test_catalog_revalidates_and_varies() -> None:
    block = locations(render_locations(SETTINGS))["/streams/v1/"]
    assert 'add_header Cache-Control "no-cache" always;' in block
    assert "gzip_static on;" in block and "gzip_vary on;" in block
    # validators are nginx's defaults: nothing turns them off
    conf = render_locations(SETTINGS)
    assert "etag off" not in conf and "if_modified_since off" not in conf


def test_no_http_listener_by_default() -> None:
    site = render_site(SETTINGS, "/snippet", DEBIAN_12)
    assert site.count("server {") == 1 and "lxd-image-server-http" not in site


HTTP = SiteSettings(
    root_dir="/srv/root",
    upload_socket="/run/u.sock",
    http_listen=("80", "[::]:80"),
    server_names=("images.example.com",),
)


def test_http_listener_server_block() -> None:
    site = render_site(HTTP, "/snippet", DEBIAN_13, "/http-snippet")
    tls_server, http_server = site.split("server {")[1:]
    assert "ssl" in tls_server and "include /snippet;" in tls_server
    assert "    listen 80;\n    listen [::]:80;\n" in http_server
    assert "ssl" not in http_server and "http2" not in http_server
    assert "server_name images.example.com;" in http_server
    assert "include /http-snippet;" in http_server
    with pytest.raises(NginxError):
        render_site(HTTP, "/snippet", DEBIAN_13)


def test_http_listener_serves_image_files_only() -> None:
    conf = nginx.render_http_locations(HTTP)
    found = locations(conf)
    assert set(found) == {"/images/", r"~ /\.", "/"}
    assert "return 404;" in found["/"] and "deny all;" in found[r"~ /\."]
    assert "if ($request_method !~ ^(GET|HEAD)$) {\n        return 405;" in found["/images/"]
    # no way to the upload app, the catalog or the page
    for word in ("proxy_pass", "@upload", "streams", "text/html", "auth_basic", "try_files"):
        assert word not in conf, word
    # the HTTPS site's hardening
    assert "disable_symlinks on;" in conf and "autoindex off;" in conf
    assert "types { }\ndefault_type application/octet-stream;" in conf
    for name, block in found.items():
        assert NOSNIFF in block and csp(block) == [STRICT_CSP], name
    assert DOWNLOAD in found["/images/"] and IMAGE_CACHE_LINE in found["/images/"]
    top = conf.split("\nlocation ", 1)[0]
    assert NOSNIFF in top and csp(top) == [STRICT_CSP]


@pytest.mark.parametrize(
    ("listen", "http_listen", "why"),
    [
        (("8443",), ("8443",), "port of its own"),
        (("127.0.0.1:80",), ("80",), "port of its own"),
        (("8443",), ("http",), "expected [HOST:]PORT"),
        (("8443",), ("70000",), "expected [HOST:]PORT"),
        (("8443",), ("[::]",), "expected [HOST:]PORT"),
    ],
)
def test_http_listen_is_checked(
    listen: tuple[str, ...], http_listen: tuple[str, ...], why: str
) -> None:
    with pytest.raises(NginxError, match=re.escape(why)):
        SiteSettings("/r", "/s", listen=listen, http_listen=http_listen)


def test_private_refuses_plain_http() -> None:
    with pytest.raises(NginxError, match="clear text"):
        SiteSettings("/r", "/s", private=True, http_listen=("80",))


def test_install_site_adds_and_removes_the_http_snippet(tmp_path: Path) -> None:
    snippet = tmp_path / "snippets" / "lxd-image-server-http.conf"
    assert nginx.install_site(str(tmp_path), HTTP, DEBIAN_12)
    assert snippet.is_file()
    site = (tmp_path / "sites-available" / "lxd-image-server").read_text()
    assert f"include {snippet};" in site
    assert not nginx.install_site(str(tmp_path), HTTP, DEBIAN_12)
    off = SiteSettings("/srv/root", "/run/u.sock")
    assert nginx.install_site(str(tmp_path), off, DEBIAN_12)
    assert not snippet.exists()
    assert (
        "lxd-image-server-http"
        not in (tmp_path / "sites-available" / "lxd-image-server").read_text()
    )
