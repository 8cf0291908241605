import pytest

from lxd_image_server.overrides import NO_OVERRIDES, parse_overrides


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
