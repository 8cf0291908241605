"""The `health` command: options in, lxd_image_server.service.health out."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from lxd_image_server.cli.common import handle_errors
from lxd_image_server.service.health import DEFAULT_TIMEOUT, check_all

if TYPE_CHECKING:
    from lxd_image_server.cli.common import Globals


@click.command()
@click.option(
    "--url",
    metavar="URL",
    help="Where nginx serves the tree [default: what `run` noted in STATE_DIR/run/url].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds each check may take.",
)
@click.pass_obj
@handle_errors
def health(g: Globals, url: str | None, timeout: float) -> None:
    """Exit 0 if nginx, the upload server and the watcher of `run` all answer, else 1."""
    checks = check_all(g.state, url, timeout)
    for c in checks:
        click.echo(f"{'ok' if c.ok else 'FAIL':4} {c.name}: {c.detail}")
    sys.exit(0 if all(c.ok for c in checks) else 1)
