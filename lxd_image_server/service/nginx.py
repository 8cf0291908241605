"""Renders the nginx templates in nginx/ and installs, checks and reloads the site.

Templates use @NAME@ placeholders (nginx itself uses $var and braces). A value of several
lines keeps the indentation of its placeholder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lxd_image_server import envnames
from lxd_image_server.config import DEFAULT_HTPASSWD, DEFAULT_SSL_DIR, ServiceError
from lxd_image_server.fsutil import write_atomic
from lxd_image_server.procs import pid_alive

log = logging.getLogger(__name__)

SITE_NAME = "lxd-image-server"
_PLACEHOLDER = re.compile(r"^([ \t]*)@([A-Z_]+)@|@([A-Z_]+)@", re.MULTILINE)
_VERSION = re.compile(r"nginx/(\d+)\.(\d+)\.(\d+)", re.ASCII)

#: nginx >= 1.25.1 turns HTTP/2 on with `http2 on;` and warns about `listen ... http2`
HTTP2_DIRECTIVE_SINCE = (1, 25, 1)
#: On everything nginx serves, errors included: nothing loads, runs or frames it.
STRICT_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
#: The catalog page's header. The page's own <meta> policy (page.content_security_policy)
#: allows exactly its inline script and style by their sha256; both policies apply, so the
#: header only has to let inline code through to it and forbid the rest. Hashes are not
#: repeated here: the site outlives package upgrades that change the page.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: Image files: caches keep them but revalidate before each use (nginx's ETag and
#: Last-Modified: a 304 while the file is unchanged). Never `immutable` for a year: an sftp
#: upload rewrites a file in place whatever ALLOW_OVERWRITES says (internal-sftp cannot refuse
#: it), so can `import --force`, and a cache serving the old bytes would fail every client's
#: sha256 check on that file for as long as it keeps them (over plain HTTP the client then
#: downloads it again over HTTPS; through a TLS-terminating cache it fails). Not `public`: a
#: shared cache must not keep what a private server answered to a request with credentials
#: (RFC 9111, 3.5). Not `always`: an error (a 404 for a file not yet uploaded) is not cached.
IMAGE_CACHE = "no-cache"
HTTP_SNIPPET_NAME = f"{SITE_NAME}-http"


class NginxError(ServiceError):
    """nginx refused the configuration, or could not be found or reloaded."""


def template_dirs() -> list[Path]:
    """Where the templates may be: env override, the installed copy, the source tree."""
    dirs = []
    if env := os.environ.get(envnames.TEMPLATES):
        dirs.append(Path(env))
    dirs += [
        Path(sys.prefix) / "share" / "lxd-image-server" / "nginx",
        Path("/usr/share/lxd-image-server/nginx"),
        Path(__file__).resolve().parents[2] / "nginx",
    ]
    return dirs


def render(name: str, values: dict[str, str]) -> str:
    for d in template_dirs():
        path = d / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            break
    else:
        raise NginxError(f"template {name} not found in {', '.join(map(str, template_dirs()))}")

    def sub(m: re.Match[str]) -> str:
        indent, key = (m[1], m[2]) if m[2] else ("", m[3])
        if key not in values:
            raise NginxError(f"template {name}: no value for @{key}@")
        return indent + values[key].replace("\n", "\n" + indent)

    return _PLACEHOLDER.sub(sub, text)


@dataclass(frozen=True)
class SiteSettings:
    root_dir: str
    upload_socket: str
    #: nginx listen addresses: "8443", "127.0.0.1:8443", "[::]:8443"
    listen: tuple[str, ...] = ("8443",)
    tls: bool = True
    ssl_dir: str = DEFAULT_SSL_DIR
    #: None: anyone may upload (the proxy in front authenticates)
    htpasswd: str | None = DEFAULT_HTPASSWD
    #: auth on reads too (LXD accepts https://user:pass@host remotes)
    private: bool = False
    #: client_max_body_size: "0" is unlimited; the upload app enforces its own limit too
    max_body: str = "0"
    #: nginx's longest wait between two reads of an upload's body (or writes to the app)
    body_timeout: str = "60s"
    #: how long the app may take to answer once the body is sent (it fsyncs the file)
    answer_timeout: str = "120s"
    #: plain-HTTP listen addresses serving image files only (empty: no such listener)
    http_listen: tuple[str, ...] = ()
    #: the plain-HTTP server's names: with another site holding `default_server` on its port
    #: (Debian's default site on 80), only requests for these names reach it
    server_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.private and self.htpasswd is None:
            raise NginxError(
                "a private server needs credentials: reads would be public without them "
                "(drop --private or --allow-anonymous-uploads)"
            )
        if self.private and self.http_listen:
            raise NginxError(
                "--private cannot go with --http-listen: the credentials would cross the "
                "network in clear text"
            )
        taken = {_port(a) for a in self.listen}
        for addr in self.http_listen:
            port = _port(addr)
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise NginxError(f"--http-listen {addr!r}: expected [HOST:]PORT")
            if port in taken:
                raise NginxError(
                    f"--http-listen {addr!r}: port {port} is already the site's "
                    "(--listen); plain HTTP needs a port of its own"
                )


def _port(addr: str) -> str:
    """'8443', '127.0.0.1:8443', '[::]:8443' -> '8443'."""
    return addr.rsplit(":", 1)[-1] if not addr.endswith("]") else ""


def _auth(htpasswd: str | None, indent: str) -> str:
    if htpasswd is None:
        return f"{indent}auth_basic off;"
    return f'{indent}auth_basic "lxd-image-server";\n{indent}auth_basic_user_file {htpasswd};'


def _headers(csp: str, *extra: str) -> str:
    lines = [
        'add_header X-Content-Type-Options "nosniff" always;',
        f'add_header Content-Security-Policy "{csp}" always;',
        *extra,
    ]
    return "\n".join(lines)


def _download_headers() -> str:
    return _headers(STRICT_CSP, 'add_header Content-Disposition "attachment" always;')


def _image_headers() -> str:
    return _download_headers() + f'\nadd_header Cache-Control "{IMAGE_CACHE}";'


def render_locations(s: SiteSettings) -> str:
    return render(
        "locations.conf.in",
        {
            # resolved, so that disable_symlinks can check every component of every path
            "ROOT": os.path.realpath(s.root_dir),
            "READ_AUTH": _auth(s.htpasswd, "") if s.private else "",
            "WRITE_AUTH": _auth(s.htpasswd, "    "),
            "MAX_BODY": s.max_body,
            "UPLOAD_SOCKET": s.upload_socket,
            "BODY_TIMEOUT": s.body_timeout,
            "ANSWER_TIMEOUT": s.answer_timeout,
            "HEADERS": _headers(STRICT_CSP),
            "PAGE_HEADERS": _headers(PAGE_CSP),
            "DOWNLOAD_HEADERS": _download_headers(),
            "IMAGE_HEADERS": _image_headers(),
        },
    )


def render_http_locations(s: SiteSettings) -> str:
    """The plain-HTTP listener's snippet: image files only, GET and HEAD only."""
    return render(
        "http-images.conf.in",
        {
            "ROOT": os.path.realpath(s.root_dir),
            "HEADERS": _headers(STRICT_CSP),
            "IMAGE_HEADERS": _image_headers(),
        },
    )


def render_site(
    s: SiteSettings,
    snippet_path: str,
    version: tuple[int, ...] | None = None,
    http_snippet_path: str | None = None,
) -> str:
    """`version`: of the nginx that will run it (None: the one installed here, `nginx -v`).
    `http_snippet_path`: where render_http_locations' output is (needed with http_listen)."""
    if s.tls and version is None:
        version = installed_version()
    http2_on = s.tls and version is not None and version >= HTTP2_DIRECTIVE_SINCE
    suffix = " ssl" if http2_on else " ssl http2" if s.tls else ""
    listen = [f"    listen {addr}{suffix};" for addr in s.listen]
    if http2_on:
        listen.append("    http2 on;")
    http_server = ""
    if s.http_listen:
        if http_snippet_path is None:
            raise NginxError("the plain-HTTP listener needs its snippet's path")
        http_server = render(
            "http-server.conf.in",
            {
                "LISTEN": "\n".join(f"    listen {addr};" for addr in s.http_listen),
                "SERVER_NAMES": " ".join(s.server_names) or "_",
                "SNIPPET": http_snippet_path,
            },
        )
    return render(
        "site.conf.in",
        {
            "LISTEN": "\n".join(listen),
            "TLS": render("tls.conf.in", {"SSL_DIR": s.ssl_dir}) if s.tls else "",
            "SNIPPET": snippet_path,
            "HTTP_SERVER": http_server,
        },
    )


def parse_version(text: str) -> tuple[int, int, int] | None:
    """From `nginx -v` ("nginx version: nginx/1.22.1", maybe with a vendor suffix)."""
    m = _VERSION.search(text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def installed_version() -> tuple[int, int, int] | None:
    """The installed nginx's version; None if there is none or it does not say (the
    configuration then uses the older syntax, which newer nginx accepts with a warning)."""
    try:
        r = subprocess.run(
            [nginx_binary(), "-v"], capture_output=True, text=True, timeout=30, check=False
        )
    except (NginxError, OSError, subprocess.TimeoutExpired):
        return None
    found = parse_version(r.stderr + r.stdout)
    if found is None:
        log.warning("cannot tell the nginx version from %r", (r.stderr or r.stdout).strip())
    return found


def render_standalone(run_dir: str, site_path: str, user: str | None, verbose: bool) -> str:
    return render(
        "standalone.conf.in",
        {
            "RUN_DIR": run_dir,
            "SITE": site_path,
            "USER": f"user {user};" if user else "",
            "ACCESS_LOG": "/dev/stdout" if verbose else "off",
            "ERROR_LEVEL": "info" if verbose else "warn",
        },
    )


def _write_if_changed(path: Path, text: str) -> bool:
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(str(path), data)
    return True


def install_site(nginx_dir: str, s: SiteSettings, version: tuple[int, ...] | None = None) -> bool:
    """Debian layout: snippets/, sites-available/ and the sites-enabled/ link.

    Returns True if anything changed.
    """
    base = Path(nginx_dir)
    snippet = base / "snippets" / f"{SITE_NAME}.conf"
    http_snippet = base / "snippets" / f"{HTTP_SNIPPET_NAME}.conf"
    site = base / "sites-available" / SITE_NAME
    link = base / "sites-enabled" / SITE_NAME
    changed = _write_if_changed(snippet, render_locations(s))
    if s.http_listen:
        changed |= _write_if_changed(http_snippet, render_http_locations(s))
    changed |= _write_if_changed(site, render_site(s, str(snippet), version, str(http_snippet)))
    if not s.http_listen and http_snippet.exists():
        http_snippet.unlink()  # the listener was turned off: its snippet goes too
        changed = True
    if not (link.is_symlink() and os.readlink(link) == str(site)):
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(site)
        changed = True
    return changed


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if not found:
        raise NginxError("nginx is not installed (apt install nginx-light)")
    return found


def check(conf: str | None = None, prefix: str | None = None) -> None:
    """`nginx -t`; raises NginxError with nginx's own words if the config is refused."""
    cmd = [nginx_binary(), "-t", "-q"]
    if prefix:
        cmd += ["-p", prefix]
    if conf:
        cmd += ["-c", conf]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise NginxError(f"nginx -t failed:\n{(r.stderr or r.stdout).strip()}")


def reload() -> bool:
    """Asks the running nginx to reload. False if no nginx is running (nothing to do)."""
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        active = (
            subprocess.run(["systemctl", "is-active", "--quiet", "nginx"], check=False).returncode
            == 0
        )
        if not active:
            return False
        r = subprocess.run(["systemctl", "reload", "nginx"], capture_output=True, text=True)
    else:
        if not _nginx_running(Path("/run/nginx.pid")):
            return False
        r = subprocess.run([nginx_binary(), "-s", "reload"], capture_output=True, text=True)
    if r.returncode != 0:
        raise NginxError(f"reloading nginx failed: {(r.stderr or r.stdout).strip()}")
    return True


def _nginx_running(pid_file: Path) -> bool:
    """`nginx -t` leaves an empty pid file behind: only a live pid counts."""
    try:
        return pid_alive(int(pid_file.read_text().strip()))
    except (OSError, ValueError):
        return False
