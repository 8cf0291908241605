"""`run` hands its configuration to the parts it starts (the watcher and the upload app).

The end-to-end proof (a mirror configured only by `--config` receives an upload) is
tests/integration/test_run_config.py; this checks the hand-off itself, in-process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lxd_image_server.cli import root as cli
from lxd_image_server.config import Paths
from lxd_image_server.service import nginx, run
from lxd_image_server.service.supervise import Ended
from lxd_image_server.settings import MirrorConfig, Settings
from lxd_image_server.web.upload import settings_from_env


@pytest.fixture(autouse=True)
def any_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argv of nginx is not under test here: no need for it to be installed."""
    monkeypatch.setattr(nginx, "nginx_binary", lambda: "/usr/sbin/nginx")


def options(tmp_path: Path, **kw: object) -> run.RunOptions:
    paths = Paths.resolve(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    return run.RunOptions(paths=paths, **kw)  # type: ignore[arg-type]


def watcher_argv(opts: run.RunOptions) -> list[str]:
    return run._commands(opts, "/dev/null", None)["watcher"]


def test_the_watcher_gets_the_config_file_and_the_global_options(tmp_path: Path) -> None:
    opts = options(tmp_path, config="/etc/extra.toml", verbose=True, log_file="/var/log/x.log")
    argv = watcher_argv(opts)
    globals_, _, rest = " ".join(argv).partition(" watch ")
    assert "--config /etc/extra.toml" in globals_
    assert "--verbose" in globals_
    assert "--log-file /var/log/x.log" in globals_
    assert f"--state-dir {opts.paths.state_dir}" in globals_
    assert rest == f"--root-dir {opts.paths.root_dir}"


def test_without_config_the_watcher_gets_none(tmp_path: Path) -> None:
    argv = watcher_argv(options(tmp_path))
    assert "--config" not in argv
    assert argv[argv.index("--log-file") + 1] == "STDOUT"


def test_the_upload_app_gets_the_resolved_settings_over_its_own_environment(
    tmp_path: Path,
) -> None:
    settings = Settings(allow_overwrites=True, allow_deletes=False, max_upload_size=12345)
    opts = options(tmp_path, settings=settings, verbose=True)
    # the environment `run` was started with said otherwise; `run` resolved it already
    env = run.upload_env(opts, None, {"ALLOW_DELETES": "1", "HOME": str(tmp_path)})
    got = settings_from_env(env)
    assert got.img_dir == opts.paths.img_dir
    assert (got.allow_overwrites, got.allow_deletes) == (True, False)
    assert got.max_size == 12345
    assert got.debug is True
    unlimited = settings_from_env(run.upload_env(options(tmp_path), None, {"HOME": str(tmp_path)}))
    assert unlimited.max_size is None
    assert (unlimited.allow_overwrites, unlimited.allow_deletes, unlimited.debug) == (
        False,
        False,
        False,
    )


def test_the_run_command_passes_config_and_settings_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[upload]\nallow_overwrites = true\n[mirrors.m1]\nremote = "mirror.example"\n'
    )
    seen: list[run.RunOptions] = []

    def fake_run(opts: run.RunOptions) -> Ended:
        seen.append(opts)
        return Ended(signal_name="SIGTERM")

    monkeypatch.setattr(run, "run", fake_run)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("ALLOW_OVERWRITES", "ALLOW_DELETES", "DEBUG", "LXD_IMAGE_SERVER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(
        cli.main,
        ["--config", str(config), "--state-dir", str(tmp_path / "s"), "run", "--root-dir", "r"],
    )
    assert result.exit_code == 0, result.output
    (opts,) = seen
    assert opts.config == str(config)
    assert opts.settings.allow_overwrites is True
    assert opts.settings.mirrors == (MirrorConfig(name="m1", host="mirror.example"),)
    assert "--config" in watcher_argv(opts)


@pytest.mark.parametrize(
    ("ended", "status"),
    [(Ended(signal_name="SIGTERM"), 0), (Ended("nginx exited with status 1"), 1)],
)
def test_run_says_what_ended_it_and_the_command_line_exits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ended: Ended, status: int
) -> None:
    """The use case reports what happened (supervise.Ended); the exit status is the command
    line's: 0 when stopped, 1 when a part failed (what failed is logged already)."""
    monkeypatch.setattr(run, "run", lambda opts: ended)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(
        cli.main, ["--state-dir", str(tmp_path / "s"), "run", "--root-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == status, result.output
    assert result.output == ""
