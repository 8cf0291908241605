"""The host's commands: `init` (certificate, credentials, nginx site), `passwd` (upload
credentials) and `run` (nginx, the upload server and the watcher in the foreground). Options in,
one call to service/ out; loaded by name when used (root.py's LAZY_COMMANDS)."""

from __future__ import annotations

import os
import sys

import click

from lxd_image_server import envnames, logs
from lxd_image_server.cli.common import (
    FAILED,
    F,
    Globals,
    handle_errors,
    root_dir_option,
    tree_paths,
)
from lxd_image_server.config import (
    DEFAULT_HTPASSWD,
    DEFAULT_NGINX_DIR,
    DEFAULT_SSL_DIR,
    DEFAULT_UPLOAD_SOCKET,
)


def refuse_private_anonymous(private: bool, anonymous: bool) -> None:
    """Reads behind credentials that do not exist would silently stay public."""
    if private and anonymous:
        raise click.UsageError(
            "--private needs upload credentials: it cannot go with --allow-anonymous-uploads "
            "(reads would be public)"
        )


def refuse_private_http(private: bool, http_listen: tuple[str, ...]) -> None:
    """Basic auth over plain HTTP would send the credentials in clear text."""
    if private and http_listen:
        raise click.UsageError(
            "--private cannot go with --http-listen: the credentials would cross the network "
            "in clear text"
        )


HTTP_LISTEN_HELP = (
    "Also serve image files (only them: GET and HEAD below /images/) over plain HTTP here, "
    "for caching proxies; clients try http://HOST first when their remote is https://HOST "
    "(port 443). Off by default."
)


def _htpasswd_option(f: F) -> F:
    return click.option(
        "--htpasswd",
        "htpasswd_path",
        default=DEFAULT_HTPASSWD,
        show_default=True,
        type=click.Path(dir_okay=False),
        help="Upload credentials file.",
    )(f)


@click.command()
@root_dir_option
@click.option(
    "--ssl-dir",
    "--ssl_dir",
    "ssl_dir",
    default=DEFAULT_SSL_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where nginx.crt and nginx.key live.",
)
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    metavar="NAME",
    help="Name or address clients use (repeatable; also in the certificate).",
)
@click.option(
    "--ssl-skip", "--ssl_skip", "ssl_skip", is_flag=True, help="Leave the certificate alone."
)
@click.option(
    "--nginx-skip", "--nginx_skip", "nginx_skip", is_flag=True, help="Do not write the nginx site."
)
@click.option("--force", is_flag=True, help="Replace an existing certificate.")
@click.option(
    "--nginx-dir",
    default=DEFAULT_NGINX_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="nginx configuration directory.",
)
@_htpasswd_option
@click.option(
    "--listen",
    multiple=True,
    default=["8443"],
    show_default=True,
    metavar="[HOST:]PORT",
    help="Where nginx listens (repeatable).",
)
@click.option(
    "--http-listen",
    multiple=True,
    metavar="[HOST:]PORT",
    help=HTTP_LISTEN_HELP + " Repeatable.",
)
@click.option("--private", is_flag=True, help="Require the credentials for reads too.")
@click.option(
    "--allow-anonymous-uploads",
    is_flag=True,
    help="No upload credentials: anyone may upload (a proxy in front authenticates).",
)
@click.option(
    "--password-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a new upload user's password to this file (mode 0600) instead of printing it.",
)
@click.option(
    "--upload-socket",
    default=DEFAULT_UPLOAD_SOCKET,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Unix socket of the upload app.",
)
@click.pass_obj
@handle_errors
def init(
    g: Globals,
    root_dir: str | None,
    ssl_dir: str,
    hostnames: tuple[str, ...],
    ssl_skip: bool,
    nginx_skip: bool,
    force: bool,
    nginx_dir: str,
    htpasswd_path: str,
    listen: tuple[str, ...],
    http_listen: tuple[str, ...],
    private: bool,
    allow_anonymous_uploads: bool,
    password_file: str | None,
    upload_socket: str,
) -> None:
    """Create the tree, a self-signed certificate, upload credentials and the nginx site."""
    refuse_private_anonymous(private, allow_anonymous_uploads)
    refuse_private_http(private, http_listen)
    paths = tree_paths(g, root_dir, None, None)
    # imported here: certificates pull in `cryptography`, which the other commands never need
    from lxd_image_server.service import tls
    from lxd_image_server.service.initialize import InitOptions, initialize, instructions_for

    report = initialize(
        InitOptions(
            paths=paths,
            ssl_dir=ssl_dir,
            hostnames=hostnames,
            ssl_skip=ssl_skip,
            nginx_skip=nginx_skip,
            force=force,
            nginx_dir=nginx_dir,
            htpasswd=None if allow_anonymous_uploads else htpasswd_path,
            listen=listen,
            private=private,
            upload_socket=upload_socket,
            http_listen=http_listen,
            password_file=password_file,
        )
    )
    for change in report.changes:
        click.echo(f"- {change}")
    if not report.changes:
        click.echo("Nothing to change: everything was already in place.")
    if report.cert is not None:
        click.echo("")
        click.echo(tls.describe(report.cert.cert_path))
    if report.new_credentials:
        user, password = report.new_credentials
        click.echo("")
        if report.password_file:
            where = f"{report.password_file} (mode 0600)"
            click.echo(f"Upload user {user!r}: its password is in {where}")
        else:
            click.echo(f"Upload user {user!r}, password {password}")
        click.echo("(shown once; change it with: lxd-image-server passwd USER)")
    cert_fallback = None if ssl_skip else ssl_dir + "/nginx.crt"
    click.echo("")
    click.echo(
        instructions_for(report, hostnames, listen[0], cert_fallback=cert_fallback, private=private)
    )


@click.command()
@click.argument("user")
@_htpasswd_option
@click.option(
    "--delete",
    is_flag=True,
    help="Remove USER instead: its password stops working at the next request (revokes one "
    "client's or uploader's credentials).",
)
@click.pass_obj
@handle_errors
def passwd(g: Globals, user: str, htpasswd_path: str, delete: bool) -> None:
    """Add an upload USER or change its password (from a prompt, or standard input), or
    remove it (--delete)."""
    from lxd_image_server import htpasswd
    from lxd_image_server.service.initialize import credentials_group

    try:
        htpasswd.validate_user(user)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="USER") from e
    if delete:
        if not htpasswd.remove_user(htpasswd_path, user):
            raise click.ClickException(f"no user {user} in {htpasswd_path}")
        click.echo(f"removed {user} from {htpasswd_path}")
        return
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.UsageError("the password is empty")
    os.makedirs(os.path.dirname(os.path.abspath(htpasswd_path)), exist_ok=True)
    new = htpasswd.set_password(htpasswd_path, user, password, group=credentials_group())
    click.echo(f"{'added' if new else 'changed the password of'} {user} in {htpasswd_path}")


@click.command()
@root_dir_option
@click.option(
    "--listen",
    default="8443",
    show_default=True,
    metavar="[HOST:]PORT",
    help="Where nginx listens.",
)
@click.option("--http-listen", metavar="[HOST:]PORT", help=HTTP_LISTEN_HELP)
@click.option(
    "--ssl-dir",
    type=click.Path(file_okay=False),
    help="nginx.crt and nginx.key (made if missing) [default: STATE_DIR/ssl].",
)
@click.option(
    "--htpasswd",
    "htpasswd_path",
    type=click.Path(dir_okay=False),
    help="Upload credentials (a user is made if empty) [default: STATE_DIR/htpasswd].",
)
@click.option(
    "--allow-anonymous-uploads",
    is_flag=True,
    help="Accept uploads without credentials (a proxy in front authenticates).",
)
@click.option(
    "--no-create-user",
    is_flag=True,
    help="Never make an upload user: with none in the htpasswd file, uploads are refused.",
)
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    metavar="NAME",
    help="Name or address clients use (repeatable; also in a new certificate).",
)
@click.option("--plain-http", is_flag=True, help="Serve plain HTTP (behind a TLS proxy).")
@click.option("--private", is_flag=True, help="Require the credentials for reads too.")
@click.option(
    "--user",
    "run_as",
    metavar="USER",
    envvar=envnames.RUN_USER,
    help="Started as root: the user the upload server and the watcher run as "
    "[default: the owner of the root directory, if not root].",
)
@click.pass_obj
@handle_errors
def run(
    g: Globals,
    root_dir: str | None,
    listen: str,
    http_listen: str | None,
    ssl_dir: str | None,
    htpasswd_path: str | None,
    allow_anonymous_uploads: bool,
    no_create_user: bool,
    hostnames: tuple[str, ...],
    plain_http: bool,
    private: bool,
    run_as: str | None,
) -> None:
    """Run nginx, the upload server and the watcher in the foreground."""
    refuse_private_anonymous(private, allow_anonymous_uploads)
    refuse_private_http(private, (http_listen,) if http_listen else ())
    from lxd_image_server.service.run import RunOptions
    from lxd_image_server.service.run import run as run_server

    if not g.log_file_given:
        logs.setup("STDOUT", g.verbose)
    paths = tree_paths(g, root_dir, None, None)
    ended = run_server(
        RunOptions(
            paths=paths,
            listen=listen,
            http_listen=http_listen,
            ssl_dir=ssl_dir,
            htpasswd=htpasswd_path,
            allow_anonymous_uploads=allow_anonymous_uploads,
            create_user=not no_create_user,
            hostnames=hostnames,
            plain_http=plain_http,
            private=private,
            verbose=g.verbose,
            config=g.config,
            settings=g.settings,
            log_file=g.log_file if g.log_file_given else "STDOUT",
            user=run_as,
        )
    )
    if not ended.ok:
        sys.exit(FAILED)  # what failed is logged already
