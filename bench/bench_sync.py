"""`sync` from an upstream served by nginx over TLS, against `curl` fetching the same files.

    python bench/bench_sync.py [--total-mb 2048] [--versions 8] [--noop-versions 1000]
                               [--repeat 3] [--workdir DIR]

Builds an upstream in images.linuxcontainers.org's layout (lxd.tar.xz and incus.tar.xz items
for one 4 KiB metadata file, a rootfs.squashfs of random bytes; `--total-mb` in all over
`--versions` versions; the catalog written by hand with every sha256 and combined fingerprint),
serves it with nginx on loopback (a self-signed certificate), and times, alternating which goes
first in each round:

- baseline: one `curl` process fetching every file the sync needs (one keep-alive connection,
  `--cacert`, each file to its own path);
- first sync: `lxd-image-server sync URL --keep N` into an empty tree (download, size, sha256
  and fingerprint checks, placing, fsync, the publish).

Both end with a syncfs of the target's file system (curl does not fsync). Goal: sync at most
1/0.9 of curl's time (>= 0.9x curl's speed). Then a no-change sync of an upstream of
`--noop-versions` versions that the tree holds already: goal under 1 s, and exactly two
requests (index.json, images.json) in nginx's log.

Every result is checked before it counts: the synced catalog must list every version with the
upstream's fingerprints, every synced and every curl'ed file must have its sha256, and the
no-change sync must leave the catalog's bytes as they were. A fast wrong answer fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    MiB,
    add_common_args,
    machine_line,
    main_wrapper,
    median,
    parallel_sha256_seconds,
    print_table,
    runs,
    scratch_dir,
    serial,
    server_exe,
    settle,
    syncfs,
    tail,
    verdict,
    warm,
)

from lxd_image_server.service.tls import ensure_certificate

GOAL_SPEED = 0.9
GOAL_NOOP = 1.0
PRODUCT = "bench:1.0:amd64:default"
META_SIZE = 4096

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 2;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{
    worker_connections 256;
}}
http {{
    log_format plain '$request_method $status $uri';
    access_log {work}/access.log plain;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
        location / {{
            try_files $uri =404;
        }}
    }}
}}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--total-mb", type=int, default=2048, help="MiB synced (default 2048)")
    parser.add_argument("--versions", type=int, default=8, help="versions (default 8)")
    parser.add_argument(
        "--noop-versions",
        type=int,
        default=1000,
        help="upstream versions of the no-change sync (default 1000)",
    )
    add_common_args(parser)
    return parser.parse_args(argv)


def write_file(path: Path, size: int, hashers: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = os.urandom(min(4 * MiB, left))
            f.write(chunk)
            for h in hashers:
                h.update(chunk)
            left -= len(chunk)


def build_upstream(root: Path, count: int, root_size: int) -> dict[str, str]:
    """`count` versions in the lxc layout and their catalog. -> serial -> fingerprint."""
    versions: dict[str, Any] = {}
    fps: dict[str, str] = {}
    for n in range(count):
        s = serial(n)
        rel = f"images/bench/1.0/amd64/default/{s}"
        meta_h = hashlib.sha256()
        write_file(root / rel / "lxd.tar.xz", META_SIZE, [meta_h])
        root_h = hashlib.sha256()
        combined = meta_h.copy()
        write_file(root / rel / "rootfs.squashfs", root_size, [root_h, combined])
        fp = combined.hexdigest()
        meta = {"size": META_SIZE, "sha256": meta_h.hexdigest(), "combined_squashfs_sha256": fp}
        versions[s] = {
            "items": {
                "lxd.tar.xz": {"ftype": "lxd.tar.xz", "path": f"{rel}/lxd.tar.xz", **meta},
                "incus.tar.xz": {"ftype": "incus.tar.xz", "path": f"{rel}/lxd.tar.xz", **meta},
                "root.squashfs": {
                    "ftype": "squashfs",
                    "path": f"{rel}/rootfs.squashfs",
                    "size": root_size,
                    "sha256": root_h.hexdigest(),
                },
            }
        }
        fps[s] = fp
    products = {
        PRODUCT: {
            "os": "bench",
            "release": "1.0",
            "arch": "amd64",
            "variant": "default",
            "aliases": "bench/1.0",
            "versions": versions,
        }
    }
    streams = root / "streams" / "v1"
    streams.mkdir(parents=True, exist_ok=True)
    doc = {"content_id": "images", "datatype": "image-downloads", "format": "products:1.0"}
    (streams / "images.json").write_text(json.dumps({**doc, "products": products}))
    index = {
        "format": "index:1.0",
        "index": {
            "images": {
                "datatype": "image-downloads",
                "format": "products:1.0",
                "path": "streams/v1/images.json",
                "products": [PRODUCT],
            }
        },
    }
    (streams / "index.json").write_text(json.dumps(index))
    return fps


class Nginx:
    def __init__(self, root: Path, work: Path, cert: str, key: str, port: int) -> None:
        self.work = work
        (work / "tmp").mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        # as root, the workers would be nobody, who cannot enter the scratch directory
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            NGINX_CONF.format(work=work, port=port, cert=cert, key=key, root=root, user=user)
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [nginx, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"nginx exited:\n{tail(work / 'error.log')}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise BenchError("nginx did not start")

    def requests(self) -> list[str]:
        log = self.work / "access.log"
        return log.read_text().splitlines() if log.exists() else []

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(cmd: list[str], log: Path, timeout: float, sync_dir: Path) -> float:
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout
        )
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail(log)}")
    syncfs(sync_dir)
    return time.perf_counter() - start


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def check_synced(target: Path, upstream: Path, fps: dict[str, str]) -> None:
    """The catalog lists every version with upstream's fingerprint; every file is upstream's."""
    doc = json.loads((target / "streams/v1/images.json").read_text())
    versions = doc["products"][PRODUCT]["versions"]
    if set(versions) != set(fps):
        raise BenchError(f"synced catalog lists {sorted(versions)}, expected {sorted(fps)}")
    for s, fp in fps.items():
        for ftype in ("lxd.tar.xz", "incus.tar.xz"):
            if versions[s]["items"][ftype]["combined_squashfs_sha256"] != fp:
                raise BenchError(f"{s}: fingerprint differs from upstream's")
        rel = f"images/bench/1.0/amd64/default/{s}"
        for name in ("lxd.tar.xz", "rootfs.squashfs"):
            if sha256_file(target / rel / name) != sha256_file(upstream / rel / name):
                raise BenchError(f"{rel}/{name}: not upstream's bytes")


def curl_config(url: str, upstream: Path, out: Path, fps: dict[str, str]) -> Path:
    """What the sync downloads (index, catalog, each metadata file once, each root), for
    `curl -K`: one process, one keep-alive connection."""
    lines = []
    paths = ["streams/v1/index.json", "streams/v1/images.json"]
    for s in fps:
        rel = f"images/bench/1.0/amd64/default/{s}"
        paths += [f"{rel}/lxd.tar.xz", f"{rel}/rootfs.squashfs"]
    for p in paths:
        lines.append(f'url = "{url}/{p}"')
        lines.append(f'output = "{out / p}"')
    cfg = out.parent / "curl.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def check_curled(out: Path, upstream: Path, fps: dict[str, str]) -> None:
    for s in fps:
        rel = f"images/bench/1.0/amd64/default/{s}"
        for name in ("lxd.tar.xz", "rootfs.squashfs"):
            if sha256_file(out / rel / name) != sha256_file(upstream / rel / name):
                raise BenchError(f"curl's {rel}/{name} differs")


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    curl = shutil.which("curl")
    if curl is None:
        raise BenchError("curl is not installed")
    rows: list[list[str]] = []
    with scratch_dir(args.workdir, args.keep, "bench-sync-") as work:
        cert = ensure_certificate(str(work / "ssl"), ["127.0.0.1"])
        upstream = work / "upstream"
        root_size = args.total_mb * MiB // args.versions
        print(f"building {args.versions} versions of {root_size // MiB} MiB ...", flush=True)
        fps = build_upstream(upstream, args.versions, root_size)
        server = Nginx(upstream, work / "nginx", cert.cert_path, cert.key_path, free_port())
        log = work / "log"
        try:
            base_runs: list[float] = []
            ours_runs: list[float] = []
            for rnd in range(args.repeat):
                order = ("curl", "sync") if rnd % 2 == 0 else ("sync", "curl")
                for which in order:
                    target = work / f"target-{which}"
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir()
                    warm(sorted(p for p in upstream.rglob("*") if p.is_file()))
                    settle()
                    if which == "curl":
                        cfg = curl_config(server.url, upstream, target, fps)
                        cmd = [curl, "-sS", "--fail", "--create-dirs", "--cacert"]
                        cmd += [cert.cert_path, "-K", str(cfg)]
                        base_runs.append(timed(cmd, log, args.timeout, target))
                        check_curled(target, upstream, fps)
                    else:
                        cmd = [exe, "--state-dir", str(target / "state"), "sync", server.url]
                        cmd += ["--ca", cert.cert_path, "--keep", str(args.versions)]
                        cmd += ["--root-dir", str(target / "root")]
                        ours_runs.append(timed(cmd, log, args.timeout, target))
                        check_synced(target / "root", upstream, fps)
                    shutil.rmtree(target, ignore_errors=True)
        finally:
            server.stop()
        base, ours = median(base_runs), median(ours_runs)
        speed = base / ours
        print(f"  first sync: curl {runs(base_runs)} | sync {runs(ours_runs)}")
        rows.append(
            [
                f"first sync, {args.versions} x {root_size // MiB} MiB",
                f"{base:.3f}",
                f"{ours:.3f}",
                f"{speed:.2f}x",
                verdict(speed >= GOAL_SPEED),
            ]
        )
        # what the sync must do on top of curl's work: every root hashed twice (its sha256
        # and the fingerprint), here on one thread per CPU, files warm
        roots = sorted(upstream.rglob("rootfs.squashfs"))
        warm(roots)
        floor = parallel_sha256_seconds([*roots, *roots], os.cpu_count() or 1)
        rows.append(["(info) hashing twice, one thread per CPU", "", f"{floor:.3f}", "", ""])
        shutil.rmtree(upstream)

        # the no-change sync at --noop-versions upstream versions (tiny files)
        noop = work / "noop"
        print(f"building {args.noop_versions} tiny versions ...", flush=True)
        fps = build_upstream(noop, args.noop_versions, 4096)
        server = Nginx(noop, work / "nginx-noop", cert.cert_path, cert.key_path, free_port())
        try:
            target = work / "target-noop"
            cmd = [exe, "--state-dir", str(target / "state"), "sync", server.url]
            cmd += ["--ca", cert.cert_path, "--keep", str(args.noop_versions)]
            cmd += ["--root-dir", str(target / "root")]
            timed(cmd, log, args.timeout, work)
            check_synced(target / "root", noop, fps)
            catalog = (target / "root/streams/v1/images.json").read_bytes()
            noop_runs = []
            for _ in range(args.repeat):
                before = len(server.requests())
                noop_runs.append(timed(cmd, log, args.timeout, work))
                made = server.requests()[before:]
                if [r.split()[2] for r in made] != [
                    "/streams/v1/index.json",
                    "/streams/v1/images.json",
                ]:
                    raise BenchError(f"the no-change sync made these requests: {made}")
                if (target / "root/streams/v1/images.json").read_bytes() != catalog:
                    raise BenchError("the no-change sync changed the catalog")
        finally:
            server.stop()
        noop_s = median(noop_runs)
        print(f"  no-change sync: {runs(noop_runs)}")
        rows.append(
            [
                f"no-change sync, {args.noop_versions} versions",
                "",
                f"{noop_s:.3f}",
                "2 requests",
                verdict(noop_s < GOAL_NOOP),
            ]
        )
    print()
    print(f"{machine_line()}; median of {args.repeat}; sources warm; syncfs after each run")
    print(f"goals: first sync >= {GOAL_SPEED}x curl's speed; no-change sync < {GOAL_NOOP} s")
    print_table(("run", "curl s", "sync s", "speed", "goal"), rows)
    return 0


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
