import dataclasses
import datetime as dt
import gzip
import json
import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from lxd_image_server.catalog import publish as publish_module
from lxd_image_server.catalog.gzip_chunks import GzipCache
from lxd_image_server.catalog.model import Item, Product, Version
from lxd_image_server.catalog.products import UPDATED_FORMAT
from lxd_image_server.catalog.publish import PublishError, catalog_lock

from .helpers import model_products

PRODUCTS_JSON = {
    "busybox:1.35:amd64:default": {
        "aliases": "busybox/1.35",
        "arch": "amd64",
        "os": "busybox",
        "release": "1.35",
        "release_title": "1.35",
        "variant": "default",
        "versions": {"20240101_1200": {"items": {}}},
    }
}
PRODUCTS = model_products(PRODUCTS_JSON)


def publish(
    streams: str, products: Any, now: dt.datetime | None = None, gz: GzipCache | None = None
) -> bool:
    """publish.publish with the writer's state directory beside `streams`."""
    return publish_module.publish(streams, products, now, gz, state_dir=streams + ".state")


T1 = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC)
T2 = dt.datetime(2024, 1, 2, 12, 0, tzinfo=dt.UTC)


def read(streams: Path, name: str) -> Any:
    return json.loads((streams / name).read_bytes())


def test_writes_both_documents_and_gz(tmp_path):
    streams = tmp_path / "streams" / "v1"
    assert publish(str(streams), PRODUCTS, T1)
    images = read(streams, "images.json")
    index = read(streams, "index.json")
    assert images["format"] == "products:1.0"
    assert images["datatype"] == "image-downloads"
    assert images["content_id"] == "images"
    assert images["updated"] == T1.strftime(UPDATED_FORMAT)
    assert index["index"]["images"]["products"] == list(PRODUCTS)
    for name in ("images.json", "index.json"):
        assert (
            gzip.decompress((streams / (name + ".gz")).read_bytes())
            == (streams / name).read_bytes()
        )
    leftovers = [p.name for p in streams.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_unchanged_content_keeps_bytes_and_timestamp(tmp_path):
    streams = tmp_path / "v1"
    publish(str(streams), PRODUCTS, T1)
    before = {n: (streams / n).read_bytes() for n in ("images.json", "index.json")}
    mtime = (streams / "images.json").stat().st_mtime_ns
    assert not publish(str(streams), PRODUCTS, T2)
    assert {n: (streams / n).read_bytes() for n in before} == before
    assert (streams / "images.json").stat().st_mtime_ns == mtime


def test_changed_content_moves_timestamp(tmp_path):
    streams = tmp_path / "v1"
    publish(str(streams), PRODUCTS, T1)
    assert publish(str(streams), {}, T2)
    assert read(streams, "images.json")["updated"] == T2.strftime(UPDATED_FORMAT)
    assert read(streams, "index.json")["index"]["images"]["products"] == []


def test_deterministic_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    publish(str(a), PRODUCTS, T1)
    reordered = model_products(
        {k: dict(reversed(list(v.items()))) for k, v in PRODUCTS_JSON.items()}
    )
    publish(str(b), reordered, T1)
    for n in ("images.json", "images.json.gz", "index.json", "index.json.gz"):
        assert (a / n).read_bytes() == (b / n).read_bytes()


def test_missing_gz_is_rewritten(tmp_path):
    streams = tmp_path / "v1"
    publish(str(streams), PRODUCTS, T1)
    (streams / "images.json.gz").unlink()
    assert publish(str(streams), PRODUCTS, T2)
    assert (streams / "images.json.gz").exists()
    # content unchanged: timestamp kept
    assert read(streams, "images.json")["updated"] == T1.strftime(UPDATED_FORMAT)


def _hold_lock(streams, started, seconds, marker):
    with catalog_lock(streams):
        started.set()
        time.sleep(seconds)
        with open(marker, "w") as f:
            f.write("released")


def test_lock_is_exclusive_across_processes(tmp_path):
    streams = str(tmp_path / "v1")
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    marker = tmp_path / "marker"
    p = ctx.Process(target=_hold_lock, args=(streams, started, 0.5, str(marker)))
    p.start()
    try:
        assert started.wait(10)
        assert not marker.exists()
        with catalog_lock(streams):
            # we only got the lock after the holder was done with it
            assert marker.read_text() == "released"
    finally:
        p.join(10)


# -- issue 9, finding 3: what the publisher reads back, and its lock ------------------------------


def _publish_with_little_memory(streams: str, conn) -> None:
    """In a child limited to 256 MiB more address space than it has: publish, report."""
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + 256 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(("ok", publish(streams, PRODUCTS, T2)))
    except BaseException as e:
        conn.send(("error", repr(e)[:200]))


def _publish_in_child(streams) -> tuple[str, object]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_publish_with_little_memory, args=(str(streams), child))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        p.join()
        return ("hung", None)
    return parent.recv() if parent.poll() else ("died", p.exitcode)


@pytest.mark.parametrize("target", ["/dev/zero", "huge"])
def test_previous_catalog_is_read_bounded(tmp_path, target):
    """images.json or index.json a symlink to /dev/zero or a huge file: the publisher neither
    follows the link nor reads without bound; it replaces the documents."""
    streams = tmp_path / "v1"
    publish(str(streams), PRODUCTS, T1)
    if target == "huge":
        huge = tmp_path / "huge"
        with open(huge, "wb") as f:
            f.truncate(8 << 30)  # sparse: 8 GiB of zeros, no disk used
        target = str(huge)
    for name in ("images.json", "index.json"):
        (streams / name).unlink()
        (streams / name).symlink_to(target)
    assert _publish_in_child(streams) == ("ok", True)
    for name in ("images.json", "index.json"):
        assert not (streams / name).is_symlink()
        assert read(streams, name)["updated"] == T2.strftime(UPDATED_FORMAT)


def test_a_huge_regular_catalog_is_not_read_whole(tmp_path):
    streams = tmp_path / "v1"
    publish(str(streams), PRODUCTS, T1)
    with open(streams / "images.json", "r+b") as f:
        f.truncate(8 << 30)
    assert _publish_in_child(streams) == ("ok", True)
    assert read(streams, "images.json")["updated"] == T2.strftime(UPDATED_FORMAT)


@pytest.mark.parametrize("kind", ["directory", "symlink", "dangling symlink", "fifo"])
def test_lock_that_is_not_a_regular_file_is_refused_by_name(tmp_path, kind):
    state = tmp_path / "state"
    state.mkdir()
    lock = state / "catalog.lock"
    victim = tmp_path / "victim"
    if kind == "directory":
        lock.mkdir()
    elif kind == "symlink":
        victim.write_text("precious")
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(victim)
    else:
        os.mkfifo(lock)
    with pytest.raises(PublishError) as e, catalog_lock(str(state)):
        pass
    message = str(e.value)
    assert str(lock) in message and "\n" not in message
    assert "not a regular file" in message
    if kind == "symlink":
        assert victim.read_text() == "precious"
    else:
        assert not victim.exists()


def test_lock_is_created_private_to_its_writer(tmp_path):
    state = tmp_path / "state"
    with catalog_lock(str(state)):
        st = os.lstat(state / "catalog.lock")
    assert stat.S_ISREG(st.st_mode)
    assert not st.st_mode & 0o022


def test_publishing_a_large_catalog_holds_few_copies_of_it(tmp_path):
    """Issue 13 (memory): publishing never holds a copy of the new images.json whole (each
    version's kept entry is written as it is, and compressed a chunk at a time), nor the
    previous one read whole: the peak (the pieces, a block read back to compare, the .gz)
    stays below the document's size. (Before: its bytes, and their join, twice that.)"""
    import tracemalloc

    def products(n: int) -> dict[str, Product]:
        versions: dict[str, dict[str, Version]] = {}
        for i in range(n):
            h = f"{i:064x}"
            items = {
                k: Item(k, f"images/os/1/amd64/default/{i}/{k}", i, h)
                for k in ("lxd.tar.xz", "incus.tar.xz", "squashfs")
            }
            versions.setdefault(f"os{i % 10}:1:amd64:default", {})[f"{i:012d}"] = Version(
                f"{i:012d}", items
            )
        return {
            k: Product(k, "x", "1", "1", "amd64", "default", (), v) for k, v in versions.items()
        }

    streams = tmp_path / "v1"
    big = products(3000)
    publish(str(streams), big, T1)
    size = (streams / "images.json").stat().st_size
    # one version more; the others' text was encoded already, as in the pipeline
    new = products(3001)["os0:1:amd64:default"].versions["000000003000"]
    bigger = dict(big)
    p = big["os0:1:amd64:default"]
    bigger[p.name] = dataclasses.replace(p, versions={**p.versions, new.serial: new})
    tracemalloc.start()
    try:
        assert publish(str(streams), bigger, T2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size, (peak, size)
