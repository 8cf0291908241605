"""Fuzz tests (hypothesis) of the readers of what an uploader writes: metadata.json, the
metadata.yaml inside a tarball, and the layout's path checks. Whatever the bytes, nothing
escapes but the module's own error type. Bounded: a few hundred examples each, no deadline."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lxd_image_server.ops.import_detect import parse_yaml
from lxd_image_server.ops.import_errors import ImportFailed
from lxd_image_server.tree.layout import (
    LayoutError,
    classify,
    parse_file_path,
    parse_version_dir,
    valid_serial,
)
from lxd_image_server.tree.overrides import NO_OVERRIDES, Overrides, parse_overrides

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


# -- metadata.yaml (importer) --------------------------------------------------------------------

_YAML_PIECES = st.sampled_from(
    ["a:", " b:", "- ", "[", "]", "{", "}", ",", "&x ", "*x", "!!str ", "!!python/name:os ", "'",
     '"', "\\u00e9", "\n", "  ", "#", "---", "...", "|", ">", "? ", ": ", "~", "null", "3.10",
     "properties:\n  os: x\n", "\t", "%YAML 1.1\n", "\x00", "\ufeff"]
)  # fmt: skip


def _check_yaml(data: str | bytes) -> None:
    try:
        doc = parse_yaml(data)
    except ImportFailed as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(doc, dict)


@FUZZ
@given(st.binary(max_size=2048))
def test_metadata_yaml_any_bytes(data: bytes) -> None:
    _check_yaml(data)


@FUZZ
@given(st.lists(_YAML_PIECES, max_size=60).map("".join))
def test_metadata_yaml_yaml_like_text(text: str) -> None:
    _check_yaml(text)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=20_000), st.sampled_from(["[", "{a: ", "- ", "a:\n "]))
def test_metadata_yaml_any_nesting(depth: int, opener: str) -> None:
    _check_yaml(opener * depth)


# -- layout path checks --------------------------------------------------------------------------

_PATH_PIECES = st.sampled_from(
    ["busybox", "1.35", "amd64", "default", "20240101_12:00", "lxd.tar.xz", "/", "..", ".", "",
     "\n", "\x00", "\uff12", "\u0662", "x" * 200, ".hidden", "a.part", "rootfs.squashfs"]
)  # fmt: skip


@FUZZ
@given(st.text(max_size=300) | st.lists(_PATH_PIECES, max_size=10).map("".join))
def test_layout_upload_path_any_text(path: str) -> None:
    try:
        key, name = parse_file_path(path)
    except LayoutError:
        return
    parts = [*key.relpath.split("/"), name]
    assert "/".join(parts) == path
    assert all(p.isascii() and p.isprintable() and p not in (".", "..") for p in parts)
    assert (valid_serial(key.serial) and classify(name) is not None) or name


@FUZZ
@given(st.lists(st.text(max_size=20) | _PATH_PIECES, min_size=5, max_size=5))
def test_layout_version_dir_any_components(parts: list[str]) -> None:
    try:
        key = parse_version_dir(parts)
    except LayoutError:
        return
    assert all(p.isascii() and p.isprintable() and "/" not in p for p in key.relpath.split("/"))


@FUZZ
@given(st.text(max_size=300))
def test_layout_serial_and_classify_any_text(text: str) -> None:
    if valid_serial(text):
        assert text.isascii() and text.replace("_", "").replace(":", "").isdigit()
    role = classify(text)
    assert role is None or (text.isascii() and text.isprintable())
