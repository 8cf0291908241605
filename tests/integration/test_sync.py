"""`lxd-image-server sync` against real upstreams served by a real nginx over TLS: a tree
published by this project, one in the layout of images.linuxcontainers.org, one made by
`incus-simplestreams`; and hostile upstreams (tiny HTTPS servers on loopback and nginx serving
lying catalogs), each of which must cost one line naming the item and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lxd_image_server.catalog.model import Client, read_catalog
from lxd_image_server.config import Paths
from lxd_image_server.ops.sync_select import parse_filters
from lxd_image_server.ops.syncing import SyncRequest
from lxd_image_server.ops.syncing import sync as do_sync
from lxd_image_server.settings import Settings

from .servers import Nginx, Pki, free_port, make_pki, run
from .sync_upstreams import (
    BIN,
    SERIALS,
    Files,
    HostileServer,
    LxcUpstream,
    build_files,
    combined_of,
    incus_upstream,
    lxc_upstream,
    lxc_version,
    own_upstream,
    sha256_of,
    write_catalog,
)
from .test_import_watch import running_watcher
from .test_run import curl, reachable_dir, start_server

PRODUCT = "busybox:1.35:amd64:default"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "sync")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Files]:
    for tool in ("mksquashfs", "qemu-img", "xdelta3", "incus-simplestreams", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"{tool} is missing: run tests/host-setup.sh")
    return build_files(tmp_path_factory.mktemp("files"), 3)


def serve(root: Path, pki: Pki, work: Path) -> Nginx:
    server = Nginx(root, pki, work, free_port())
    server.start()
    return server


@pytest.fixture(scope="module")
def own(files: list[Files], pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    work = tmp_path_factory.mktemp("own")
    root = own_upstream(work / "root", files, work / "state")
    server = serve(root, pki, work / "nginx")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lxc(
    files: list[Files], pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Nginx, LxcUpstream]]:
    work = tmp_path_factory.mktemp("lxc")
    up = lxc_upstream(work / "root", files, work)
    server = serve(up.root, pki, work / "nginx")
    yield server, up
    server.stop()


@pytest.fixture(scope="module")
def incus(
    files: list[Files], pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    work = tmp_path_factory.mktemp("incus")
    root = incus_upstream(work / "root", files)
    server = serve(root, pki, work / "nginx")
    yield server
    server.stop()


def sync(
    target: Path, url: str, pki: Pki, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    cmd = [
        os.fspath(BIN),
        "--state-dir",
        os.fspath(target / "state"),
        "sync",
        url,
        "--root-dir",
        os.fspath(target),
        "--ca",
        os.fspath(pki.ca_cert),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def published(target: Path) -> dict[str, dict[str, set[str]]]:
    """product -> serial -> the fingerprints of its images (LXD's view and Incus's)."""
    cat = read_catalog(os.fspath(target / "streams" / "v1" / "images.json"))
    out: dict[str, dict[str, set[str]]] = {}
    for name, p in cat.products.items():
        for serial, v in p.versions.items():
            fps = {i.fingerprint for c in Client for i in v.images(c)}
            out.setdefault(name, {})[serial] = fps
    return out


def upstream_images(url_root: Path) -> dict[str, dict[str, set[str]]]:
    return published(url_root)


def leftovers(target: Path) -> list[str]:
    """Hidden staging directories left below images/ (never any after a sync)."""
    found = []
    for dirpath, dirnames, _ in os.walk(target / "images"):
        found += [
            os.path.join(dirpath, d)
            for d in dirnames
            if d.startswith(".sync-") and d != ".sync-partial"
        ]
    return found


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "not synced:" in line]


# -- the three kinds of upstream -------------------------------------------------------------


def test_sync_from_this_project_keeps_fingerprints(own: Nginx, pki: Pki, tmp_path: Path) -> None:
    proc = sync(tmp_path, own.url, pki, "--keep", "2")
    assert proc.returncode == 0, proc.stderr
    up = upstream_images(own.root)
    got = published(tmp_path)
    for product in ("busybox:1.35:amd64:default", "busybox:1.35:amd64:rootxz"):
        newest = sorted(up[product])[-2:]
        assert sorted(got[product]) == newest
        for serial in newest:
            assert got[product][serial] == up[product][serial]
    assert not leftovers(tmp_path)


def test_sync_lxc_layout(lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path) -> None:
    server, up = lxc
    proc = sync(tmp_path, server.url, pki, "--keep", "2")
    assert proc.returncode == 0, proc.stderr
    got = published(tmp_path)
    for serial in SERIALS[1:]:
        # the container (squashfs) and the VM, with upstream's fingerprints
        assert got[PRODUCT][serial] == {
            up.fingerprints[serial]["container"],
            up.fingerprints[serial]["vm"],
        }
    assert SERIALS[0] not in got[PRODUCT]
    assert got["busybox:1.35:amd64:unified"] == {SERIALS[0]: {up.unified_fp}}
    version = tmp_path / "images/busybox/1.35/amd64/default" / SERIALS[2]
    # one metadata file for both clients, the squashfs (not root.tar.xz), the VM disk, and
    # the product's fields
    assert sorted(os.listdir(version)) == [
        "disk.qcow2",
        "lxd.tar.xz",
        "metadata.json",
        "rootfs.squashfs",
    ]
    # one log line per version
    landed = [line for line in proc.stderr.splitlines() if " INFO " in line and "synced " in line]
    assert len(landed) == 3, proc.stderr
    doc = json.loads((tmp_path / "streams/v1/images.json").read_text())
    product = doc["products"][PRODUCT]
    assert product["release_title"] == "1.35 (lxc layout)"
    assert "bb-lxc" in product["aliases"].split(",")
    assert product["requirements"] == {"secureboot": "false"}


def test_sync_lxc_layout_filters(lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path) -> None:
    server, up = lxc
    proc = sync(tmp_path, server.url, pki, "--filter", "variant=default", "--filter", "type=vm")
    assert proc.returncode == 0, proc.stderr
    got = published(tmp_path)
    assert got == {PRODUCT: {SERIALS[2]: {up.fingerprints[SERIALS[2]]["vm"]}}}
    version = tmp_path / "images/busybox/1.35/amd64/default" / SERIALS[2]
    assert "rootfs.squashfs" not in os.listdir(version)


def test_sync_incus_simplestreams(
    incus: Nginx, files: list[Files], pki: Pki, tmp_path: Path
) -> None:
    proc = sync(tmp_path, incus.url, pki, "--keep", "5")
    assert proc.returncode == 0, proc.stderr
    got = published(tmp_path)
    want = {combined_of(f.meta, f.squashfs) for f in files}
    want.add(combined_of(files[-1].meta, files[-1].qcow2))
    assert set().union(*got[PRODUCT].values()) == want
    assert len(got[PRODUCT]) == 3


def test_dry_run_downloads_nothing(own: Nginx, pki: Pki, tmp_path: Path) -> None:
    proc = sync(tmp_path, own.url, pki, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would download" in proc.stdout
    assert not (tmp_path / "streams").exists()
    assert (
        not list((tmp_path / "images").rglob("*.squashfs"))
        if (tmp_path / "images").exists()
        else True
    )


def test_nothing_new_reads_only_the_index_and_catalog(
    lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path
) -> None:
    server, _ = lxc
    assert sync(tmp_path, server.url, pki, "--keep", "2").returncode == 0
    before = len(server.requests())
    catalog = (tmp_path / "streams/v1/images.json").read_bytes()
    proc = sync(tmp_path, server.url, pki, "--keep", "2")
    assert proc.returncode == 0, proc.stderr
    assert "nothing new" in proc.stdout
    assert [p for _, _, p in server.requests()[before:]] == [
        "/streams/v1/index.json",
        "/streams/v1/images.json",
    ]
    assert (tmp_path / "streams/v1/images.json").read_bytes() == catalog


def test_versions_upstream_no_longer_covers_are_pruned(
    lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path
) -> None:
    """--keep lowered: the older synced version leaves the catalog by the retention path (a
    record in pruned.json, its files kept for the grace period); nothing is downloaded."""
    server, _ = lxc
    assert sync(tmp_path, server.url, pki, "--keep", "2").returncode == 0
    before = len(server.requests())
    proc = sync(tmp_path, server.url, pki, "--keep", "1")
    assert proc.returncode == 0, proc.stderr
    assert len(server.requests()) - before == 2
    got = published(tmp_path)
    assert list(got[PRODUCT]) == [SERIALS[2]]
    old = tmp_path / "images/busybox/1.35/amd64/default" / SERIALS[1]
    assert old.is_dir()  # the grace period: clients may still hold the old catalog
    pruned = json.loads((tmp_path / "state/pruned.json").read_text())
    assert [p["path"] for p in pruned["pending"]] == [str(old)]
    assert "no longer among upstream's newest" in proc.stderr
    assert proc.stderr.count("catalog.publish: published") == 1, "one publish"
    # and the next sync has nothing to do: it does not publish again
    catalog = (tmp_path / "streams/v1/images.json").read_bytes()
    assert sync(tmp_path, server.url, pki, "--keep", "1").returncode == 0
    assert (tmp_path / "streams/v1/images.json").read_bytes() == catalog


def test_a_running_watcher_publishes_what_sync_brought(
    lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path
) -> None:
    """With a watcher on the tree, sync hands it the digests it computed while downloading and
    asks it to publish the versions landed and retired: the watcher rescans only those, reads
    no file again, and the catalog is right (the retired version out, its files kept)."""
    server, _ = lxc
    with running_watcher(tmp_path, tmp_path / "state", tmp_path / "watch.log") as w:
        proc = sync(tmp_path, server.url, pki, "--keep", "2")
        assert proc.returncode == 0, proc.stderr
        assert "published by the running watcher" in proc.stderr
        assert "catalog.publish: published" not in proc.stderr  # not by sync itself
        assert sorted(published(tmp_path)[PRODUCT]) == list(SERIALS[1:])
        assert "taken from its upload, not read again" in w.text()
        assert not list((tmp_path / "state/upload-digests").iterdir())
        proc = sync(tmp_path, server.url, pki, "--keep", "1")
        assert proc.returncode == 0, proc.stderr
        assert "published by the running watcher" in proc.stderr
        assert list(published(tmp_path)[PRODUCT]) == [SERIALS[2]]
        assert (tmp_path / "images/busybox/1.35/amd64/default" / SERIALS[1]).is_dir()
        assert w.alive()


def configured(tmp_path: Path, url: str, pki: Pki) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f"""
[sync.lxc]
url = "{url}"
filters = {{ variant = "default", type = "container" }}
keep = 1
interval = "1h"
ca = "{pki.ca_cert}"
timeout = 30
"""
    )
    return cfg


def run_cli(tmp_path: Path, cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [os.fspath(BIN), "--config", os.fspath(cfg), "--state-dir", os.fspath(tmp_path / "state")]
    cmd += ["sync", *args, "--root-dir", os.fspath(tmp_path)]
    env = {**os.environ, "HOME": os.fspath(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)


def test_configured_syncs_and_their_schedule(
    lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path
) -> None:
    server, up = lxc
    cfg = configured(tmp_path, server.url, pki)
    proc = run_cli(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr
    assert published(tmp_path) == {
        PRODUCT: {SERIALS[2]: {up.fingerprints[SERIALS[2]]["container"]}}
    }
    state = json.loads((tmp_path / "state/syncs.json").read_text())
    assert state["lxc"]["ok"] is True
    # the timer's run: not due for an hour, so not a single request
    before = len(server.requests())
    proc = run_cli(tmp_path, cfg, "--due")
    assert proc.returncode == 0, proc.stderr
    assert "no configured sync is due" in proc.stdout
    assert len(server.requests()) == before


def test_sync_repeat_runs_until_stopped(
    lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path
) -> None:
    """`sync --repeat` (what `run` starts): syncs what is due, waits, stops on SIGTERM."""
    server, _ = lxc
    cfg = configured(tmp_path, server.url, pki)
    cmd = [os.fspath(BIN), "--config", os.fspath(cfg), "--state-dir", os.fspath(tmp_path / "state")]
    cmd += ["sync", "--repeat", "--root-dir", os.fspath(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state = tmp_path / "state/syncs.json"
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state.exists(), "the first round did not finish"
        assert proc.poll() is None, "it must keep running"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert PRODUCT in published(tmp_path)


def test_progress_counts_every_byte_once(
    lxc: tuple[Nginx, LxcUpstream], pki: Pki, tmp_path: Path
) -> None:
    """The progress bar's callback (several downloads at once) is told the total, then every
    byte downloaded, once."""
    server, _ = lxc
    totals: list[int] = []
    done: list[int] = []

    def start(total: int) -> Callable[[int], None]:
        totals.append(total)
        return done.append

    paths = Paths.resolve(root_dir=str(tmp_path), state_dir=str(tmp_path / "state"))
    request = SyncRequest(server.url, parse_filters([]), 3, str(pki.ca_cert), jobs=4)
    result = do_sync(request, paths, Settings(), start)
    assert not result.failed and len(result.landed) == 4
    assert totals == [sum(p.size for p in result.selected)]
    assert sum(done) == totals[0]


def test_upstream_delta_used_when_the_base_is_held(
    files: list[Files], pki: Pki, tmp_path: Path
) -> None:
    """The tree holds v1; upstream adds v2 with deltas from v1: the sync downloads the deltas,
    rebuilds the roots (xdelta3), checks them, and never asks for v2's whole roots. A delta
    that does not rebuild its root falls back to the whole file."""
    root = tmp_path / "up"
    v1 = lxc_version(root, f"images/b/{SERIALS[0]}", files[0], None)
    write_catalog(root, {PRODUCT: {**base_product(), "versions": {SERIALS[0]: v1}}})
    server = HostileServer(root, pki)
    server.start()
    try:
        target = tmp_path / "target"
        assert sync(target, server.url, pki).returncode == 0
        v2 = lxc_version(root, f"images/b/{SERIALS[1]}", files[1], (SERIALS[0], files[0]))
        # the VM disk's delta rebuilds other bytes (the catalog's size and sha256 of the delta
        # are right: only rebuilding tells)
        bad = root / "images/b/bad.vcdiff"
        run(["xdelta3", "-e", "-9", "-s", files[0].qcow2, files[1].root_tar_xz, bad])
        v2["items"][f"disk-delta-{SERIALS[0]}"].update(
            size=bad.stat().st_size, sha256=sha256_of(bad), path="images/b/bad.vcdiff"
        )
        versions = {SERIALS[0]: v1, SERIALS[1]: v2}
        write_catalog(root, {PRODUCT: {**base_product(), "versions": versions}})
        server.requests.clear()
        proc = sync(target, server.url, pki)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    asked = set(server.requests)
    rel = f"images/b/{SERIALS[1]}"
    assert f"{rel}/rootfs.squashfs" not in asked, "the whole root was downloaded"
    assert any(p.startswith(f"{rel}/rootfs.vcdiff") for p in asked)
    assert "rebuilt from" in proc.stderr
    # the bad VM delta: tried, refused, the whole disk downloaded instead
    assert "images/b/bad.vcdiff" in asked and f"{rel}/disk.qcow2" in asked
    assert "bad.vcdiff: it rebuilds more than" in proc.stderr
    assert "downloading the whole file" in proc.stderr
    got = published(target)
    assert got[PRODUCT][SERIALS[1]] == {
        combined_of(files[1].meta, files[1].squashfs),
        combined_of(files[1].meta, files[1].qcow2),
    }
    version = target / "images/busybox/1.35/amd64/default" / SERIALS[1]
    assert not [n for n in os.listdir(version) if n.startswith(".") or n.endswith(".vcdiff")]


def base_product() -> dict[str, object]:
    return {
        "aliases": "bb",
        "arch": "amd64",
        "os": "busybox",
        "release": "1.35",
        "variant": "default",
    }


def test_run_syncs_the_configured_upstreams(
    lxc: tuple[Nginx, LxcUpstream], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --config FILE` with a [sync.NAME]: its syncer child brings the upstream's image in,
    the server publishes and serves it; SIGTERM stops everything cleanly (exit 0)."""
    server, up = lxc
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca_cert))  # this module's CA, not the system's
    for base in reachable_dir():
        cfg = configured(base, server.url, pki)
        for served in start_server(base, pki, {}, global_args=["--config", cfg]):
            deadline = time.monotonic() + 120
            fp = up.fingerprints[SERIALS[2]]["container"]
            while True:
                code, body = curl(f"{served.url}/streams/v1/images.json", auth=False)
                if code == 200 and fp in body:
                    break
                assert served.proc.poll() is None, served.log.read_text()
                assert time.monotonic() < deadline, served.log.read_text()
                time.sleep(0.2)
            assert "starting syncer" in served.log.read_text()


def test_credentials_in_the_url(pki: Pki, files: list[Files], tmp_path: Path) -> None:
    root = tmp_path / "up"
    up = tmp_path / "served"
    own_upstream(root, files[:1], tmp_path / "upstate")
    shutil.copytree(root, up)
    server = HostileServer(up, pki)
    server.start()
    try:
        url = server.url.replace("https://", "https://mirror:s3cret@")
        proc = sync(tmp_path / "t", url, pki)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr


def test_plain_http_is_refused(pki: Pki, tmp_path: Path) -> None:
    proc = sync(tmp_path, "http://127.0.0.1:1/", pki)
    assert proc.returncode == 1
    assert "https" in proc.stderr


# -- hostile upstreams -----------------------------------------------------------------------


@pytest.fixture
def two_versions(files: list[Files], tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """An upstream in the lxc layout with two good versions (the test spoils the newer)."""
    root = tmp_path / "hostile"
    versions = {}

    for f, serial in zip(files[:2], SERIALS[:2], strict=True):
        versions[serial] = lxc_version(root, f"images/b/{serial}", f, None)
    product: dict[str, object] = {
        "aliases": "bb",
        "arch": "amd64",
        "os": "busybox",
        "release": "1.35",
        "variant": "default",
        "versions": versions,
    }
    return root, product


def spoil_and_sync(
    root: Path,
    product: dict[str, object],
    pki: Pki,
    tmp_path: Path,
    *args: str,
    server: HostileServer | None = None,
) -> subprocess.CompletedProcess[str]:
    write_catalog(root, {PRODUCT: product})
    own_server = server is None
    srv = server or HostileServer(root, pki)
    if own_server:
        srv.start()
    try:
        return sync(tmp_path / "target", srv.url, pki, "--keep", "2", *args, timeout=120)
    finally:
        if own_server:
            srv.stop()


def check_one_failed(proc: subprocess.CompletedProcess[str], tmp_path: Path, what: str) -> None:
    """The newer version failed with one line naming `what`; the older one is published;
    nothing of the newer is in the tree."""
    assert proc.returncode == 1, proc.stderr
    lines = errors(proc)
    assert len(lines) == 1, proc.stderr
    assert what in lines[0] and SERIALS[1] in lines[0], lines[0]
    target = tmp_path / "target"
    got = published(target)
    assert list(got[PRODUCT]) == [SERIALS[0]]
    assert not (target / "images/busybox/1.35/amd64/default" / SERIALS[1]).exists()
    assert not leftovers(target)


def _items(product: dict[str, object], serial: str) -> dict[str, dict[str, object]]:
    versions = product["versions"]
    assert isinstance(versions, dict)
    items: dict[str, dict[str, object]] = versions[serial]["items"]
    return items


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "images/b/x/../../../y"])
def test_item_path_leaving_the_tree(
    two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path, path: str
) -> None:
    root, product = two_versions
    _items(product, SERIALS[1])["root.squashfs"]["path"] = path
    proc = spoil_and_sync(root, product, pki, tmp_path)
    check_one_failed(proc, tmp_path, "root.squashfs")


def test_control_character_in_path(
    two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path
) -> None:
    root, product = two_versions
    _items(product, SERIALS[1])["root.squashfs"]["path"] = "images/b/x\nnot synced: forged"
    proc = spoil_and_sync(root, product, pki, tmp_path)
    check_one_failed(proc, tmp_path, "root.squashfs")


def test_wrong_sha256(
    two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path
) -> None:
    root, product = two_versions
    _items(product, SERIALS[1])["root.squashfs"]["sha256"] = "0" * 64
    proc = spoil_and_sync(root, product, pki, tmp_path)
    check_one_failed(proc, tmp_path, "root.squashfs")
    assert "sha256" in errors(proc)[0]


def test_wrong_combined_fingerprint(
    two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path
) -> None:
    root, product = two_versions
    for key in ("lxd.tar.xz", "incus.tar.xz"):
        _items(product, SERIALS[1])[key]["combined_squashfs_sha256"] = "1" * 64
    proc = spoil_and_sync(root, product, pki, tmp_path)
    check_one_failed(proc, tmp_path, "fingerprint")


@pytest.mark.parametrize("delta", [+1000, -1000, -1])
@pytest.mark.parametrize("length", [True, False], ids=["content-length", "no-length"])
def test_size_that_lies(
    two_versions: tuple[Path, dict[str, object]],
    pki: Pki,
    tmp_path: Path,
    delta: int,
    length: bool,
) -> None:
    """Larger or smaller than the file; the server saying how long it is, or sending until it
    closes the connection (then only the bound on what is read can tell)."""
    root, product = two_versions
    it = _items(product, SERIALS[1])["root.squashfs"]
    size = it["size"]
    assert isinstance(size, int)
    it["size"] = size + delta
    server = HostileServer(root, pki)
    server.no_length = not length
    server.start()
    try:
        proc = spoil_and_sync(root, product, pki, tmp_path, server=server)
    finally:
        server.stop()
    check_one_failed(proc, tmp_path, "root.squashfs")
    line = errors(proc)[0]
    if length:
        assert "the server sends" in line
    else:
        assert ("longer than" if delta < 0 else "cut short") in line


def test_download_cut_in_the_middle_then_resumed(
    two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path
) -> None:
    root, product = two_versions
    path = _items(product, SERIALS[1])["root.squashfs"]["path"]
    assert isinstance(path, str)
    write_catalog(root, {PRODUCT: product})
    server = HostileServer(root, pki)
    server.cut.add(path)
    server.start()
    try:
        proc = spoil_and_sync(root, product, pki, tmp_path, server=server)
        check_one_failed(proc, tmp_path, "root.squashfs")
        assert "cut short" in errors(proc)[0]
        # the next sync resumes where the cut left off: a Range request, and it lands
        server.cut.clear()
        server.requests.clear()
        proc = sync(tmp_path / "target", server.url, pki, "--keep", "2")
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert "resuming at byte" in proc.stderr
    got = published(tmp_path / "target")
    assert sorted(got[PRODUCT]) == list(SERIALS[:2])
    assert not list((tmp_path / "target/images/.sync-partial").iterdir())


@pytest.mark.parametrize("planted", ["file", "foreign-dir"])
def test_partial_directory_planted_by_an_uploader(
    own: Nginx, pki: Pki, tmp_path: Path, planted: str
) -> None:
    """images/ is the uploaders' too: a .sync-partial they made (a file, or a directory of
    theirs holding bytes under the very name a partial download would have) is never resumed
    from, and the sync still lands."""
    partial = tmp_path / "images" / ".sync-partial"
    partial.parent.mkdir(parents=True)
    if planted == "file":
        partial.write_bytes(b"x")
    else:
        partial.mkdir()
        cat = json.loads((own.root / "streams/v1/images.json").read_text())
        for p in cat["products"].values():
            for v in p["versions"].values():
                for it in v["items"].values():
                    (partial / f"{it['sha256']}.part").write_bytes(b"forged")
        os.chown(partial, 4242, 4242)
    proc = sync(tmp_path, own.url, pki)
    assert proc.returncode == 0, proc.stderr
    assert "resuming at byte" not in proc.stderr
    assert "downloading without resuming" in proc.stderr
    assert sorted(published(tmp_path)) == sorted(upstream_images(own.root))


def test_server_that_stalls(
    two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path
) -> None:
    root, product = two_versions
    path = _items(product, SERIALS[1])["root.squashfs"]["path"]
    assert isinstance(path, str)
    write_catalog(root, {PRODUCT: product})
    server = HostileServer(root, pki)
    server.stall.add(path)
    server.start()
    try:
        proc = spoil_and_sync(root, product, pki, tmp_path, "--timeout", "3", server=server)
    finally:
        server.stop()
    check_one_failed(proc, tmp_path, "root.squashfs")
    assert "timed out" in errors(proc)[0]


def test_missing_file(
    two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path
) -> None:
    root, product = two_versions
    path = _items(product, SERIALS[1])["root.squashfs"]["path"]
    assert isinstance(path, str)
    (root / path).unlink()
    proc = spoil_and_sync(root, product, pki, tmp_path)
    check_one_failed(proc, tmp_path, "root.squashfs")
    assert "HTTP 404" in errors(proc)[0]


def test_redirects(two_versions: tuple[Path, dict[str, object]], pki: Pki, tmp_path: Path) -> None:
    """A redirect on the same server is followed; one to plain HTTP, or a loop, fails the
    file it was for."""
    root, product = two_versions
    write_catalog(root, {PRODUCT: product})
    old_path = _items(product, SERIALS[0])["root.squashfs"]["path"]
    new_path = _items(product, SERIALS[1])["root.squashfs"]["path"]
    assert isinstance(old_path, str) and isinstance(new_path, str)
    shutil.copy(root / old_path, root / "moved.squashfs")
    (root / old_path).unlink()
    server = HostileServer(root, pki)
    server.redirects[old_path] = "/moved.squashfs"
    server.redirects[new_path] = "http://127.0.0.1:1/x"
    server.start()
    try:
        proc = spoil_and_sync(root, product, pki, tmp_path, server=server)
        check_one_failed(proc, tmp_path, "root.squashfs")
        assert "non-https" in errors(proc)[0]
        server.redirects[new_path] = f"/{new_path}"  # a loop
        proc = sync(tmp_path / "target", server.url, pki, "--keep", "2")
    finally:
        server.stop()
    assert proc.returncode == 1
    [line] = errors(proc)
    assert "redirects" in line and SERIALS[1] in line


def test_catalog_of_100_mb(pki: Pki, tmp_path: Path) -> None:
    root = tmp_path / "big"
    write_catalog(root, {})
    with (root / "streams/v1/images.json").open("w") as f:
        f.write('{"products": {"x": "')
        f.write("a" * (100 << 20))
        f.write('"}}')
    index = json.loads((root / "streams/v1/index.json").read_text())
    index["index"]["images"]["products"] = ["x"]
    (root / "streams/v1/index.json").write_text(json.dumps(index))
    server = serve(root, pki, tmp_path / "nginx")
    try:
        proc = sync(tmp_path / "t", server.url, pki)
    finally:
        server.stop()
    assert proc.returncode == 1
    assert "images.json: larger than" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


def test_catalog_nested_100000_deep(pki: Pki, tmp_path: Path) -> None:
    root = tmp_path / "deep"
    write_catalog(root, {"x": {}})
    (root / "streams/v1/images.json").write_text("[" * 100_000 + "]" * 100_000)
    server = serve(root, pki, tmp_path / "nginx")
    try:
        proc = sync(tmp_path / "t", server.url, pki)
    finally:
        server.stop()
    assert proc.returncode == 1
    assert "nested deeper than" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_untrusted_certificate(own: Nginx, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", "other")
    proc = sync(tmp_path, own.url, other)
    assert proc.returncode == 1
    assert "not trusted" in proc.stderr


def test_unchanged_sha_on_disk(own: Nginx, pki: Pki, tmp_path: Path) -> None:
    """Every synced file is byte for byte upstream's."""
    assert sync(tmp_path, own.url, pki).returncode == 0
    for version in (tmp_path / "images").glob("busybox/1.35/amd64/*/*"):
        rel = version.relative_to(tmp_path)
        for f in version.iterdir():
            if f.name != "metadata.json":
                assert sha256_of(f) == sha256_of(own.root / rel / f.name)
