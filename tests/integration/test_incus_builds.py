"""The Incus builds the client tests run are the ones asked for (issue 19): Debian 13's Incus
6.0.4 at 6.0.4-2+deb13u12 or later (the build with the fingerprint checks) and trixie-backports'
Incus 7.0.2 or later 7.x, client and daemon of the same version, each in its Debian 13
container (incus_guest.py). The versions are printed: `pytest -s` shows what a run used.
A build apt cannot install fails its tests (never skips them) and leaves no container behind.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from .incus_guest import INCUS_BUILDS, Guests, IncusBuild
from .servers import Pki

pytestmark = [pytest.mark.lxd, pytest.mark.timeout(1800)]


def dpkg_compare(guests: Guests, key: str, a: str, op: str, b: str) -> bool:
    c = guests.client(key).container
    cmd = shlex.join(["dpkg", "--compare-versions", a, op, b])
    return c.run(cmd, check=False).returncode == 0


@pytest.mark.parametrize("build", INCUS_BUILDS, ids=lambda b: b.key)
def test_the_build_asked_for_runs(incus_guests: Guests, build: IncusBuild) -> None:
    client = incus_guests.client(build.key)
    release = client.container.run(". /etc/os-release && echo $VERSION_CODENAME").stdout.strip()
    assert release == "trixie", release
    package = client.package
    assert dpkg_compare(incus_guests, build.key, package, "ge", build.minimum), (
        f"{build.key}: incus {package} is older than {build.minimum} ({build.why})"
    )
    assert dpkg_compare(incus_guests, build.key, package, "lt", build.below), (
        f"{build.key}: incus {package} is not below {build.below}"
    )
    lines = dict(
        line.split(": ", 1) for line in client.run(["version"]).stdout.splitlines() if ": " in line
    )
    assert lines.get("Client version") == lines.get("Server version"), lines
    assert package.startswith(f"{lines['Server version']}-"), (package, lines)
    print(f"{build.key}: Debian package incus {package}, `incus version`: {lines}")


def test_a_build_that_cannot_install_fails_and_leaves_nothing(pki: Pki, label: str) -> None:
    """An Incus that apt cannot install (a suite that does not exist) fails the test that asks
    for it, and every later one with the same error, without booting again; close() powers the
    container off and deletes it."""
    bad = IncusBuild("incusbad", "trixie-nosuchsuite", "0", "1", "a build that cannot exist")
    guests = Guests(pki.ca_cert, label, {bad.key: bad})
    workdir = Path("/var/tmp") / f"lis-{bad.key}-{label}"
    try:
        with pytest.raises(AssertionError, match="trixie-nosuchsuite") as first:
            guests.client(bad.key)
        assert workdir.is_dir()
        with pytest.raises(AssertionError, match="did not come up") as again:
            guests.client(bad.key)
        assert str(first.value) in str(again.value)
    finally:
        guests.close()
    assert not workdir.exists()
    nspawns = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert f"--machine=lis-{bad.key}-{label}" not in nspawns.stdout
