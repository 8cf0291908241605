"""`import`'s engine: telling exported files apart, naming them from metadata.yaml, placing
them atomically. Real tarballs (made with tarfile) in tmp_path; no LXD needed here
(tests/integration/test_ops.py imports what a real `lxc image export` wrote)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.hashing import HashEngine
from lxd_image_server.ops.import_detect import inspect_tarball, parse_yaml, plan_import
from lxd_image_server.ops.import_errors import ImportFailed, NamingError, VersionExists
from lxd_image_server.ops.import_naming import Naming, serial_from_timestamp, tree_arch
from lxd_image_server.ops.import_place import place, seed_cache
from lxd_image_server.progress import Progress
from lxd_image_server.tree.layout import Role
from lxd_image_server.tree.scan import Scanner

from .helpers import blob, sha

TarMode = Literal["w:xz", "w:gz"]

#: 2024-01-01 12:00:00 UTC
CREATED = 1704110400
SERIAL = "20240101_12:00"
VERSION = f"busybox/1.35/amd64/default/{SERIAL}"

LXD_METADATA = """\
architecture: x86_64
creation_date: {created}
expiry_date: 1706702400
properties:
  architecture: x86_64
  description: "busybox 1.35 \\"test\\""
  name: busybox-1.35-x86_64-default
  os: busybox
  release: "1.35"
{variant}templates:
  /etc/hostname:
    when:
    - create
    - copy
    create_only: false
    template: hostname.tpl
    properties: {{}}
"""


def metadata_yaml(created: int = CREATED, variant: str | None = None, arch: str = "x86_64") -> str:
    text = LXD_METADATA.format(
        created=created, variant=f"  variant: {variant}\n" if variant else ""
    )
    return text.replace("architecture: x86_64", f"architecture: {arch}")


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = CREATED
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)
    else:
        info.size = len(data)
        info.mode = 0o644
        tf.addfile(info, io.BytesIO(data))


def meta_tarball(path: Path, yaml: str | None = None, mode: TarMode = "w:xz") -> Path:
    with tarfile.open(path, mode) as tf:
        _add(tf, "metadata.yaml", (yaml or metadata_yaml()).encode())
        _add(tf, "templates")
        _add(tf, "templates/hostname.tpl", b"{{ container.name }}\n")
    return path


def unified_tarball(path: Path, yaml: str | None = None, rootfs_first: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        if rootfs_first:
            _add(tf, "rootfs")
            _add(tf, "rootfs/bin/busybox", blob(5000, 7))
        _add(tf, "metadata.yaml", (yaml or metadata_yaml()).encode())
        if not rootfs_first:
            _add(tf, "rootfs")
            _add(tf, "rootfs/bin/busybox", blob(5000, 7))
    return path


def root_tarball(path: Path, mode: TarMode = "w:xz") -> Path:
    with tarfile.open(path, mode) as tf:
        _add(tf, "./")
        _add(tf, "./bin")
        _add(tf, "./bin/busybox", blob(5000, 8))
    return path


def squashfs(path: Path, seed: int = 1) -> Path:
    path.write_bytes(b"hsqs" + blob(20000, seed))
    return path


def qcow2(path: Path) -> Path:
    path.write_bytes(b"QFI\xfb" + blob(3000, 2))
    return path


def split_export(directory: Path, kind: str = "squashfs", yaml: str | None = None) -> list[Path]:
    """Named as `lxc image export` names them: meta-<fp>.tar.xz and <fp>.<ext>."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = meta_tarball(directory / "meta.tmp", yaml)
    makers: dict[str, tuple[Callable[[Path], Path], str]] = {
        "squashfs": (squashfs, "squashfs"),
        "tarball": (root_tarball, "tar.xz"),
        "qcow2": (qcow2, "qcow2"),
    }
    make, ext = makers[kind]
    root = make(directory / "root.tmp")
    fp = sha(meta.read_bytes(), root.read_bytes())
    return [meta.rename(directory / f"meta-{fp}.tar.xz"), root.rename(directory / f"{fp}.{ext}")]


def unified_export(directory: Path, yaml: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = unified_tarball(directory / "u.tmp", yaml)
    return tmp.rename(directory / f"{sha(tmp.read_bytes())}.tar.gz")


def tree_files(img: Path) -> set[str]:
    """Every entry below img (hidden ones too), relative."""
    return {str(p.relative_to(img)) for p in img.rglob("*")}


# -- metadata.yaml ------------------------------------------------------------------------------


def test_parse_yaml_reads_lxd_metadata() -> None:
    doc = parse_yaml(metadata_yaml(variant="cloud"))
    assert doc["architecture"] == "x86_64"
    assert doc["creation_date"] == str(CREATED)
    assert doc["properties"] == {
        "architecture": "x86_64",
        "description": 'busybox 1.35 "test"',
        "name": "busybox-1.35-x86_64-default",
        "os": "busybox",
        "release": "1.35",
        "variant": "cloud",
    }
    assert doc["templates"]["/etc/hostname"]["template"] == "hostname.tpl"
    assert doc["templates"]["/etc/hostname"]["create_only"] == "false"
    assert doc["templates"]["/etc/hostname"]["properties"] == {}


def test_parse_yaml_quotes_comments_folds_and_block_scalars() -> None:
    doc = parse_yaml(
        "# a comment\n"
        "---\n"
        "architecture: 'aarch64' # trailing comment\n"
        "properties:\n"
        "  os: 'it''s'\n"
        '  release: "22.04\\u00e9"\n'
        "  description: a long description that\n"
        "    continues here\n"
        "  notes: |\n"
        "    os: not-this\n"
        "  variant: default\n"
        "  url: http://example.com/#x\n"
        "empty: ~\n"
    )
    assert doc["architecture"] == "aarch64"
    assert doc["properties"]["os"] == "it's"
    assert doc["properties"]["release"] == "22.04\u00e9"
    assert doc["properties"]["description"] == "a long description that continues here"
    assert doc["properties"]["variant"] == "default"
    assert doc["properties"]["url"] == "http://example.com/#x"
    assert doc["empty"] is None


def test_parse_yaml_junk_is_one_import_error() -> None:
    with pytest.raises(ImportFailed, match="not valid YAML"):
        parse_yaml(":\n  - [\n\t\"unterminated\n'x: y\n")


def test_parse_yaml_keeps_scalars_as_strings() -> None:
    doc = parse_yaml("properties:\n  release: 3.10\n  os: yes\ncreation_date: 1704110400\n")
    assert doc["properties"] == {"release": "3.10", "os": "yes"}
    assert doc["creation_date"] == "1704110400"


# -- hostile metadata.yaml (issue 9, finding 5): bounded, one error line, never a crash --------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[" * 5000, "deeper"),
        ("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 300)), "deeper"),
        ("- " * 3000 + "x", "deeper"),
        ("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", "anchors"),
        ("x: " + "y" * (300 << 10), "larger than"),
        ("- a\n- b\n", "not a mapping"),
        ("just a string", "not a mapping"),
        ("", "not a mapping"),
        ("a: !!python/object:os.system x\n", "not valid YAML"),
        ("\x00\x01", "not valid YAML"),
    ],
)
def test_parse_yaml_hostile(text: str, why: str) -> None:
    with pytest.raises(ImportFailed, match=why) as e:
        parse_yaml(text)
    assert "\n" not in str(e.value)


def test_nested_metadata_yaml_in_a_tarball_is_one_import_error(tmp_path: Path) -> None:
    bad = meta_tarball(tmp_path / "bad.tar.xz", "[" * 5000)
    with pytest.raises(ImportFailed, match=r"bad\.tar\.xz: metadata\.yaml nests deeper"):
        inspect_tarball(str(bad), "xz")
    with pytest.raises(ImportFailed):
        plan_import([str(bad), str(squashfs(tmp_path / "r.squashfs"))])


def test_tarball_with_too_many_entries_is_refused(tmp_path: Path, monkeypatch) -> None:
    import lxd_image_server.ops.import_detect as import_detect

    monkeypatch.setattr(import_detect, "MAX_MEMBERS", 50)
    path = tmp_path / "u.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "rootfs")
        for i in range(60):
            _add(tf, f"rootfs/f{i}", b"x")
        _add(tf, "metadata.yaml", metadata_yaml().encode())
    with pytest.raises(ImportFailed, match="more than 50 entries"):
        inspect_tarball(str(path), "gzip")


@pytest.mark.parametrize(
    ("given", "tree"),
    [
        ("x86_64", "amd64"),
        ("aarch64", "arm64"),
        ("armv7l", "armhf"),
        ("i686", "i386"),
        ("ppc64le", "ppc64el"),
        ("s390x", "s390x"),
        ("riscv64", "riscv64"),
        ("amd64", "amd64"),
    ],
)
def test_arch_names_map_to_the_tree(given: str, tree: str) -> None:
    assert tree_arch(given) == tree


def test_unknown_arch_is_a_naming_error() -> None:
    with pytest.raises(NamingError, match="unknown architecture"):
        tree_arch("sparc9")


def test_serial_is_the_creation_time_in_utc() -> None:
    assert serial_from_timestamp(CREATED) == SERIAL
    assert serial_from_timestamp("1704153599") == "20240101_23:59"
    with pytest.raises(NamingError, match="not a timestamp"):
        serial_from_timestamp("yesterday")


# -- telling files apart -----------------------------------------------------------------------


def test_plan_split_squashfs_either_order(tmp_path: Path) -> None:
    meta, root = split_export(tmp_path)
    for files in ([meta, root], [root, meta]):
        plan = plan_import([str(f) for f in files])
        assert plan.key.relpath == VERSION
        assert [(s.role, s.target) for s in plan.sources] == [
            (Role.META, "lxd.tar.xz"),
            (Role.ROOT, "rootfs.squashfs"),
        ]
        assert plan.export_fingerprint == root.name.split(".")[0]


@pytest.mark.parametrize(("kind", "name"), [("tarball", "root.tar.xz"), ("qcow2", "disk.qcow2")])
def test_plan_split_other_roots(tmp_path: Path, kind: str, name: str) -> None:
    files = split_export(tmp_path, kind)
    plan = plan_import([str(f) for f in files])
    assert plan.sources[1].target == name
    assert plan.sources[1].kind == kind


def test_plan_unified(tmp_path: Path) -> None:
    tarball = unified_export(tmp_path)
    plan = plan_import([str(tarball)])
    assert plan.unified
    assert plan.sources[0].role is Role.UNIFIED
    assert plan.sources[0].target is None  # named <sha256>.tar.gz when placed
    assert plan.export_fingerprint == tarball.name.removesuffix(".tar.gz")
    assert plan.key.relpath == VERSION


def test_unified_with_metadata_after_rootfs(tmp_path: Path) -> None:
    tarball = unified_tarball(tmp_path / "u.tar.gz", rootfs_first=True)
    assert plan_import([str(tarball)]).key.relpath == VERSION


def test_naming_options_override_metadata(tmp_path: Path) -> None:
    files = [str(f) for f in split_export(tmp_path)]
    plan = plan_import(
        files,
        Naming(
            os="alpine", release="3.19", arch="aarch64", variant="cloud", serial="20230505_0505"
        ),
    )
    assert plan.key.relpath == "alpine/3.19/arm64/cloud/20230505_0505"


def test_variant_from_metadata_and_default(tmp_path: Path) -> None:
    files = [str(f) for f in split_export(tmp_path / "a", yaml=metadata_yaml(variant="cloud"))]
    assert plan_import(files).key.variant == "cloud"
    files = [str(f) for f in split_export(tmp_path / "b")]
    assert plan_import(files).key.variant == "default"


def test_missing_metadata_fields_ask_for_the_option(tmp_path: Path) -> None:
    yaml = "architecture: x86_64\nproperties:\n  release: '1'\n"
    files = [str(f) for f in split_export(tmp_path, yaml=yaml)]
    with pytest.raises(NamingError, match="--os"):
        plan_import(files)
    with pytest.raises(NamingError, match="--serial"):
        plan_import(files, Naming(os="x"))
    assert plan_import(files, Naming(os="x", serial="20240101_1200")).key.os == "x"


@pytest.mark.parametrize(
    ("naming", "message"),
    [
        (Naming(arch="sparc9"), "unknown architecture"),
        (Naming(serial="yesterday"), "bad serial"),
        (Naming(os="../etc"), "not a valid name"),
        (Naming(variant=".hidden"), "not a valid name"),
    ],
)
def test_bad_naming_options(tmp_path: Path, naming: Naming, message: str) -> None:
    files = [str(f) for f in split_export(tmp_path)]
    with pytest.raises(NamingError, match=message):
        plan_import(files, naming)


def test_refuses_what_is_not_one_image(tmp_path: Path) -> None:
    meta, root = split_export(tmp_path / "x")
    meta2, _ = split_export(tmp_path / "y", yaml=metadata_yaml(created=CREATED + 60))
    unified = unified_export(tmp_path / "u")
    cases = [
        ([meta], "give the root filesystem too"),
        ([root], "give its metadata tarball too"),
        ([meta, meta2], "both metadata tarballs"),
        ([root, root], "given twice"),
        ([unified, root], "import it alone"),
    ]
    for files, message in cases:
        with pytest.raises(ImportFailed, match=message):
            plan_import([str(f) for f in files])


def test_refuses_mismatched_export_names(tmp_path: Path) -> None:
    meta, _ = split_export(tmp_path / "x")
    _, root = split_export(tmp_path / "y", yaml=metadata_yaml(created=CREATED + 60))
    with pytest.raises(ImportFailed, match="different exports"):
        plan_import([str(meta), str(root)])


def test_refuses_compressions_the_catalog_cannot_name(tmp_path: Path) -> None:
    meta = meta_tarball(tmp_path / "meta.tar.xz")
    gz_root = root_tarball(tmp_path / "root.tar.gz", "w:gz")
    with pytest.raises(ImportFailed, match="recompress it with xz"):
        plan_import([str(meta), str(gz_root)])
    xz_unified = tmp_path / "u.tar.xz"
    with tarfile.open(xz_unified, "w:xz") as tf:
        _add(tf, "metadata.yaml", metadata_yaml().encode())
        _add(tf, "rootfs/bin/sh", b"x")
    with pytest.raises(ImportFailed, match="recompress it with gzip"):
        plan_import([str(xz_unified)])
    zstd = tmp_path / "x.tar.zst"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 100)
    with pytest.raises(ImportFailed, match="zstd"):
        plan_import([str(zstd)])
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world")
    with pytest.raises(ImportFailed, match="not an image file"):
        plan_import([str(junk)])


def test_corrupt_tarball_is_a_clear_error(tmp_path: Path) -> None:
    meta = meta_tarball(tmp_path / "meta.tar.xz")
    data = meta.read_bytes()
    meta.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImportFailed, match=r"cannot read .* as a tarball"):
        plan_import([str(meta), str(squashfs(tmp_path / "r.squashfs"))])


def test_metadata_link_is_not_followed(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.xz"
    with tarfile.open(evil, "w:xz") as tf:
        info = tarfile.TarInfo("metadata.yaml")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ImportFailed, match="not a regular file"):
        inspect_tarball(str(evil), "xz")


def test_inspecting_extracts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    info = inspect_tarball(str(unified_tarball(tmp_path / "u.tar.gz")), "gzip")
    assert info.metadata is not None and info.has_rootfs and not info.foreign
    assert list(work.iterdir()) == []


# -- placing -------------------------------------------------------------------------------------


def test_place_new_version(tmp_path: Path) -> None:
    img = tmp_path / "images"
    meta, root = split_export(tmp_path / "export")
    plan = plan_import([str(meta), str(root)])
    placed = place(plan, str(img))
    vdir = img / VERSION
    assert placed.version_dir == str(vdir)
    assert sorted(os.listdir(vdir)) == ["lxd.tar.xz", "rootfs.squashfs"]
    assert (vdir / "lxd.tar.xz").read_bytes() == meta.read_bytes()
    assert (vdir / "rootfs.squashfs").read_bytes() == root.read_bytes()
    assert placed.fingerprint == sha(meta.read_bytes(), root.read_bytes())
    assert placed.files["rootfs.squashfs"] == (root.stat().st_size, sha(root.read_bytes()))
    for p in (vdir / "lxd.tar.xz", vdir / "rootfs.squashfs"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    for d in (vdir, vdir.parent, img / "busybox"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert not any(n.startswith(".") for n in tree_files(img) for n in n.split("/"))
    assert meta.exists() and root.exists()  # copied, not moved


def test_place_in_the_packages_tree_makes_group_writable_setgid_directories(
    tmp_path: Path,
) -> None:
    """Issue 18: images/ is setgid and group-writable in the package (2775, group lxdadm):
    an import (as root) makes its directories so too, so that the catalog writer, a member of
    the group, can delete the version when retention or prune lets it go."""
    img = tmp_path / "images"
    img.mkdir()
    img.chmod(0o2775)
    meta, root = split_export(tmp_path / "export")
    placed = place(plan_import([str(meta), str(root)]), str(img))
    vdir = Path(placed.version_dir)
    for d in (vdir, vdir.parent, img / "busybox"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o2775, d
    for p in (vdir / "lxd.tar.xz", vdir / "rootfs.squashfs"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_place_unified_names_it_by_sha256(tmp_path: Path) -> None:
    img = tmp_path / "images"
    tarball = unified_tarball(tmp_path / "renamed-by-user.tar.gz")
    placed = place(plan_import([str(tarball)]), str(img))
    digest = sha(tarball.read_bytes())
    assert os.listdir(img / VERSION) == [f"{digest}.tar.gz"]
    assert placed.fingerprint == digest


def test_existing_version_is_refused_without_force(tmp_path: Path) -> None:
    img = tmp_path / "images"
    files = [str(f) for f in split_export(tmp_path / "export")]
    place(plan_import(files), str(img))
    before = {p: (img / p).stat().st_mtime_ns for p in tree_files(img)}
    with pytest.raises(VersionExists, match="--force"):
        place(plan_import(files), str(img))
    assert {p: (img / p).stat().st_mtime_ns for p in tree_files(img)} == before


def test_force_replaces_files_keeps_overrides_and_drops_other_roots(tmp_path: Path) -> None:
    img = tmp_path / "images"
    old = [str(f) for f in split_export(tmp_path / "old", "tarball")]
    place(plan_import(old), str(img))
    vdir = img / VERSION
    (vdir / "metadata.json").write_text('{"aliases": ["x"]}')
    new_meta, new_root = split_export(tmp_path / "new", "squashfs", metadata_yaml(variant=None))
    placed = place(plan_import([str(new_meta), str(new_root)]), str(img), force=True)
    assert placed.replaced
    assert sorted(os.listdir(vdir)) == ["lxd.tar.xz", "metadata.json", "rootfs.squashfs"]
    assert (vdir / "rootfs.squashfs").read_bytes() == new_root.read_bytes()
    assert (vdir / "metadata.json").read_text() == '{"aliases": ["x"]}'


def test_move_on_the_same_file_system(tmp_path: Path) -> None:
    img = tmp_path / "images"
    meta, root = split_export(tmp_path / "export")
    data = root.read_bytes()
    placed = place(plan_import([str(meta), str(root)]), str(img), move=True)
    assert not meta.exists() and not root.exists()
    assert (img / VERSION / "rootfs.squashfs").read_bytes() == data
    assert sorted(placed.moved) == sorted([str(meta), str(root)])
    assert stat.S_IMODE((img / VERSION / "rootfs.squashfs").stat().st_mode) == 0o644


def test_content_not_matching_the_export_name_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "images"
    meta, root = split_export(tmp_path / "export")
    data = bytearray(root.read_bytes())
    data[1000] ^= 1  # a flipped bit in transit
    root.write_bytes(bytes(data))
    for move in (False, True):
        plan = plan_import([str(meta), str(root)])
        with pytest.raises(ImportFailed, match="does not match the fingerprint"):
            place(plan, str(img), move=move)
        # nothing left in the tree, the sources where they were
        assert not (img / VERSION).exists()
        assert not [p for p in tree_files(img) if os.path.basename(p).startswith(".")]
        assert meta.exists() and root.read_bytes() == bytes(data)


def test_failure_leaves_no_temporary_files(tmp_path: Path) -> None:
    img = tmp_path / "images"
    files = [str(f) for f in split_export(tmp_path / "export")]
    plan = plan_import(files)
    # the root becomes unreadable after the metadata was copied (a directory: we run as root)
    os.unlink(files[1])
    os.mkdir(files[1])
    with pytest.raises(ImportFailed, match=r"failed|cannot read|not a regular file"):
        place(plan, str(img))
    assert not (img / VERSION).exists()
    assert not [p for p in img.rglob("*") if p.is_file() or p.name.startswith(".")]


def test_seeded_cache_means_publishing_reads_nothing(tmp_path: Path) -> None:
    img = tmp_path / "images"
    files = [str(f) for f in split_export(tmp_path / "export")]
    placed = place(plan_import(files), str(img))
    cache = HashCache(None)
    seed_cache(cache, str(img), placed)
    started: list[int] = []

    def progress_start(total: int) -> Progress:
        started.append(total)
        return lambda _n: None

    versions = Scanner(str(img)).scan()
    digests = HashEngine(cache).digest(versions, progress_start=progress_start)
    assert started == []  # everything came from the cache
    meta_path = str(img / VERSION / "lxd.tar.xz")
    root_path = str(img / VERSION / "rootfs.squashfs")
    assert digests.combined[(meta_path, root_path)] == placed.fingerprint
    assert digests.files[root_path] == hashlib.sha256(Path(root_path).read_bytes()).hexdigest()


def test_logs_a_copy_when_move_crosses_file_systems(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("this test needs /dev/shm on a file system other than tmp_path's")
    src_dir = shm / f"lis-import-test-{os.getpid()}"
    try:
        files = [str(f) for f in split_export(src_dir)]
        with caplog.at_level(logging.INFO):
            placed = place(plan_import(files), str(tmp_path / "images"), move=True)
        assert placed.moved == []
        assert all(os.path.exists(f) for f in files)  # copied and left in place
        assert "another file system" in caplog.text
    finally:
        for f in src_dir.glob("*"):
            f.unlink()
        src_dir.rmdir()


# -- placement never leaves images/ (issue 9): directory fds, no link followed -----------------


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_a_symlinked_directory_on_the_way_is_refused(
    tmp_path: Path, level: int, force: bool
) -> None:
    """An uploader replaced a directory of the version's path by a symlink to an outside tree
    holding the same version: import (even --force) writes and deletes nothing there."""
    img = tmp_path / "images"
    outside = tmp_path / "outside"
    parts = VERSION.split("/")
    precious = outside.joinpath(*parts)
    precious.mkdir(parents=True)
    (precious / "rootfs.squashfs").write_bytes(b"keep me")
    (precious / "lxd.tar.xz").write_bytes(b"keep me too")
    link = img.joinpath(*parts[:level])
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside.joinpath(*parts[:level]))
    before = tree_files(outside)
    files = split_export(tmp_path / "export")
    with pytest.raises(ImportFailed, match=r"symbolic link|not a directory|exists"):
        place(plan_import([str(f) for f in files]), str(img), force=force)
    assert tree_files(outside) == before
    assert (precious / "rootfs.squashfs").read_bytes() == b"keep me"
    assert (precious / "lxd.tar.xz").read_bytes() == b"keep me too"


def test_a_fifo_given_to_import_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "export.tar.gz")
    with pytest.raises(ImportFailed, match="not a regular file"):
        plan_import([str(tmp_path / "export.tar.gz")])
