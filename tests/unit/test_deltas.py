"""Delta updates (issue 12): catalog items, which deltas are listed, making them with the real
xdelta3 (ratio cut-off, the record that stops it being made again), checking uploaded ones,
and deltas leaving the catalog and the disk with their base."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import deltagen, deltas, retention
from lxd_image_server.catalog import page as page_module
from lxd_image_server.catalog.deltawork import BACKGROUND, FOREGROUND, DeltaService
from lxd_image_server.catalog.hashcache import HashCache
from lxd_image_server.catalog.pipeline import Pipeline
from lxd_image_server.catalog.products import build_products
from lxd_image_server.config import Paths
from lxd_image_server.ops.pruning import prune
from lxd_image_server.settings import DeltaSettings
from lxd_image_server.tree.layout import Role, classify, delta_name
from lxd_image_server.tree.scan import ScannedVersion, Scanner

from .helpers import blob, digest_once, sha, version_dir, write

OLD, NEW, NEWER = "20240101_12:00", "20240102_12:00", "20240103_12:00"
PRODUCT = "busybox:1.35:amd64:default"
META = blob(3000, 1)
ROOT_1 = blob(400_000, 2)
#: version 1 with 20 KB changed in the middle and 10 KB appended
ROOT_2 = ROOT_1[:200_000] + blob(20_000, 3) + ROOT_1[220_000:] + blob(10_000, 4)
#: the roots here are smaller than [deltas] min_size's default: no floor unless a test sets one
SMALL_OK = DeltaSettings(min_size=0)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    os.makedirs(p.img_dir)
    return p


def add(paths: Paths, serial: str, root: bytes, name: str = "rootfs.squashfs") -> Path:
    d = version_dir(Path(paths.img_dir), serial=serial)
    write(d / "lxd.tar.xz", META)
    write(d / name, root)
    return d


def xdelta(old: Path, new: Path, out: Path) -> Path:
    subprocess.run(["xdelta3", "-e", "-9", "-f", "-s", old, new, out], check=True)
    return out


Products = dict[str, Any]


def catalog(paths: Paths, listed: bool = True) -> Products:
    versions = Scanner(paths.img_dir).scan()
    digests = digest_once(None, versions)
    ok = frozenset(f.path for v in versions for f in v.files.values() if f.role.role is Role.DELTA)
    built = build_products(versions, digests, paths.root_dir, ok if listed else frozenset())
    return {k: p.to_json() for k, p in built.items()}


def items(products: Products, serial: str = NEW) -> dict[str, Any]:
    found: dict[str, Any] = products[PRODUCT]["versions"][serial]["items"]
    return found


def update(paths: Paths, config: DeltaSettings | None = None, save_every: float = 2.0) -> Pipeline:
    """What `update` does: publish, make and check the deltas, publish again (FOREGROUND)."""
    cache = HashCache(None)
    service = DeltaService(
        paths.img_dir, paths.state_dir, config or SMALL_OK, FOREGROUND, save_every=save_every
    )
    pipeline = Pipeline(paths, cache, deltas=service)
    pipeline.update_all()
    assert service.pending() == 0
    cache.close()
    return pipeline


def undated(page: str) -> str:
    return re.sub(r"catalog updated [^<]*", "", page)


def published(paths: Paths) -> Products:
    products: Products = json.loads(Path(paths.streams_dir, "images.json").read_bytes())["products"]
    return products


# -- names ----------------------------------------------------------------------------------


def test_delta_names_say_their_base_and_kind() -> None:
    assert delta_name("squashfs", OLD) == "rootfs.20240101_1200.vcdiff"
    assert delta_name("disk-kvm.img", "202401011200") == "disk.202401011200.vcdiff"
    role = classify("rootfs.20240101_1200.vcdiff")
    assert role is not None and role.role is Role.DELTA
    assert (role.ftype, role.base) == ("squashfs.vcdiff", "20240101_1200")
    disk = classify("disk.20240101_1200.vcdiff")
    assert disk is not None and disk.ftype == "disk-kvm.img.vcdiff"
    for bad in (
        "rootfs.20241301_1200.vcdiff",  # month 13
        "rootfs.20240101_12:00.vcdiff",  # ':' is not a file name character here
        "rootfs.\uff12\uff10\uff12\uff140101_1200.vcdiff",  # full-width digits
        "rootfs.20240101_1200.vcdiff\n",
        ".rootfs.20240101_1200.vcdiff",
        "root.20240101_1200.vcdiff",
    ):
        assert classify(bad) is None, bad


# -- catalog items --------------------------------------------------------------------------


def test_delta_item_for_both_clients(paths: Paths) -> None:
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    delta = xdelta(
        old / "rootfs.squashfs", new / "rootfs.squashfs", new / delta_name("squashfs", OLD)
    )
    products = catalog(paths)
    found = [i for i in items(products).values() if i["ftype"] == "squashfs.vcdiff"]
    assert found == [
        {
            "ftype": "squashfs.vcdiff",
            "delta_base": OLD,
            "path": f"images/busybox/1.35/amd64/default/{NEW}/rootfs.20240101_1200.vcdiff",
            "size": delta.stat().st_size,
            "sha256": sha(delta.read_bytes()),
        }
    ]
    # what both clients look the base image up by: the base's metadata items carry it
    base = items(products, OLD)
    for ftype in ("lxd.tar.xz", "incus.tar.xz"):
        assert base[ftype]["combined_squashfs_sha256"] == sha(META, ROOT_1)
    # the base version itself lists no delta
    assert not [i for i in base.values() if "delta_base" in i]


def test_a_delta_is_not_listed_unless_checked(paths: Paths) -> None:
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    xdelta(old / "rootfs.squashfs", new / "rootfs.squashfs", new / delta_name("squashfs", OLD))
    assert "squashfs.vcdiff-" + OLD not in items(catalog(paths, listed=False))


def test_a_delta_is_not_listed_without_its_base(paths: Paths, tmp_path: Path) -> None:
    add(paths, NEW, ROOT_2)
    elsewhere = write(tmp_path / "old", ROOT_1)
    new = Path(paths.img_dir, "busybox/1.35/amd64/default", NEW)
    xdelta(elsewhere, new / "rootfs.squashfs", new / delta_name("squashfs", OLD))
    assert set(items(catalog(paths))) == {"lxd.tar.xz", "incus.tar.xz", "squashfs"}


def test_a_delta_needs_a_base_with_a_root_of_its_kind_older_than_itself(paths: Paths) -> None:
    old = add(paths, OLD, ROOT_1, name="root.tar.xz")  # not squashfs
    new = add(paths, NEW, ROOT_2)
    write(new / delta_name("squashfs", OLD), b"x" * 100)
    newer = add(paths, NEWER, ROOT_2)
    write(old / delta_name("squashfs", NEWER), b"x" * 100)  # a "delta" from a newer version
    products = catalog(paths)
    for serial in (OLD, NEW, NEWER):
        assert not [i for i in items(products, serial).values() if "delta_base" in i]
    assert newer.is_dir()


def test_a_disk_delta_is_not_listed_on_a_base_that_also_has_squashfs(paths: Paths) -> None:
    # Incus and LXD 5.0 look the base up by combined_squashfs_sha256 for any delta: they would
    # patch the container's squashfs with the VM disk's delta and fail the refresh
    old = add(paths, OLD, ROOT_1, name="disk.qcow2")
    write(old / "rootfs.squashfs", blob(1000, 9))
    new = add(paths, NEW, ROOT_2, name="disk.qcow2")
    xdelta(old / "disk.qcow2", new / "disk.qcow2", new / delta_name("disk-kvm.img", OLD))
    assert "disk-kvm.img.vcdiff-" + OLD not in items(catalog(paths))
    (old / "rootfs.squashfs").unlink()
    item = items(catalog(paths))["disk-kvm.img.vcdiff-" + OLD]
    assert (item["ftype"], item["delta_base"]) == ("disk-kvm.img.vcdiff", OLD)


# -- making and checking --------------------------------------------------------------------


def test_update_makes_checks_and_lists_the_delta(paths: Paths) -> None:
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    update(paths)
    delta = new / delta_name("squashfs", OLD)
    assert delta.is_file() and delta.stat().st_size < len(ROOT_2) * 0.2
    rebuilt = subprocess.run(
        ["xdelta3", "-d", "-c", "-s", old / "rootfs.squashfs", delta],
        capture_output=True,
        check=True,
    ).stdout
    assert rebuilt == ROOT_2
    item = items(published(paths))["squashfs.vcdiff-" + OLD]
    assert item["sha256"] == sha(delta.read_bytes()) and item["size"] == delta.stat().st_size
    assert not [n for n in os.listdir(new) if n.startswith(".")]  # no temporary file left
    assert oct(delta.stat().st_mode & 0o7777) == "0o644"


def test_the_settings_make_xdelta3s_options() -> None:
    """bench/bench_delta.py measures alternatives through the same options: the window is the
    base's size within [MIN_WINDOW, max_window], the secondary compression named when set."""
    s = deltagen.Settings(level=6, max_window=64 << 20, secondary="djw")
    assert s.encode_options(4096) == [
        "-e", "-6", "-S", "djw", "-A", "-c", "-B", str(deltagen.MIN_WINDOW),
    ]  # fmt: skip
    assert s.window(10 << 20) == 10 << 20
    assert s.window(1 << 30) == 64 << 20
    assert s.decode_options(1 << 30) == ["-d", "-c", "-B", str(64 << 20)]
    assert "-S" not in deltagen.Settings(secondary=None).encode_options(4096)


def test_the_servers_deltas_need_no_secondary_compressor_of_the_client(
    paths: Paths, tmp_path: Path
) -> None:
    """The server names its secondary compression (not the xdelta3 binary's default, LZMA in
    Debian's build): `none`, so a client's xdelta3 built without liblzma applies its deltas,
    with the command LXD and Incus run (`xdelta3 -f -d -s OLD DELTA NEW`, no -B)."""
    assert deltagen.SETTINGS.secondary == "none"
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    update(paths)
    delta = new / delta_name("squashfs", OLD)
    header = delta.read_bytes()[:5]
    assert header[:4] == b"\xd6\xc3\xc4\x00"  # VCDIFF, version 0
    assert not header[4] & 0x01  # VCD_SECONDARY: no secondary compressor
    out = tmp_path / "rebuilt"
    subprocess.run(
        ["xdelta3", "-f", "-d", "-s", old / "rootfs.squashfs", delta, out],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == ROOT_2


def test_a_window_sized_to_the_base_still_finds_matches_across_all_of_it(paths: Paths) -> None:
    """xdelta3's window is the base's size (not a fixed 16 MiB, costly for small roots): a
    root whose blocks moved from one end of the base to the other still gets a small delta
    that rebuilds it."""
    base = blob(1_500_000, 8)
    assert deltagen.MIN_WINDOW < len(base) < 16 << 20
    old = add(paths, OLD, base)
    new = add(paths, NEW, base[750_000:] + blob(1000, 9) + base[:750_000])
    update(paths)
    delta = new / delta_name("squashfs", OLD)
    assert delta.stat().st_size < 20_000
    rebuilt = subprocess.run(
        ["xdelta3", "-d", "-c", "-s", old / "rootfs.squashfs", delta],
        capture_output=True,
        check=True,
    ).stdout
    assert rebuilt == (new / "rootfs.squashfs").read_bytes()
    assert "squashfs.vcdiff-" + OLD in items(published(paths))


def test_only_the_newest_version_gets_deltas_from_its_bases(paths: Paths) -> None:
    add(paths, OLD, ROOT_1)
    mid = add(paths, NEW, ROOT_2)
    newest = add(paths, NEWER, ROOT_2 + blob(5000, 7))
    update(paths, DeltaSettings(bases=2, min_size=0))
    assert not [n for n in os.listdir(mid) if n.endswith(".vcdiff")]
    assert sorted(n for n in os.listdir(newest) if n.endswith(".vcdiff")) == [
        "rootfs.20240101_1200.vcdiff",
        "rootfs.20240102_1200.vcdiff",
    ]
    assert {i.get("delta_base") for i in items(published(paths), NEWER).values()} >= {OLD, NEW}


def test_a_batch_of_deltas_writes_its_records_once(paths: Paths, monkeypatch) -> None:
    """deltas.json is written once per batch, not after every xdelta3 run; a batch that runs
    past `save_every` writes what it has so far (here: after every job)."""
    for n in range(3):
        add(paths, OLD, ROOT_1 + bytes([n]), name="rootfs.squashfs")
        add(paths, NEW, ROOT_2 + bytes([n]), name="rootfs.squashfs")
        os.rename(Path(paths.img_dir, "busybox"), Path(paths.img_dir, f"busybox{n}"))
    saves: list[int] = []
    real_save = deltas.save

    def save(state_dir: str, records: Any) -> None:
        saves.append(len(records))
        real_save(state_dir, records)

    monkeypatch.setattr(deltas, "save", save)
    update(paths, save_every=3600)
    assert saves == [3]
    made = [p for p, r in deltas.load(paths.state_dir).items() if r.result == deltas.OK]
    assert len(made) == 3 and all(os.path.isfile(p) for p in made)
    # made again one at a time: each record is on disk as soon as its delta is made
    for p in made:
        os.unlink(p)
    os.unlink(deltas.state_path(paths.state_dir))
    saves.clear()
    update(paths, save_every=0)
    assert saves == [1, 2, 3]


def test_the_watcher_publishes_first_and_makes_the_deltas_after_in_one_batch(
    paths: Paths, monkeypatch
) -> None:
    """In the background (the watcher), the catalog is published at once without deltas;
    the deltas are made after it, their records written once for the batch, and the pipeline
    told (once per batch) so that it publishes them."""
    for n in range(3):
        add(paths, OLD, ROOT_1 + bytes([n]))
        add(paths, NEW, ROOT_2 + bytes([n]))
        os.rename(Path(paths.img_dir, "busybox"), Path(paths.img_dir, f"busybox{n}"))
    saves: list[int] = []
    real_save = deltas.save

    def save(state_dir: str, records: Any) -> None:
        saves.append(len(records))
        real_save(state_dir, records)

    monkeypatch.setattr(deltas, "save", save)
    cache = HashCache(None)
    try:
        service = DeltaService(paths.img_dir, paths.state_dir, SMALL_OK, BACKGROUND, 3600)
        told = threading.Event()
        pipeline = Pipeline(paths, cache, deltas=service, on_hashed=told.set)
        pipeline.update_all()
        assert not [k for p in published(paths).values() for k in items_of(p) if "vcdiff" in k]
        assert told.wait(60)
        deadline = time.monotonic() + 60
        while service.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.pending() == 0 and saves == [3]
        assert pipeline.has_news()
        made = sorted(
            str(Path(p).parent.relative_to(paths.img_dir)) for p in deltas.load(paths.state_dir)
        )
        pipeline.refresh(made)  # (the watcher's inotify events for the new files)
        got = published(paths)
        assert all(
            "squashfs.vcdiff-" + OLD
            in got[f"busybox{n}:1.35:amd64:default"]["versions"][NEW]["items"]
            for n in range(3)
        )
    finally:
        cache.close()


def items_of(product: dict[str, Any]) -> list[str]:
    return [k for v in product["versions"].values() for k in v["items"]]


def test_update_rescans_only_the_versions_that_got_a_delta(paths: Paths, monkeypatch) -> None:
    """After making deltas, `update` publishes them without scanning the whole tree again, and
    writes the page once, after the deltas: the catalog is the one a full update makes, and
    the next update on the same tree finds it published already."""
    add(paths, OLD, ROOT_1)
    other = add(paths, NEW, ROOT_2 + b"other")
    os.rename(Path(paths.img_dir, "busybox"), Path(paths.img_dir, "alpine"))
    other = Path(str(other).replace("/busybox/", "/alpine/"))
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    scans: list[str] = []
    real_scan = Scanner.scan

    def scan(self: Scanner, rel_prefix: str = "") -> list[ScannedVersion]:
        scans.append(rel_prefix)
        return real_scan(self, rel_prefix)

    pages: list[object] = []
    real_page = page_module.write_page

    def write_page(root_dir: str, products: Products, **kwargs: Any) -> bool:
        pages.append(products)
        return real_page(root_dir, products, **kwargs)

    plans: list[object] = []
    real_plan = deltas.plan

    def plan(*args: Any, **kwargs: Any) -> list[deltas.Job]:
        plans.append(args)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(Scanner, "scan", scan)
    monkeypatch.setattr(page_module, "write_page", write_page)  # (pipeline imports it late)
    monkeypatch.setattr(deltas, "plan", plan)
    update(paths)
    assert len(plans) == 1  # (nothing would run what a plan after the deltas' publish found)
    made = [new / delta_name("squashfs", OLD), other / delta_name("squashfs", OLD)]
    assert all(p.is_file() for p in made)
    rel = [str(p.parent.relative_to(paths.img_dir)) for p in made]
    assert scans == ["", *sorted(rel)]
    assert len(pages) == 1
    got = published(paths)
    assert "squashfs.vcdiff-" + OLD in items(got)
    assert "squashfs.vcdiff-" + OLD in got["alpine:1.35:amd64:default"]["versions"][NEW]["items"]
    page = Path(paths.root_dir, "streams", "index.html").read_text()
    assert "busybox:1.35:amd64:default" in page and "alpine:1.35:amd64:default" in page
    monkeypatch.undo()
    # an update with nothing changed builds nothing: the record vouches for what was published
    cache = HashCache(None)
    try:
        service = DeltaService(paths.img_dir, paths.state_dir, SMALL_OK, FOREGROUND)
        pipeline = Pipeline(paths, cache, deltas=service)
        assert pipeline.update_all() is False
        assert pipeline._unbuilt is not None
    finally:
        cache.close()
    # the same catalog and page as a full update of the tree as it is now
    os.unlink(Path(paths.state.catalog_inputs))
    Path(paths.streams_dir, "images.json").unlink()
    Path(paths.root_dir, "streams", "index.html").unlink()
    update(paths)
    assert published(paths) == got
    again = Path(paths.root_dir, "streams", "index.html").read_text()
    assert undated(again) == undated(page)


def test_a_delta_over_max_ratio_is_not_kept_nor_made_again(paths: Paths, monkeypatch) -> None:
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, blob(400_000, 50))  # unrelated: the delta is as big as the root
    update(paths)
    assert not [n for n in os.listdir(new) if n.endswith(".vcdiff") or n.startswith(".")]
    rec = deltas.load(paths.state_dir)[str(new / delta_name("squashfs", OLD))]
    assert rec.result == deltas.TOO_BIG
    runs = []
    monkeypatch.setattr(deltagen, "make", lambda *a: runs.append(a))
    update(paths)
    assert runs == []  # the record says so while the roots stay the same


def test_roots_below_min_size_get_no_delta_and_larger_ones_do(paths: Paths) -> None:
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    update(paths, DeltaSettings(min_size=len(ROOT_2) + 1))
    assert not [n for n in os.listdir(new) if n.endswith(".vcdiff") or n.startswith(".")]
    assert deltas.load(paths.state_dir) == {}  # not even tried: nothing recorded
    assert not [k for k in items(published(paths)) if "vcdiff" in k]
    update(paths, DeltaSettings(min_size=len(ROOT_2)))
    assert [n for n in os.listdir(new) if n.endswith(".vcdiff")] == [delta_name("squashfs", OLD)]
    assert "squashfs.vcdiff-" + OLD in items(published(paths))


def test_the_default_floor_skips_small_roots_and_still_checks_uploaded_deltas(
    paths: Paths,
) -> None:
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    assert len(ROOT_2) < DeltaSettings().min_size
    update(paths, DeltaSettings())
    assert not [n for n in os.listdir(new) if n.endswith(".vcdiff")]
    good = xdelta(
        old / "rootfs.squashfs", new / "rootfs.squashfs", new / delta_name("squashfs", OLD)
    )
    update(paths, DeltaSettings())
    assert items(published(paths))["squashfs.vcdiff-" + OLD]["sha256"] == sha(good.read_bytes())


def test_disabled_makes_nothing(paths: Paths) -> None:
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    update(paths, DeltaSettings(enabled=False, min_size=0))
    assert not [n for n in os.listdir(new) if n.endswith(".vcdiff")]


def test_an_uploaded_delta_is_listed_once_checked_and_a_wrong_one_never(paths: Paths) -> None:
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    good = xdelta(
        old / "rootfs.squashfs", new / "rootfs.squashfs", new / delta_name("squashfs", OLD)
    )
    update(paths, DeltaSettings(enabled=False, min_size=0))
    assert items(published(paths))["squashfs.vcdiff-" + OLD]["sha256"] == sha(good.read_bytes())
    # the root is replaced (ALLOW_OVERWRITES): the old delta would break the refresh
    write(new / "rootfs.squashfs", ROOT_2 + b"changed")
    update(paths, DeltaSettings(enabled=False, min_size=0))
    assert "squashfs.vcdiff-" + OLD not in items(published(paths))
    rec = deltas.load(paths.state_dir)[str(good)]
    assert rec.result == deltas.WRONG


def test_a_root_swapped_for_a_link_is_never_read(paths: Paths, tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", b"secret " * 1000)
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    versions = {v.key.serial: v for v in Scanner(paths.img_dir).scan()}
    base_root = versions[OLD].files["rootfs.squashfs"]
    target_root = versions[NEW].files["rootfs.squashfs"]
    (new / "rootfs.squashfs").unlink()
    os.symlink(secret, new / "rootfs.squashfs")  # after the scan, before xdelta3
    job = deltas.Job(str(new), delta_name("squashfs", OLD), base_root, target_root, sha(ROOT_2))
    rec = deltagen.make(job, deltagen.Limits(), paths.img_dir)
    assert rec.result == deltas.FAILED
    assert sorted(os.listdir(new)) == ["lxd.tar.xz", "rootfs.squashfs"]
    assert old.is_dir()


# -- deltas go with their base --------------------------------------------------------------


def test_deltas_leave_the_catalog_and_the_disk_with_their_base(paths: Paths) -> None:
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    update(paths)
    delta = new / delta_name("squashfs", OLD)
    assert "squashfs.vcdiff-" + OLD in items(published(paths))
    cache = HashCache(None)
    try:
        pipeline = Pipeline(paths, cache)  # as `prune` runs it: lists, makes nothing
        outcome = prune(pipeline, keep=1, grace=3600)
    finally:
        cache.close()
    assert [p.serial for p in outcome.scheduled] == [OLD]
    # out of the catalog at once (the base is), the file stays for the grace period
    assert set(published(paths)[PRODUCT]["versions"]) == {NEW}
    assert "squashfs.vcdiff-" + OLD not in items(published(paths))
    assert delta.is_file()
    # the grace period is over: the base's files go, and the deltas on it
    deleted = retention.delete_expired(paths, now=4e9)
    assert [p.serial for p in deleted] == [OLD]
    assert sorted(os.listdir(new)) == ["lxd.tar.xz", "rootfs.squashfs"]
    update(paths)
    assert set(items(published(paths))) == {"lxd.tar.xz", "incus.tar.xz", "squashfs"}


def test_a_delta_being_hashed_does_not_hold_its_version_back(paths: Paths) -> None:
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    update(paths, DeltaSettings(enabled=False, min_size=0))
    cache = HashCache(str(Path(paths.state_dir) / "h.sqlite3"))
    try:
        pipeline = Pipeline(paths, cache)
        pipeline.update_all()
        xdelta(
            Path(paths.img_dir, "busybox/1.35/amd64/default", OLD, "rootfs.squashfs"),
            new / "rootfs.squashfs",
            new / delta_name("squashfs", OLD),
        )
        pipeline.jobs.limit = 1
        pipeline.refresh([str(new.relative_to(paths.img_dir))], budget=0)
        assert set(published(paths)[PRODUCT]["versions"]) == {OLD, NEW}
    finally:
        pipeline.jobs.wait(30, {str(new.relative_to(paths.img_dir))})
        cache.close()


# -- running xdelta3 --------------------------------------------------------------------------


def _stdin(tmp_path: Path) -> int:
    return os.open(write(tmp_path / "in", b"input"), os.O_RDONLY)


def test_run_feeds_all_output_to_the_sink_and_reports_a_failure(tmp_path: Path) -> None:
    fd = _stdin(tmp_path)
    try:
        got: list[bytes] = []
        # output far larger than a pipe holds, and standard error too: neither may stall it
        script = "head -c 3000000 /dev/zero; head -c 300000 /dev/zero >&2; cat; echo"
        assert deltagen._run(["sh", "-c", script], fd, [], got.append, 60) is None
        assert b"".join(got) == bytes(3_000_000) + b"input\n"
        problem = deltagen._run(
            ["sh", "-c", "head -c 100000 /dev/zero >&2; echo first >&2; echo last >&2; exit 3"],
            fd,
            [],
            got.append,
            60,
        )
        assert problem == deltagen.Failure("xdelta3 exited 3: last", refused=False)
        # xdelta3's own message: it refused its input
        problem = deltagen._run(
            ["sh", "-c", "echo 'xdelta3: bad' >&2; exit 1"], fd, [], got.append, 60
        )
        assert problem == deltagen.Failure("xdelta3 exited 1: xdelta3: bad", refused=True)
        # killed (the OOM killer at the unit's MemoryMax): cut short, not refused
        problem = deltagen._run(["sh", "-c", "kill -9 $$"], fd, [], got.append, 60)
        assert problem == deltagen.Failure("xdelta3 was killed by SIGKILL", refused=False)
    finally:
        os.close(fd)


def test_run_stops_a_command_that_runs_too_long_or_writes_too_much(tmp_path: Path) -> None:
    fd = _stdin(tmp_path)
    try:
        problem = deltagen._run(["sleep", "60"], fd, [], lambda _: None, 0.3)
        assert problem is not None and problem.why.startswith("timed out")
        assert not problem.refused

        def sink(chunk: bytes) -> None:
            raise deltagen._Stop()

        with pytest.raises(deltagen._Stop):
            deltagen._run(["sh", "-c", "while :; do echo y; done"], fd, [], sink, 60)
    finally:
        os.close(fd)


def test_xdelta3_runs_at_nice_19_in_the_idle_io_class(tmp_path: Path) -> None:
    fd = _stdin(tmp_path)
    try:
        got: list[bytes] = []
        script = "ionice -p $$; cut -d' ' -f19 /proc/$$/stat"
        assert deltagen._run(["sh", "-c", script], fd, [], got.append, 60) is None
        assert b"".join(got).split() == [b"idle", b"19"]
    finally:
        os.close(fd)


# -- when xdelta3 runs again (issue 18) -------------------------------------------------------


def _record(result: str, at: float, tries: int = 0, env: str = "env") -> deltas.Record:
    return deltas.Record(result, "b", "t", "d", at=at, tries=tries, env=env)


def test_a_path_runs_again_after_the_interval_and_a_failure_later_each_time() -> None:
    assert deltas.due(None, 60, "env") == 0.0
    for result in (deltas.OK, deltas.WRONG, deltas.TOO_BIG):
        assert deltas.due(_record(result, 1000.0), 60, "env") == 1060.0
    assert [deltas.due(_record(deltas.FAILED, 1000.0, n), 60, "env") for n in (1, 2, 3)] == [
        1060.0,
        1120.0,
        1240.0,
    ]
    assert deltas.due(_record(deltas.FAILED, 0.0, 40), 60, "env") == deltas.MAX_BACKOFF
    # another program or xdelta3 (an upgrade): what failed or said WRONG is tried at once
    assert deltas.due(_record(deltas.FAILED, 1000.0, 3, env="old"), 60, "env") == 0.0
    assert deltas.due(_record(deltas.WRONG, 1000.0, env=""), 60, "env") == 0.0
    assert deltas.due(_record(deltas.OK, 1000.0, env=""), 60, "env") == 1060.0


def test_records_of_0_2_0_still_load_and_new_fields_round_trip() -> None:
    old = {"result": "failed", "base": "b", "target": "t", "delta": "", "size": 0, "detail": "x"}
    rec = deltas.Record.from_json(old)
    assert rec == deltas.Record("failed", "b", "t", "", 0, "x", 0.0, 0, "")
    new = _record(deltas.FAILED, 12.5, 2)
    assert deltas.Record.from_json(new.as_json()) == new
    for bad in ({"tries": True}, {"at": "now"}, {"env": 3}, {"size": 1.5}):
        assert deltas.Record.from_json({**old, **bad}) is None


def _background(paths: Paths, config: DeltaSettings) -> tuple[DeltaService, Pipeline, HashCache]:
    cache = HashCache(None)
    service = DeltaService(paths.img_dir, paths.state_dir, config, BACKGROUND, 3600)
    return service, Pipeline(paths, cache, deltas=service), cache


def _idle(service: DeltaService) -> None:
    deadline = time.monotonic() + 60
    while (service.pending() or service._worker is not None) and time.monotonic() < deadline:
        if service.deferred() and not service.pending():
            return
        time.sleep(0.05)


def test_renaming_a_delta_back_and_forth_buys_one_check_per_interval(
    paths: Paths, monkeypatch
) -> None:
    """Issue 18, finding 2: each rename gives the delta a new ctime (a new identity); the
    watcher checks it again only once `check_interval` has passed since the last check."""
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    wrong = write(new / delta_name("squashfs", OLD), blob(5000, 9))
    runs: list[str] = []
    real = deltagen.check

    def check(job: deltas.Job, limits: deltagen.Limits) -> deltas.Record:
        runs.append(job.path)
        return real(job, limits)

    monkeypatch.setattr(deltagen, "check", check)
    service, pipeline, cache = _background(paths, DeltaSettings(enabled=False, check_interval=600))
    try:
        pipeline.update_all()
        _idle(service)
        assert runs == [str(wrong)]
        assert deltas.load(paths.state_dir)[str(wrong)].result == deltas.WRONG
        for _ in range(5):
            os.rename(wrong, new / ".away")
            os.rename(new / ".away", wrong)
            pipeline.refresh([str(new.relative_to(paths.img_dir))])
            _idle(service)
        assert runs == [str(wrong)]
        when = service.deferred()[str(wrong)]
        assert 500 < when - time.time() <= 600
        # an interval later (the record says the check is that old), it runs once more
        records = deltas.load(paths.state_dir)
        records[str(wrong)] = replace(records[str(wrong)], at=time.time() - 601)
        deltas.save(paths.state_dir, records)
        pipeline.refresh([str(new.relative_to(paths.img_dir))])
        _idle(service)
        deadline = time.monotonic() + 60
        while len(runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runs == [str(wrong)] * 2
    finally:
        cache.close()


def test_a_failed_delta_is_made_again_by_the_watcher_after_an_upgrade(paths: Paths) -> None:
    """A delta FAILED in another environment (0.2.0's ionice refused by the units' filter)
    is made again at once; one FAILED here waits for its time."""
    add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    path = str(new / delta_name("squashfs", OLD))
    versions = {v.key.serial: v for v in Scanner(paths.img_dir).scan()}
    base = deltas.ident(versions[OLD].files["rootfs.squashfs"])
    target = deltas.ident(versions[NEW].files["rootfs.squashfs"])
    env = deltagen.environment(deltagen.xdelta3_path() or "xdelta3")
    failed = deltas.Record(deltas.FAILED, base, target, detail="refused", at=time.time(), tries=1)
    deltas.save(paths.state_dir, {path: replace(failed, env=env)})
    service, pipeline, cache = _background(paths, SMALL_OK)
    try:
        pipeline.update_all()
        _idle(service)
        assert list(service.deferred()) == [path]
        assert not os.path.exists(path)
    finally:
        cache.close()
    deltas.save(paths.state_dir, {path: failed})  # env "": a record of 0.2.0
    service, pipeline, cache = _background(paths, SMALL_OK)
    try:
        pipeline.update_all()
        deadline = time.monotonic() + 60
        while deltas.load(paths.state_dir)[path].result != deltas.OK:
            assert time.monotonic() < deadline, deltas.load(paths.state_dir)
            time.sleep(0.05)
        assert service.deferred() == {}
        assert os.path.isfile(path)
    finally:
        cache.close()


def test_a_check_cut_short_is_failed_not_wrong(paths: Paths, tmp_path: Path) -> None:
    """xdelta3 killed (the OOM killer at MemoryMax) says nothing about the delta: FAILED,
    tried again later; never WRONG, which would keep a good delta out until it changes."""
    old = add(paths, OLD, ROOT_1)
    new = add(paths, NEW, ROOT_2)
    good = xdelta(
        old / "rootfs.squashfs", new / "rootfs.squashfs", new / delta_name("squashfs", OLD)
    )
    versions = {v.key.serial: v for v in Scanner(paths.img_dir).scan()}
    killed = write(tmp_path / "xdelta3", b"#!/bin/sh\nkill -9 $$\n")
    killed.chmod(0o755)
    job = deltas.Job(
        str(new),
        good.name,
        versions[OLD].files["rootfs.squashfs"],
        versions[NEW].files["rootfs.squashfs"],
        sha(ROOT_2),
        versions[NEW].files[good.name],
    )
    rec = deltagen.check(job, deltagen.Limits(xdelta3=str(killed)))
    assert rec.result == deltas.FAILED and "SIGKILL" in rec.detail
    assert deltagen.check(job, deltagen.Limits()).result == deltas.OK
