import pytest

from lxd_image_server.layout import (
    LayoutError,
    Role,
    classify,
    is_ignored_name,
    parse_file_path,
    parse_version_dir,
    valid_serial,
)


@pytest.mark.parametrize("serial", ["20180716_12:00", "20180716_1200", "201807161200"])
def test_accepted_serials(serial):
    assert valid_serial(serial)


@pytest.mark.parametrize(
    "serial",
    [
        "2018071612",
        "20181316_1200",
        "20180716_2500",
        "20180716-1200",
        "latest",
        "",
        "20180716_12:0",
        "20180716_12:00x",
    ],
)
def test_refused_serials(serial):
    assert not valid_serial(serial)


def test_version_dir_ok():
    key = parse_version_dir(["busybox", "1.35", "amd64", "default", "20180716_12:00"])
    assert key.product == "busybox:1.35:amd64:default"
    assert key.relpath == "busybox/1.35/amd64/default/20180716_12:00"


@pytest.mark.parametrize(
    ("parts", "why"),
    [
        (["busybox", "1.35", "amd64", "default"], "5 levels"),
        (["busybox", "1.35", "amd64", "default", "x", "20180716_1200"], "5 levels"),
        (["busybox", "1.35", "sparc9", "default", "20180716_1200"], "unknown architecture"),
        (["busybox", "1.35", "amd64", "default", "2018"], "bad serial"),
        (["busy box", "1.35", "amd64", "default", "20180716_1200"], "not a valid name"),
    ],
)
def test_version_dir_refused(parts, why):
    with pytest.raises(LayoutError, match=why):
        parse_version_dir(parts)


@pytest.mark.parametrize(
    "path",
    [
        "/busybox/1.35/amd64/default/20180716_1200/lxd.tar.xz",
        "busybox/../1.35/amd64/default/20180716_1200/lxd.tar.xz",
        "busybox/1.35/amd64/default/20180716_1200/../../x",
        "busybox/1.35/amd64/.hidden/20180716_1200/lxd.tar.xz",
        "busybox/1.35/amd64/default/20180716_1200/.lxd.tar.xz",
        "busybox/1.35/amd64/default/20180716_1200/lxd.tar.xz\x00",
        "busybox/1.35/amd64/default/20180716_1200",
        "busybox/1.35/amd64/default/notaserial/lxd.tar.xz",
        "busybox//1.35/amd64/default/20180716_1200/lxd.tar.xz",
        "busybox/1.35/amd64/default/20180716_1200/lxd.tar.xz.part",
    ],
)
def test_upload_paths_refused(path):
    with pytest.raises(LayoutError):
        parse_file_path(path)


def test_upload_path_ok():
    key, name = parse_file_path("busybox/1.35/amd64/default/20180716_12:00/lxd.tar.xz")
    assert (key.serial, name) == ("20180716_12:00", "lxd.tar.xz")


@pytest.mark.parametrize(
    ("name", "role", "ftype"),
    [
        ("lxd.tar.xz", Role.META, "lxd.tar.xz"),
        ("incus.tar.xz", Role.META, "incus.tar.xz"),
        ("rootfs.squashfs", Role.ROOT, "squashfs"),
        ("root.tar.xz", Role.ROOT, "root.tar.xz"),
        ("disk.qcow2", Role.ROOT, "disk-kvm.img"),
        ("disk-kvm.img", Role.ROOT, "disk-kvm.img"),
        ("rootfs.img", Role.ROOT, "disk-kvm.img"),
        ("0123abcd.tar.gz", Role.UNIFIED, "combined"),
        ("metadata.json", Role.OVERRIDES, ""),
    ],
)
def test_classify(name, role, ftype):
    r = classify(name)
    assert r is not None
    assert (r.role, r.ftype) == (role, ftype)


@pytest.mark.parametrize(
    "name", [".lxd.tar.xz", "lxd.tar.xz.part", "rootfs.squashfs.tmp", "README", "SHA256SUMS"]
)
def test_not_published(name):
    assert classify(name) is None


def test_ignored_names():
    assert is_ignored_name(".staging")
    assert is_ignored_name("x.part")
    assert not is_ignored_name("lxd.tar.xz")
