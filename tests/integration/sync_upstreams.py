"""Upstreams for `sync` tests, built from real small images (tests/integration/images.py):

- `own_upstream`: a tree published by this project's `update`;
- `lxc_upstream`: the layout of images.linuxcontainers.org, its images.json written by hand:
  lxd.tar.xz and incus.tar.xz items (the same bytes), squashfs, root.tar.xz and disk-kvm.img
  items, deltas (real ones, xdelta3), and a product of *_combined.tar.gz items;
- `incus_upstream`: a tree made by Incus's own `incus-simplestreams add`;

and `HostileServer`, a tiny HTTPS server on loopback that serves a directory and can cut or
stall chosen files.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .images import build_rootfs, make_qcow2, make_root_tar_xz, make_squashfs
from .servers import Pki, run

BIN = Path(sys.executable).parent / "lxd-image-server"
SERIALS = ("20240101_05:24", "20240102_05:24", "20240103_05:24")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def combined_of(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def write_meta(out: Path, variant: str, serial_time: int, work: Path) -> Path:
    """A metadata tarball with what incus-simplestreams wants of metadata.yaml."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "metadata.yaml").write_text(
        "architecture: x86_64\n"
        f"creation_date: {serial_time}\n"
        "properties:\n"
        "  os: busybox\n"
        '  release: "1.35"\n'
        f"  variant: {variant}\n"
        "  architecture: amd64\n"
        f"  description: busybox {variant} {serial_time}\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    run(["tar", "-C", work, "-cJf", out, "metadata.yaml"])
    return out


@dataclass
class Files:
    """One version's real files."""

    meta: Path
    squashfs: Path
    root_tar_xz: Path
    qcow2: Path


def build_files(work: Path, n: int) -> list[Files]:
    """`n` versions of the busybox image, each a little different (a file in /etc)."""
    out = []
    for i in range(n):
        d = work / f"v{i}"
        rootfs = build_rootfs(d / "rootfs")
        (rootfs / "etc" / "version").write_text(f"{i}\n" * (i + 1))
        out.append(
            Files(
                meta=write_meta(d / "meta.tar.xz", "default", 1704085440 + 86400 * i, d / "m"),
                squashfs=make_squashfs(rootfs, d / "rootfs.squashfs"),
                root_tar_xz=make_root_tar_xz(rootfs, d / "root.tar.xz"),
                qcow2=make_qcow2(d / "disk.qcow2"),
            )
        )
    return out


def own_upstream(root: Path, files: list[Files], state: Path) -> Path:
    """A tree published by `lxd-image-server update`: default (squashfs + VM) and rootxz."""
    for f, serial in zip(files, SERIALS, strict=False):
        d = root / "images/busybox/1.35/amd64/default" / serial
        d.mkdir(parents=True)
        shutil.copy(f.meta, d / "lxd.tar.xz")
        shutil.copy(f.squashfs, d / "rootfs.squashfs")
        shutil.copy(f.qcow2, d / "disk.qcow2")
        x = root / "images/busybox/1.35/amd64/rootxz" / serial
        x.mkdir(parents=True)
        shutil.copy(f.meta, x / "lxd.tar.xz")
        shutil.copy(f.root_tar_xz, x / "root.tar.xz")
    run([BIN, "--state-dir", state, "update", "--root-dir", root], timeout=300)
    return root


def item(root: Path, rel: str, ftype: str, **extra: Any) -> dict[str, Any]:
    p = root / rel
    return {"ftype": ftype, "path": rel, "size": p.stat().st_size, "sha256": sha256_of(p), **extra}


def write_catalog(root: Path, products: dict[str, Any]) -> None:
    streams = root / "streams" / "v1"
    streams.mkdir(parents=True, exist_ok=True)
    doc = {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "products": products,
        "updated": "Mon, 01 Jan 2024 05:24:00 +0000",
    }
    (streams / "images.json").write_text(json.dumps(doc, indent=1))
    index = {
        "format": "index:1.0",
        "index": {
            "images": {
                "datatype": "image-downloads",
                "format": "products:1.0",
                "path": "streams/v1/images.json",
                "products": sorted(products),
                "updated": doc["updated"],
            }
        },
        "updated": doc["updated"],
    }
    (streams / "index.json").write_text(json.dumps(index))


@dataclass
class LxcUpstream:
    root: Path
    #: serial -> {"container": fingerprint, "vm": fingerprint}
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)
    unified_fp: str = ""


def lxc_version(root: Path, rel: str, f: Files, base: tuple[str, Files] | None) -> dict[str, Any]:
    """One version in images.linuxcontainers.org's way: files under `rel`, items keyed as
    there."""
    d = root / rel
    d.mkdir(parents=True)
    for name, src in (
        ("lxd.tar.xz", f.meta),
        ("incus.tar.xz", f.meta),
        ("rootfs.squashfs", f.squashfs),
        ("rootfs.tar.xz", f.root_tar_xz),
        ("disk.qcow2", f.qcow2),
    ):
        shutil.copy(src, d / name)
    fps = {
        "combined_squashfs_sha256": combined_of(f.meta, f.squashfs),
        "combined_rootxz_sha256": combined_of(f.meta, f.root_tar_xz),
        "combined_sha256": combined_of(f.meta, f.root_tar_xz),
        "combined_disk-kvm-img_sha256": combined_of(f.meta, f.qcow2),
    }
    items = {
        "incus.tar.xz": item(root, f"{rel}/incus.tar.xz", "incus.tar.xz", **fps),
        "lxd.tar.xz": item(root, f"{rel}/lxd.tar.xz", "lxd.tar.xz", **fps),
        "root.squashfs": item(root, f"{rel}/rootfs.squashfs", "squashfs"),
        "root.tar.xz": item(root, f"{rel}/rootfs.tar.xz", "root.tar.xz"),
        "disk.qcow2": item(root, f"{rel}/disk.qcow2", "disk-kvm.img"),
    }
    if base is not None:
        bserial, bfiles = base
        delta = d / f"rootfs.vcdiff.{bserial.replace(':', '')}"
        run(["xdelta3", "-e", "-9", "-s", bfiles.squashfs, f.squashfs, delta])
        items[f"delta-{bserial}"] = item(
            root, f"{rel}/{delta.name}", "squashfs.vcdiff", delta_base=bserial
        )
        vm_delta = d / f"disk.vcdiff.{bserial.replace(':', '')}"
        run(["xdelta3", "-e", "-9", "-s", bfiles.qcow2, f.qcow2, vm_delta])
        items[f"disk-delta-{bserial}"] = item(
            root, f"{rel}/{vm_delta.name}", "disk-kvm.img.vcdiff", delta_base=bserial
        )
    return {"items": items}


def make_unified(work: Path, f: Files) -> Path:
    """A unified tarball (metadata.yaml and rootfs/ in one .tar.gz), as `lxc publish` makes."""
    d = work / "unified"
    (d / "rootfs").mkdir(parents=True, exist_ok=True)
    run(["tar", "-C", d, "-xJf", f.meta])
    shutil.copytree(f.meta.parent / "rootfs", d / "rootfs", symlinks=True, dirs_exist_ok=True)
    out = work / "unified.tar.gz"
    run(["tar", "--numeric-owner", "--owner=0", "--group=0", "-C", d, "-czf", out, "."])
    return out


def lxc_upstream(root: Path, files: list[Files], work: Path) -> LxcUpstream:
    up = LxcUpstream(root)
    versions: dict[str, Any] = {}
    base: tuple[str, Files] | None = None
    for f, serial in zip(files, SERIALS, strict=False):
        rel = f"images/busybox/1.35/amd64/default/{serial}"
        versions[serial] = lxc_version(root, rel, f, base)
        up.fingerprints[serial] = {
            "container": combined_of(f.meta, f.squashfs),
            "vm": combined_of(f.meta, f.qcow2),
        }
        base = (serial, f)
    products: dict[str, Any] = {
        "busybox:1.35:amd64:default": {
            "aliases": "busybox/1.35/default,busybox/1.35,bb-lxc",
            "arch": "amd64",
            "os": "busybox",
            "release": "1.35",
            "release_title": "1.35 (lxc layout)",
            "variant": "default",
            "requirements": {"secureboot": "false"},
            "versions": versions,
        }
    }
    unified = make_unified(work, files[0])
    urel = f"images/busybox/1.35/amd64/unified/{SERIALS[0]}"
    (root / urel).mkdir(parents=True)
    shutil.copy(unified, root / urel / "busybox_combined.tar.gz")
    up.unified_fp = sha256_of(unified)
    products["busybox:1.35:amd64:unified"] = {
        "aliases": "busybox/1.35/unified",
        "arch": "amd64",
        "os": "busybox",
        "release": "1.35",
        "release_title": "1.35",
        "variant": "unified",
        "versions": {
            SERIALS[0]: {
                "items": {
                    "lxd_combined.tar.gz": item(
                        root, f"{urel}/busybox_combined.tar.gz", "lxd_combined.tar.gz"
                    ),
                    "incus_combined.tar.gz": item(
                        root, f"{urel}/busybox_combined.tar.gz", "incus_combined.tar.gz"
                    ),
                }
            }
        },
    }
    write_catalog(root, products)
    return up


def incus_upstream(root: Path, files: list[Files]) -> Path:
    """A tree made by `incus-simplestreams add` (Debian's incus-extra): split images, the
    container and the VM of each version."""
    root.mkdir(parents=True, exist_ok=True)
    adds = [(f.meta, f.squashfs) for f in files] + [(files[-1].meta, files[-1].qcow2)]
    for meta, data in adds:
        proc = subprocess.run(
            ["incus-simplestreams", "add", os.fspath(meta), os.fspath(data)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"incus-simplestreams add failed: {proc.stderr}")
    return root


# -- a hostile server ---------------------------------------------------------------------


class HostileServer:
    """HTTPS on 127.0.0.1 serving `root`; paths in `cut` are sent half and the connection
    closed, paths in `stall` send their headers and a few bytes, then nothing until stop().
    Counts requests; answers Range requests. `no_length`: no Content-Length, the body ends
    when the connection closes."""

    def __init__(self, root: Path, pki: Pki) -> None:
        self.root = root
        self.cut: set[str] = set()
        self.stall: set[str] = set()
        self.no_range = False
        self.no_length = False
        #: path -> Location: answered with a 302
        self.redirects: dict[str, str] = {}
        self.requests: list[str] = []
        self.released = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = unquote(self.path.split("?", 1)[0].lstrip("/"))
                server.requests.append(path)
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                target = server.root / path
                if ".." in path.split("/") or not target.is_file():
                    body = b"not found"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = target.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.no_range and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if server.no_length:
                    self.close_connection = True  # the body ends where the connection does
                else:
                    self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if path in server.cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if path in server.stall:
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    server.released.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], OSError):
                    super().handle_error(request, client_address)
                # else: a client that hung up (the point of some tests)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
