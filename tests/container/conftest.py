"""Fixtures of the container test: the image (built once per session), the real-LXD fixtures
of tests/integration (test CA in the system store, LXD restarted to trust it), busybox images.

Prerequisites: root, `bash tests/host-setup.sh` (LXD), `make container-deps` (podman, runc,
debootstrap), `make deb` (dist/apt) and `make k8s-venv`; `make container-test` does all that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration import conftest as integration
from tests.integration.images import build_rootfs, make_squashfs, write_metadata_tarball
from tests.integration.servers import free_port

from .engine import Container, Volumes, build_image, remove_containers

# the real-LXD fixtures of tests/integration: the test CA in the system store, LXD restarted
lxd_host = integration.lxd_host
label = integration.label
pki = integration.pki


@pytest.fixture(scope="session")
def image(lxd_host: None) -> str:
    seconds = build_image()
    print(f"image built in {seconds:.1f} s")
    return "lxd-image-server:latest"


@dataclass(frozen=True)
class Busybox:
    """A metadata tarball and a squashfs: one bootable container image, in the seed's form."""

    meta: Path
    squashfs: Path


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rootfs(tmp_path_factory.mktemp("rootfs") / "rootfs")


@pytest.fixture(scope="session")
def make_busybox(
    busybox_rootfs: Path,
    tmp_path_factory: pytest.TempPathFactory,
    label: str,
):
    """Distinct images (their own fingerprints, so LXD never reuses one it downloaded from
    another server)."""
    squashfs = make_squashfs(busybox_rootfs, tmp_path_factory.mktemp("sq") / "rootfs.squashfs")

    def make(name: str) -> Busybox:
        work = tmp_path_factory.mktemp(f"meta-{name}")
        meta = write_metadata_tarball(
            work / "meta", work / "meta.tar.xz", f"container test {name} {label}"
        )
        return Busybox(meta, squashfs)

    return make


class Containers:
    """Makes containers with this session's names and removes them all afterwards."""

    def __init__(self, label: str, base: Path) -> None:
        self.label = label
        self.base = base
        self.names: list[str] = []

    def make(
        self,
        role: str,
        env: dict[str, str] | None = None,
        mounts: list[str] | None = None,
        plain: bool = False,
        volumes: Volumes | None = None,
    ) -> Container:
        name = f"lis-{self.label}-{role}"
        self.names.append(name)
        return Container(
            name=name,
            volumes=volumes or Volumes.make(self.base / role),
            env=env or {},
            port=free_port(),
            mounts=mounts or [],
            plain=plain,
        )


@pytest.fixture
def containers(
    image: str,
    label: str,
    tmp_path: Path,
) -> Iterator[Containers]:
    tmp_path.chmod(0o755)
    c = Containers(label, tmp_path)
    try:
        yield c
    finally:
        remove_containers(c.names)
