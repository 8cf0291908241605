"""The scanner and hasher against an uploader racing them (issue 9, finding 12): a directory of
the tree is swapped for a symlink to an outside decoy and back, by a second process, while
the catalog is built hundreds of times. Only bytes from inside images/ may ever be published.
It keeps two cores busy for several seconds, so it is not in the unit tier."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..unit.helpers import sha, version_dir
from ..unit.test_scan import EVIL_META, EVIL_ROOT, META, ROOT, catalog, complete

#: The racing uploader: another process (two cores race for real, no GIL between them) that
#: swaps a directory for a symlink to a decoy and back, forever, pausing a little in each state
#: (the pauses only pace it; nothing is asserted about time).
SWAPPER = """
import os, sys, time
victim, decoy, parked = sys.argv[1:4]
print("ready", flush=True)
while True:
    os.rename(victim, parked)
    os.symlink(decoy, victim)
    time.sleep(0.002)
    os.unlink(victim)
    os.rename(parked, victim)
    time.sleep(0.002)
"""


@contextlib.contextmanager
def swapping(victim: Path, decoy: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(victim), str(decoy), str(victim.with_name(".parked"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield
    finally:
        proc.kill()
        proc.wait()
    parked = victim.with_name(".parked")
    if parked.exists():  # killed while the symlink was in place: put the real directory back
        with contextlib.suppress(FileNotFoundError):
            victim.unlink()
        parked.rename(victim)


@pytest.mark.parametrize("swapped", ["variant", "version"])
def test_directory_swapped_for_a_symlink_never_publishes_the_outside(tmp_path, swapped):
    """A racing uploader swaps a directory of the tree (the last of 20 siblings, so the scan is
    busy elsewhere when the swap lands) for a symlink to an outside directory holding a
    valid-looking image; scan + hash + catalog, 600 times: only bytes from inside the tree are
    ever published. The old scanner (hashing by path after checking) published the decoy in
    about one run of a hundred."""
    img = tmp_path / "images"
    for k in range(20):
        where = {"serial": f"202401{k + 1:02d}_12:00"} if swapped == "version" else {}
        where |= {"variant": f"v{k:02d}"} if swapped == "variant" else {}
        inside = complete(version_dir(img, **where))
    decoy = complete(version_dir(tmp_path / "outside", **where), EVIL_META, EVIL_ROOT)
    victim, target = (inside, decoy) if swapped == "version" else (inside.parent, decoy.parent)
    good = {sha(META), sha(ROOT), sha(META, ROOT)}
    evil = {sha(EVIL_META), sha(EVIL_ROOT), sha(EVIL_META, EVIL_ROOT)}
    published = 0
    logging.disable(logging.WARNING)
    try:
        with swapping(victim, target):
            for _ in range(600):
                seen: set[str] = set()
                for product in catalog(tmp_path).values():
                    for version in product["versions"].values():
                        published += 1
                        for item in version["items"].values():
                            seen.add(item["sha256"])
                            seen.update(v for k, v in item.items() if k.startswith("combined_"))
                assert not seen & evil, "a file from outside images/ was published"
                assert seen <= good
    finally:
        logging.disable(logging.NOTSET)
    assert published > 0
    assert (inside / "rootfs.squashfs").read_bytes() == ROOT
