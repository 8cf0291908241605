"""What `run` hands the upload app: the image directory and the credentials nginx checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server import envnames
from lxd_image_server.config import Paths
from lxd_image_server.service.run import RunError, RunOptions, prepare, upload_env
from lxd_image_server.settings import Settings
from lxd_image_server.web.upload_settings import UploadSettings, settings_from_env

ANONYMOUS_ENV, HTPASSWD_ENV = envnames.ANONYMOUS_UPLOADS, envnames.HTPASSWD


def options(tmp_path: Path, **kw: Any) -> RunOptions:
    paths = Paths.resolve(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    return RunOptions(paths=paths, **kw)


def test_the_app_learns_the_htpasswd_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = upload_env(
        options(tmp_path), "creds/htpasswd", base={"PATH": "/bin", ANONYMOUS_ENV: "yes"}
    )
    assert env[HTPASSWD_ENV] == str(tmp_path / "creds" / "htpasswd")
    assert ANONYMOUS_ENV not in env
    assert env[envnames.IMG_DIR] == str(tmp_path / "root" / "images")
    assert env["PATH"] == "/bin"


def test_anonymous_uploads_drop_an_inherited_htpasswd(tmp_path: Path) -> None:
    env = upload_env(options(tmp_path), None, base={HTPASSWD_ENV: "/etc/elsewhere"})
    assert HTPASSWD_ENV not in env
    assert env[ANONYMOUS_ENV] == "yes"


def test_prepare_refuses_private_without_credentials(tmp_path: Path) -> None:
    opts = options(tmp_path, private=True, allow_anonymous_uploads=True)
    with pytest.raises(RunError, match="--private"):
        prepare(opts)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("anonymous", [False, True])
def test_the_upload_app_reads_what_run_hands_it(tmp_path: Path, anonymous: bool) -> None:
    """Both sides of the environment agree: `run`'s settings (none the app's defaults) come
    out of the app's own reading of the environment `run` builds, whatever the process had."""
    settings = Settings(
        root_dir="/elsewhere",
        allow_overwrites=True,
        allow_deletes=True,
        max_upload_size=12345,
        max_parallel_uploads=3,
    )
    opts = options(tmp_path, settings=settings, verbose=True, allow_anonymous_uploads=anonymous)
    state = opts.paths.state
    os.makedirs(state.upload_digests)
    os.makedirs(state.upload_run_dir)  # `run` makes it (prepare), the app its slots
    htpasswd = None if anonymous else str(tmp_path / "htpasswd")
    names = set(upload_env(opts, htpasswd, base={})) - {"PYTHONUNBUFFERED"}
    assert names <= set(envnames.ALL)
    # what the process had under these names (the operator's environment) counts for nothing
    inherited = {name: "junk" for name in (*names, ANONYMOUS_ENV, HTPASSWD_ENV)}
    env = upload_env(opts, htpasswd, base={**inherited, "HOME": str(tmp_path)})
    got = settings_from_env(env, system_dir=str(tmp_path / "no-system-config"))
    assert got == UploadSettings(
        img_dir=opts.paths.img_dir,
        allow_overwrites=True,
        allow_deletes=True,
        max_size=12345,
        debug=True,
        htpasswd=htpasswd or got.htpasswd,
        allow_anonymous=anonymous,
        digest_dir=state.upload_digests,
        max_parallel=3,
        slots_dir=state.upload_slots,
    )
