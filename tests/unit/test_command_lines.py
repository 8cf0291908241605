"""Command lines written as text, far from the commands they name: the units' ExecStart, the
children `run` starts, the code `run` hands a child Python, the paths the config unit watches.
Each is read here as its reader would read it, so that renaming a command, an option or a
function breaks a test rather than the package."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from lxd_image_server import settings
from lxd_image_server.cli.root import main
from lxd_image_server.config import Paths
from lxd_image_server.service import health, run
from lxd_image_server.settings import Settings, SyncConfig

TOP = Path(__file__).resolve().parents[2]
UNITS = sorted((TOP / "systemd").iterdir())


def parse(argv: list[str]) -> tuple[str, dict[str, object]]:
    """The subcommand `argv` (the program's arguments) runs and its parameters, as click reads
    them; click.UsageError for a command or an option that does not exist."""
    with click.Context(main, info_name="lxd-image-server") as ctx:
        # the group's own options, then the rest as the group hands it to the subcommand
        rest = click.Command.parse_args(main, ctx, list(argv))
        name, cmd, rest = main.resolve_command(ctx, rest)
        assert cmd is not None and name is not None
        with cmd.make_context(name, rest, parent=ctx) as sub:
            return name, sub.params


def unit_command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for unit in UNITS:
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart=/usr/bin/lxd-image-server "):
                found.append((unit.name, shlex.split(line.removeprefix("ExecStart="))[1:]))
    return found


UNIT_LINES = unit_command_lines()


def test_the_units_start_the_commands_they_mean() -> None:
    assert {(unit, parse(argv)[0]) for unit, argv in UNIT_LINES} == {
        ("lxd-image-server.service", "watch"),
        ("lxd-image-server-update.service", "update"),
        ("lxd-image-server-sync.service", "sync"),
    }


@pytest.mark.parametrize(("unit", "argv"), UNIT_LINES, ids=[u for u, _ in UNIT_LINES])
def test_every_unit_command_line_parses(unit: str, argv: list[str]) -> None:
    name, params = parse(argv)
    assert params["root_dir"] == "/var/www/simplestreams", unit
    if name == "sync":
        assert params["due"] is True


def test_a_renamed_option_fails_the_parse() -> None:
    with pytest.raises(click.UsageError):
        parse(["watch", "--root-directory", "/x"])


def test_run_starts_children_the_command_line_understands(tmp_path: Path) -> None:
    paths = Paths.resolve(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    opts = run.RunOptions(
        paths=paths,
        config=str(tmp_path / "c.toml"),
        verbose=True,
        settings=Settings(syncs=(SyncConfig("up", "https://up.example/"),)),
    )
    commands = run._commands(opts, "nginx.conf", None)
    for child, subcommand in (("watcher", "watch"), ("syncer", "sync")):
        argv = commands[child]
        assert argv[1:3] == ["-m", "lxd_image_server"]
        name, params = parse(argv[3:])
        assert name == subcommand
        assert params["root_dir"] == paths.root_dir
    assert parse(commands["syncer"][3:])[1]["repeat"] is True


def test_health_knows_the_watcher_as_the_unit_and_run_start_it(tmp_path: Path) -> None:
    paths = Paths.resolve(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    by_run = run._commands(run.RunOptions(paths=paths), "nginx.conf", None)
    (by_unit,) = [argv for unit, argv in UNIT_LINES if unit == "lxd-image-server.service"]
    for argv in (by_run["watcher"], ["/usr/bin/lxd-image-server", *by_unit]):
        assert health.is_watcher([a.encode() for a in argv]), argv
    assert not health.is_watcher([a.encode() for a in by_run["upload"]])
    assert not health.is_watcher([b"/usr/bin/lxd-image-server", b"update"])


def test_the_first_catalog_code_run_hands_a_child_publishes(tmp_path: Path) -> None:
    """`run` as root has the watcher's user make the first catalog with a few lines of Python
    naming functions by text (run._FIRST_CATALOG): run here as it is there."""
    p = Paths.resolve(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    cmd = [sys.executable, "-c", run._FIRST_CATALOG, p.root_dir, p.img_dir, p.streams_dir]
    subprocess.run([*cmd, p.state_dir], check=True, timeout=120, env=dict(os.environ))
    index = json.loads(Path(p.streams_dir, "index.json").read_text())
    assert index["format"] == "index:1.0"


def test_the_config_unit_watches_the_files_settings_reads() -> None:
    unit = (TOP / "systemd" / "lxd-image-server-config.path").read_text()
    watched = set(re.findall(r"^PathChanged=(\S+)$", unit, re.M))
    system = Path(settings.SYSTEM_DIR)
    conf_d = system / "conf.d"
    conf_d_file = conf_d / "x.toml"
    files = settings.config_files(None, {}, str(system), None)
    assert files[0][0] == system / "config.toml"
    assert watched == {str(system / "config.toml"), str(conf_d)}
    assert conf_d_file.parent == conf_d
