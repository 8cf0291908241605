"""The lxd-image-server command: the group (its global options), the catalog writer's own
commands (`update`, `watch`, `reload`) and the console script. Options in, one call out, errors
to exit codes (cli/common.py).

The use cases live below: `update` and `watch` in ops/updating.py. The other commands are
loaded by name when used (LAZY_COMMANDS): `init`, `passwd` and `run` from cli/service.py, the
operator commands from cli/ops.py (`push` from cli/push.py, `sync` from cli/sync.py), `mirror`
from cli/mirror.py, `health` from cli/health.py."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from lxd_image_server import __version__, envnames, logs
from lxd_image_server import settings as settings_module
from lxd_image_server.cli.common import Globals, handle_errors, tree_options, tree_paths
from lxd_image_server.config import DEFAULT_STATE_DIR, ConfigError, StateDir
from lxd_image_server.progress import for_terminal
from lxd_image_server.settings import Settings

if TYPE_CHECKING:
    from lxd_image_server.ops.import_early import EarlyRoot

log = logging.getLogger(__name__)


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
    "init": "lxd_image_server.cli.service:init",
    "passwd": "lxd_image_server.cli.service:passwd",
    "run": "lxd_image_server.cli.service:run",
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
    early = ctx.obj  # (console_main: an import's root copy, already started, or None)
    logs.setup(log_file, verbose or logs.truthy(os.environ.get(envnames.DEBUG)))
    settings = load_settings(config)
    given = ctx.get_parameter_source("log_file") is not click.core.ParameterSource.DEFAULT
    ctx.obj = g = Globals(
        config=config,
        state_dir=state_dir,
        settings=settings,
        verbose=verbose or settings.debug,
        log_file=log_file,
        log_file_given=given,
        early=early,
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
    watch_tree(paths, g.settings, reload_settings, max_watches, rescan_interval)


@main.command()
@click.pass_obj
@handle_errors
def reload(g: Globals) -> None:
    """Make the running watcher re-read its configuration and rescan (like SIGHUP)."""
    try:
        settings_module.load(g.config)
    except ConfigError as e:
        raise click.ClickException(f"not reloading: {e}") from e
    from lxd_image_server.catalog.watch_pid import signal_watcher

    try:
        pid = signal_watcher(StateDir(g.state).watch_pid)
    except ProcessLookupError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"asked the watcher (pid {pid}) to reload")


def console_main(early: EarlyRoot | None = None) -> None:
    """The console script (and `python3 -m lxd_image_server`): the command, then, if it leaves
    no thread behind, an exit without the interpreter's teardown (freeing every module and
    object one by one costs a short command as much as its own work: about 20 ms). Output is
    flushed and logging shut down first; every file the commands write is fsynced (or, for the
    hash cache, committed) before they return, so nothing is lost. With a thread still running
    (none should be) the exit is the ordinary one, which waits for it.
    `early`: an import's root copy started before (cli/early.py), handed to the command
    (Globals.early) and closed (stopped, what it made removed if unused) whatever happens."""
    try:
        main(obj=early)
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        status = e.code or 0
    else:
        status = 0
    finally:
        if early is not None:
            early.close()
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
