"""The mirror pusher's logic with a fake transport (coalescing, backoff, state changes logged
once, one mirror never holding back another), the rsync command lines, the state file and
`mirror status`, and the pure parts of `mirror authorize`. The real rsync-over-ssh push to a
real sshd is tests/integration/test_mirror.py."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lxd_image_server.cli.root import main
from lxd_image_server.config import Paths
from lxd_image_server.mirror.authorize import (
    AuthorizeError,
    AuthorizeReport,
    PublicKey,
    authorize,
    key_options,
    merge_authorized_keys,
    parse_public_keys,
)
from lxd_image_server.mirror.sendlist import CatalogError
from lxd_image_server.mirror.state import MirrorStatus, describe, read_state, write_state
from lxd_image_server.mirror.transport import (
    EXCLUDES,
    PushCancelled,
    PushError,
    RsyncPusher,
    Snapshot,
    Source,
    _rsh_quote,
    catalog_command,
    deletions_command,
    describe_target,
    images_command,
    rsync_command,
    take_snapshot,
)
from lxd_image_server.mirror.worker import Mirrors, MirrorWorker, push_once, retry_delay
from lxd_image_server.settings import MirrorConfig

DEADLINE = 10.0
M1 = MirrorConfig(name="eu1", host="mirror1.example.com", user="push", key_path="/k", port=2222)
M2 = MirrorConfig(name="us1", host="mirror2.example.com")


def wait_for(predicate, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


class FakePusher:
    """Counts pushes; can hold a push until released, fail a number of times, be cancelled."""

    def __init__(self, fail: int = 0, hold: bool = False, message: str = "refused") -> None:
        self.pushes = 0
        self.fail = fail
        self.message = message
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.inside = threading.Event()
        self.cancelled = threading.Event()
        self.lock = threading.Lock()

    def push(self) -> None:
        self.inside.set()
        self.gate.wait()
        if self.cancelled.is_set():
            raise PushCancelled("cancelled")
        with self.lock:
            self.pushes += 1
            failing = self.pushes <= self.fail
        self.inside.clear()
        if failing:
            raise PushError(f"images: {self.message}")

    def cancel(self) -> None:
        self.cancelled.set()
        self.gate.set()


def idle(worker: MirrorWorker) -> bool:
    st = worker.status()
    return not st.pending and not st.pushing


@pytest.fixture
def workers():
    started: list[MirrorWorker] = []

    def make(pusher, config=M1, **kw) -> MirrorWorker:
        w = MirrorWorker(config, pusher, **kw)
        w.start()
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop(timeout=DEADLINE)


# -- backoff and coalescing -------------------------------------------------------------------


def test_retry_delay_doubles_from_5_s_to_10_min():
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays[:4] == [5, 10, 20, 40]
    assert delays[-1] == 600
    assert delays == sorted(delays)
    assert max(delays) == 600


def test_requests_during_a_push_fold_into_one_more_push(workers):
    pusher = FakePusher(hold=True)
    w = workers(pusher)
    w.request()
    wait_for(pusher.inside.is_set, "the first push to start")
    for _ in range(5):
        w.request()
    assert w.status().pushing and w.status().pending
    pusher.gate.set()
    wait_for(lambda: idle(w) and pusher.pushes >= 2, "the pushes to finish")
    time.sleep(0.05)  # nothing else is coming
    assert pusher.pushes == 2
    assert w.status().state == "ok"


def test_failures_back_off_are_logged_once_and_recovery_once(workers, caplog):
    caplog.set_level(logging.DEBUG, logger="lxd_image_server.mirror")
    pusher = FakePusher(fail=3)
    w = workers(pusher, first_retry=0.01, max_retry=0.04)
    w.request()
    wait_for(lambda: w.status().state == "ok", "the mirror to recover")
    wait_for(lambda: "works again" in caplog.text, "the recovery to be logged")
    assert pusher.pushes == 4
    records = [r for r in caplog.records if r.name == "lxd_image_server.mirror.worker"]
    errors = [r for r in records if r.levelno == logging.ERROR]
    recovered = [r for r in records if "works again" in r.getMessage()]
    assert len(errors) == 1 and "push failed" in errors[0].getMessage()
    assert "images: refused" in errors[0].getMessage()
    assert len(recovered) == 1 and recovered[0].levelno == logging.WARNING
    assert "3 failed attempt(s)" in recovered[0].getMessage()
    assert sum("still failing" in r.getMessage() for r in records) == 2
    st = w.status()
    assert st.failures == 0 and st.last_error == "images: refused" and st.last_success


def test_a_failing_mirror_waits_for_its_backoff_not_for_requests(workers):
    pusher = FakePusher(fail=100)
    w = workers(pusher, first_retry=3600, max_retry=3600)
    w.request()
    wait_for(lambda: w.status().failures == 1, "the first failure")
    st = w.status()
    assert st.state == "failing" and st.pending and st.next_attempt
    for _ in range(3):
        w.request()
    time.sleep(0.1)
    assert pusher.pushes == 1, "a request during the backoff pushed at once"
    w.retry_now()  # what a reload does
    wait_for(lambda: pusher.pushes == 2, "the retry asked for")
    wait_for(lambda: w.status().failures == 2, "the second failure")


def test_a_stuck_mirror_does_not_hold_back_the_others(tmp_path):
    stuck, fine = FakePusher(hold=True), FakePusher()
    pushers = {"eu1": stuck, "us1": fine}
    mirrors = Mirrors(paths(tmp_path), make_pusher=lambda m: pushers[m.name])
    try:
        mirrors.configure([M1, M2])
        wait_for(stuck.inside.is_set, "the stuck push to start")
        wait_for(lambda: fine.pushes == 1, "the first push to the other mirror")
        for n in (2, 3):
            mirrors.request()
            wait_for(lambda n=n: fine.pushes == n, f"push {n} to the other mirror")
        assert stuck.pushes == 0
    finally:
        mirrors.stop()  # cancels the stuck push
    assert stuck.cancelled.is_set()
    doc = read_state(str(tmp_path / "state"))
    assert doc is not None and set(doc["mirrors"]) == {"eu1", "us1"}


def test_stop_cancels_a_push_in_progress():
    pusher = FakePusher(hold=True)
    w = MirrorWorker(M1, pusher)
    w.start()
    w.request()
    wait_for(pusher.inside.is_set, "the push to start")
    w.stop(timeout=DEADLINE)
    assert not w._thread.is_alive()
    assert pusher.pushes == 0


def test_reconfigure_keeps_restarts_and_drops_workers(tmp_path):
    made: list[str] = []

    def make(m: MirrorConfig) -> FakePusher:
        made.append(m.name)
        return FakePusher()

    mirrors = Mirrors(paths(tmp_path), make_pusher=make)
    try:
        mirrors.configure([M1, M2])
        moved = MirrorConfig(name="us1", host="elsewhere.example.com")
        mirrors.configure([M1, moved])
        assert made == ["eu1", "us1", "us1"]
        mirrors.configure([M1])
        assert set(mirrors.statuses()) == {"eu1"}
        wait_for(lambda: mirrors.statuses()["eu1"].state == "ok", "the push")
        wait_for(
            lambda: set((read_state(str(tmp_path / "state")) or {}).get("mirrors", {})) == {"eu1"},
            "the state file to drop us1",
        )
    finally:
        mirrors.stop()


# -- the state file and `mirror status` -------------------------------------------------------


def paths(tmp_path: Path) -> Paths:
    return Paths.resolve(str(tmp_path / "root"), state_dir=str(tmp_path / "state"))


def test_state_file_and_status_text(tmp_path):
    state = str(tmp_path / "state")
    ok = MirrorStatus(target=describe_target(M2), state="ok", last_success="2024-01-01T12:00:00Z")
    ok.last_duration = 1.25
    bad = MirrorStatus(
        target=describe_target(M1),
        state="failing",
        failures=3,
        pending=True,
        last_error="images: rsync exited 255: Connection refused",
        last_error_at="2024-01-01T12:00:30Z",
        next_attempt="2024-01-01T12:01:10Z",
    )
    write_state(state, {"eu1": bad, "us1": ok})
    doc = read_state(state)
    assert doc is not None and doc["pid"] == os.getpid()
    now = 1704110460.0  # 2024-01-01T12:01:00Z
    lines, all_ok = describe(doc, [M1, M2], now)
    text = "\n".join(lines)
    assert not all_ok
    assert "eu1: ssh://push@mirror1.example.com:2222/var/www/simplestreams" in text
    assert "failing (3 attempt(s) in a row); push pending" in text
    assert "Connection refused" in text and "(30 s ago)" in text
    assert "next attempt: 2024-01-01T12:01:10Z (in 10 s)" in text
    assert "last success: 2024-01-01T12:00:00Z (60 s ago), took 1.2 s" in text
    # merge: `update` by hand records its mirrors and keeps the watcher's others
    write_state(state, {"eu1": MirrorStatus(target="x", state="ok")}, merge=True)
    doc = read_state(state)
    assert doc is not None and set(doc["mirrors"]) == {"eu1", "us1"}
    assert describe(doc, [M1, M2], now)[1]


def test_status_of_configured_mirror_never_pushed_and_of_removed_one(tmp_path):
    lines, all_ok = describe(None, [M1], time.time())
    assert not all_ok
    assert "no mirror state recorded yet" in lines[0]
    assert "  state:        not pushed yet" in lines
    doc = {"pid": -1, "updated": "2024-01-01T12:00:00Z", "mirrors": {"old": {"target": "t"}}}
    lines, _ = describe(doc, [], time.time())
    assert "old: t (no longer configured)" in lines
    assert "no longer running" in lines[0]


def test_status_command_reads_the_state_dir_and_exits_1_when_failing(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[mirrors.eu1]\nremote = "mirror1.example.com"\nuser = "push"\nport = 2222\n')
    monkeypatch.setenv("LXD_IMAGE_SERVER_CONFIG", str(config))
    monkeypatch.setenv("HOME", str(tmp_path))
    state = tmp_path / "state"
    bad = MirrorStatus(target=describe_target(M1), state="failing", failures=1, last_error="boom")
    write_state(str(state), {"eu1": bad})
    runner = CliRunner()
    result = runner.invoke(main, ["--state-dir", str(state), "mirror", "status"])
    assert result.exit_code == 1, result.output
    assert "boom" in result.output and str(state / "mirrors.json") in result.output
    write_state(str(state), {"eu1": MirrorStatus(target=describe_target(M1), state="ok")})
    result = runner.invoke(main, ["--state-dir", str(state), "mirror", "status"])
    assert result.exit_code == 0, result.output


def test_push_once_retries_and_records(tmp_path):
    flaky, down = FakePusher(fail=1), FakePusher(fail=100, message="Connection refused")
    pushers = {"eu1": flaky, "us1": down}
    results = push_once(
        [M1, M2], paths(tmp_path), attempts=2, wait=0, make_pusher=lambda m: pushers[m.name]
    )
    assert [(r.name, r.ok) for r in results] == [("eu1", True), ("us1", False)]
    assert flaky.pushes == 2 and down.pushes == 2
    assert "Connection refused" in results[1].message
    doc = read_state(str(tmp_path / "state"))
    assert doc is not None
    assert doc["mirrors"]["eu1"]["state"] == "ok"
    assert doc["mirrors"]["us1"]["state"] == "failing"


# -- the rsync command lines ------------------------------------------------------------------


def source(tmp_path: Path) -> Source:
    root = tmp_path / "root"
    return Source(str(root), str(root / "images"), str(root / "streams" / "v1"))


def test_commands_send_regular_files_only_and_in_order(tmp_path):
    common = rsync_command(M1, "/state/mirrors/known_hosts")
    snap = Snapshot("/snap", "images")
    images = images_command(common, M1, "/snap/stage-0", "/snap/files-0")
    catalog = catalog_command(common, M1, snap)
    deletions = deletions_command(common, M1, snap)
    dest = "push@mirror1.example.com:/var/www/simplestreams/"
    # 1: the checked list of files below the staging tree; nothing deleted; sparse stays sparse
    assert images[-2:] == ["/snap/stage-0/", dest]
    assert "--files-from=/snap/files-0" in images and "--from0" in images
    assert "--sparse" in images and "--ignore-missing-args" in images
    assert not any(a.startswith("--delete") for a in images), "images pass deletes"
    assert "--recursive" not in images
    # 2: streams/ as a whole: v1/ and the page (streams/index.html) travel together
    assert catalog[-2:] == ["/snap/streams", dest] and "--delete-after" in catalog
    # 3: nothing sent, only deleted: placeholders name what stays
    assert deletions[-2:] == ["/snap/keep/images", dest]
    for flag in ("--existing", "--ignore-existing", "--delete-after", "--recursive"):
        assert flag in deletions
    for cmd in (images, catalog, deletions):
        assert cmd[0] == "rsync"
        # never a link followed or copied, no devices or FIFOs, modes set rather than copied
        for flag in ("--no-links", "--no-devices", "--no-specials", "--perms", "--chmod=D755,F644"):
            assert flag in cmd
        short = [a for a in cmd if a.startswith("-") and not a.startswith("--")]
        assert short == ["-e"], f"short options hide what they do: {short}"
        for bad in ("--links", "--copy-links", "--copy-dirlinks", "--keep-dirlinks", "--inplace"):
            assert bad not in cmd
        for pattern in EXCLUDES:
            assert f"--exclude={pattern}" in cmd
        rsh = cmd[cmd.index("-e") + 1]
        assert rsh.startswith("ssh -p 2222 -i /k -o IdentitiesOnly=yes")
        for opt in (
            "BatchMode=yes",
            "StrictHostKeyChecking=accept-new",
            "UserKnownHostsFile=/state/mirrors/known_hosts",
        ):
            assert f"-o {opt}" in rsh
    assert "--exclude=.*" in images and "--exclude=*.part" in images


def test_remote_paths_ipv6_and_quoting(tmp_path):
    m = MirrorConfig(name="v6", host="2001:db8::5", user="u", key_path="/etc/my key", path="/")
    images = images_command(rsync_command(m, "/kh"), m, "/stage", "/files")
    assert images[-1] == "u@[2001:db8::5]:/"
    assert "-i '/etc/my key'" in images[images.index("-e") + 1]
    assert _rsh_quote("it's") == '"it\'s"'
    with pytest.raises(PushError):
        _rsh_quote("both'\"")


def local(cmd: list[str], dest: Path) -> list[str]:
    """A pass's command to a local directory instead of over ssh."""
    e = cmd.index("-e")
    return [*cmd[:e], *cmd[e + 2 : -1], f"{dest}/"]


def catalog_doc(*paths: str) -> str:
    items = {
        f"i{n}": {"path": p, "ftype": "squashfs", "size": 1, "sha256": "0" * 64}
        for n, p in enumerate(paths)
    }
    return json.dumps({"products": {"p": {"versions": {"20240101_1200": {"items": items}}}}})


def publish_catalog(src: Source, *paths: str) -> None:
    streams = Path(src.streams_dir)
    streams.mkdir(parents=True, exist_ok=True)
    (streams / "images.json").write_text(catalog_doc(*paths))
    (streams / "index.json").write_text("{}")


def test_snapshot_copies_the_catalog_files_and_the_page_only(tmp_path):
    src = source(tmp_path)
    publish_catalog(src)
    streams = Path(src.streams_dir)
    (streams / ".lxd-image-server.lock").write_text("")
    (streams / ".images.json.abc.tmp").write_text("partial")
    (streams / "x.html").write_text("<script>")  # not a catalog file: never pushed
    (streams / "index.json.gz").symlink_to("/etc/passwd")
    snap = tmp_path / "snap"
    (snap / "streams" / "v1").mkdir(parents=True)
    (snap / "streams" / "v1" / "stale.json").write_text("old")
    taken = take_snapshot(src, str(snap))
    assert taken.listing.paths == () and taken.images_rel == "images"
    assert sorted(os.listdir(snap / "streams" / "v1")) == ["images.json", "index.json"]
    assert sorted(os.listdir(snap / "streams")) == ["v1"]
    assert (
        os.stat(snap / "streams/v1/images.json").st_mtime_ns
        == os.stat(streams / "images.json").st_mtime_ns
    )
    page = Path(src.root_dir, "streams", "index.html")
    page.write_text("<html>")
    take_snapshot(src, str(snap))
    assert (snap / "streams" / "index.html").read_text() == "<html>"
    assert sorted(os.listdir(snap)) == ["keep", "streams"]
    os.unlink(page)
    page.symlink_to("/etc/hostname")  # a link is not the page
    take_snapshot(src, str(snap))
    assert sorted(os.listdir(snap / "streams")) == ["v1"]


def test_snapshot_refuses_a_catalog_that_is_a_link_fifo_or_too_large(tmp_path, monkeypatch):
    src = source(tmp_path)
    publish_catalog(src)
    images = Path(src.streams_dir) / "images.json"
    images.unlink()
    images.symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(catalog_doc())
    with pytest.raises(CatalogError, match="missing or not a regular file"):
        take_snapshot(src, str(tmp_path / "snap"))
    images.unlink()
    os.mkfifo(images)  # nobody writes: a blocking open would hang here
    with pytest.raises(CatalogError, match="missing or not a regular file"):
        take_snapshot(src, str(tmp_path / "snap"))
    images.unlink()
    images.write_text(catalog_doc())
    monkeypatch.setattr("lxd_image_server.mirror.sendlist.MAX_CATALOG_BYTES", 10)
    with pytest.raises(CatalogError, match="larger than 10 bytes"):
        take_snapshot(src, str(tmp_path / "snap"))


def test_a_bad_catalog_fails_the_push_with_one_line_and_the_worker_goes_on(tmp_path, caplog):
    src = source(tmp_path)
    publish_catalog(src)
    (Path(src.streams_dir) / "images.json").write_text("[" * 200_000 + "]" * 200_000)
    pusher = RsyncPusher(M1, src, str(tmp_path / "work"))
    with pytest.raises(PushError, match=r"^catalog: images\.json: nested deeper"):
        pusher.push()  # before any connection: nothing is sent
    assert os.listdir(tmp_path / "work") == []
    caplog.set_level(logging.DEBUG, logger="lxd_image_server.mirror")
    w = MirrorWorker(M1, pusher, first_retry=3600)
    w.start()
    try:
        w.request()
        wait_for(lambda: w.status().failures == 1, "the failed push")
        assert w._thread.is_alive()
        assert (w.status().last_error or "").startswith("catalog: images.json: nested deeper")
    finally:
        w.stop(timeout=DEADLINE)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()


# -- authorize: keys and authorized_keys ------------------------------------------------------


def fake_key(kind: str = "ssh-ed25519", seed: int = 1) -> str:
    name = kind.encode()
    blob = len(name).to_bytes(4, "big") + name + (32).to_bytes(4, "big") + bytes([seed]) * 32
    return base64.b64encode(blob).decode()


def test_parse_public_keys():
    keys = parse_public_keys(f"# a comment\n\nssh-ed25519 {fake_key()} root@master\n")
    assert keys == [PublicKey("ssh-ed25519", fake_key(), "root@master")]
    for text, message in (
        ("", "no public key"),
        (f'command="sh" ssh-ed25519 {fake_key()}', "expected a public key"),
        ("ssh-ed25519", "missing"),
        ("ssh-ed25519 !!!notbase64", "not base64"),
        (f"ssh-rsa {fake_key('ssh-ed25519')}", "does not match"),
    ):
        with pytest.raises(AuthorizeError, match=message):
            parse_public_keys(text)


def test_authorized_keys_line_restricts_to_write_only_rrsync_in_the_tree():
    opts = key_options("/usr/bin/rrsync", "/var/www/simplestreams", absolute=True)
    assert opts == (
        'restrict,command="/usr/bin/rrsync -wo -munge -absolute /var/www/simplestreams"'
    )
    odd = key_options("/usr/bin/rrsync", '/srv/my "tree"', absolute=False)
    assert odd == 'restrict,command="/usr/bin/rrsync -wo -munge \'/srv/my \\"tree\\"\'"'


def test_merge_authorized_keys_is_idempotent_and_updates_options():
    key = PublicKey("ssh-ed25519", fake_key(seed=1), "master")
    other = f"ssh-ed25519 {fake_key(seed=2)} someone-else"
    opts = key_options("/usr/bin/rrsync", "/srv/a", absolute=True)
    once = merge_authorized_keys(f"# keep me\n{other}\n", [key], opts)
    assert once.splitlines() == ["# keep me", other, key.line(opts)]
    assert merge_authorized_keys(once, [key], opts) == once
    moved = key_options("/usr/bin/rrsync", "/srv/b", absolute=True)
    again = merge_authorized_keys(once + key.line(opts) + "\n", [key], moved)
    assert again.splitlines() == ["# keep me", other, key.line(moved)]
    assert merge_authorized_keys("", [key], opts) == key.line(opts) + "\n"


def test_push_user_default_is_the_same_everywhere():
    from lxd_image_server.cli.mirror import authorize_command

    option = next(p for p in authorize_command.params if p.name == "user")
    # the name the README and the man page give
    assert option.default == "lxdmirror"
    assert AuthorizeReport().user == option.default
    assert MirrorConfig("n", "h").user == option.default


def test_authorize_refuses_bad_user_names_before_changing_anything():
    with pytest.raises(AuthorizeError, match="not a valid user name"):
        authorize(f"ssh-ed25519 {fake_key()}", "Bad User", "/nonexistent")


def test_state_json_is_what_status_reads(tmp_path):
    st = MirrorStatus(target="t", state="ok", last_success="2024-01-01T00:00:00Z")
    write_state(str(tmp_path), {"a": st})
    raw = json.loads((tmp_path / "mirrors.json").read_text())
    assert MirrorStatus.from_json(raw["mirrors"]["a"]) == st
    assert MirrorStatus.from_json("junk") is None
