"""The one encoder (encode.py) writes json.dumps(sort_keys=True, indent=1,
ensure_ascii=False)'s bytes, and a Version's entry is encoded once."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest

from lxd_image_server.catalog import encode as encode_module
from lxd_image_server.catalog.encode import catalog_bytes, encode_value
from lxd_image_server.catalog.model import Item, Product, Version, catalog_from_json
from lxd_image_server.catalog.products import catalog_of

STRINGS = [
    "",
    "a",
    'quo"te',
    "back\\slash",
    "line\nbreak",
    "tab\t",
    "\x00\x1f\x7f",
    "é☃𝄞",
    "\u2028",
]


def reference(value: Any) -> str:
    return json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)


def random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9 if depth < 5 else 6)
    if kind == 0:
        return rng.choice(STRINGS) + str(rng.randrange(100))
    if kind == 1:
        return rng.randrange(-(10**20), 10**20)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4, 5):
        return rng.choice(STRINGS)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    n = rng.randrange(20 if kind == 7 else 4)
    return {rng.choice(STRINGS) + str(i): random_value(rng, depth + 1) for i in range(n)}


@pytest.mark.parametrize("seed", range(200))
def test_random_documents_encode_like_json(seed: int) -> None:
    value = random_value(random.Random(seed), 0)
    assert encode_value(value) == reference(value).encode()


def version(serial: str, n: int) -> Version:
    path = f"images/os/1/amd64/default/{serial}/"
    return Version(
        serial,
        {
            "lxd.tar.xz": Item(
                "lxd.tar.xz", path + "m", n, "a" * 64, combined_squashfs_sha256="b" * 64
            ),
            "squashfs": Item("squashfs", path + "r", n + 1, "c" * 64),
            f"squashfs.vcdiff-{n}": Item(
                "squashfs.vcdiff", path + "d", 7, "d" * 64, delta_base='1 ☃ "\n'
            ),
            "incus_combined.tar.gz": Item(
                "incus_combined.tar.gz", path + "u", 9, "e" * 64, combined_type="virtual-machine"
            ),
        },
    )


def test_a_catalog_encodes_like_json_of_its_model_and_each_version_once(monkeypatch) -> None:
    versions = {f"2024010{i}": version(f"2024010{i}", i) for i in range(1, 6)}
    versions["20240100"] = Version("20240100", {})  # (no client would use it; encoded all the same)
    versions["20240106"] = Version("20240106", {"é ☃\\": Item("x", "p", 0, "")})
    product = Product(
        "os:1:amd64:default",
        "Ös",
        "1",
        "1 «x»",
        "amd64",
        "default",
        ("a", "b/c"),
        versions,
        requirements={"secureboot": "false"},
        lxd_requirements={"secureboot": "false"},
        release_codename="c",
        support_eol="2030-01-01",
    )
    other = dataclasses.replace(product, name="os:1:arm64:default", arch="arm64", aliases=())
    catalog = catalog_of({product.name: product, other.name: other}, "now")
    assert catalog_bytes(catalog) == (reference(catalog.to_json()) + "\n").encode()
    assert catalog_from_json(json.loads(catalog_bytes(catalog))) == catalog
    # a second encoding reuses every version's text: none is encoded again
    encoded: list[str] = []
    real = encode_module._version_text

    def counting(v: Version) -> bytes:
        encoded.append(v.serial)
        return real(v)

    monkeypatch.setattr(encode_module, "_version_text", counting)
    assert catalog_bytes(catalog) == catalog_bytes(catalog) and encoded == []
    # a new version: only it is encoded
    fresh = version("20240109", 9)
    grown = dataclasses.replace(product, versions={**versions, fresh.serial: fresh})
    bigger = catalog_of({grown.name: grown, other.name: other}, "later")
    assert catalog_bytes(bigger) == (reference(bigger.to_json()) + "\n").encode()
    assert encoded == [fresh.serial]


def test_a_version_elsewhere_than_in_a_catalog_is_encoded_at_its_level() -> None:
    v = version("20240101", 1)
    v.derived("entry", encode_module._version_text)  # its text at VERSION_LEVEL, kept
    for doc in ({"v": v}, [v, [v]], {"a": {"b": {"c": {"d": {"e": v}}}}}):
        plain = json.loads(json.dumps(doc, default=lambda o: o.to_json()))
        assert encode_value(doc) == reference(plain).encode()


@pytest.mark.parametrize("value", [1.5, {1: "a"}, {"a": {1, 2}}, b"x", float("nan")])
def test_what_the_catalog_never_holds_is_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        encode_value(value)
