"""What the command modules share: the global options, the tree options, the tree's paths, and
the one map from the package's errors to exit codes. root.py loads the other command modules
(ops.py, mirror.py, health.py) by name, so they import this module, never root.py."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from lxd_image_server.config import ConfigError, Paths
from lxd_image_server.settings import Settings

if TYPE_CHECKING:
    from lxd_image_server.ops.import_early import EarlyRoot

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Globals:
    config: str | None
    state_dir: str | None
    settings: Settings
    verbose: bool = False
    log_file: str = "STDERR"
    log_file_given: bool = False
    #: `import` of one image: its root's copy, started before the arguments were parsed
    #: (cli/early.py), or None
    early: EarlyRoot | None = None

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
    return root_dir_option(f)


def root_dir_option(f: F) -> F:
    """--root-dir alone (`init`, `run`: the image and catalog directories follow from it)."""
    return click.option(
        "--root-dir",
        "--root_dir",
        "root_dir",
        type=click.Path(file_okay=False),
        help="Directory served as the remote's root [default: /var/www/simplestreams].",
    )(f)


def tree_paths(
    g: Globals, root_dir: str | None, img_dir: str | None, streams_dir: str | None
) -> Paths:
    if root_dir is None and img_dir is None and streams_dir is None:
        root_dir = g.settings.root_dir
    try:
        return Paths.resolve(root_dir, img_dir, streams_dir, g.state)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


#: exit codes: 1 the command failed, 2 it was used wrongly (click's own usage errors too)
FAILED, USAGE = 1, 2

#: The package's errors, "module:class", and the exit code each means; anything else is a bug
#: (a traceback). Named, not imported: a command imports only what it uses (`update` never
#: loads the push client), and an error of a module that is not loaded cannot be raised.
EXIT_CODES: tuple[tuple[str, int], ...] = (
    ("lxd_image_server.ops.import_errors:NamingError", USAGE),
    ("lxd_image_server.ops.import_errors:ImportFailed", FAILED),
    ("lxd_image_server.ops.pushclient:PushError", FAILED),
    ("lxd_image_server.ops.sync_fetch:SyncError", FAILED),
    ("lxd_image_server.catalog.retention:RetentionError", FAILED),
    ("lxd_image_server.ops.listing:CatalogMissing", FAILED),
    ("lxd_image_server.catalog.publish:PublishError", FAILED),
    ("lxd_image_server.config:ServiceError", FAILED),
    ("lxd_image_server.mirror.authorize:AuthorizeError", FAILED),
    ("lxd_image_server.ops.updating:MirrorsFailed", FAILED),
    ("builtins:PermissionError", FAILED),
)


def error_class(spec: str, load: bool = False) -> type[BaseException] | None:
    """The class EXIT_CODES names by `spec`; None while its module is not loaded (or `load`)."""
    module_name, _, name = spec.partition(":")
    module = importlib.import_module(module_name) if load else sys.modules.get(module_name)
    cls = getattr(module, name, None) if module is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def exit_code(e: BaseException) -> int | None:
    """The exit code the package's error `e` means, or None (not one of ours: a bug)."""
    for spec, code in EXIT_CODES:
        cls = error_class(spec)
        if cls is not None and isinstance(e, cls):
            return code
    return None


def message(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}"
    return str(e)


def handle_errors(f: F) -> F:
    """Every command's errors -> their exit code (EXIT_CODES), with the message on stderr."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:
            code = exit_code(e)
            if code is None:
                raise
            if code == USAGE:
                raise click.UsageError(message(e)) from e
            raise click.ClickException(message(e)) from e

    return wrapper  # type: ignore[return-value]
