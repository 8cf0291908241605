import pytest

from lxd_image_server.config import ConfigError
from lxd_image_server.settings import load


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
        ("[deltas]\nwindow = 1\n", "unknown key(s) in [deltas]: window"),
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
    f.write_text("[deltas]\nenabled = false\nbases = 2\nmax_ratio = 0.25\ntimeout = 60\n")
    d = load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None).deltas
    assert (d.enabled, d.bases, d.max_ratio, d.timeout) == (False, 2, 0.25, 60)
    default = load(env={}, system_dir=str(tmp_path / "none"), home=None).deltas
    assert (default.enabled, default.bases, default.max_ratio) == (True, 1, 0.5)


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
