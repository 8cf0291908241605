"""The package's postinst, its functions run on a scratch tree as root (issue 18, finding 7b).

The catalog writer owns the state directory, so it can swap any name in it for a link at any
moment: nothing root does there may follow one, even one swapped in after a test.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
POSTINST = TOP / "debian" / "lxd-image-server.postinst"
#: a user (and group) of every Debian system stands for both of the package's users here
USER = "daemon"


def functions(text: str) -> str:
    """Every shell function the postinst defines (none of its top-level code)."""
    found = re.findall(r"^[a-z_]+\(\) \{\n.*?^\}\n", text, re.M | re.S)
    assert found, "no functions in the postinst"
    return "\n".join(found)


@pytest.fixture
def scratch() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="lis-postinst-", dir="/var/tmp"))
    base.chmod(0o755)  # the users reach it
    try:
        yield base
    finally:
        shutil.rmtree(base)


def create_tree(base: Path, path_dir: Path) -> subprocess.CompletedProcess[str]:
    script = (
        "set -e\n"
        + functions(POSTINST.read_text())
        + f"ROOT={base}/root STATE={base}/state UPLOADER={USER} WRITER={USER}\n"
        + "create_tree\n"
    )
    env = {**os.environ, "PATH": f"{path_dir}:{os.environ['PATH']}"}
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=60)


def test_the_digest_directory_is_never_changed_through_a_link(scratch: Path) -> None:
    """The writer swaps upload-digests for a link to a root file the moment root has chowned
    it (a `chown` in PATH that does so): root's `chmod 2770` then made that file 2770."""
    victim = scratch / "victim"
    victim.write_text("root's")
    victim.chmod(0o600)
    state = scratch / "state"
    (state / "upload-digests").mkdir(parents=True)
    shims = scratch / "bin"
    shims.mkdir()
    (shims / "chown").write_text(
        "#!/bin/sh\n"
        '/bin/chown "$@"\n'
        f'd="{state}/upload-digests"\n'
        'case "$*" in *upload-digests*)\n'
        f'  rmdir "$d" && ln -s "{victim}" "$d" ;;\n'
        "esac\n"
    )
    (shims / "chown").chmod(0o755)
    r = create_tree(scratch, shims)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600, r.stderr
    assert victim.stat().st_uid == 0
    digests = state / "upload-digests"
    st = os.lstat(digests)
    assert stat.S_ISDIR(st.st_mode), r.stderr
    assert stat.S_IMODE(st.st_mode) == 0o2770
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam(USER).pw_uid, grp.getgrnam(USER).gr_gid)


def test_a_link_in_place_of_the_digest_directory_is_left_alone(scratch: Path) -> None:
    victim = scratch / "victim"
    victim.mkdir(mode=0o700)
    state = scratch / "state"
    state.mkdir()
    (state / "upload-digests").symlink_to(victim)
    r = create_tree(scratch, scratch)
    assert "upload-digests is not a directory" in r.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o700
    assert victim.stat().st_uid == 0
    assert (state / "upload-digests").is_symlink()


def test_the_digest_directory_is_made_for_the_uploader(scratch: Path) -> None:
    r = create_tree(scratch, scratch)
    assert r.returncode == 0, r.stderr
    st = os.lstat(scratch / "state" / "upload-digests")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o2770
    assert st.st_uid == pwd.getpwnam(USER).pw_uid
