"""`push`: an export uploaded to a server's upload app over HTTPS (a module of its own, so that
`import` and the other operator commands do not load the HTTPS client)."""

from __future__ import annotations

import os
import sys

import click

from lxd_image_server.cli.common import handle_errors
from lxd_image_server.cli.naming import files_given, naming, naming_options, terminal_progress
from lxd_image_server.ops import import_detect, pushclient


def _password(password_file: str | None, user: str) -> str | None:
    if password_file is not None:
        return pushclient.read_password_file(password_file)
    env = os.environ.get(pushclient.PASSWORD_ENV)
    if env:
        return env
    if sys.stdin.isatty():
        return str(click.prompt(f"Password for {user}", hide_input=True))
    return None


@click.command("push")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--remote",
    required=True,
    metavar="https://HOST[:PORT]",
    help="The server (its nginx, which passes uploads to the upload app).",
)
@click.option("--user", default=pushclient.DEFAULT_USER, show_default=True, help="Upload user.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False),
    help=f"File whose first line is the password [default: ${pushclient.PASSWORD_ENV}, "
    "else a prompt].",
)
@naming_options
@handle_errors
def push_cmd(
    files: tuple[str, ...],
    remote: str,
    user: str,
    password_file: str | None,
    os_name: str | None,
    release: str | None,
    arch: str | None,
    variant: str | None,
    serial: str | None,
) -> None:
    """Upload what `lxc image export` wrote to a server over HTTPS.

    The same files and naming as `import`, sent to the server's upload app (one PUT per file,
    metadata first); the server's watcher publishes the image once every file is there.
    """
    try:
        target = pushclient.parse_remote(remote)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--remote") from e
    plan = import_detect.plan_import(
        files_given(files), naming(os_name, release, arch, variant, serial)
    )
    client = pushclient.Client(target, user, _password(password_file, user))
    try:
        pushed = pushclient.push(plan, client, terminal_progress)
    finally:
        client.close()
    for p in pushed:
        state = "already there" if p.skipped else "sent"
        click.echo(f"{state}: images/{p.rel} ({p.size} bytes, sha256 {p.sha256})")
    click.echo(f"pushed {import_detect.describe(plan)} to {target.url}")
