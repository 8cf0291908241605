"""Real, bootable busybox images in every form the catalog engine publishes.

The tree built here:

    images/busybox/1.35/amd64/default/<serial>/{lxd.tar.xz, rootfs.squashfs, disk.qcow2}
    images/busybox/1.35/amd64/rootxz/<serial>/{lxd.tar.xz, root.tar.xz, metadata.json}
    images/busybox/1.35/amd64/unified/<serial>/<fingerprint>.tar.gz

The VM disk shares the container's metadata tarball, as on images.linuxcontainers.org; nothing
boots it, it only has to be listed. The rootxz version's metadata.json adds an alias. The
unified tarball comes from a real `lxc publish` and `lxc image export`, so it is exactly what
users upload.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from .servers import delete_images, delete_instance, local_images, lxc, run

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "echo", "cat", "init", "mount", "sleep", "ps", "hostname")
INITTAB = """\
::sysinit:/bin/busybox mount -t tmpfs tmpfs /run
::respawn:/bin/busybox sleep 1000000
"""
PREFIX = "images/busybox/1.35/amd64"
#: the alias the rootxz version's metadata.json adds to its product
OVERRIDE_ALIAS = "bbx-rootxz"


def sha256_file(*paths: Path) -> str:
    """sha256 of the files' bytes one after the other (a combined fingerprint for two)."""
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def build_rootfs(dest: Path) -> Path:
    if not BUSYBOX.exists():
        raise AssertionError(f"{BUSYBOX} is missing: run tests/host-setup.sh (busybox-static)")
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    (dest / "sbin" / "init").symlink_to("../bin/busybox")
    (dest / "etc" / "inittab").write_text(INITTAB)
    (dest / "etc" / "hostname").write_text("busybox\n")
    return dest


def write_metadata_tarball(workdir: Path, out: Path, description: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    created = int(datetime.datetime.now(datetime.UTC).timestamp())
    (workdir / "metadata.yaml").write_text(
        "architecture: x86_64\n"
        f"creation_date: {created}\n"
        "properties:\n"
        "  os: busybox\n"
        '  release: "1.35"\n'
        f"  description: {description}\n"
    )
    run(["tar", "-C", workdir, "-cJf", out, "metadata.yaml"])
    return out


def make_squashfs(rootfs: Path, out: Path) -> Path:
    run(["mksquashfs", rootfs, out, "-noappend", "-quiet", "-all-root"], timeout=300)
    return out


def make_root_tar_xz(rootfs: Path, out: Path) -> Path:
    run(["tar", "--numeric-owner", "--owner=0", "--group=0", "-C", rootfs, "-cJf", out, "."])
    return out


def make_qcow2(out: Path) -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", out, "16M"])
    return out


def export_unified(meta: Path, squashfs: Path, outdir: Path, label: str) -> Path:
    """Imports (meta, squashfs) into the local LXD, launches and stops a container, publishes
    it and exports the result: a unified `<fingerprint>.tar.gz`. Leaves nothing behind."""
    src_alias, pub_alias, name = f"lis-{label}-src", f"lis-{label}-pub", f"lis-{label}-pub"
    outdir.mkdir(parents=True, exist_ok=True)
    created: set[str] = set()
    try:
        lxc("image", "import", str(meta), str(squashfs), "--alias", src_alias)
        created.add(sha256_file(meta, squashfs))
        lxc("launch", src_alias, name)
        lxc("stop", name, "--timeout", "30")
        lxc("publish", name, "--alias", pub_alias)
        lxc("image", "export", pub_alias, f"{outdir}/")
    finally:
        delete_instance(name)
        for fp, img in local_images().items():
            if {a["name"] for a in img.get("aliases") or []} & {src_alias, pub_alias}:
                created.add(fp)
        delete_images(created)
    exported = list(outdir.iterdir())
    if len(exported) != 1 or not exported[0].name.endswith(".tar.gz"):
        raise AssertionError(f"`lxc image export` gave {exported}, expected one <fp>.tar.gz")
    tarball = exported[0]
    fingerprint = tarball.name.removesuffix(".tar.gz")
    if sha256_file(tarball) != fingerprint:
        raise AssertionError(f"{tarball.name}: its sha256 is not the fingerprint in its name")
    return tarball


@dataclass(frozen=True)
class Tree:
    """The served root (images/ and, after `update`, streams/) and what is in it."""

    root: Path
    serial: str
    meta: Path  # default/<serial>/lxd.tar.xz, shared by the squashfs and the VM
    squashfs: Path
    qcow2: Path
    rootxz_meta: Path
    root_tar_xz: Path
    unified: Path

    @property
    def fp_squashfs(self) -> str:
        return sha256_file(self.meta, self.squashfs)

    @property
    def fp_vm(self) -> str:
        return sha256_file(self.meta, self.qcow2)

    @property
    def fp_rootxz(self) -> str:
        return sha256_file(self.rootxz_meta, self.root_tar_xz)

    @property
    def fp_unified(self) -> str:
        return sha256_file(self.unified)

    def relpath(self, path: Path) -> str:
        return str(path.relative_to(self.root))


def build_tree(workdir: Path, label: str) -> Tree:
    """Builds the images, lays them out under workdir/root and returns the Tree.

    Needs a running LXD daemon (for the unified tarball)."""
    serial = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d_%H:%M")
    root = workdir / "root"
    build = workdir / "build"
    rootfs = build_rootfs(build / "rootfs")

    default = root / PREFIX / "default" / serial
    default.mkdir(parents=True)
    meta = write_metadata_tarball(build / "meta-default", default / "lxd.tar.xz", "default")
    squashfs = make_squashfs(rootfs, default / "rootfs.squashfs")
    qcow2 = make_qcow2(default / "disk.qcow2")

    rootxz = root / PREFIX / "rootxz" / serial
    rootxz.mkdir(parents=True)
    rootxz_meta = write_metadata_tarball(build / "meta-rootxz", rootxz / "lxd.tar.xz", "rootxz")
    root_tar_xz = make_root_tar_xz(rootfs, rootxz / "root.tar.xz")
    (rootxz / "metadata.json").write_text(f'{{"aliases": ["{OVERRIDE_ALIAS}"]}}\n')

    exported = export_unified(meta, squashfs, build / "export", label)
    unified_dir = root / PREFIX / "unified" / serial
    unified_dir.mkdir(parents=True)
    unified = unified_dir / exported.name
    shutil.move(exported, unified)

    return Tree(
        root=root,
        serial=serial,
        meta=meta,
        squashfs=squashfs,
        qcow2=qcow2,
        rootxz_meta=rootxz_meta,
        root_tar_xz=root_tar_xz,
        unified=unified,
    )
