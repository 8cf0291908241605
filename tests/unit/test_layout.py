import datetime as dt
import random

import pytest

from lxd_image_server.tree import layout
from lxd_image_server.tree.layout import (
    LayoutError,
    Role,
    classify,
    is_ignored_name,
    parse_file_path,
    parse_version_dir,
    valid_name,
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


# -- strict names (issue 9, finding 13): ASCII only, no control characters, the whole string --

FULLWIDTH_SERIAL = "\uff12\uff10\uff19\uff19\uff10\uff11\uff10\uff11_\uff11\uff12:\uff10\uff10"
ARABIC_INDIC_SERIAL = "\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0661\u0661\u0662\u0660\u0660"


@pytest.mark.parametrize(
    "serial",
    [
        "20180716_12:00\n",
        "201807161200\n",
        FULLWIDTH_SERIAL,
        ARABIC_INDIC_SERIAL,
        "20180716_12:0\uff10",
        "20180716_12:00\x00",
        "2018\u06f00716_1200",
    ],
)
def test_serials_with_newline_or_non_ascii_digits_refused(serial):
    assert not valid_serial(serial)


BAD_NAMES = [
    "x\n",
    "busybox\n",
    "x\r",
    "x\x00",
    "x\ty",
    "\u0431usybox",  # Cyrillic be
    "busyb\u043ex",  # Cyrillic o
    "ubuntu\u200b",  # zero-width space
    "\uff55buntu",  # full-width u
    "1\u0662",  # Arabic-Indic digit
    "x\x7f",
    "x\x85",
    "a" * 129,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_component_names_strict(name):
    with pytest.raises(LayoutError):
        parse_version_dir([name, "1.35", "amd64", "default", "20180716_1200"])
    with pytest.raises(LayoutError):
        parse_version_dir(["busybox", name, "amd64", "default", "20180716_1200"])
    with pytest.raises(LayoutError):
        parse_version_dir(["busybox", "1.35", "amd64", name, "20180716_1200"])
    with pytest.raises(LayoutError):
        parse_file_path(f"{name}/1.35/amd64/default/20180716_1200/lxd.tar.xz")


def test_long_but_reasonable_names_accepted():
    parse_version_dir(["a" * 128, "1.35", "amd64", "default", "20180716_1200"])


@pytest.mark.parametrize("name", ["amd64\n", "amd\u0466", "x86_64\x00"])
def test_arch_strict(name):
    with pytest.raises(LayoutError):
        parse_version_dir(["busybox", "1.35", name, "default", "20180716_1200"])


@pytest.mark.parametrize(
    "name", ["lxd.tar.xz\n", "rootfs.squashfs\n", "x\n.tar.gz", "\u0430.tar.gz", "a\x00.tar.gz"]
)
def test_file_names_strict(name):
    assert classify(name) is None
    with pytest.raises(LayoutError):
        parse_file_path(f"busybox/1.35/amd64/default/20180716_1200/{name}")


def test_unified_tarball_name_too_long_not_published():
    assert classify("a" * 200 + ".tar.gz") is None


def test_fixed_file_names_are_valid_names_so_classify_may_look_them_up_first():
    from lxd_image_server.tree.layout import _ROLES

    for name in _ROLES:
        assert valid_name(name) and not is_ignored_name(name), name


def _by_strptime(serial: str) -> dt.datetime | None:
    """serial_time as it was, all by strptime (the reference)."""
    digits = "".join(c for c in serial if c in "0123456789")
    for length, fmt in ((12, "%Y%m%d%H%M"), (8, "%Y%m%d")):
        if len(digits) >= length:
            try:
                return dt.datetime.strptime(digits[:length], fmt)
            except ValueError:
                continue
    return None


def test_serial_time_reads_digits_as_strptime_does() -> None:
    """serial_time's fixed-width reading of the digits (faster) agrees with strptime on every
    field value around and beyond each range, a day the month lacks and year 0 included."""
    rng = random.Random(13)
    years = ["0000", "0001", "1999", "2024", "9999"]
    days = [f"{y}{m:02d}{d:02d}" for y in years for m in range(100) for d in range(100)]
    samples = [*days, *(s + f"{rng.randrange(100):02d}{rng.randrange(100):02d}" for s in days)]
    samples += [f"20240229_{h:02d}:{n:02d}" for h in range(100) for n in range(100)]
    samples += ["20230229_1200", "20240431_1200", "20241231_2359", "2024123", "2024010112"]
    for serial in samples:
        assert layout.serial_time(serial) == _by_strptime(serial), serial
