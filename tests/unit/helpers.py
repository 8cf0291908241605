"""Small builders for unit tests: real files in a tmp tree, no mocks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from lxd_image_server.catalog.hashing import Digests, HashCache, HashEngine
from lxd_image_server.catalog.model import Product, catalog_from_json

SERIAL = "20240101_12:00"


def version_dir(
    img: Path,
    os_: str = "busybox",
    release: str = "1.35",
    arch: str = "amd64",
    variant: str = "default",
    serial: str = SERIAL,
) -> Path:
    d = img / os_ / release / arch / variant / serial
    d.mkdir(parents=True, exist_ok=True)
    return d


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def blob(n: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def make_tree(root: Path) -> Path:
    os.makedirs(root / "images", exist_ok=True)
    return root / "images"


def digest_once(db: str | None, versions: Any, *args: Any, **kwargs: Any) -> Digests:
    """HashEngine(HashCache(db)).digest(...), closing the cache afterwards: Python 3.13 warns
    (ResourceWarning) about every sqlite3 connection left to the garbage collector."""
    cache = HashCache(db)
    try:
        return HashEngine(cache).digest(versions, *args, **kwargs)
    finally:
        cache.close()


def model_products(products: dict[str, Any]) -> dict[str, Product]:
    """The products of an images.json's `products` object, as the model (model.py) reads
    them: what the writer builds, from a document a test writes by hand."""
    doc = {
        k: {**p, "versions": {s: {"items": {}, **v} for s, v in p.get("versions", {}).items()}}
        for k, p in products.items()
    }
    return dict(catalog_from_json({"products": doc}).products)
