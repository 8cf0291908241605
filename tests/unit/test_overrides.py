import pytest

from lxd_image_server.tree.overrides import NO_OVERRIDES, parse_overrides

MAX_OVERRIDES_BYTES = 64 * 1024


def test_full():
    ov, problem = parse_overrides(
        b'{"os": "BusyBox", "release_title": "1.35 (stable)", "aliases": ["bb", "bb/x"],'
        b' "requirements": {"secureboot": false, "nesting": "true"}, "variant": "tiny",'
        b' "support_eol": "2030-01-01"}'
    )
    assert problem is None
    assert ov.os == "BusyBox"
    assert ov.release_title == "1.35 (stable)"
    assert ov.aliases == ("bb", "bb/x")
    assert ov.requirements_map == {"secureboot": "false", "nesting": "true"}
    assert ov.variant == "tiny"
    assert ov.support_eol == "2030-01-01"


def test_alias_string():
    ov, problem = parse_overrides(b'{"aliases": "a, b,,c"}')
    assert problem is None
    assert ov.aliases == ("a", "b", "c")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"aliases": 3}', "aliases"),
        (b'{"aliases": ["ok", 3]}', "aliases"),
        (b'{"aliases": ["has space"]}', "alias"),
        (b'{"os": 5}', "'os'"),
        (b'{"os": ""}', "'os'"),
        (b'{"requirements": ["x"]}', "requirements"),
        (b'{"requirements": {"a": 1}}', "requirements.a"),
        (b'{"support_eol": "soon"}', "support_eol"),
        (b'{"variant": "a/b"}', "variant"),
    ],
)
def test_invalid_means_defaults(data, why):
    ov, problem = parse_overrides(data)
    assert ov == NO_OVERRIDES
    assert problem is not None
    assert why in problem
    assert problem.endswith("using defaults")


def test_unknown_keys_reported_but_applied():
    ov, problem = parse_overrides(b'{"alias": "typo", "os": "X"}')
    assert ov.os == "X"
    assert problem is not None
    assert "alias" in problem


# -- hostile metadata.json (issue 9, finding 5): bounded, one problem line, never an exception --


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 5000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"requirements": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"os": "x", "aliases": [' + b"[" * 100 + b"]" * 100 + b"]}",
    ],
)
def test_deeply_nested_json_means_defaults(data):
    ov, problem = parse_overrides(data)
    assert ov == NO_OVERRIDES
    assert problem is not None
    assert "\n" not in problem
    assert problem.endswith("using defaults")


def test_too_large_means_defaults():
    ov, problem = parse_overrides(b'{"os": "' + b"x" * (MAX_OVERRIDES_BYTES + 1) + b'"}')
    assert ov == NO_OVERRIDES
    assert problem is not None and "larger than" in problem


@pytest.mark.parametrize(
    "data",
    [
        b'{"aliases": ["bb\\n"]}',
        b'{"aliases": "bb\\n"}',
        b'{"aliases": ["\\u0431b"]}',
        b'{"aliases": ["' + b"a" * 300 + b'"]}',
        b'{"aliases": [' + b",".join(b'"a%d"' % i for i in range(1000)) + b"]}",
        b'{"os": "Busy\\u0000Box"}',
        b'{"release_title": "1.35\\n<script>"}',
        b'{"os": "' + b"x" * 1000 + b'"}',
        b'{"requirements": {"a\\n": "true"}}',
        b'{"requirements": {"secureboot": "fa\\u0000lse"}}',
    ],
)
def test_control_characters_and_giants_refused(data):
    ov, problem = parse_overrides(data)
    assert ov == NO_OVERRIDES
    assert problem is not None and problem.endswith("using defaults")
