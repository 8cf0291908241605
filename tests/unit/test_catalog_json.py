"""catalog_json writes json.dumps(sort_keys=True, indent=1, ensure_ascii=False)'s bytes."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from lxd_image_server.catalog.encode import Encoded, encode

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
    d = {rng.choice(STRINGS) + str(i): random_value(rng, depth + 1) for i in range(n)}
    return Encoded(d) if rng.random() < 0.3 else d


@pytest.mark.parametrize("seed", range(200))
def test_random_documents_encode_like_json(seed: int) -> None:
    value = random_value(random.Random(seed), 0)
    assert encode(value) == reference(value)
    # a second time, with every Encoded's text kept
    assert encode(value) == reference(value)


def test_an_encoded_mapping_is_reused_at_another_level() -> None:
    inner = Encoded(items=Encoded(a={"ftype": "x", "size": 1}), more=[1, {}])
    assert encode({"v": inner}) == reference({"v": inner})
    assert encode({"p": {"q": {"v": inner}}}) == reference({"p": {"q": {"v": inner}}})
    assert encode(inner) == reference(inner)
    assert encode([inner, inner]) == reference([inner, inner])


@pytest.mark.parametrize("value", [1.5, {1: "a"}, {"a": {1, 2}}, b"x", float("nan")])
def test_what_the_catalog_never_holds_is_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        encode(value)
