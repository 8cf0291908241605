"""[sync.NAME]: the configured syncs, their schedule, and who runs them (the settings,
ops/sync_schedule.py, `run`'s children, `sync` without a URL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lxd_image_server.cli import root as cli
from lxd_image_server.config import ConfigError, Paths
from lxd_image_server.ops import sync_schedule
from lxd_image_server.service import nginx, run
from lxd_image_server.settings import Settings, SyncConfig, load


def load_text(tmp_path: Path, text: str) -> Settings:
    f = tmp_path / "c.toml"
    f.write_text(text)
    return load(str(f), env={}, system_dir=str(tmp_path / "none"), home=None)


def test_sync_tables(tmp_path: Path) -> None:
    s = load_text(
        tmp_path,
        """
[sync.debian]
url = "https://u:p@images.example"
filters = ["os=debian", "arch=amd64"]
keep = 2
interval = "6h"
ca = "/etc/ca.pem"
timeout = 5

[sync.alpine]
url = "https://images.example/"
filters = { os = "alpine", variant = ["default", "cloud"] }
""",
    )
    assert s.syncs == (
        SyncConfig(
            "alpine", "https://images.example/", ("os=alpine", "variant=default", "variant=cloud")
        ),
        SyncConfig(
            "debian",
            "https://u:p@images.example",
            ("os=debian", "arch=amd64"),
            2,
            21600,
            "/etc/ca.pem",
            5.0,
        ),
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[sync.a]\nfilters = ["os=x"]', "needs url"),
        ('[sync.a]\nurl = "http://x"', "https://"),
        ('[sync.a]\nurl = "https://x"\nkeep = 0', "at least 1"),
        ('[sync.a]\nurl = "https://x"\ninterval = "10s"', "at least a minute"),
        ('[sync.a]\nurl = "https://x"\ninterval = "often"', "seconds or like"),
        ('[sync.a]\nurl = "https://x"\nfilters = "os=x"', "must be a list"),
        ('[sync.a]\nurl = "https://x"\ncolour = 1', "unknown key"),
        ('[sync.a]\nurl = "https://x"\ntimeout = 0', "timeout"),
        ("sync = 1", "[sync] must hold"),
    ],
)
def test_bad_sync_tables(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    assert why in str(e.value)
    assert "c.toml" in str(e.value)


def test_due_follows_the_recorded_runs() -> None:
    a = SyncConfig("a", "https://x", interval=3600)
    b = SyncConfig("b", "https://y", interval=86400)
    state = {"a": {"started": 1000, "ok": True}, "b": {"started": 1000, "ok": False}}
    assert sync_schedule.due([a, b], state, 1000 + 3599) == []
    assert sync_schedule.due([a, b], state, 1000 + 3600) == [a]
    assert sync_schedule.due([a, b], {}, 0) == [a, b]  # never ran: due


def test_a_broken_state_file_makes_every_sync_due(tmp_path: Path) -> None:
    (tmp_path / "syncs.json").write_text("[" * 100)
    assert sync_schedule.load_state(str(tmp_path)) == {}
    (tmp_path / "syncs.json").write_text(json.dumps({"a": {"started": 5, "ok": True}, "b": 3}))
    assert sync_schedule.load_state(str(tmp_path)) == {"a": {"started": 5, "ok": True}}


def test_a_bad_filter_fails_that_sync_only(tmp_path: Path) -> None:
    paths = Paths.resolve(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    bad = SyncConfig("bad", "https://127.0.0.1:1", ("colour=red",))
    outcome = sync_schedule.run_one(bad, paths, Settings())
    assert not outcome.ok and "colour" in outcome.error
    state = sync_schedule.load_state(paths.state_dir)
    assert state["bad"]["ok"] is False  # recorded: it waits its interval


def test_run_starts_the_syncer_only_when_syncs_are_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nginx, "nginx_binary", lambda: "/usr/sbin/nginx")
    paths = Paths.resolve(root_dir=str(tmp_path / "root"), state_dir=str(tmp_path / "state"))
    plain = run.RunOptions(paths=paths)
    assert "syncer" not in run._commands(plain, "/dev/null", None)
    synced = run.RunOptions(
        paths=paths,
        config="/etc/x.toml",
        settings=Settings(syncs=(SyncConfig("a", "https://x"),)),
    )
    argv = run._commands(synced, "/dev/null", None)["syncer"]
    assert argv[argv.index("--config") + 1] == "/etc/x.toml"
    assert argv[argv.index("sync") :] == ["sync", "--repeat", "--root-dir", paths.root_dir]


def test_sync_without_url_and_nothing_configured(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    base = ["--config", str(cfg), "--state-dir", str(tmp_path / "s"), "sync"]
    tree = ["--root-dir", str(tmp_path / "r")]
    r = CliRunner().invoke(cli.main, [*base, *tree], env={"HOME": str(tmp_path)})
    assert r.exit_code == 2 and "no [sync.NAME]" in r.output
    r = CliRunner().invoke(cli.main, [*base, "--due", *tree], env={"HOME": str(tmp_path)})
    assert r.exit_code == 0 and "nothing to do" in r.output
    r = CliRunner().invoke(cli.main, [*base, "--keep", "2", *tree], env={"HOME": str(tmp_path)})
    assert r.exit_code == 2 and "only go with a URL" in r.output
    r = CliRunner().invoke(
        cli.main, [*base, "https://x", "--due", *tree], env={"HOME": str(tmp_path)}
    )
    assert r.exit_code == 2
