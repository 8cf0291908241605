"""fsutil.DirChain and fsutil.delete_tree: directory trees made, walked and deleted relative to
a descriptor, never through a link an uploader planted (used by the upload app's store and by
the deletion of expired versions)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lxd_image_server.fsutil import DirChain, delete_tree, open_dir


def chain(root: Path) -> DirChain:
    return DirChain(open_dir(str(root)))


def test_a_chain_is_made_with_its_mode_and_removed_again(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with chain(tmp_path) as c:
            for name in ("a", "b", "c"):
                c.down(name, 0o775)
            assert stat.S_IMODE(os.fstat(c.fd).st_mode) == 0o775
            assert c.created == [0, 1, 2]
            c.remove_created()
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == []


def test_only_what_the_chain_made_is_removed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with chain(tmp_path) as c:
        c.down("a", 0o755)
        c.down("b", 0o755)
        c.remove_created()
    assert os.listdir(tmp_path) == ["a"] and os.listdir(tmp_path / "a") == []


def test_a_link_on_the_way_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a").symlink_to(outside)
    with chain(tmp_path / "tree") as c:
        with pytest.raises(NotADirectoryError):
            c.down("a", 0o755)
        with pytest.raises(NotADirectoryError):
            c.down("a")
    assert os.listdir(outside) == []


def test_a_missing_directory_is_not_made_without_a_mode(tmp_path: Path) -> None:
    with chain(tmp_path) as c, pytest.raises(FileNotFoundError):
        c.down("a")
    assert os.listdir(tmp_path) == []


def test_prune_removes_the_empty_parents_only(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "keep").mkdir()
    with chain(tmp_path) as c:
        c.down("a")
        c.down("b")
        os.rmdir("c", dir_fd=c.fd)
        c.prune()
    assert sorted(os.listdir(tmp_path / "a")) == ["keep"]


def test_delete_tree_deletes_a_directory_and_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "v" / "sub").mkdir(parents=True)
    (tmp_path / "v" / "sub" / "f").write_bytes(b"x")
    fd = open_dir(str(tmp_path))
    try:
        delete_tree("v", fd)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_delete_tree_removes_a_link_itself_never_what_it_leads_to(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"x")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "v").symlink_to(outside)
    fd = open_dir(str(tmp_path / "tree"))
    try:
        delete_tree("v", fd)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path / "tree") == []
    assert (outside / "precious").read_bytes() == b"x"


def test_delete_tree_of_a_missing_name_says_so(tmp_path: Path) -> None:
    fd = open_dir(str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError):
            delete_tree("v", fd)
    finally:
        os.close(fd)
