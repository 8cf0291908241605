"""Fuzz tests (hypothesis) of the readers of what an uploader writes: metadata.json, the
metadata.yaml inside a tarball, and the layout's path checks. Whatever the bytes, nothing
escapes but the module's own error type. Bounded: a few hundred examples each, no deadline."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lxd_image_server.overrides import NO_OVERRIDES, Overrides, parse_overrides

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: JSON-like values, nested a few levels, with the keys metadata.json knows among others
_KEYS = st.sampled_from(
    ["os", "release_title", "variant", "release_codename", "support_eol", "aliases",
     "requirements", "secureboot", "x"]
) | st.text(max_size=8)  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["2030-01-01", "bb", "a, b", "true", "x/y"])
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=30,
)


def _check_overrides(data: bytes) -> None:
    ov, problem = parse_overrides(data)
    assert isinstance(ov, Overrides)
    assert problem is None or (isinstance(problem, str) and "\n" not in problem)
    if ov != NO_OVERRIDES:
        for text in (ov.os, ov.release_title, ov.variant, ov.release_codename, ov.support_eol):
            assert text is None or all(c >= " " and c != "\x7f" for c in text)


@FUZZ
@given(st.binary(max_size=2048))
def test_metadata_json_any_bytes(data: bytes) -> None:
    _check_overrides(data)


@FUZZ
@given(st.dictionaries(_KEYS, _JSON, max_size=8))
def test_metadata_json_any_document(doc: dict[str, object]) -> None:
    _check_overrides(json.dumps(doc).encode())


@FUZZ
@given(st.integers(min_value=1, max_value=20_000), st.sampled_from(["[", '{"a":', '{"aliases":[']))
def test_metadata_json_any_nesting(depth: int, opener: str) -> None:
    _check_overrides((opener * depth).encode())
