"""The upload app's gunicorn settings live in one module, used by the systemd unit and `run`
alike (issue 9, finding 11: graceful timeouts used to differ, threads were too few)."""

from __future__ import annotations

import shlex
from pathlib import Path

from lxd_image_server.config import Paths
from lxd_image_server.service.run import RunOptions, _commands
from lxd_image_server.service.supervise import STOP_TIMEOUT
from lxd_image_server.web import gunicorn_conf

UNIT = Path(__file__).parents[2] / "systemd" / "lxd-image-server-upload.service"
CONFIG = ["-c", "python:lxd_image_server.web.gunicorn_conf"]
#: Settings that belong in gunicorn_conf only.
OWNED = (
    *("--workers", "-w", "--threads", "--worker-class", "-k", "--timeout", "-t"),
    *("--graceful-timeout", "--error-logfile", "--log-file"),
)


def _exec_start() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise AssertionError("no ExecStart")


def test_unit_and_run_use_the_config_module(tmp_path: Path) -> None:
    unit = _exec_start()
    paths = Paths(str(tmp_path), str(tmp_path / "images"), str(tmp_path / "streams"), str(tmp_path))
    run = _commands(RunOptions(paths=paths), "nginx.conf", None)["upload"]
    as_root = _commands(RunOptions(paths=paths, verbose=True), "nginx.conf", "www-data www-data")
    for argv in (unit, run, as_root["upload"]):
        assert argv[1:3] == ["-m", "gunicorn"], argv
        assert argv[3:5] == CONFIG, argv
        assert not set(argv) & set(OWNED), argv
        assert argv[-1] == "lxd_image_server.web.upload:app_from_env()"


def test_settings() -> None:
    assert gunicorn_conf.worker_class == "gthread"
    assert gunicorn_conf.workers * gunicorn_conf.threads >= 32
    # a stop ends uploads before `run` or systemd (TimeoutStopSec) kill gunicorn
    assert gunicorn_conf.graceful_timeout < STOP_TIMEOUT
    assert "TimeoutStopSec=30s" in UNIT.read_text()
