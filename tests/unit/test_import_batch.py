"""Which files make up which image when `import` is given several (ops/import_batch.py), and
the plans of several images (ops/importing.py): unambiguous, or refused before anything is
placed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_image_server.ops.import_batch import group_files, stem
from lxd_image_server.ops.import_errors import NamingError
from lxd_image_server.ops.import_naming import Naming
from lxd_image_server.ops.importing import plan_all

from .test_importer import metadata_yaml, split_export, unified_export


def touch(*paths: Path) -> list[str]:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return [str(p) for p in paths]


def test_stem() -> None:
    assert stem("abc.tar.xz") == "abc"
    assert stem("abc.squashfs") == "abc"
    assert stem("abc.qcow2") == "abc"
    assert stem("debian-12.1.tar.gz") == "debian-12.1"
    assert stem(".tar.xz") == ".tar.xz"
    assert stem("notes.txt") == "notes.txt"


def test_one_or_two_files_are_one_image_whatever_their_names(tmp_path: Path) -> None:
    a, b = touch(tmp_path / "x.tar.xz", tmp_path / "y.squashfs")
    assert group_files([a, b]) == [(a, b)]
    assert group_files([a]) == [(a,)]


def test_a_directory_pairs_by_lxcs_names(tmp_path: Path) -> None:
    d = tmp_path / "exports"
    files = touch(
        d / "meta-aaa.tar.xz",
        d / "aaa.squashfs",
        d / "bbb.tar.gz",
        d / "meta-ccc.tar.xz",
        d / "ccc.tar.xz",
        d / ".hidden",
        d / "partial.part",
    )
    (d / "sub").mkdir()
    m_a, r_a, u_b, m_c, r_c = files[:5]
    # hidden and partial files, and subdirectories, are not images
    assert group_files([str(d)]) == [(m_a, r_a), (u_b,), (m_c, r_c)]


def test_three_files_are_several_images(tmp_path: Path) -> None:
    m, r, u = touch(tmp_path / "meta-n1.tar.xz", tmp_path / "n1.squashfs", tmp_path / "u.tar.gz")
    assert group_files([u, r, m]) == [(u,), (m, r)]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["meta-a.tar.xz", "b.squashfs", "c.tar.gz"], "no root file system named a"),
        (["meta-a.tar.xz", "a.squashfs", "a.qcow2"], "same name but for its suffix"),
    ],
)
def test_ambiguous_sets_are_refused(tmp_path: Path, names: list[str], message: str) -> None:
    files = touch(*(tmp_path / n for n in names))
    with pytest.raises(NamingError, match=message):
        group_files(files)


def test_the_same_file_twice_is_refused(tmp_path: Path) -> None:
    (a,) = touch(tmp_path / "u.tar.gz")
    with pytest.raises(NamingError, match="given twice"):
        group_files([a, str(tmp_path / "." / "u.tar.gz"), a])
    with pytest.raises(NamingError, match="given twice"):
        group_files([str(tmp_path), a])


def test_an_empty_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NamingError, match="no image files"):
        group_files([str(tmp_path)])


def test_plans_of_a_directory_of_exports(tmp_path: Path) -> None:
    d = tmp_path / "e"
    split_export(d, yaml=metadata_yaml(created=1704110400))
    unified_export(d, yaml=metadata_yaml(created=1704110460))
    split_export(d, kind="qcow2", yaml=metadata_yaml(created=1704110520))
    plans = plan_all(group_files([str(d)]), Naming())
    assert sorted(p.key.serial for p in plans) == [
        "20240101_12:00",
        "20240101_12:01",
        "20240101_12:02",
    ]


def test_two_images_of_one_version_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "e"
    split_export(d)
    unified_export(d)  # the same metadata.yaml: the same version
    with pytest.raises(NamingError, match=r"are both busybox:1\.35:amd64:default"):
        plan_all(group_files([str(d)]), Naming())


def test_one_serial_for_several_images_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "e"
    split_export(d, yaml=metadata_yaml(created=1704110400))
    unified_export(d, yaml=metadata_yaml(created=1704110460))
    with pytest.raises(NamingError, match="--serial names one version"):
        plan_all(group_files([str(d)]), Naming(serial="20240101_1300"))


def test_one_image_that_cannot_be_staged_places_none(tmp_path: Path) -> None:
    """Several images: the third's version exists already, so none is placed (the others'
    staged files are taken back, moved sources moved back) and nothing is published."""
    from lxd_image_server.config import Paths
    from lxd_image_server.ops.import_errors import VersionExists
    from lxd_image_server.ops.importing import import_images
    from lxd_image_server.settings import Settings

    paths = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    d = tmp_path / "e"
    for n in range(3):
        split_export(d, yaml=metadata_yaml(created=1704110400 + 60 * n))
    plans = plan_all(group_files([str(d)]), Naming())
    taken = plans[2].key.relpath
    Path(paths.img_dir, taken).mkdir(parents=True)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(VersionExists):
        import_images(paths, Settings(), plans, move=True)
    assert sorted(p.name for p in d.iterdir()) == before  # moved back
    variant = Path(paths.img_dir, taken).parent
    assert sorted(p.name for p in variant.iterdir()) == [plans[2].key.serial]  # no staging left
    assert not Path(paths.streams_dir).exists()
