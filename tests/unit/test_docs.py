"""The man page and the README stay true: every command and option of the CLI is documented."""

from pathlib import Path

import click
import pytest

from lxd_image_server.cli.root import main

TOP = Path(__file__).resolve().parents[2]


def man_text() -> str:
    return (TOP / "man" / "lxd-image-server.1").read_text().replace("\\", "")


def commands(group: click.Group, prefix: str = ""):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        yield f"{prefix}{name}", cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, f"{prefix}{name} ")


ALL = list(commands(main))


@pytest.mark.parametrize(("name", "cmd"), ALL, ids=[n for n, _ in ALL])
def test_every_command_and_option_in_the_man_page(name, cmd):
    text = man_text()
    assert f"lxd-image-server {name}" in text or f".SS {name}" in text, name
    for param in cmd.params:
        if isinstance(param, click.Option):
            longest = max(param.opts, key=len)
            assert longest in text, f"{name} {longest}"


def test_global_options_in_the_man_page():
    text = man_text()
    for param in main.params:
        if isinstance(param, click.Option):
            assert max(param.opts, key=len) in text


@pytest.mark.parametrize(("name", "cmd"), ALL, ids=[n for n, _ in ALL])
def test_every_command_in_the_readme(name, cmd):
    readme = (TOP / "README.md").read_text()
    assert f"`{name}" in readme, name
