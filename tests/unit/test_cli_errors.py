"""The one map from the package's errors to exit codes (cli_common.EXIT_CODES), which every
command goes through."""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest

from lxd_image_server.cli import common as cli_common
from lxd_image_server.cli.common import EXIT_CODES, FAILED, USAGE, error_class, handle_errors
from lxd_image_server.config import ServiceError

PACKAGE = Path(cli_common.__file__).parent


@pytest.mark.parametrize("spec", [spec for spec, _ in EXIT_CODES])
def test_every_entry_names_an_exception_class(spec: str) -> None:
    assert error_class(spec, load=True) is not None, spec


def test_a_mapped_error_becomes_its_exit_code_with_its_message() -> None:
    @handle_errors
    def failing() -> None:
        raise ServiceError("nginx would not start")

    with pytest.raises(click.ClickException) as caught:
        failing()
    assert caught.value.exit_code == FAILED
    assert caught.value.format_message() == "nginx would not start"


def test_a_usage_error_exits_2() -> None:
    from lxd_image_server.ops.import_errors import NamingError

    @handle_errors
    def failing() -> None:
        raise NamingError("no release")

    with pytest.raises(click.UsageError) as caught:
        failing()
    assert caught.value.exit_code == USAGE


def test_an_error_that_is_not_ours_is_a_bug_and_goes_through() -> None:
    @handle_errors
    def failing() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        failing()


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(function, decorator names) of every click command defined in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            names = [ast.unparse(d) for d in node.decorator_list]
            if any(".command" in n or n.startswith("click.command") for n in names):
                found.append((node.name, names))
    return found


def test_every_command_goes_through_the_map() -> None:
    cli_modules = sorted(PACKAGE.glob("*.py"))
    found = [(p.name, fn, names) for p in cli_modules for fn, names in commands(p)]
    assert len(found) >= 14, found
    missing = [f"{mod}:{fn}" for mod, fn, names in found if "handle_errors" not in names]
    assert missing == []


#: The package's exceptions that are not in EXIT_CODES, each with where it stops before it could
#: reach a command. Every other exception class the package defines (web/ aside: the upload app
#: answers with HTTP statuses, it never runs under a command) must be in EXIT_CODES, itself or a
#: base class: a new error is either an operator's (mapped) or stopped on its way (listed here).
STOPPED_ON_THE_WAY = {
    "lxd_image_server.config:ConfigError": "a setting or path: the commands make it a usage "
    "error (cli/root.py load_settings, cli/common.py tree_paths, cli/sync.py); the watcher "
    "keeps its settings",
    "lxd_image_server.retention_policy:PolicyError": "settings.py makes it a ConfigError",
    "lxd_image_server.fsutil:NotRegularFile": "the bounded readers': each caller says what it "
    "means (a file skipped, a catalog refused)",
    "lxd_image_server.fsutil:TooLarge": "the same",
    "lxd_image_server.fsutil:DirectoryChanged": "DirChain's: an OSError its callers handle",
    "lxd_image_server.tree.layout:LayoutError": "a name that does not fit the layout: its "
    "callers skip it or make it their own error (import_naming's NamingError)",
    "lxd_image_server.catalog.hashing:FileChanged": "a file that changed while hashed: its "
    "version waits for the next pass",
    "lxd_image_server.mirror.sendlist:CatalogError": "a push to a mirror: the worker records "
    "it and retries (mirror/worker.py); `update` reports failed pushes as MirrorsFailed",
    "lxd_image_server.mirror.transport:PushError": "the same",
    "lxd_image_server.mirror.transport:PushCancelled": "the same",
    "lxd_image_server.ops.sync_fetch:FetchFailed": "one download: syncing.py makes it a "
    "SyncError or a failed version",
    "lxd_image_server.ops.sync_fetch:RangeIgnored": "the same",
    "lxd_image_server.ops.sync_place:VersionFailed": "one version of a sync: logged and counted, "
    "the sync goes on (syncing.py)",
    "lxd_image_server.ops.sync_select:FilterError": "cli/sync.py makes it a usage error of "
    "--filter; a configured sync's is logged (sync_schedule.py)",
    "lxd_image_server.catalog.publish_requests:RequestError": "a malformed publish request: the "
    "watcher answers it with the error and goes on; request_publish publishes by itself",
}


def package_exceptions() -> dict[str, type[BaseException]]:
    """ "module:class" -> class, for every public exception class the package defines (web/
    aside): every module is imported."""
    import importlib
    import inspect

    top = PACKAGE.parent
    found: dict[str, type[BaseException]] = {}
    for path in sorted(top.rglob("*.py")):
        parts = path.relative_to(top.parent).with_suffix("").parts
        if parts[-1] == "__main__" or parts[1:2] == ("web",):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(name)
        for attr, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and issubclass(cls, BaseException)
                and cls.__module__ == name
                and not attr.startswith("_")
            ):
                found[f"{name}:{attr}"] = cls
    return found


def test_every_error_is_mapped_or_stopped_on_the_way() -> None:
    mapped = tuple(c for c in (error_class(s, load=True) for s, _ in EXIT_CODES) if c)
    errors = package_exceptions()
    assert len(errors) > 20, sorted(errors)
    unmapped = {spec for spec, cls in errors.items() if not issubclass(cls, mapped)}
    assert unmapped - set(STOPPED_ON_THE_WAY) == set(), "map it in EXIT_CODES or list it here"
    assert set(STOPPED_ON_THE_WAY) - unmapped == set(), "listed but mapped, or gone"
