"""What `run` hands the upload app: the image directory and the credentials nginx checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.config import Paths
from lxd_image_server.service.run import (
    ANONYMOUS_ENV,
    HTPASSWD_ENV,
    RunError,
    RunOptions,
    prepare,
    upload_env,
)


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
    assert env["LXD_IMAGE_SERVER_IMG_DIR"] == str(tmp_path / "root" / "images")
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
