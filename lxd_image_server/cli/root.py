"""The lxd-image-server command: options in, one call out, errors to exit codes (cli/common.py).

The use cases live below: `update` and `watch` in ops/updating.py, `init` in
service/initialize.py, `run` in service/run.py; the operator commands are in cli/ops.py (`push`
in cli/push.py), `mirror` in cli/mirror.py, `health` in cli/health.py, loaded by name when
used."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from typing import Any

import click

from lxd_image_server import __version__, logs
from lxd_image_server import settings as settings_module
from lxd_image_server.cli.common import (
    F,
    Globals,
    handle_errors,
    root_dir_option,
    tree_options,
    tree_paths,
)
from lxd_image_server.config import (
    DEFAULT_HTPASSWD,
    DEFAULT_NGINX_DIR,
    DEFAULT_SSL_DIR,
    DEFAULT_STATE_DIR,
    DEFAULT_UPLOAD_SOCKET,
    ConfigError,
    StateDir,
)
from lxd_image_server.progress import for_terminal
from lxd_image_server.settings import Settings

log = logging.getLogger(__name__)


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


def load_settings(config: str | None) -> Settings:
    """The layered configuration, or a usage error naming the file and line."""
    try:
        return settings_module.load(config)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


def apply_logging(g: Globals) -> None:
    logs.setup(g.log_file, g.verbose)
    if g.settings.logging is not None and not g.log_file_given:
        logs.configure(g.settings.logging)


class LazyGroup(click.Group):
    """Commands from other modules are imported only when used, so that `update` and `watch`
    do not pay for what `push` or `health` import (TLS clients, tarfile, ...)."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attr = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


LAZY_COMMANDS = {
    "health": "lxd_image_server.cli.health:health",
    "mirror": "lxd_image_server.cli.mirror:mirror",
    "import": "lxd_image_server.cli.ops:import_cmd",
    "push": "lxd_image_server.cli.push:push_cmd",
    "sync": "lxd_image_server.cli.sync:sync_cmd",
    "list": "lxd_image_server.cli.ops:list_cmd",
    "verify": "lxd_image_server.cli.ops:verify_cmd",
    "prune": "lxd_image_server.cli.ops:prune_cmd",
    "remove": "lxd_image_server.cli.ops:remove_cmd",
}


@click.group(
    cls=LazyGroup,
    lazy=LAZY_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--config", type=click.Path(dir_okay=False), help="Extra configuration file.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help=f"Hash cache and runtime state [default: {DEFAULT_STATE_DIR}].",
)
@click.option(
    "--log-file",
    default="STDERR",
    show_default=True,
    metavar="PATH|STDOUT|STDERR",
    help="Where to log.",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging (also: DEBUG=1).")
@click.version_option(__version__, prog_name="lxd-image-server")
@click.pass_context
def main(
    ctx: click.Context, config: str | None, state_dir: str | None, log_file: str, verbose: bool
) -> None:
    """Serve a directory of LXD and Incus images as a simplestreams remote."""
    logs.setup(log_file, verbose or logs.truthy(os.environ.get("DEBUG")))
    settings = load_settings(config)
    given = ctx.get_parameter_source("log_file") is not click.core.ParameterSource.DEFAULT
    ctx.obj = g = Globals(
        config=config,
        state_dir=state_dir,
        settings=settings,
        verbose=verbose or settings.debug,
        log_file=log_file,
        log_file_given=given,
    )
    apply_logging(g)


@main.command()
@tree_options
@click.option("--rehash", is_flag=True, help="Ignore the hash cache and hash every file again.")
@click.pass_obj
@handle_errors
def update(
    g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None, rehash: bool
) -> None:
    """Rebuild streams/v1/index.json and images.json from the image tree."""
    from lxd_image_server.ops.updating import update as update_tree
    from lxd_image_server.privileges import become_writer

    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    become_writer(paths)  # as root on the package's tree: as its catalog writer
    update_tree(paths, g.settings, rehash, for_terminal())


@main.command()
@tree_options
@click.option(
    "--max-watches",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Most directories watched with inotify; past it, the tree is rescanned periodically.",
)
@click.option(
    "--rescan-interval",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds between full rescans once --max-watches is reached.",
)
@click.pass_obj
@handle_errors
def watch(
    g: Globals,
    root_dir: str | None,
    img_dir: str | None,
    streams_dir: str | None,
    max_watches: int,
    rescan_interval: float,
) -> None:
    """Publish the tree, then republish whenever images are added or removed."""
    from lxd_image_server.ops.updating import watch as watch_tree

    def reload_settings() -> Settings:
        g.settings = settings_module.load(g.config)  # ConfigError: the watcher keeps the old
        apply_logging(g)
        log.info("configuration reloaded (%s)", ", ".join(g.settings.sources) or "defaults")
        return g.settings

    paths = tree_paths(g, root_dir, img_dir, streams_dir)
    sys.exit(watch_tree(paths, g.settings, reload_settings, max_watches, rescan_interval))


@main.command()
@click.pass_obj
@handle_errors
def reload(g: Globals) -> None:
    """Make the running watcher re-read its configuration and rescan (like SIGHUP)."""
    try:
        settings_module.load(g.config)
    except ConfigError as e:
        raise click.ClickException(f"not reloading: {e}") from e
    from lxd_image_server.catalog.watch import signal_watcher

    try:
        pid = signal_watcher(StateDir(g.state).watch_pid)
    except ProcessLookupError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"asked the watcher (pid {pid}) to reload")


def _htpasswd_option(f: F) -> F:
    return click.option(
        "--htpasswd",
        "htpasswd_path",
        default=DEFAULT_HTPASSWD,
        show_default=True,
        type=click.Path(dir_okay=False),
        help="Upload credentials file.",
    )(f)


@main.command()
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


@main.command()
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


@main.command()
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
    envvar="LXD_IMAGE_SERVER_RUN_USER",
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
    sys.exit(
        run_server(
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
    )


def console_main() -> None:
    """The console script (and `python3 -m lxd_image_server`): the command, then, if it leaves
    no thread behind, an exit without the interpreter's teardown (freeing every module and
    object one by one costs a short command as much as its own work: about 20 ms). Output is
    flushed and logging shut down first; every file the commands write is fsynced (or, for the
    hash cache, committed) before they return, so nothing is lost. With a thread still running
    (none should be) the exit is the ordinary one, which waits for it."""
    try:
        main()
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        status = e.code or 0
    else:
        status = 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        sys.exit(status)  # a closed pipe: let the ordinary exit report it
    logging.shutdown()
    if threading.active_count() > 1:
        sys.exit(status)
    os._exit(status)


if __name__ == "__main__":
    console_main()
