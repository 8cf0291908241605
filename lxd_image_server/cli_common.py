"""What the command modules share: the global options, the tree options, the tree's paths, the
pipeline's retention, and the one map from errors to exit codes. cli.py loads the other command
modules (cli_*.py) by name, so they import this module, never cli.py."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from .config import ConfigError, Paths, ServiceError
from .publish import PublishError
from .retention import Retention
from .settings import Settings

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Globals:
    config: str | None
    state_dir: str | None
    settings: Settings
    verbose: bool = False
    log_file: str = "STDERR"
    log_file_given: bool = False

    @property
    def state(self) -> str:
        return self.state_dir or self.settings.state_dir


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


def tree_paths(
    g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None
) -> Paths:
    if root_dir is None and img_dir is None and streams_dir is None:
        root_dir = g.settings.root_dir
    try:
        return Paths.resolve(root_dir, img_dir, streams_dir, g.state)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


def retention_of(settings: Settings) -> Retention:
    """[retention] with the grace period of [prune], for the pipeline."""
    return Retention(settings.retention, settings.prune_grace)


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
        except ServiceError as e:
            log.error("%s", e)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
