"""Podman as these machines run it, our container image, and an nginx TLS proxy.

Podman runs as root with runc and cgroupfs (no systemd), the host's network, and explicit
ulimits no higher than the host's hard limits (the engine's defaults can be higher, which runc
refuses). Containers are named lis-<session label>-<role> and removed by name afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.servers import REPO, CommandError, Pki, run

IMAGE = "lxd-image-server:latest"
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager=cgroupfs")
#: the image's user; the volumes on the host must be its
UID = 10001
DEADLINE = 90.0
NGINX = Path("/usr/sbin/nginx")


def ulimits() -> list[str]:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else min(nofile, 1048576)
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def podman(
    *args: str, timeout: float = 120, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run([*PODMAN, *args], timeout=timeout, check=check, input=input)


def build_image() -> float:
    """`make image-build` (container.mk) from the dist/apt `make deb` wrote; returns seconds."""
    if shutil.which("podman") is None:
        raise AssertionError("podman is missing: run `make container-deps`")
    if not (REPO / "dist" / "apt" / "Packages").is_file():
        raise AssertionError("dist/apt is missing: run `make deb` (or `make container-test`)")
    start = time.monotonic()
    run(["make", "-C", REPO, "-f", "container.mk", "image-build"], timeout=1800)
    return time.monotonic() - start


def owned_dir(path: Path, mode: int = 0o755) -> Path:
    """A directory the container's user owns (a volume)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    path.chmod(mode)
    return path


@dataclass
class Volumes:
    root: Path
    state: Path

    @classmethod
    def make(cls, base: Path) -> Volumes:
        return cls(owned_dir(base / "root"), owned_dir(base / "state"))

    def args(self) -> list[str]:
        return [
            "-v",
            f"{self.root}:/var/www/simplestreams",
            "-v",
            f"{self.state}:/var/lib/lxd-image-server",
        ]

    def catalog(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.root / "streams/v1/images.json").read_bytes())
        return doc


@dataclass
class Container:
    name: str
    volumes: Volumes
    env: dict[str, str]
    port: int
    mounts: list[str] = field(default_factory=list)
    plain: bool = False

    @property
    def url(self) -> str:
        return f"{'http' if self.plain else 'https'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        """`podman run -d`, as a user would (read-only root filesystem, as in kubernetes/)."""
        self.remove()
        env = {"LISTEN": f"127.0.0.1:{self.port}", **self.env}
        if self.plain:
            env["PLAIN_HTTP"] = "1"
        argv = ["run", "-d", "--name", self.name, "--network", "host", "--read-only"]
        # no systemd here to schedule the periodic check; `podman healthcheck run` still works
        argv += ["--health-interval", "disable", *ulimits(), *self.volumes.args(), *self.mounts]
        for k, v in env.items():
            argv += ["-e", f"{k}={v}"]
        podman(*argv, IMAGE)

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)

    def logs(self) -> str:
        p = podman("logs", self.name, check=False)
        return p.stdout + p.stderr

    def state(self) -> dict[str, Any]:
        out = podman("inspect", "--type", "container", "--format", "{{json .State}}", self.name)
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, check=check)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """`podman healthcheck run`: the image's HEALTHCHECK, exit 0 healthy, 1 unhealthy."""
        return podman("healthcheck", "run", self.name, check=False, timeout=60)

    def wait_healthy(self, deadline: float = DEADLINE) -> None:
        end = time.monotonic() + deadline
        while True:
            if not self.state().get("Running"):
                raise AssertionError(f"{self.name} stopped:\n{self.logs()}")
            if self.healthcheck().returncode == 0:
                return
            if time.monotonic() > end:
                health = self.exec("lxd-image-server", "health", check=False)
                raise AssertionError(
                    f"{self.name} not healthy after {deadline:.0f} s:\n{health.stdout}\n"
                    f"{self.logs()}"
                )
            time.sleep(0.5)

    def wait_exited(self, deadline: float = DEADLINE) -> int:
        end = time.monotonic() + deadline
        while self.state().get("Running"):
            if time.monotonic() > end:
                raise AssertionError(f"{self.name} still runs after {deadline:.0f} s")
            time.sleep(0.2)
        return int(self.state()["ExitCode"])

    def stop(self, timeout: int = 30) -> tuple[int, float]:
        """`podman stop` (SIGTERM, SIGKILL after `timeout`): (exit code, seconds taken)."""
        start = time.monotonic()
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 60)
        return int(self.state()["ExitCode"]), time.monotonic() - start

    def processes(self) -> list[tuple[int, int, str]]:
        """(pid, ppid, command line) of every process in the container."""
        out = self.exec("ps", "-eo", "pid=,ppid=,args=").stdout
        procs = []
        for line in out.splitlines():
            pid, ppid, args = line.split(None, 2)
            procs.append((int(pid), int(ppid), args))
        return procs


def curl(*args: str | Path, user: str | None = None, cacert: Path | None = None) -> tuple[int, str]:
    """(HTTP status, body); 0 and curl's message when there was no HTTP answer."""
    cmd = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "120"]
    if user:
        cmd += ["-u", user]
    if cacert:
        cmd += ["--cacert", str(cacert)]
    out = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=180)
    body, _, code = out.stdout.rpartition("\n")
    status = int(code or 0)
    return status, body if status else out.stderr


PROXY_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {work}/nginx.pid;
error_log {work}/error.log info;

events {{
    worker_connections 128;
}}

http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/client_body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;

    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;

        # what a user puts in front of PLAIN_HTTP=1: TLS here, big streamed uploads
        client_max_body_size 0;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


class TlsProxy:
    """Debian's nginx terminating TLS with the test CA's certificate, proxying to `upstream`."""

    def __init__(self, pki: Pki, workdir: Path, port: int, upstream: int) -> None:
        self.pki = pki
        self.work = workdir
        self.port = port
        self.upstream = upstream
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not NGINX.exists():
            raise AssertionError(f"{NGINX} is missing: run `make container-deps`")
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(
            PROXY_CONF.format(
                work=self.work,
                port=self.port,
                upstream=self.upstream,
                cert=self.pki.server_cert,
                key=self.pki.server_key,
            )
        )
        base: Sequence[str | Path] = [NGINX, "-p", self.work, "-c", conf, "-e", "stderr"]
        run([*base, "-t"], timeout=30)
        with open(self.work / "stdout.log", "wb") as out:
            self.proc = subprocess.Popen(
                [os.fspath(a) for a in base], stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + 30
        while curl(f"{self.url}/streams/v1/index.json", cacert=self.pki.ca_cert)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                log = (self.work / "stdout.log").read_text()
                raise AssertionError(f"the TLS proxy does not serve the catalog:\n{log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def remove_containers(names: Sequence[str]) -> None:
    for name in names:
        with contextlib.suppress(CommandError):
            podman("rm", "-f", "-t", "0", name, check=False)
