"""The lxd-image-server command: options in, calls out. No logic of its own."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from . import __version__, logs
from .config import DEFAULT_STATE_DIR, ConfigError, Paths
from .hashing import HashCache
from .pipeline import Pipeline
from .progress import for_terminal
from .publish import PublishError
from .watch import Watcher

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Globals:
    config: str | None
    state_dir: str | None


def tree_options(f: F) -> F:
    """--root-dir/--img-dir/--streams-dir, with the original tool's underscore spellings."""
    f = click.option(
        "--streams-dir",
        "--streams_dir",
        "streams_dir",
        type=click.Path(file_okay=False),
        help="Catalog directory [default: ROOT/streams/v1].",
    )(f)
    f = click.option(
        "--img-dir",
        "--img_dir",
        "img_dir",
        type=click.Path(file_okay=False),
        help="Image tree [default: ROOT/images].",
    )(f)
    f = click.option(
        "--root-dir",
        "--root_dir",
        "root_dir",
        type=click.Path(file_okay=False),
        help="Directory served as the remote's root [default: /var/www/simplestreams].",
    )(f)
    return f


def _paths(g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None) -> Paths:
    try:
        return Paths.resolve(root_dir, img_dir, streams_dir, g.state_dir)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


def handle_errors(f: F) -> F:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except PublishError as e:
            log.error("%s", e)
            sys.exit(1)
        except PermissionError as e:
            log.error("permission denied: %s", e.filename or e)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    debug_env = os.environ.get("DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    logs.setup(log_file, verbose or debug_env)
    ctx.obj = Globals(config=config, state_dir=state_dir)


@main.command()
@tree_options
@click.option("--rehash", is_flag=True, help="Ignore the hash cache and hash every file again.")
@click.pass_obj
@handle_errors
def update(
    g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None, rehash: bool
) -> None:
    """Rebuild streams/v1/index.json and images.json from the image tree."""
    paths = _paths(g, root_dir, img_dir, streams_dir)
    cache = HashCache(paths.cache_path)
    try:
        pipeline = Pipeline(paths, cache, progress_start=for_terminal())
        changed = pipeline.update_all(rehash=rehash)
    finally:
        cache.close()
    if not changed:
        log.info("catalog unchanged (%d products)", len(pipeline.products))


@main.command()
@tree_options
@click.pass_obj
@handle_errors
def watch(g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None) -> None:
    """Publish the tree, then republish whenever images are added or removed."""
    paths = _paths(g, root_dir, img_dir, streams_dir)
    cache = HashCache(paths.cache_path)
    try:
        sys.exit(Watcher(Pipeline(paths, cache)).run())
    finally:
        cache.close()


if __name__ == "__main__":
    main()
