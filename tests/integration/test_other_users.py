"""What the package's principals may do, played by real other users and groups (root only):
credentials rewritten keep their owner and group, and `update` run as an unprivileged catalog
writer, which owns images/ and streams/ but not the served root, writes the page; and an
uploader who makes their own version directory unreadable to the writer stops nobody's
publishing."""

from __future__ import annotations

import json
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
#: an uploader that is neither the writer nor root
UPLOADER = 4243


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


def chown_tree(top: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, uid, uid)


def add_version(images: Path, serial: str, owner: int = NOBODY) -> Path:
    d = version_dir(images, serial=serial)
    write(d / "lxd.tar.xz", blob(300, int(serial[:8])))
    write(d / "rootfs.squashfs", blob(5000, int(serial[:8]) + 1))
    chown_tree(d.parents[3], owner)  # busybox/ and below
    chown_tree(d, owner)
    return d


def update_as_nobody(base: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """`update` run as the catalog writer: nobody, with no supplementary group."""
    cli = Path(sys.executable).parent / "lxd-image-server"
    cmd: list[str | Path] = [cli, "--state-dir", base / "state", "--log-file", "STDERR"]
    return subprocess.run(
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


def writers_root(base: Path) -> Path:
    """A served root as the package makes it: root's, with images/ and streams/ the writer's."""
    root = base / "root"
    (root / "images").mkdir(parents=True)
    (root / "streams" / "v1").mkdir(parents=True)
    (base / "state").mkdir()
    for sub in ("images", "streams"):
        chown_tree(root / sub, NOBODY)
    os.chown(base / "state", NOBODY, NOBODY)
    os.chmod(base, 0o755)
    os.chmod(root, 0o755)
    return root


def listed(root: Path) -> list[str]:
    doc = json.loads((root / "streams" / "v1" / "images.json").read_bytes())
    return sorted(s for p in doc["products"].values() for s in p["versions"])


def test_update_writes_the_page_without_write_access_to_the_root() -> None:
    """The package's root is root's (lxdadm's sftp chroot); the catalog writer owns only
    images/ and streams/. `update` runs as nobody, with no supplementary group."""
    # not below pytest's tmp_path: /tmp/pytest-of-root is 0700, which nobody cannot traverse
    with tempfile.TemporaryDirectory(prefix="lis-page-") as tmp:
        base = Path(tmp)
        root = writers_root(base)
        add_version(root / "images", "20240101_1200")
        proc = update_as_nobody(base, root)
        assert proc.returncode == 0, f"update exited {proc.returncode}:\n{proc.stderr}"
        page = root / "streams" / "index.html"
        assert "busybox:1.35:amd64:default" in page.read_text()
        assert page.stat().st_uid == NOBODY
        # nothing was made at the root, which the writer cannot write
        assert sorted(p.name for p in root.iterdir()) == ["images", "streams"]
        assert os.stat(root).st_uid == 0


@pytest.mark.parametrize("where", ["version", "product"])
def test_an_uploaders_unreadable_directory_stops_no_publish(where: str) -> None:
    """An uploader owns what it uploaded and may chmod it 000 (sftp allows it): the writer
    cannot read that version any more (nor can nginx serve it). It leaves the catalog with that
    reason, in one log line, and every other version, a new one too, is still published. Not
    so for images/ itself, which no uploader owns: unreadable, it publishes nothing new."""
    with tempfile.TemporaryDirectory(prefix="lis-eacces-") as tmp:
        base = Path(tmp)
        root = writers_root(base)
        images = root / "images"
        theirs = add_version(images, "20240101_1200", owner=UPLOADER)
        if where == "product":
            # the uploader's own product: a release of another os
            theirs = version_dir(images, os_="theirs", serial="20240101_1200")
            write(theirs / "lxd.tar.xz", blob(300, 7))
            write(theirs / "rootfs.squashfs", blob(5000, 8))
            chown_tree(images / "theirs", UPLOADER)
        add_version(images, "20240102_1200")
        proc = update_as_nobody(base, root)
        assert proc.returncode == 0, proc.stderr
        before = listed(root)
        assert "20240101_1200" in before and "20240102_1200" in before

        hidden = theirs if where == "version" else images / "theirs"
        os.chmod(hidden, 0)
        add_version(images, "20240103_1200")
        proc = update_as_nobody(base, root)
        assert proc.returncode == 0, proc.stderr
        now = listed(root)
        assert "20240103_1200" in now, proc.stderr
        assert "20240102_1200" in now
        if where == "version":
            assert "20240101_1200" not in now
        assert "1 unreadable" in proc.stderr, proc.stderr

        # images/ itself unreadable to the writer (a restore gone wrong): nothing is unpublished
        os.chmod(hidden, 0o755)
        os.chown(images, 0, 0)
        os.chmod(images, 0o700)
        add_version(images, "20240104_1200")
        os.chown(images, 0, 0)  # add_version gave it to the writer again
        proc = update_as_nobody(base, root)
        assert proc.returncode != 0
        assert listed(root) == now
        os.chmod(images, 0o744)  # listed, but not searched
        proc = update_as_nobody(base, root)
        assert proc.returncode != 0
        assert listed(root) == now
