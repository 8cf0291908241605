"""What a killed sync leaves below images/ is cleared by the next one (sync_place.py)."""

from __future__ import annotations

import os
from pathlib import Path

from lxd_image_server.ops.sync_place import PARTIAL_DIR, PARTIAL_MAX_AGE, clear_leftovers
from lxd_image_server.tree.layout import VersionKey


def test_leftovers_of_a_killed_sync_are_cleared(tmp_path: Path) -> None:
    key = VersionKey("debian", "12", "amd64", "default", "20240101_0000")
    variant = tmp_path / "debian/12/amd64/default"
    staging = variant / ".sync-staging-0123456789ab"
    staging.mkdir(parents=True)
    (staging / "rootfs.squashfs").write_bytes(b"half")
    other = variant / ".import-0123456789ab"  # not ours: left alone
    other.mkdir()
    partials = tmp_path / PARTIAL_DIR
    partials.mkdir()
    old, fresh = partials / ("a" * 64 + ".part"), partials / ("b" * 64 + ".part")
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    now = 2_000_000_000.0
    os.utime(old, (now - PARTIAL_MAX_AGE - 1, now - PARTIAL_MAX_AGE - 1))
    os.utime(fresh, (now - 60, now - 60))
    clear_leftovers(str(tmp_path), [key], now=now)
    assert not staging.exists()
    assert other.exists()
    assert not old.exists() and fresh.exists()


def test_nothing_to_clear(tmp_path: Path) -> None:
    clear_leftovers(str(tmp_path), [VersionKey("a", "1", "amd64", "default", "20240101_0000")])
