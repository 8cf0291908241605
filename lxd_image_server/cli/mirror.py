"""`lxd-image-server mirror ...`: the mirrors' state on the master, and `authorize` on a mirror.

Registered in root.py with `main.add_command(mirror)`.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import IO, TYPE_CHECKING

import click

from lxd_image_server.cli.common import handle_errors
from lxd_image_server.config import DEFAULT_MIRROR_USER

if TYPE_CHECKING:
    from lxd_image_server.cli.common import Globals


@click.group()
def mirror() -> None:
    """Push the tree to mirrors: their state, and preparing a mirror."""


@mirror.command()
@click.pass_obj
@handle_errors
def status(g: Globals) -> None:
    """Show each mirror's last push, last error and pending push.

    Read from STATE_DIR/mirrors.json, which the running watcher keeps up to date. Exits 1
    unless every mirror's last push worked."""
    from lxd_image_server.mirror.state import describe, read_state, state_path

    path = state_path(g.state)
    click.echo(f"mirror state: {path}")
    lines, all_ok = describe(read_state(g.state), g.settings.mirrors, time.time())
    for line in lines:
        click.echo(line)
    sys.exit(0 if all_ok else 1)


@mirror.command(name="authorize")
@click.argument("key_file", metavar="KEY.pub", type=click.File("r", encoding="utf-8"))
@click.option(
    "--user",
    default=DEFAULT_MIRROR_USER,
    show_default=True,
    help="The push user (created if missing).",
)
@click.option(
    "--root",
    "root_dir",
    type=click.Path(file_okay=False),
    help="The mirror's served root [default: the configured root, /var/www/simplestreams].",
)
@click.pass_obj
@handle_errors
def authorize_command(g: Globals, key_file: IO[str], user: str, root_dir: str | None) -> None:
    """Let the holder of KEY.pub push into this mirror's tree.

    Run as root on the mirror. The key may run rsync write-only into the tree and nothing
    else (rrsync; no shell, no forwarding). Idempotent."""
    from lxd_image_server.mirror.authorize import authorize

    report = authorize(key_file.read(), user, root_dir or g.settings.root_dir)
    for change in report.changes:
        click.echo(f"- {change}")
    if not report.changes:
        click.echo("Nothing to change: the key and the tree were already in place.")
    click.echo("")
    click.echo("On the master, in /etc/lxd-image-server/config.toml (then reload):")
    click.echo("")
    click.echo("[mirrors.NAME]")
    click.echo(f'remote = "{socket.getfqdn()}"')
    click.echo(f'user = "{report.user}"')
    click.echo('key_path = "/etc/lxd-image-server/mirror.key"   # the private half of KEY.pub')
    click.echo(f'path = "{report.path}"')
    if report.path == "/":
        click.echo("# this rrsync has no -absolute (rsync < 3.5): the tree is / for the push user")
