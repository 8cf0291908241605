"""`prune` with a running watcher (a real process): chosen from the record of what the watcher
published, published once by the watcher at prune's request; without a watcher (or with a dead
one) prune publishes by itself. (Its choice against a record that no longer says what is on
disk, and peers that are not the watcher: tests/unit/test_prune_watcher.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_import_watch import (
    BIN,
    DEADLINE,
    PRODUCT_DIR,
    Publishes,
    Watcher,
    exports,
    listed,
    on_disk,
    run_cli,
    run_import,
    serial,
    wait_for,
)

PRODUCT = "busybox:1.35:amd64:default"


@pytest.fixture
def four(tmp_path: Path) -> tuple[Path, Path]:
    """A tree with 4 versions of one product, imported (and published) without a watcher, one
    by one, oldest first (as they would arrive: none is spared for coming after the newest)."""
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "images").mkdir(parents=True)
    for n in range(4):
        r = run_import(state, root, *exports(tmp_path / f"e{n}", 1, first=n))
        assert r.returncode == 0, r.stderr
    assert listed(root) == on_disk(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in range(4)}
    return root, state


@pytest.fixture
def watching(four: tuple[Path, Path], tmp_path: Path) -> Iterator[Watcher]:
    """`watch` on the tree, once its socket is there (its catalog was published before)."""
    root, state = four
    with open(tmp_path / "watch.log", "w+") as log:
        proc = subprocess.Popen(
            [BIN, "--state-dir", state, "--verbose", "watch", "--root-dir", root],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        w = Watcher(root, state, proc, log)
        try:
            wait_for(
                lambda: (state / "publish.sock").exists() or not w.alive(), "the watcher's socket"
            )
            assert w.alive(), w.text()
            yield w
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=DEADLINE)
            assert "Traceback" not in w.text()


def pruned_paths(state: Path) -> set[str]:
    doc = json.loads((state / "pruned.json").read_bytes())
    return {os.path.basename(p["path"]) for p in doc["pending"]}


def test_prune_is_published_by_the_watcher(watching: Watcher) -> None:
    """Chosen from what the watcher published, without building the catalog; the watcher
    publishes once without them; the files stay for the grace period."""
    root, state = watching.root, watching.state
    r = run_cli(state, root, "prune", "--keep", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"would remove {PRODUCT} {serial(n)}" for n in (0, 1)]
    assert not (state / "pruned.json").exists()
    count = Publishes(root / "streams/v1")
    r = run_cli(state, root, "prune", "--keep", "2")
    assert r.returncode == 0, r.stderr
    for n in (0, 1):
        assert f"removed {PRODUCT} {serial(n)} from the catalog" in r.stdout
    assert "published by the running watcher" in r.stdout
    # the command neither built nor published the catalog: the watcher did, once
    assert "pipeline" not in r.stderr and "catalog.publish: published" not in r.stderr, r.stderr
    assert "choosing from the whole tree" not in r.stderr, r.stderr
    assert listed(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in (2, 3)}
    assert count.count() == 1
    count.close()
    assert pruned_paths(state) == {serial(0), serial(1)}
    assert on_disk(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in range(4)}  # the grace period
    assert "publish request from pid" in watching.text()
    # nothing more to prune: nothing asked
    r = run_cli(state, root, "prune", "--keep", "2")
    assert r.returncode == 0, r.stderr
    assert "nothing to prune" in r.stdout and "by the running watcher" not in r.stdout
    assert watching.alive()


def test_a_damaged_record_leaves_prune_to_the_whole_tree(watching: Watcher) -> None:
    """The record of the last publish damaged: one warning, and prune builds the catalog
    itself (under the catalog lock, as the one writer at that moment)."""
    root, state = watching.root, watching.state
    (state / "published.json").write_bytes(b"garbage\n")
    r = run_cli(state, root, "prune", "--keep", "3")
    assert r.returncode == 0, r.stderr
    assert "ignoring the record of the last publish" in r.stderr, r.stderr
    assert "catalog.publish: published" in r.stderr, r.stderr
    assert f"removed {PRODUCT} {serial(0)} from the catalog" in r.stdout
    assert listed(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in (1, 2, 3)}
    assert watching.alive()


def test_prune_without_a_watcher_publishes_by_itself(four: tuple[Path, Path]) -> None:
    root, state = four
    r = run_cli(state, root, "prune", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert "catalog.publish: published" in r.stderr
    assert "by the running watcher" not in r.stdout
    assert listed(root) == {f"{PRODUCT_DIR}/{serial(3)}"}


def test_a_dead_watcher_leaves_prune_to_publish_by_itself(watching: Watcher) -> None:
    root, state = watching.root, watching.state
    watching.proc.kill()  # no clean-up: its pid file and socket stay
    watching.proc.wait()
    assert (state / "watch.pid").exists() and (state / "publish.sock").exists()
    r = run_cli(state, root, "prune", "--keep", "3")
    assert r.returncode == 0, r.stderr
    assert "catalog.publish: published" in r.stderr
    assert "by the running watcher" not in r.stdout
    assert listed(root) == {f"{PRODUCT_DIR}/{serial(n)}" for n in (1, 2, 3)}
