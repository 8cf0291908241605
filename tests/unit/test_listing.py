"""`list`: rows as a client sees the images (combined fingerprints for split images)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from lxd_image_server.config import Paths
from lxd_image_server.ops.listing import CatalogMissing, ImageRow, image_rows, read_catalog, render

from .helpers import sha
from .test_verify import tree  # noqa: F401  (the fixture)

DEFAULT = "images/busybox/1.35/amd64/default/20240101_12:00"


def rows_of(paths: Paths) -> list[ImageRow]:
    return image_rows(read_catalog(paths.streams_dir))


def test_one_row_per_image(tree: Paths) -> None:  # noqa: F811
    root = Path(tree.root_dir)
    rows = rows_of(tree)
    got = {(r.product, r.root): r for r in rows}
    assert set(got) == {
        ("busybox:1.35:amd64:default", "squashfs"),
        ("busybox:1.35:amd64:default", "disk-kvm.img"),
        ("busybox:1.35:amd64:rootxz", "root.tar.xz"),
        ("busybox:1.35:amd64:unified", "unified"),
    }
    meta = (root / DEFAULT / "lxd.tar.xz").read_bytes()
    squash = (root / DEFAULT / "rootfs.squashfs").read_bytes()
    row = got[("busybox:1.35:amd64:default", "squashfs")]
    assert row.fingerprint == sha(meta, squash)
    assert row.size == len(meta) + len(squash)
    assert row.type == "container"
    assert row.files == (f"{DEFAULT}/lxd.tar.xz", f"{DEFAULT}/rootfs.squashfs")
    assert row.aliases == (
        "busybox/1.35/default",
        "busybox/1.35",
        "busybox/1.35/amd64/default",
    )
    assert got[("busybox:1.35:amd64:default", "disk-kvm.img")].type == "virtual-machine"
    unified = got[("busybox:1.35:amd64:unified", "unified")]
    assert unified.fingerprint == sha((root / unified.files[0]).read_bytes())


def test_formats(tree: Paths) -> None:  # noqa: F811
    rows = rows_of(tree)
    doc = json.loads(render(rows, "json"))
    assert len(doc) == 4 and {"product", "version", "fingerprint", "aliases"} <= set(doc[0])
    assert isinstance(doc[0]["aliases"], list)
    parsed = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert [r["fingerprint"] for r in parsed] == [r.fingerprint for r in rows]
    assert parsed[0]["aliases"] == ",".join(rows[0].aliases)
    table = render(rows, "table").splitlines()
    assert table[0].split() == [
        "PRODUCT", "VERSION", "TYPE", "ROOT", "SIZE", "FINGERPRINT", "DELTAS", "ALIASES"
    ]  # fmt: skip
    assert len(table) == 5
    assert rows[0].fingerprint[:12] in table[1] and rows[0].fingerprint not in table[1]
    assert "VM" in render(rows, "table")


def test_empty_and_missing_catalogs(tmp_path: Path) -> None:
    with pytest.raises(CatalogMissing, match="run `lxd-image-server update`"):
        read_catalog(str(tmp_path))
    (tmp_path / "images.json").write_text("[]")
    with pytest.raises(CatalogMissing, match="not a simplestreams"):
        read_catalog(str(tmp_path))
    (tmp_path / "images.json").write_text('{"products": {}}')
    assert render(image_rows(read_catalog(str(tmp_path))), "table") == "(the catalog is empty)\n"


# -- the catalog read back is bounded (issue 9, finding 3) ---------------------------------------


def test_nested_catalog_is_refused_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "images.json").write_text('{"products": ' + "[" * 100_000)
    with pytest.raises(CatalogMissing, match="cannot read"):
        read_catalog(str(tmp_path))


def test_catalog_that_is_a_symlink_or_a_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images.json").symlink_to("/dev/zero")
    with pytest.raises(CatalogMissing, match="cannot read"):
        read_catalog(str(tmp_path))
    (tmp_path / "images.json").unlink()
    os.mkfifo(tmp_path / "images.json")
    with pytest.raises(CatalogMissing, match="cannot read"):
        read_catalog(str(tmp_path))
