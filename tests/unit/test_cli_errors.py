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
