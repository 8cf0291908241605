"""`lxd-image-server --config FILE run`: the file reaches every part `run` starts.

The mirror is configured only in that file (no LXD_IMAGE_SERVER_CONFIG, nothing in /etc): the
watcher must push to it, and the upload app must apply the file's [upload] settings. The
mirror is the real one of test_mirror.py (sshd, rrsync, nginx on loopback ports).

Prerequisites: root, `bash tests/host-setup.sh` (openssh-server, rsync, nginx).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .servers import Pki
from .test_mirror import MirrorHost, listed, wait_until, watchers_key
from .test_mirror import image as busybox_image
from .test_mirror import mirror_host as config_mirror
from .test_run import Server, curl, start_server

#: what the issue promises: a mirror configured by `run --config` serves an upload this soon
MIRROR_DEADLINE = 5.0
MAX_SIZE = 1 << 20

__all__ = ["busybox_image", "config_mirror"]  # fixtures, used by name


@pytest.fixture(scope="module")
def configured(pki: Pki, config_mirror: MirrorHost, run_user: str | None) -> Iterator[Server]:
    base = Path(tempfile.mkdtemp(prefix="lis-config-", dir="/var/tmp"))
    base.chmod(0o755)
    config = base / "config.toml"
    config.write_text(
        "[upload]\n"
        "allow_overwrites = true\n"
        f"max_size = {MAX_SIZE}\n"
        "\n"
        "[mirrors.m1]\n"
        'remote = "127.0.0.1"\n'
        f'user = "{config_mirror.user}"\n'
        f'key_path = "{watchers_key(config_mirror.key, base, run_user)}"\n'
        f"port = {config_mirror.sshd.port}\n"
        f'path = "{config_mirror.root}"\n'
    )
    try:
        yield from start_server(base, pki, {}, global_args=["--config", config])
    finally:
        shutil.rmtree(base)


def test_the_mirror_of_config_serves_an_upload(
    configured: Server, config_mirror: MirrorHost, busybox_image: tuple[Path, Path]
) -> None:
    meta, squashfs = busybox_image
    serial = "20240301_1200"
    d, product = f"busyconf/1.35/amd64/default/{serial}", "busyconf:1.35:amd64:default"
    for src, name in ((meta, "lxd.tar.xz"), (squashfs, "rootfs.squashfs")):
        code, body = curl(f"-Fupload=@{src};filename={d}/{name}", f"{configured.url}/images/")
        assert code == 201, body

    def served() -> bool:
        return serial in listed(config_mirror.fetch("streams/v1/images.json")[1], product)

    took = wait_until(served, "the mirror to list the upload", MIRROR_DEADLINE, configured.log)
    print(f"the mirror listed the upload {took:.2f} s after the second curl returned")
    code, data = config_mirror.fetch(f"images/{d}/rootfs.squashfs")
    assert code == 200
    assert data == squashfs.read_bytes()


def test_the_upload_app_applies_the_upload_settings_of_config(
    configured: Server, tmp_path: Path
) -> None:
    d = "overwrite/1.0/amd64/default/20240301_1300"
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    for f in (first, second):
        code, body = curl("-T", f, f"{configured.url}/images/{d}/lxd.tar.xz")
        assert code == 201, body
    version = configured.root / "images" / d
    # allow_overwrites = true: replaced, not kept beside as lxd.tar.xz.1
    assert sorted(p.name for p in version.iterdir()) == ["lxd.tar.xz"]
    assert (version / "lxd.tar.xz").read_bytes() == b"second"

    big = tmp_path / "big"
    big.write_bytes(b"\0" * (MAX_SIZE + 1))
    code, body = curl("-T", big, f"{configured.url}/images/{d}/rootfs.squashfs")
    assert code == 413, body
    assert not (version / "rootfs.squashfs").exists()
