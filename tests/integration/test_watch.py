"""The watcher as a real process on a real tree, driven the way users change it."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "lxd-image-server"
DEADLINE = 30.0
V = "busybox/1.35/amd64/default"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Catalog:
    """Reads images.json as a client would, and remembers everything it ever saw."""

    def __init__(self, root: Path):
        self.path = root / "streams" / "v1" / "images.json"
        self.seen_paths: set[str] = set()
        self.torn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def read(self) -> dict:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            self.torn += 1
            return {}
        for product in doc.get("products", {}).values():
            for version in product["versions"].values():
                for item in version["items"].values():
                    self.seen_paths.add(item["path"])
        return doc

    def _poll(self):
        while not self._stop.is_set():
            self.read()
            time.sleep(0.005)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def versions(self) -> dict[str, dict]:
        """'os/release/arch/variant/serial' -> items."""
        out = {}
        for product in self.read().get("products", {}).values():
            base = f"{product['os']}/{product['release']}/{product['arch']}/{product['variant']}"
            for serial, version in product["versions"].items():
                out[f"{base}/{serial}"] = version["items"]
        return out

    def wait_for(self, predicate, what: str) -> dict[str, dict]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            versions = self.versions()
            if predicate(versions):
                return versions
            time.sleep(0.02)
        raise AssertionError(f"catalog never showed {what}; last: {sorted(self.versions())}")


@pytest.fixture
def watcher(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    with open(tmp_path / "watch.log", "w+") as log:
        proc = subprocess.Popen(
            [str(BIN), "--state-dir", str(tmp_path / "state"), "watch", "--root-dir", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        catalog = Catalog(root)
        try:
            deadline = time.monotonic() + DEADLINE
            while not catalog.path.exists():
                assert proc.poll() is None, "watcher died at start"
                assert time.monotonic() < deadline, "watcher never published its first catalog"
                time.sleep(0.02)
            catalog.start()
            yield root, proc, catalog, log
        finally:
            catalog.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def write_slowly(path: Path, data: bytes, pieces: int = 6, pause: float = 0.25):
    step = len(data) // pieces + 1
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(pause)


def test_watcher_follows_the_tree(watcher):
    root, proc, catalog, log = watcher
    img = root / "images"
    meta, squash = os.urandom(3000), os.urandom(2_000_000)

    # 1. files copied in slowly (as scp/sftp do): never published half-written
    d1 = img / V / "20240101_12:00"
    d1.mkdir(parents=True)
    (d1 / "lxd.tar.xz").write_bytes(meta)
    write_slowly(d1 / "rootfs.squashfs", squash)
    key1 = f"{V}/20240101_12:00"
    versions = catalog.wait_for(lambda v: key1 in v, "the slowly copied version")
    assert versions[key1]["squashfs"]["sha256"] == sha(squash)
    assert versions[key1]["squashfs"]["size"] == len(squash)
    assert versions[key1]["lxd.tar.xz"]["combined_squashfs_sha256"] == sha(meta + squash)

    # 2. a hidden staging directory, filled, then moved in whole under its final name
    staging = img / "busybox/1.35/amd64/default/.staging"
    staging.mkdir()
    meta2, rootxz = os.urandom(2000), os.urandom(1_500_000)
    (staging / "lxd.tar.xz").write_bytes(meta2)
    (staging / "root.tar.xz").write_bytes(rootxz)
    time.sleep(1.5)  # give the watcher every chance to (wrongly) publish the staging dir
    assert not any(".staging" in p for p in catalog.seen_paths)
    staging.rename(img / V / "20240102_1200")
    key2 = f"{V}/20240102_1200"
    versions = catalog.wait_for(lambda v: key2 in v, "the moved-in version")
    assert versions[key2]["root.tar.xz"]["sha256"] == sha(rootxz)

    # 3. a whole product tree moved in at once (directories created before any watch existed)
    outside = root.parent / "incoming" / "alpine"
    nested = outside / "3.19/arm64/cloud/202402011200"
    nested.mkdir(parents=True)
    (nested / "lxd.tar.xz").write_bytes(meta)
    (nested / "rootfs.squashfs").write_bytes(squash)
    outside.rename(img / "alpine")
    catalog.wait_for(lambda v: "alpine/3.19/arm64/cloud/202402011200" in v, "a moved-in tree")

    # 4. metadata.json: applied when valid; when malformed, defaults, and the watcher lives on
    def aliases() -> list[str]:
        product = catalog.read().get("products", {}).get("busybox:1.35:amd64:default", {})
        return product.get("aliases", "").split(",")

    def wait_aliases(predicate, what):
        deadline = time.monotonic() + DEADLINE
        while not predicate(aliases()):
            assert time.monotonic() < deadline, f"never saw {what}: {aliases()}"
            time.sleep(0.02)

    newest = img / V / "20240102_1200"
    (newest / "metadata.json").write_text('{"aliases": ["bb"]}')
    wait_aliases(lambda a: "bb" in a, "the metadata.json alias")
    (newest / "metadata.json").write_text("{not json")
    wait_aliases(lambda a: "bb" not in a and "busybox/1.35" in a, "defaults after bad JSON")
    assert key2 in catalog.versions()

    # 5. a deletion unpublishes
    shutil.rmtree(img / V / "20240102_1200")
    catalog.wait_for(lambda v: key2 not in v and key1 in v, "the deletion")

    # 6. a moved-out version unpublishes
    (img / V / "20240101_12:00").rename(root.parent / "moved-away")
    catalog.wait_for(lambda v: key1 not in v, "the move out")

    # nothing half-written or hidden was ever listed, and no torn JSON was read
    assert not any(".staging" in p or p.endswith((".part", ".tmp")) for p in catalog.seen_paths)
    assert catalog.torn == 0
    assert proc.poll() is None, "the watcher died"
    log.seek(0)
    text = log.read()
    assert "invalid JSON" in text
    assert "Traceback" not in text

    # SIGTERM: finishes and exits 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0


def test_half_copied_file_never_listed(watcher):
    """The catalog must never list a root whose bytes are not all there yet."""
    root, proc, catalog, _ = watcher
    d = root / "images" / V / "20240301_1200"
    d.mkdir(parents=True)
    (d / "lxd.tar.xz").write_bytes(os.urandom(1000))
    data = os.urandom(3_000_000)
    sizes_seen = set()

    def record():
        for items in catalog.versions().values():
            if "squashfs" in items:
                sizes_seen.add(items["squashfs"]["size"])

    step = len(data) // 10
    with open(d / "rootfs.squashfs", "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(0.15)
            record()
    catalog.wait_for(lambda v: f"{V}/20240301_1200" in v, "the completed file")
    record()
    assert sizes_seen == {len(data)}
    assert proc.poll() is None


def test_reload_keeps_old_configuration_when_malformed(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    conf = tmp_path / "extra.toml"
    conf.write_text("[upload]\nallow_deletes = true\n")
    env = {**os.environ, "LXD_IMAGE_SERVER_CONFIG": str(conf)}
    state = tmp_path / "state"
    log_path = tmp_path / "watch.log"

    def log_text():
        return log_path.read_text()

    def wait_log(needle, count=1):
        deadline = time.monotonic() + DEADLINE
        while log_text().count(needle) < count:
            assert time.monotonic() < deadline, f"never logged {needle!r}:\n{log_text()}"
            time.sleep(0.05)

    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN), "--state-dir", str(state), "watch", "--root-dir", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_log("watching")
        reload = [str(BIN), "--state-dir", str(state), "reload"]
        r = subprocess.run(reload, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_log("configuration reloaded")
        conf.write_text("[upload]\nallow_deletes = maybe\n")
        # `reload` checks the file first and refuses, naming file and line
        r = subprocess.run(reload, env=env, capture_output=True, text=True)
        assert r.returncode == 2  # a configuration error is a usage error
        assert str(conf) in r.stderr and "line 2" in r.stderr
        # a SIGHUP anyway: the watcher keeps its configuration and goes on
        proc.send_signal(signal.SIGHUP)
        wait_log("keeping the previous configuration")
        assert proc.poll() is None
        conf.write_text("[upload]\nallow_deletes = false\n")
        proc.send_signal(signal.SIGHUP)
        wait_log("configuration reloaded", 2)
        assert "Traceback" not in log_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    assert not (state / "watch.pid").exists()
    r = subprocess.run(
        [str(BIN), "--state-dir", str(state), "reload"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1 and "no running watcher" in r.stderr
