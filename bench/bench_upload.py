"""Upload throughput of `lxd-image-server run` (nginx + the upload app) against nginx's WebDAV.

    python bench/bench_upload.py [--size-mb 1024] [--repeat 3] [--warmup 1] [--http both|1.1|2]
                                 [--curl CMD] [--workdir DIR] [--keep] [--exe PATH] [--timeout S]

Starts `lxd-image-server run` on 127.0.0.1 (TLS with its own self-signed certificate, uploads
behind basic auth with an htpasswd made by `lxd-image-server passwd`), and next to it a second
nginx serving WebDAV PUT over the same TLS settings, the same certificate and the same
credentials, writing to a directory on the same file system (client_body_temp_path too). Then,
WARMUP untimed rounds and REPEAT timed ones (the order of the three steps rotates), with the
source file warm in the page cache and dirty pages flushed before each step, curl uploads
SIZE_MB MiB of random bytes as rootfs.squashfs:

- baseline: `curl -T f https://.../images/<path>` to nginx's WebDAV (dav_methods PUT), then an
            fsync of the stored file (the upload app fsyncs before it answers; WebDAV does not);
- PUT:      `curl -T f https://.../images/<path>` to the upload app;
- POST:     `curl -F "upload=@f;filename=<path>" https://.../images/` (the seeds' command).

Every upload goes to a new serial (lxd.tar.xz is put there first, untimed, so the version is
complete once the rootfs lands); the benchmark waits until the watcher lists it in the catalog,
then deletes it, so the disk does not fill and the watcher's hashing never overlaps a timed
upload. The first round checks the stored files' sha256 (and the one the app reports). Time is
curl's own time_total (TLS handshake to the final response, which the upload app sends after
fsync and rename); the baseline's is curl's plus the fsync after it (the "(info)" row shows
WebDAV's curl time alone). `--curl CMD` uploads with another curl (e.g. a newer one in a
chroot: `--curl "chroot /srv/trixie curl"`; the scratch paths must be the same inside).

Also per step: the CPU seconds of curl, of the nginx workers and of the upload app's gunicorn
workers (from /proc), per upload and per GiB, which show where the time goes; the share of the
machine's CPU time left idle during the upload (/proc/stat: near 0 % means the 2 CPUs were the
limit); and the hashing the product needs (sha256 timed in this process, twice per byte).
Peak RSS: before each upload to the app, every gunicorn worker's peak (VmHWM) is reset with
`echo 5 > /proc/PID/clear_refs`; afterwards the largest VmHWM is the peak during the upload,
and VmHWM minus the RSS just before is the growth.

Also: the publish latency, from curl's return to the version listed in images.json by the
watcher (which takes the digests the upload app handed over instead of reading the file).

Prints the medians, MiB/s and the ratios to the baseline against the target (>= 0.95x); a
missed target is printed (MISS), not fatal. A failing command or a deadline is (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    META_NAME,
    META_SIZE,
    ROOT_NAME,
    VARIANT_REL,
    BenchError,
    MiB,
    add_common_args,
    catalog_versions,
    machine_line,
    main_wrapper,
    median,
    print_table,
    read_catalog,
    runs,
    scratch_dir,
    serial,
    server_exe,
    settle,
    tail,
    verdict,
    warm,
    write_random,
)

from lxd_image_server.service.nginx import SiteSettings
from lxd_image_server.web.upload_sink import BUFFER_SIZE

#: Throughput of an upload to the app over that of the durable baseline (WebDAV PUT + fsync).
TARGET = 0.95
USER = "bench"
START_DEADLINE = 60.0
STOP_DEADLINE = 60.0
#: How long the watcher may take to list (and, after a delete, drop) an uploaded version.
CATALOG_DEADLINE = 300.0
POLL = 0.05
#: Below images/ (the layout's os/release/arch/variant), as in the other benchmarks.
VARIANT = str(VARIANT_REL.relative_to("images"))

DAV_CONF = """\
# WebDAV baseline for bench_upload.py: same TLS settings, certificate and credentials as the
# `lxd-image-server run` it is compared with.
daemon off;
master_process on;
worker_processes auto;
pid {run}/nginx.pid;
error_log stderr warn;
{user}

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {tmp};
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;

    server {{
        listen 127.0.0.1:{port} ssl http2;
        server_name _;
        ssl_certificate {ssl}/nginx.crt;
        ssl_certificate_key {ssl}/nginx.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:bench_dav:10m;
        ssl_session_timeout 1d;
        root {root};

        location /images/ {{
            auth_basic "bench";
            auth_basic_user_file {htpasswd};
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 0;
            client_body_timeout {body_timeout};
        }}
    }}
}}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--size-mb", type=int, default=1024, help="MiB uploaded per step (default: 1024)"
    )
    parser.add_argument(
        "--http",
        choices=("both", "1.1", "2"),
        default="both",
        help="HTTP versions curl uses: 1.1, 2, or both, each step once per version in every "
        "round (default: both)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds first (default: 1). The first writes into pages the machine has "
        "not used yet, which is much slower on some VMs; it also checks the stored sha256",
    )
    parser.add_argument(
        "--curl",
        default="curl",
        help="the curl command that uploads, split like a shell would (default: curl); "
        'e.g. a newer curl in a chroot: "chroot /srv/trixie curl"',
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.size_mb < 1:
        parser.error("--size-mb must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    try:
        args.curl_command = shlex.split(args.curl)
    except ValueError as e:
        parser.error(f"--curl: {e}")
    if not args.curl_command:
        parser.error("--curl must name a command")
    return args


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, name: str, log: Path) -> int:
    """Sends `sig` and waits; kills after STOP_DEADLINE. Returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(
                f"{name} did not stop in {STOP_DEADLINE:.0f} s; killed. Log:\n{tail(log)}"
            ) from None
    return proc.returncode


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in KiB ({} if it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass
class Gunicorn:
    master: int

    def workers(self) -> list[int]:
        return children(self.master)

    def reset_peaks(self) -> dict[int, int]:
        """Resets every worker's VmHWM; returns each one's VmRSS (KiB) just after."""
        before: dict[int, int] = {}
        for pid in self.workers():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            st = read_status(pid)
            if "VmRSS" in st:
                before[pid] = st["VmRSS"]
        return before

    def peaks(self) -> dict[int, int]:
        return {pid: st["VmHWM"] for pid in self.workers() if "VmHWM" in (st := read_status(pid))}


def child_named(parent: int, name: str) -> int:
    """The child of `parent` whose command line mentions `name`."""
    for pid in children(parent):
        if any(name in arg for arg in cmdline(pid)):
            if not children(pid):
                raise BenchError(f"the {name} master {pid} has no workers")
            return pid
    raise BenchError(f"no {name} among the children of pid {parent}")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes have used so far."""
    ticks = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(idle + iowait, all) clock ticks of the whole machine so far (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return fields[3] + fields[4], sum(fields)


def sha256_seconds_per_gib(path: Path, passes: int = 128) -> float:
    """CPU seconds hashlib's sha256 takes per GiB on this machine: the first BUFFER_SIZE bytes
    of `path` hashed `passes` times, from the cache, as the app's threads hash the buffer just
    received (from memory it takes up to half as long again)."""
    with open(path, "rb", buffering=0) as f:
        data = f.read(BUFFER_SIZE)
    h = hashlib.sha256()
    start = time.process_time()
    for _ in range(passes):
        h.update(data)
    return (time.process_time() - start) / max(len(data) * passes, 1) * 1024 * MiB


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have been waited for (curl)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# -- curl -------------------------------------------------------------------------------------


@dataclass
class Curl:
    cacert: Path
    password: str
    #: the command that runs curl (--curl)
    command: tuple[str, ...] = ("curl",)

    def base(self, http: str = "2") -> list[str]:
        cmd = [*self.command, "-sS", "--cacert", str(self.cacert), "-u", f"{USER}:{self.password}"]
        cmd.append("--http1.1" if http == "1.1" else "--http2")
        return cmd

    def request(
        self, args: Sequence[str], timeout: float, http: str = "2"
    ) -> tuple[int, float, int, str]:
        """(status, curl's time_total, bytes sent, response body)."""
        fmt = "\n%{http_code} %{time_total} %{size_upload}"
        cmd = [*self.base(http), "-o", "-", "-w", fmt, *args]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"curl {' '.join(args)} did not finish in {timeout:.0f} s") from e
        body, _, stats = out.stdout.rpartition("\n")
        parts = stats.split()
        if out.returncode != 0 or len(parts) != 3:
            raise BenchError(f"curl {' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return int(parts[0]), float(parts[1]), int(float(parts[2])), body

    def status(self, args: Sequence[str]) -> int:
        """The status code; 0 when the connection failed (not up yet)."""
        cmd = [*self.base(), "-o", "/dev/null", "-w", "%{http_code}", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return int(out.stdout or 0)


# -- the servers ------------------------------------------------------------------------------


@dataclass
class Servers:
    url: str
    dav_url: str
    root: Path
    dav_root: Path
    run_proc: subprocess.Popen[bytes]
    gunicorn: Gunicorn
    curl: Curl
    #: the nginx masters of `run` and of the WebDAV baseline (their workers do the work)
    run_nginx: int
    dav_nginx: int


def make_htpasswd(exe: str, path: Path, password: str, log: Path) -> None:
    with open(log, "ab") as out:
        r = subprocess.run(
            [exe, "passwd", USER, "--htpasswd", str(path)],
            input=(password + "\n").encode(),
            stdout=out,
            stderr=out,
            timeout=60,
            check=False,
        )
    if r.returncode != 0:
        raise BenchError(f"lxd-image-server passwd failed ({r.returncode}):\n{tail(log)}")


def wait_for(what: str, ready: Any, procs: Sequence[tuple[subprocess.Popen[bytes], Path]]) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while not ready():
        for proc, log in procs:
            if proc.poll() is not None:
                raise BenchError(f"{what}: exited with status {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {START_DEADLINE:.0f} s")
        time.sleep(0.1)


def nginx_user(conf: Path) -> str | None:
    """The `user` directive of the nginx.conf `run` wrote (None: none, the workers stay ours)."""
    m = re.search(r"^\s*user\s+([^;]+);", conf.read_text(), re.MULTILINE)
    return m.group(1).strip() if m else None


@contextlib.contextmanager
def servers(exe: str, work: Path, curl_command: Sequence[str] = ("curl",)) -> Iterator[Servers]:
    root, state, ssl = work / "root", work / "state", work / "ssl"
    dav = work / "dav"
    htpasswd = work / "htpasswd"
    password = secrets.token_urlsafe(16)
    run_log, dav_log = work / "run.log", work / "dav.log"
    make_htpasswd(exe, htpasswd, password, run_log)

    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ALLOW_OVERWRITES", "ALLOW_DELETES", "DEBUG", "UPLOAD_MAX_SIZE")
    }
    run_cmd = [
        exe, "--state-dir", str(state), "run", "--root-dir", str(root),
        "--listen", f"127.0.0.1:{port}", "--ssl-dir", str(ssl), "--htpasswd", str(htpasswd),
    ]  # fmt: skip
    if os.geteuid() == 0:
        # started as root, `run` needs an unprivileged user for the upload server and the
        # watcher (issue 18); nginx's workers' will do for a benchmark's scratch tree
        run_cmd += ["--user", os.environ.get("LXD_IMAGE_SERVER_RUN_USER", "www-data")]
    with open(run_log, "ab") as out:
        out.write(f"$ {' '.join(run_cmd)}\n".encode())
        out.flush()
        run_proc = subprocess.Popen(
            run_cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    dav_proc: subprocess.Popen[bytes] | None = None
    try:
        url = f"https://127.0.0.1:{port}"
        curl = Curl(ssl / "nginx.crt", password, tuple(curl_command))
        wait_for(
            "lxd-image-server run",
            lambda: (
                (ssl / "nginx.crt").exists()
                and curl.status([f"{url}/streams/v1/index.json"]) == 200
            ),
            [(run_proc, run_log)],
        )
        # the upload app answers through nginx (a bad path: refused before anything is written)
        wait_for(
            "the upload app",
            lambda: curl.status(["-X", "PUT", "--data-binary", "x", f"{url}/images/x"]) == 400,
            [(run_proc, run_log)],
        )

        dav_root, dav_tmp, dav_run = dav / "root", dav / "tmp", dav / "run"
        for d in (dav_root / "images", dav_tmp, dav_run):
            d.mkdir(parents=True)
        user = nginx_user(state / "nginx" / "nginx.conf")
        if user:
            owner, group = user.split()[0], user.split()[-1]
            for d in (dav_root, dav_root / "images", dav_tmp):
                shutil.chown(d, owner, group)
        dav_port = free_port()
        conf = dav / "nginx.conf"
        conf.write_text(
            DAV_CONF.format(
                run=dav_run,
                tmp=dav_tmp,
                root=dav_root,
                ssl=ssl,
                port=dav_port,
                htpasswd=htpasswd,
                user=f"user {user};" if user else "",
                body_timeout=SiteSettings.body_timeout,
            )
        )
        with open(dav_log, "ab") as out:
            dav_proc = subprocess.Popen(
                ["nginx", "-p", str(dav_run), "-c", str(conf), "-e", "stderr"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        dav_url = f"https://127.0.0.1:{dav_port}"
        # a GET of a missing file: 404 once nginx (and its auth) answers
        wait_for(
            "the WebDAV nginx",
            lambda: curl.status([f"{dav_url}/images/missing"]) == 404,
            [(dav_proc, dav_log)],
        )
        yield Servers(
            url,
            dav_url,
            root,
            dav_root,
            run_proc,
            Gunicorn(child_named(run_proc.pid, "gunicorn")),
            curl,
            child_named(run_proc.pid, "nginx"),
            dav_proc.pid,
        )
    finally:
        if dav_proc is not None:
            stop(dav_proc, signal.SIGQUIT, "the WebDAV nginx", dav_log)
        rc = stop(run_proc, signal.SIGTERM, "lxd-image-server run", run_log)
        if rc != 0 and sys.exc_info()[0] is None:
            raise BenchError(f"lxd-image-server run exited {rc} on SIGTERM:\n{tail(run_log)}")


# -- the steps --------------------------------------------------------------------------------


@dataclass
class Results:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    #: seconds to fsync the baseline's file after curl returned (in the baseline's seconds)
    dav_fsync: list[float] = field(default_factory=list)
    #: the baseline's curl time alone, without the fsync (the "(info)" row)
    dav_alone: dict[str, list[float]] = field(default_factory=dict)
    #: per upload to the app: (largest worker VmHWM, largest growth over its RSS before), KiB
    rss: list[tuple[int, int]] = field(default_factory=list)
    #: per step: CPU seconds of (curl, the nginx workers, the upload app's workers) per upload
    cpu: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    #: per step: the share of the machine's CPU time left idle during each upload
    idle: dict[str, list[float]] = field(default_factory=dict)
    #: CPU seconds of one sha256 pass per GiB on this machine (measured in this process)
    sha256_per_gib: float = 0.0
    #: seconds from the answer to an upload to its version listed in images.json
    publish: list[float] = field(default_factory=list)

    def add(self, step: str, seconds: float) -> None:
        self.seconds.setdefault(step, []).append(seconds)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def fsync_seconds(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


class Bench:
    def __init__(self, s: Servers, src: Path, meta: Path, size: int, timeout: float) -> None:
        self.s = s
        self.src = src
        self.meta = meta
        self.size = size
        self.timeout = timeout
        self.serials = 0
        self.results = Results()
        #: False during the warm-up round: times are not kept (peak RSS is)
        self.recording = False
        self.src_sha256 = sha256_file(src)

    def next_serial(self) -> str:
        self.serials += 1
        return serial(self.serials)

    def prepare(self) -> None:
        """Flush dirty pages (the last step's write-back), then warm the source."""
        settle()
        warm([self.src])

    def timed(self, args: Sequence[str], what: str, nginx: int, http: str) -> tuple[float, str]:
        """One upload with curl: (curl's time_total, response body). Also notes the CPU time
        of curl, of `nginx`'s workers and of the upload app's workers."""
        workers, app = children(nginx), self.s.gunicorn.workers()
        cpu = (children_cpu_seconds(), cpu_seconds(workers), cpu_seconds(app))
        ticks = machine_ticks()
        status, seconds, sent, body = self.s.curl.request(args, self.timeout, http)
        ticks_after = machine_ticks()
        after = (children_cpu_seconds(), cpu_seconds(workers), cpu_seconds(app))
        if status not in (200, 201, 204):
            raise BenchError(f"{what}: HTTP {status}: {body.strip()[:500]}")
        if sent < self.size:
            raise BenchError(f"{what}: curl sent {sent} bytes, expected at least {self.size}")
        if self.recording:
            used = tuple(b - a for a, b in zip(cpu, after, strict=True))
            self.results.cpu.setdefault(what, []).append((used[0], used[1], used[2]))
            idle, total = (b - a for a, b in zip(ticks, ticks_after, strict=True))
            self.results.idle.setdefault(what, []).append(idle / total if total > 0 else 0.0)
        return seconds, body

    def baseline(self, http: str, check: bool) -> None:
        rel = f"{VARIANT}/{self.next_serial()}/{ROOT_NAME}"
        self.prepare()
        what = f"baseline HTTP/{http}"
        seconds, _ = self.timed(
            ["-T", str(self.src), f"{self.s.dav_url}/images/{rel}"], what, self.s.dav_nginx, http
        )
        stored = self.s.dav_root / "images" / rel
        fsync = fsync_seconds(stored)
        if self.recording:
            # durable like an upload to the app, which answers once its file is fsynced
            self.results.add(what, seconds + fsync)
            self.results.dav_fsync.append(fsync)
            self.results.dav_alone.setdefault(what, []).append(seconds)
        if check and sha256_file(stored) != self.src_sha256:
            raise BenchError(f"WebDAV: {stored} differs from the source")
        shutil.rmtree(stored.parent)

    def upload(self, method: str, http: str, check: bool) -> None:
        ser = self.next_serial()
        rel = f"{VARIANT}/{ser}/{ROOT_NAME}"
        # untimed: lxd.tar.xz first, so the version is complete when the rootfs lands
        status, _, _, body = self.s.curl.request(
            ["-T", str(self.meta), f"{self.s.url}/images/{VARIANT}/{ser}/{META_NAME}"],
            self.timeout,
        )
        if status != 201:
            raise BenchError(f"PUT {META_NAME}: HTTP {status}: {body.strip()[:500]}")
        if method == "PUT":
            args = ["-T", str(self.src), f"{self.s.url}/images/{rel}"]
        else:
            args = ["-F", f"upload=@{self.src};filename={rel}", f"{self.s.url}/images/"]
        self.prepare()
        before = self.s.gunicorn.reset_peaks()
        what = f"{method} HTTP/{http}"
        seconds, body = self.timed(args, what, self.s.run_nginx, http)
        answered = time.monotonic()
        peaks = self.s.gunicorn.peaks()
        if self.recording:
            self.results.add(what, seconds)
        if peaks:
            growth = max(peaks[p] - before.get(p, peaks[p]) for p in peaks)
            self.results.rss.append((max(peaks.values()), growth))
        stored = self.s.root / "images" / rel
        self.wait_catalog(ser, listed=True)
        if self.recording:
            self.results.publish.append(time.monotonic() - answered)
        if check:
            self.check_stored(method, stored, body)
        shutil.rmtree(stored.parent)
        self.wait_catalog(ser, listed=False)

    def check_stored(self, method: str, stored: Path, body: str) -> None:
        try:
            files = json.loads(body)["files"]
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"{method}: unexpected response {body.strip()[:500]}") from None
        if len(files) != 1 or files[0].get("sha256") != self.src_sha256:
            raise BenchError(f"{method}: the response's sha256 is not the source's: {files}")
        if files[0].get("size") != self.size:
            raise BenchError(f"{method}: the response's size is not {self.size}: {files}")
        if sha256_file(stored) != self.src_sha256:
            raise BenchError(f"{method}: {stored} differs from the source")
        print(f"  {method}: stored file's sha256 matches the source")

    def wait_catalog(self, ser: str, listed: bool) -> None:
        deadline = time.monotonic() + CATALOG_DEADLINE
        while True:
            doc = read_catalog(self.s.root)
            present = doc is not None and any(s == ser for _, s in catalog_versions(doc))
            if present == listed:
                return
            if self.s.run_proc.poll() is not None:
                raise BenchError(f"lxd-image-server run exited ({self.s.run_proc.returncode})")
            if time.monotonic() > deadline:
                state = "list" if listed else "drop"
                raise BenchError(f"the watcher did not {state} {ser} in {CATALOG_DEADLINE:.0f} s")
            time.sleep(POLL)


# -- main -------------------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    exe = server_exe(args.exe)
    curl_command: list[str] = args.curl_command
    for tool in (curl_command[0], "nginx"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (apt-get install {tool})")
    size = args.size_mb * MiB
    with scratch_dir(args.workdir, args.keep, "bench-upload-") as work:
        work.chmod(0o755)  # nginx's workers drop to www-data only if it can reach the tree
        src_dir = work / "src"
        src_dir.mkdir()
        src, meta = src_dir / ROOT_NAME, src_dir / META_NAME
        print(f"writing {args.size_mb} MiB of random bytes ...", flush=True)
        write_random(src, size)
        write_random(meta, META_SIZE)
        settle()
        with servers(exe, work, curl_command) as s:
            bench = Bench(s, src, meta, size, args.timeout)
            bench.results.sha256_per_gib = sha256_seconds_per_gib(src)
            idle = {p: read_status(p).get("VmRSS", 0) for p in s.gunicorn.workers()}
            steps = [(h, m) for h in versions(args) for m in ("baseline", "PUT", "POST")]
            for rnd in range(args.warmup + args.repeat):
                rep = rnd - args.warmup
                k = rnd % len(steps)
                order = steps[k:] + steps[:k]
                what = f"warm-up {rnd + 1}" if rep < 0 else f"repetition {rep + 1} of {args.repeat}"
                shown = ", ".join(f"{m} HTTP/{h}" for h, m in order)
                print(f"{what}: {shown} ...", flush=True)
                bench.recording = rep >= 0
                for http, step in order:
                    if step == "baseline":
                        bench.baseline(http, check=rnd == 0)
                    else:
                        bench.upload(step, http, check=rnd == 0)
            workers = len(idle)
        report(args, bench.results, size, idle, workers)
    return 0


def versions(args: argparse.Namespace) -> list[str]:
    return ["1.1", "2"] if args.http == "both" else [args.http]


def report(
    args: argparse.Namespace, r: Results, size: int, idle: dict[int, int], workers: int
) -> None:
    mib = size / MiB
    rows: list[tuple[str, ...]] = []
    verdicts: list[str] = []
    for http in versions(args):
        base = median(r.seconds[f"baseline HTTP/{http}"])
        label = f"HTTP/{http} WebDAV PUT + fsync (baseline)"
        rows.append((label, f"{base:.3f}", f"{mib / base:.0f}", "1.00", "", ""))
        for step, label in (("PUT", "PUT (curl -T)"), ("POST", "POST (curl -F, multipart)")):
            t = median(r.seconds[f"{step} HTTP/{http}"])
            ratio = base / t
            ok = ratio >= TARGET
            speed, target = f"{mib / t:.0f}", f">= {TARGET:.2f}x"
            rows.append(
                (f"HTTP/{http} {label}", f"{t:.3f}", speed, f"{ratio:.2f}", target, verdict(ok))
            )
            verdicts.append(
                f"{step} HTTP/{http}: {mib / t:.0f} MiB/s, {ratio:.2f}x the durable WebDAV "
                f"baseline (target >= {TARGET}x) {verdict(ok)}"
            )
        alone = median(r.dav_alone[f"baseline HTTP/{http}"])
        speed, ratio_s = f"{mib / alone:.0f}", f"{base / alone:.2f}"
        rows.append(
            (f"HTTP/{http} (info) WebDAV PUT, no fsync", f"{alone:.3f}", speed, ratio_s, "", "")
        )
    print()
    print(
        f"upload of {mib:.0f} MiB over TLS to 127.0.0.1 with {args.curl}; "
        f"{machine_line()}; median of {args.repeat}; 'x baseline' is throughput over the "
        "baseline's of the same HTTP version"
    )
    print_table(("step", "seconds", "MiB/s", "x baseline", "target", ""), rows)
    print("runs (s): " + " | ".join(f"{k} {runs(v)}" for k, v in sorted(r.seconds.items())))
    print(f"  WebDAV fsync (in the baseline) {runs(r.dav_fsync)}")
    if r.publish:
        print(
            f"publish latency after an upload (its answer -> listed in images.json): median "
            f"{median(r.publish):.3f} s, runs {runs(r.publish)}"
        )
    report_cpu(r, size)
    idle_mib = max(idle.values(), default=0) / 1024
    if r.rss:
        peak = max(p for p, _ in r.rss) / 1024
        growth = max(g for _, g in r.rss) / 1024
        print(
            f"upload server RSS ({workers} gunicorn workers): idle {idle_mib:.1f} MiB per worker, "
            f"peak during the uploads {peak:.1f} MiB (largest VmHWM), growth over the RSS "
            f"before each upload at most {growth:.1f} MiB"
        )
    print()
    for line in verdicts:
        print(line)


def report_cpu(r: Results, size: int) -> None:
    """CPU seconds per upload and per GiB, the machine's idle share, and how much of the
    difference to the baseline is the hashing the product needs."""
    gib = size / (1024 * MiB)
    rows = []
    totals: dict[str, float] = {}
    for step in sorted(r.cpu):
        client, web, app = (median([u[i] for u in r.cpu[step]]) for i in range(3))
        totals[step] = client + web + app
        rows.append(
            (
                "  " + step,
                f"{client:.2f}",
                f"{web:.2f}",
                "" if "baseline" in step else f"{app:.2f}",
                f"{totals[step]:.2f}",
                f"{totals[step] / gib:.2f}",
                f"{median(r.idle.get(step, [0.0])):.0%}",
            )
        )
    print(
        f"CPU seconds per upload (median; the machine has {os.cpu_count()} CPUs; idle: the "
        "share of the machine's CPU time no process used during the upload):"
    )
    print_table(("  step", "curl", "nginx workers", "upload app", "total", "per GiB", "idle"), rows)
    hashing = 2 * r.sha256_per_gib * gib
    print(
        f"hashing the product needs: sha256 takes {r.sha256_per_gib:.2f} CPU-s per GiB here; "
        f"the app hashes each byte twice (the file's sha256 and the combined fingerprint, "
        f"primed with the metadata already there), {hashing:.2f} CPU-s per upload:"
    )
    for step in sorted(totals):
        if "baseline" in step:
            continue
        base = totals.get(f"baseline {step.split()[-1]}")
        app = median([u[2] for u in r.cpu[step]])
        extra = "" if base is None else f", {totals[step] - base:.2f} more than the baseline"
        share = f"{hashing / app:.0%}" if app > 0 else "n/a"
        print(f"  {step}: {share} of the app's CPU; the path costs {totals[step]:.2f} CPU-s{extra}")


if __name__ == "__main__":
    main_wrapper(lambda: run(sys.argv[1:]))
