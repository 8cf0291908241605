from pathlib import Path

import pytest

from lxd_image_server.config import ConfigError
from lxd_image_server.settings import Settings, load


@pytest.fixture
def layers(tmp_path):
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    home = tmp_path / "home"
    (home / ".config" / "lxd-image-server").mkdir(parents=True)
    return etc, home


def test_defaults_when_nothing_exists(tmp_path):
    s = load(env={}, system_dir=str(tmp_path / "none"), home=str(tmp_path))
    assert s.root_dir == "/var/www/simplestreams"
    assert s.state_dir == "/var/lib/lxd-image-server"
    assert (s.allow_overwrites, s.allow_deletes, s.max_upload_size) == (False, False, None)
    assert s.prune_grace == 3600
    assert s.mirrors == () and s.logging is None and s.sources == ()


def test_precedence_key_by_key(layers, tmp_path):
    etc, home = layers
    (etc / "config.toml").write_text(
        '[paths]\nroot = "/etc-root"\nstate_dir = "/etc-state"\n'
        "[upload]\nallow_overwrites = true\nmax_size = 100\n"
    )
    (etc / "conf.d" / "20-b.toml").write_text('[paths]\nroot = "/conf-d-b"\n')
    (etc / "conf.d" / "10-a.toml").write_text(
        '[paths]\nroot = "/conf-d-a"\n[prune]\ngrace_period = 5\n'
    )
    (etc / "conf.d" / "ignored.txt").write_text("not toml at all [")
    (home / ".config/lxd-image-server/config.toml").write_text("[upload]\nmax_size = '2M'\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[upload]\nallow_deletes = true\n")
    extra = tmp_path / "extra.toml"
    extra.write_text("[upload]\nallow_deletes = false\nallow_overwrites = false\n")
    s = load(
        str(explicit),
        env={"LXD_IMAGE_SERVER_CONFIG": str(extra), "ALLOW_OVERWRITES": "yes"},
        system_dir=str(etc),
        home=str(home),
    )
    assert s.root_dir == "/conf-d-b"  # conf.d in name order, after config.toml
    assert s.state_dir == "/etc-state"  # untouched by later layers
    assert s.prune_grace == 5
    assert s.max_upload_size == 2 << 20  # home beats /etc
    assert s.allow_deletes is False  # $LXD_IMAGE_SERVER_CONFIG beats --config
    assert s.allow_overwrites is True  # the environment beats every file
    assert s.sources == tuple(
        str(p)
        for p in (
            etc / "config.toml",
            etc / "conf.d/10-a.toml",
            etc / "conf.d/20-b.toml",
            home / ".config/lxd-image-server/config.toml",
            explicit,
            extra,
        )
    )


def test_malformed_file_names_file_and_line(layers):
    etc, home = layers
    (etc / "conf.d" / "50-bad.toml").write_text('[upload]\nallow_deletes = true\nroot = "x\n')
    with pytest.raises(ConfigError) as e:
        load(env={}, system_dir=str(etc), home=str(home))
    assert "50-bad.toml" in str(e.value)
    assert "line 3" in str(e.value)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[upload]\nallow_deletes = 'yes'\n", "allow_deletes must be a bool"),
        ("[upload]\nmax_size = 'lots'\n", "not a size"),
        ("[paths]\nroots = '/x'\n", "unknown key(s) in [paths]: roots"),
        ("[uploads]\n", "unknown section or key 'uploads'"),
        ("[mirrors.eu1]\nuser = 'x'\n", "needs remote"),
        ("[mirrors.eu1]\nremote = 'h'\nport = 70000\n", "not a port"),
        ("[mirrors.eu1]\nremote = 'h'\nkey = '/k'\n", "unknown key(s) in [mirrors.eu1]: key"),
        ("[logging]\nroot = {level = 'INFO'}\n", "dictConfig"),
        ("[prune]\ngrace_period = -1\n", "negative"),
        ("[deltas]\nbases = 0\n", "deltas.bases must be between 1 and 10"),
        ("[deltas]\nmax_ratio = 1.5\n", "deltas.max_ratio"),
        ("[deltas]\nmax_ratio = true\n", "deltas.max_ratio"),
        ("[deltas]\nenabled = 'no'\n", "deltas.enabled must be a bool"),
        ("[deltas]\ntimeout = 0\n", "deltas.timeout"),
        ("[deltas]\ncheck_interval = 0\n", "deltas.check_interval must be at least 1"),
        ("[deltas]\ncheck_interval = '1h'\n", "deltas.check_interval"),
        ("[deltas]\nwindow = 1\n", "unknown key(s) in [deltas]: window"),
        ("[deltas]\nmin_size = -1\n", "deltas.min_size must not be negative"),
        ("[deltas]\nmin_size = '1X'\n", "deltas.min_size '1X' is not a size"),
    ],
)
def test_invalid_values(tmp_path, text, why):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None)
    assert why in str(e.value)
    assert str(f) in str(e.value)


def test_deltas_table(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        "[deltas]\nenabled = false\nbases = 2\nmax_ratio = 0.25\ntimeout = 60\nmin_size = '4M'\n"
        "check_interval = 120\n"
    )
    d = load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None).deltas
    assert (d.enabled, d.bases, d.max_ratio, d.timeout, d.min_size) == (False, 2, 0.25, 60, 4 << 20)
    assert d.check_interval == 120
    default = load(env={}, system_dir=str(tmp_path / "none"), home=None).deltas
    assert (default.enabled, default.bases, default.max_ratio) == (True, 1, 0.5)
    assert default.min_size == 1 << 20
    assert default.check_interval == 3600


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "nope.toml"), env={}, system_dir=str(tmp_path), home=None)


def test_bad_environment_flag(tmp_path):
    with pytest.raises(ConfigError, match="ALLOW_DELETES"):
        load(env={"ALLOW_DELETES": "sure"}, system_dir=str(tmp_path), home=None)


def test_mirrors_and_original_url_spelling(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        "[mirrors.eu1]\nremote = 'mirror1.example.com'\nuser = 'push'\n"
        "key_path = '/etc/lxd-image-server/mirror.key'\nport = 2222\npath = '/srv/ss'\n"
        "[mirrors.old]\nurl = 'https://mirror2.example.com:8443'\n"
    )
    s = load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None)
    eu1, old = s.mirrors
    assert (eu1.name, eu1.host, eu1.user, eu1.port, eu1.path) == (
        "eu1",
        "mirror1.example.com",
        "push",
        2222,
        "/srv/ss",
    )
    assert eu1.key_path == "/etc/lxd-image-server/mirror.key"
    assert (old.name, old.host, old.user, old.port, old.path) == (
        "old",
        "mirror2.example.com",
        "lxdmirror",
        22,
        "/var/www/simplestreams",
    )


def test_logging_table(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[logging]\nversion = 1\n[logging.root]\nlevel = 'WARNING'\n")
    s = load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None)
    assert s.logging == {"version": 1, "root": {"level": "WARNING"}}


def test_shipped_config_is_valid_and_all_defaults():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "etc" / "config.toml"
    s = load(str(shipped), env={}, system_dir="/nonexistent", home=None)
    assert s == load(env={}, system_dir="/nonexistent", home=None).__class__(
        sources=(str(shipped),)
    )


# -- [retention] (issue 12) ---------------------------------------------------------------------


def load_text(tmp_path: Path, text: str) -> Settings:
    f = tmp_path / "c.toml"
    f.write_text(text)
    return load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None)


def test_retention_keep_and_rules(tmp_path):
    s = load_text(
        tmp_path,
        "[retention]\nkeep = 3\n"
        "[[retention.rule]]\nmatch = 'debian/12'\nkeep = 7\n"
        "[[retention.rule]]\nmatch = 'debian/*'\nkeep = 1\n"
        "[[retention.rule]]\nmatch = '*/*/*/cloud'\nkeep = 0\n",
    )
    p = s.retention
    assert p.active and p.keep == 3
    assert p.keep_for("debian:12:amd64:default") == 7  # the first matching rule decides
    assert p.keep_for("debian:13:arm64:default") == 1
    assert p.keep_for("ubuntu:24.04:amd64:cloud") == 0
    assert p.keep_for("busybox:1.35:amd64:default") == 3
    assert p.keep_for("Debian:12:amd64:default") == 3  # case-sensitive, as the tree


def test_retention_is_off_by_default(tmp_path):
    s = load_text(tmp_path, "")
    assert not s.retention.active and s.retention.keep_for("a:b:amd64:default") == 0


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[retention]\nkeep = -1\n", "retention.keep must not be negative"),
        ("[retention]\nkeep = '3'\n", "retention.keep must be a int"),
        ("[retention]\nkeep = true\n", "retention.keep must be a number"),
        ("[retention]\nkept = 3\n", "unknown key(s) in [retention]: kept"),
        ("[retention]\nrule = 'debian/*'\n", "must be a list of tables"),
        ("[[retention.rule]]\nmatch = 'debian/*'\n", "rule #1 must have exactly match and keep"),
        (
            "[[retention.rule]]\nmatch = 'a/b'\nkeep = 1\nos = 'x'\n",
            "rule #1 must have exactly match and keep",
        ),
        ("[[retention.rule]]\nmatch = 'debian'\nkeep = 1\n", "rule #1: pattern 'debian'"),
        ("[[retention.rule]]\nmatch = 'a/b/c/d/e'\nkeep = 1\n", "os/release/arch/variant"),
        ("[[retention.rule]]\nmatch = 'a//b'\nkeep = 1\n", "component ''"),
        ("[[retention.rule]]\nmatch = 'a/b c'\nkeep = 1\n", "component 'b c'"),
        ("[[retention.rule]]\nmatch = 'a/b\\n'\nkeep = 1\n", "may hold only"),
        ("[[retention.rule]]\nmatch = 'a/b'\nkeep = -2\n", "rule #1 keep must not be negative"),
        ("[[retention.rule]]\nmatch = 3\nkeep = 1\n", "rule #1 match must be a str"),
    ],
)
def test_invalid_retention(tmp_path, text, why):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None)
    assert why in str(e.value) and str(f) in str(e.value)


def test_a_later_file_replaces_the_rules(tmp_path):
    system = tmp_path / "etc"
    (system / "conf.d").mkdir(parents=True)
    (system / "config.toml").write_text(
        "[retention]\nkeep = 2\n[[retention.rule]]\nmatch = 'a/*'\nkeep = 5\n"
    )
    (system / "conf.d" / "10.toml").write_text("[[retention.rule]]\nmatch = 'b/*'\nkeep = 1\n")
    s = load(env={}, system_dir=str(system), home=None)
    assert s.retention.keep == 2
    assert [r.pattern for r in s.retention.rules] == ["b/*"]


def test_shipped_retention_example_is_valid(tmp_path):
    """The commented example in etc/config.toml, uncommented, is what it says."""
    import re
    from pathlib import Path

    shipped = (Path(__file__).resolve().parents[2] / "etc" / "config.toml").read_text()
    block = shipped.split("\n[retention]\n", 1)[1].split("\n# Mirrors", 1)[0]
    lines = [m[1] for m in re.finditer(r"^# ((?:\[\[|[a-z_]+ = ).*)$", block, re.MULTILINE)]
    s = load_text(tmp_path, "[retention]\n" + "\n".join(lines) + "\n")
    assert s.retention.keep == 0
    assert [(r.pattern, r.keep) for r in s.retention.rules] == [
        ("debian/12", 7),
        ("*/*/*/cloud", 0),
    ]


def test_uploads_in_progress_per_credential(tmp_path):
    """Issue 18: 8 by default (one CI job's `xargs -P8`), from [upload] or the environment, and
    never so many that one credential could hold the upload app's 32 threads."""
    none = str(tmp_path / "none")
    assert load(env={}, system_dir=none, home=None).max_parallel_uploads == 8
    (tmp_path / "config.toml").write_text("[upload]\nmax_parallel = 12\n")
    assert load(env={}, system_dir=str(tmp_path), home=None).max_parallel_uploads == 12
    env = {"UPLOAD_MAX_PARALLEL": "3"}
    assert load(env=env, system_dir=str(tmp_path), home=None).max_parallel_uploads == 3
    for bad in ("0", "17", "many"):
        with pytest.raises(ConfigError, match="max_parallel"):
            load(env={"UPLOAD_MAX_PARALLEL": bad}, system_dir=none, home=None)
