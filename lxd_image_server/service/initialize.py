"""`init`: the directories, an initial catalog, the certificate, upload credentials, the nginx site.

Idempotent: each step does nothing when its result is already in place, and says so.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxd_image_server import htpasswd
from lxd_image_server.catalog.hashing import HashCache
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.config import (
    CREDENTIALS_GROUP,
    DEFAULT_HTPASSWD,
    DEFAULT_NGINX_DIR,
    DEFAULT_SSL_DIR,
    DEFAULT_UPLOAD_SOCKET,
    NGINX_USER,
    Paths,
)
from lxd_image_server.fsutil import write_atomic
from lxd_image_server.service import nginx, tls

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_USER = "upload"


@dataclass(frozen=True)
class InitOptions:
    paths: Paths
    ssl_dir: str = DEFAULT_SSL_DIR
    hostnames: tuple[str, ...] = ()
    ssl_skip: bool = False
    nginx_skip: bool = False
    force: bool = False
    nginx_dir: str = DEFAULT_NGINX_DIR
    #: None: no credentials (anonymous uploads, or a proxy in front authenticates)
    htpasswd: str | None = DEFAULT_HTPASSWD
    upload_user: str = DEFAULT_UPLOAD_USER
    listen: tuple[str, ...] = ("8443",)
    private: bool = False
    upload_socket: str = DEFAULT_UPLOAD_SOCKET
    #: plain-HTTP addresses serving image files only (empty: none)
    http_listen: tuple[str, ...] = ()
    #: a new upload user's password goes to this file (mode 0600), not into the report's text
    password_file: str | None = None


@dataclass
class InitReport:
    changes: list[str] = field(default_factory=list)
    #: (user, password) when a user was created: shown once, never stored in clear
    new_credentials: tuple[str, str] | None = None
    cert: tls.CertResult | None = None
    #: where the new user's password was written (InitOptions.password_file)
    password_file: str | None = None


def ensure_tree(paths: Paths, report: InitReport) -> None:
    for d in (paths.img_dir, paths.streams_dir):
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o755, exist_ok=True)
            report.changes.append(f"created {d}")
    if not os.path.exists(os.path.join(paths.streams_dir, "index.json")):
        cache = HashCache(paths.cache_path)
        try:
            Pipeline(paths, cache).update_all()
        finally:
            cache.close()
        report.changes.append(f"published the catalog in {paths.streams_dir}")


#: The package's group of those who read the credentials: nginx's workers (www-data) and the
#: upload app (lxdadm), which checks them too. Without it (not the package): nginx's group.
CREDENTIALS_GROUPS = (CREDENTIALS_GROUP, NGINX_USER)


def credentials_group() -> str | None:
    """The group of the htpasswd file, when we are root and it exists (see CREDENTIALS_GROUPS)."""
    if os.geteuid() != 0:
        return None
    for name in CREDENTIALS_GROUPS:
        try:
            return grp.getgrnam(name).gr_name
        except KeyError:
            continue
    return None


def ensure_credentials(path: str, user: str, report: InitReport) -> None:
    if htpasswd.read_users(path):
        return
    password = htpasswd.generate_password()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    htpasswd.set_password(path, user, password, group=credentials_group())
    report.new_credentials = (user, password)
    report.changes.append(f"created upload user {user!r} in {path}")


def site_settings(opts: InitOptions) -> nginx.SiteSettings:
    return nginx.SiteSettings(
        root_dir=opts.paths.root_dir,
        upload_socket=opts.upload_socket,
        listen=opts.listen,
        ssl_dir=opts.ssl_dir,
        htpasswd=opts.htpasswd,
        private=opts.private,
        http_listen=opts.http_listen,
        server_names=opts.hostnames,
    )


def ensure_site(opts: InitOptions, report: InitReport) -> None:
    """Installs the site; if nginx refuses the result, takes the site out again and raises."""
    settings = site_settings(opts)  # NginxError before anything is written
    if not nginx.install_site(opts.nginx_dir, settings):
        return
    system = os.path.abspath(opts.nginx_dir) == DEFAULT_NGINX_DIR
    try:
        # another directory (tests, chroots) is checked with its own nginx.conf
        nginx.check(None if system else os.path.join(opts.nginx_dir, "nginx.conf"))
    except nginx.NginxError:
        link = Path(opts.nginx_dir) / "sites-enabled" / nginx.SITE_NAME
        link.unlink(missing_ok=True)
        raise
    report.changes.append(f"installed the nginx site in {opts.nginx_dir}")
    if system and nginx.reload():
        report.changes.append("reloaded nginx")


def initialize(opts: InitOptions) -> InitReport:
    report = InitReport()
    ensure_tree(opts.paths, report)
    if not opts.ssl_skip:
        names = opts.hostnames or (socket.getfqdn(),)
        report.cert = tls.ensure_certificate(opts.ssl_dir, names, force=opts.force)
        if report.cert.created:
            report.changes.append(f"created the certificate {report.cert.cert_path}")
    if opts.htpasswd is not None:
        ensure_credentials(opts.htpasswd, opts.upload_user, report)
        if report.new_credentials and opts.password_file:
            # kept out of the output, which may land in a log (apt's, for the package)
            password = report.new_credentials[1]
            write_atomic(opts.password_file, f"{password}\n".encode(), mode=0o600)
            report.password_file = opts.password_file
    if not opts.nginx_skip:
        ensure_site(opts, report)
    return report


def instructions_for(
    report: InitReport,
    hostnames: Sequence[str],
    listen: str,
    default_host: str | None = None,
    cert_fallback: str | None = None,
    private: bool = False,
) -> str:
    """The client instructions once `init` or `run` has set the server up: for its first name
    (else `default_host`, else this machine's name), the port of `listen`, the certificate made
    or kept (else `cert_fallback`), and the new upload user, if one was made (its password shown
    unless it went to a file); for a `private` server, a remote URL with a client's own
    credentials and what that sends in clear text."""
    host = hostnames[0] if hostnames else (default_host or socket.getfqdn())
    port = listen.rsplit(":", 1)[-1]
    cert = report.cert.cert_path if report.cert else cert_fallback
    credentials = report.new_credentials
    if credentials and report.password_file:
        credentials = (credentials[0], "PASSWORD")
    return client_instructions(host, port, cert, credentials, private=private)


def client_instructions(
    host: str,
    port: str,
    cert_path: str | None,
    credentials: tuple[str, str] | None,
    private: bool = False,
) -> str:
    """What a client machine runs, ready to paste."""
    url = f"https://{host}:{port}" if port != "443" else f"https://{host}"
    remote_url = url.replace("https://", "https://CLIENT:PASSWORD@") if private else url
    user, password = credentials or ("USER", "PASSWORD")
    lines = ["On each client machine (and the machine running the LXD daemon):", ""]
    if cert_path:
        lines += [
            "  # trust this server's certificate (copy it from the server first)",
            f"  scp {host}:{cert_path} /usr/local/share/ca-certificates/lxd-image-server.crt",
            "  update-ca-certificates",
            "  systemctl restart snap.lxd.daemon 2>/dev/null || systemctl restart lxd  "
            "# the daemon reads the CA store once",
            "",
        ]
    if private:
        lines += [
            "  # a private server: one user per client machine (on the server:",
            "  # lxd-image-server passwd CLIENT; revoke it with passwd CLIENT --delete).",
            "  # The clients send that password in clear text before each image file",
            "  # unless the remote is on port 443 with nothing on port 80 (README: Private feeds)",
        ]
    lines += [
        "  # add the remote and launch from it",
        f"  lxc remote add myimages {remote_url} --protocol simplestreams",
        "  lxc launch myimages:<os>/<release> c1",
        "",
        "Upload an image (metadata tarball first, then the root filesystem):",
        "",
        "  dir=<os>/<release>/<arch>/<variant>/$(date -u +%Y%m%d_%H:%M)",
        f'  curl -u {user}:{password} "-Fupload=@meta.tar.xz;filename=$dir/lxd.tar.xz" '
        f"{url}/images/",
        f'  curl -u {user}:{password} "-Fupload=@rootfs.squashfs;filename=$dir/rootfs.squashfs" '
        f"{url}/images/",
    ]
    return "\n".join(lines)
