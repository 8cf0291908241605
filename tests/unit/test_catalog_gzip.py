"""images.json.gz from reused chunks is a gzip file of exactly the document's bytes."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import zlib

import pytest

from lxd_image_server.catalog import gzip_chunks as catalog_gzip
from lxd_image_server.catalog.encode import catalog_bytes, dated_catalog
from lxd_image_server.catalog.gzip_chunks import GzipCache, Pieces
from lxd_image_server.catalog.model import Item, Product, Version
from lxd_image_server.catalog.products import catalog_of


def document(serials: range, salt: str = "") -> bytes:
    products = {}
    for p in range(3):
        versions = {}
        for s in serials:
            h = hashlib.sha256(f"{p}/{s}{salt}".encode()).hexdigest()
            path = f"images/os{p}/1.0/amd64/default/{s:012d}/"
            versions[f"{s:012d}"] = Version(
                f"{s:012d}",
                {
                    "lxd.tar.xz": Item("lxd.tar.xz", path + "lxd.tar.xz", 1, h),
                    "squashfs": Item("squashfs", path + "r", s, h),
                },
            )
        name = f"os{p}:1.0:amd64:default"
        products[name] = Product(name, f"os{p}", "1.0", "1.0", "amd64", "default", (), versions)
    return catalog_bytes(catalog_of(products, "Mon, 01 Jan 2024 00:00:00 +0000"))


@pytest.fixture
def deflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the chunks compressed (not reused)."""
    sizes: list[int] = []
    real = catalog_gzip._deflate

    def counting(chunk: bytes | memoryview) -> bytes:
        sizes.append(len(chunk))
        return real(chunk)

    monkeypatch.setattr(catalog_gzip, "_deflate", counting)
    return sizes


def test_the_gzip_holds_the_document_and_gzip_reads_it(tmp_path) -> None:
    for data in (b"", b"{}\n", document(range(0)), document(range(2000))):
        z = GzipCache().compress(data)
        assert gzip.decompress(z) == data
        assert zlib.decompress(z, 31) == data
        (tmp_path / "doc.gz").write_bytes(z)
        assert (
            subprocess.run(
                ["gzip", "-dc", str(tmp_path / "doc.gz")], capture_output=True, check=True
            ).stdout
            == data
        )


def test_a_new_version_recompresses_only_the_chunk_around_it(deflated: list[int]) -> None:
    cache = GzipCache()
    before = document(range(0, 4000, 2))
    first = cache.compress(before)
    assert sum(deflated) == len(before) and len(deflated) > 20
    deflated.clear()
    # the same document: nothing compressed again, the same bytes
    assert cache.compress(before) == first and deflated == []
    after = document(range(0, 4000, 2)).replace(b'"000000000100": {', b'"000000000101": {', 1)
    z = cache.compress(after)
    assert gzip.decompress(z) == after
    assert 0 < sum(deflated) < len(after) / 10
    # and a fresh cache gives the same bytes: update and the watcher agree
    assert GzipCache().compress(after) == z


def test_the_encoders_pieces_cut_and_compress_as_the_joined_document() -> None:
    """publish.py hands the .gz the catalog in pieces (each version's kept entry, never
    joined): the version lines it names are those VERSION_LINE finds in the joined bytes, and
    the .gz is the same bytes, with a cache or without."""
    products = {}
    for p in range(3):
        versions = {}
        for s in range(0, 3000, 3):
            h = hashlib.sha256(f"{p}/{s}".encode()).hexdigest()
            path = f"images/ös{p}/1.0/amd64/default/{s:012d}/"
            items = {"lxd.tar.xz": Item("lxd.tar.xz", path + "m", s, h)}
            versions[f"{s:012d}"] = Version(f"{s:012d}", items)
        name = f"ös{p}:1.0:amd64:default"
        products[name] = Product(name, f"ös{p}", "1.0", "1 «x»", "amd64", "default", (), versions)
    catalog = catalog_of(products, "")
    pieces = dated_catalog(catalog)("Mon, 01 Jan 2024 00:00:00 +0000")
    data = pieces.join()
    assert data == catalog_bytes(catalog_of(products, "Mon, 01 Jan 2024 00:00:00 +0000"))
    assert len(pieces.parts) > 2000 and len(pieces) == len(data)
    whole = Pieces.of(data)
    assert len(whole.lines) == 3000
    offsets = [sum(len(p) for p in pieces.parts[:i]) + at for i, at in pieces.lines]
    assert offsets == [at for _, at in whole.lines]
    cache = GzipCache()
    z = cache.compress(pieces)
    assert z == GzipCache().compress(data) == b"".join(GzipCache().compress_parts(pieces))
    assert gzip.decompress(z) == data and cache.compress(data) == z
