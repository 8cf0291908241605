"""What the package's principals may do, played by real other users and groups (root only):
credentials rewritten keep their owner and group, and `update` run as an unprivileged catalog
writer, which owns images/ and streams/ but not the served root, writes the page."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lxd_image_server.htpasswd import read_users, set_password, verify_password

from ..unit.helpers import blob, version_dir, write

#: a group the test's process is not in
OTHER_GID = 4242
NOBODY = 65534


@pytest.fixture(autouse=True)
def as_root() -> None:
    assert os.geteuid() == 0, "these tests change owners and switch users: run them as root"


def test_set_password_keeps_owner_and_group(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("bob:{SHA}x\n")
    os.chown(path, -1, OTHER_GID)
    set_password(str(path), "alice", "pw")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), OTHER_GID)
    assert list(read_users(str(path))) == ["bob", "alice"]


def test_set_password_sets_group(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    set_password(str(path), "alice", "pw", group=OTHER_GID)
    assert os.stat(path).st_gid == OTHER_GID
    set_password(str(path), "alice", "pw2", group=os.getegid())
    assert os.stat(path).st_gid == os.getegid()
    assert verify_password("pw2", read_users(str(path))["alice"])


def test_update_writes_the_page_without_write_access_to_the_root() -> None:
    """The package's root is root's (lxdadm's sftp chroot); the catalog writer owns only
    images/ and streams/. `update` runs as nobody, with no supplementary group."""
    # not below pytest's tmp_path: /tmp/pytest-of-root is 0700, which nobody cannot traverse
    with tempfile.TemporaryDirectory(prefix="lis-page-") as tmp:
        base = Path(tmp)
        root = base / "root"
        d = version_dir(root / "images")
        write(d / "lxd.tar.xz", blob(300, 1))
        write(d / "rootfs.squashfs", blob(5000, 2))
        (root / "streams" / "v1").mkdir(parents=True)
        (base / "state").mkdir()
        for sub in ("images", "streams"):
            for dirpath, dirnames, filenames in os.walk(root / sub):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.chown(name, NOBODY, NOBODY)
        os.chown(base / "state", NOBODY, NOBODY)
        os.chmod(base, 0o755)
        os.chmod(root, 0o755)
        cli = Path(sys.executable).parent / "lxd-image-server"
        cmd: list[str | Path] = [cli, "--state-dir", base / "state", "--log-file", "STDERR"]
        proc = subprocess.run(
            [*cmd, "update", "--root-dir", root],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            # the writer's own home: root's ~/.config is not readable to nobody
            env={**os.environ, "HOME": str(base / "state")},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, f"update exited {proc.returncode}:\n{proc.stderr}"
        page = root / "streams" / "index.html"
        assert "busybox:1.35:amd64:default" in page.read_text()
        assert page.stat().st_uid == NOBODY
        # nothing was made at the root, which the writer cannot write
        assert sorted(p.name for p in root.iterdir()) == ["images", "streams"]
        assert os.stat(root).st_uid == 0
