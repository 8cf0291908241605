"""The mirror push's own rsync command lines, run for real against a local directory instead
of over ssh (the push over ssh to a real sshd is test_mirror.py): what each pass carries,
deletes and never follows, and that rsync reads the directories held open when the list was
checked, not a link swapped in afterwards."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lxd_image_server.mirror import (
    catalog_command,
    deletions_command,
    images_command,
    rsync_command,
    take_snapshot,
)
from lxd_image_server.mirror_list import held_batches
from lxd_image_server.settings import MirrorConfig

from ..unit.test_mirror import M1, local, publish_catalog, source
from ..unit.test_mirror_list import IMG, V, tree


def test_rsync_catalog_pass_carries_the_page_and_leaves_the_root_alone(tmp_path):
    """The catalog pass's real rsync, to a local directory instead of over ssh: the page
    arrives in streams/ with the catalog (and goes when the master has none); the mirror's
    root, which the push user cannot write, is not touched."""
    src = source(tmp_path)
    publish_catalog(src)
    streams = Path(src.streams_dir)
    (streams.parent / "index.html").write_text("<html>")
    mirror = tmp_path / "mirror"
    (mirror / "streams" / "v1").mkdir(parents=True)
    (mirror / "streams" / "v1" / "stale.json").write_text("old")
    os.chmod(mirror, 0o750)
    before = os.stat(mirror)

    def catalog_pass() -> None:
        snap = take_snapshot(src, str(tmp_path / "snap"))
        cmd = catalog_command(rsync_command(M1, "/kh"), M1, snap)
        subprocess.run(local(cmd, mirror), check=True, capture_output=True, timeout=60)

    catalog_pass()
    assert (mirror / "streams" / "index.html").read_text() == "<html>"
    assert sorted(os.listdir(mirror / "streams" / "v1")) == ["images.json", "index.json"]
    assert sorted(os.listdir(mirror)) == ["streams"]
    after = os.stat(mirror)
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    os.unlink(streams.parent / "index.html")
    catalog_pass()
    assert sorted(os.listdir(mirror / "streams")) == ["v1"]


def test_rsync_deletions_keep_exactly_what_the_catalog_lists_and_follow_no_link(tmp_path):
    """The deletions pass's real rsync, to a local directory instead of over ssh: every file
    below images/ the catalog does not list goes (even one the master still has), hidden names
    stay, and a link on the mirror is removed, never followed."""
    src = source(tmp_path)
    v = "images/busybox/1.35/amd64/default/20240101_12:00"
    kept, gone = f"{v}/lxd.tar.xz", "images/old/1.0/amd64/default/20230101_1200/lxd.tar.xz"
    publish_catalog(src, kept)
    Path(src.img_dir, "unlisted").mkdir(parents=True)
    Path(src.img_dir, "unlisted", "junk").write_text("x")
    mirror = tmp_path / "mirror"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    for rel in (kept, gone, "images/.upload-in-progress", "images/unlisted/junk"):
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        (mirror / rel).write_text("x")
    (mirror / v / "evil").symlink_to(outside, target_is_directory=True)
    (mirror / "images/old/link").symlink_to(outside / "precious")
    snap = take_snapshot(src, str(tmp_path / "snap"))
    cmd = deletions_command(rsync_command(M1, "/kh"), M1, snap)
    subprocess.run(local(cmd, mirror), check=True, capture_output=True, timeout=60)
    assert (mirror / kept).read_text() == "x", "a placeholder was sent"
    assert not (mirror / "images/old").exists()
    assert not (mirror / "images/unlisted").exists()
    assert not os.path.lexists(mirror / v / "evil")
    assert (mirror / "images/.upload-in-progress").exists()  # hidden: never touched
    assert (outside / "precious").read_text() == "keep me"
    publish_catalog(src)
    snap = take_snapshot(src, str(tmp_path / "snap"))
    cmd = deletions_command(rsync_command(M1, "/kh"), M1, snap)
    subprocess.run(local(cmd, mirror), check=True, capture_output=True, timeout=60)
    assert sorted(os.listdir(mirror / "images")) == [".upload-in-progress"]


def test_rsync_reads_the_held_directory_not_a_link_swapped_in_after_the_check(
    tmp_path: Path,
) -> None:
    """The real rsync, locally, with the push's own flags: the version directory is checked,
    held and staged, then swapped for a link to a directory holding files of the same names
    before rsync runs; what arrives is what was checked."""
    root, outside = tree(tmp_path)
    v = root / V
    v.mkdir(parents=True)
    (v / "lxd.tar.xz").write_text("meta")
    (v / "rootfs.squashfs").write_text("root")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    m = MirrorConfig(name="m", host="h")
    skipped: list[tuple[str, str]] = []
    with held_batches(
        [f"{V}/lxd.tar.xz", f"{V}/rootfs.squashfs"], str(root / "images"), IMG, skipped
    ) as batches:
        for batch in batches:
            batch.stage(str(tmp_path / "stage"), str(tmp_path / "files"))
            v.rename(v.with_name("moved"))
            v.symlink_to(outside, target_is_directory=True)
            cmd = images_command(
                rsync_command(m, "/kh"), m, str(tmp_path / "stage"), str(tmp_path / "files")
            )
            e = cmd.index("-e")
            local = [*cmd[:e], *cmd[e + 2 : -1], f"{mirror}/"]
            proc = subprocess.run(
                local, pass_fds=batch.fds, capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, proc.stderr
    assert not skipped
    assert (mirror / V / "lxd.tar.xz").read_text() == "meta"
    assert (mirror / V / "rootfs.squashfs").read_text() == "root"
    assert not (mirror / V).is_symlink()
    assert oct((mirror / V / "lxd.tar.xz").stat().st_mode & 0o7777) == "0o644"
