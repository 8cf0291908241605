"""`health`: do the three parts `run` started still answer?

- nginx: the catalog's index.json over the URL `run` noted in STATE/run/url (HTTP or HTTPS;
  the certificate is not verified: this checks that our nginx answers, not who trusts it);
- the upload server: a request over its unix socket STATE/run/upload.sock gets an HTTP answer;
- the watcher: STATE/watch.pid names a live (not zombie) `lxd-image-server watch` process.

Used by the container's HEALTHCHECK and the Kubernetes probes; exit status 0 only if all pass.
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from lxd_image_server.config import StateDir

DEFAULT_TIMEOUT = 5.0
CATALOG = "streams/v1/index.json"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def noted_url(state_dir: str) -> str | None:
    """The URL `run` serves on, as it noted it at start; None if it never got that far."""
    try:
        with open(StateDir(state_dir).url_file, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def check_nginx(url: str, timeout: float = DEFAULT_TIMEOUT) -> Check:
    target = url.rstrip("/") + "/" + CATALOG
    context = None
    if target.startswith("https:"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(target, timeout=timeout, context=context) as response:
            status = int(response.status)
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return Check("nginx", False, f"{target}: {reason}")
    # 401: a --private server asks for credentials even for the catalog; it still answered
    return Check("nginx", status in (200, 401), f"{target} answered {status}")


def check_upload_socket(path: str, timeout: float = DEFAULT_TIMEOUT) -> Check:
    request = b"GET /images/ HTTP/1.0\r\nHost: localhost\r\n\r\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(request)
            first = s.recv(64)
    except OSError as e:
        return Check("upload", False, f"{path}: {e.strerror or e}")
    if not first.startswith(b"HTTP/"):
        return Check("upload", False, f"{path}: no HTTP answer ({first[:20]!r})")
    status = first.split(b" ", 2)[1].decode("ascii", "replace") if b" " in first else "?"
    return Check("upload", True, f"{path} answered {status}")


def _process_state(pid: int) -> str:
    """One letter from /proc/PID/stat (R, S, D, Z, ...); raises OSError if there is no PID."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # "PID (COMM) STATE ...": COMM may contain spaces and parentheses
    return stat[stat.rindex(b")") + 2 :].split(b" ", 1)[0].decode("ascii", "replace")


def check_watcher(pid_file: str) -> Check:
    try:
        with open(pid_file, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return Check("watcher", False, f"not running ({pid_file} is missing or empty)")
    try:
        state = _process_state(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return Check("watcher", False, f"not running (pid {pid} from {pid_file} is gone)")
    if state in ("Z", "X"):
        return Check("watcher", False, f"pid {pid} has exited (state {state})")
    if not is_watcher(argv):
        return Check("watcher", False, f"pid {pid} from {pid_file} is not a watcher")
    return Check("watcher", True, f"pid {pid} is running")


def is_watcher(argv: Sequence[bytes]) -> bool:
    """Whether a process's arguments are this program's `watch` (as the unit and `run` start
    it: tests/unit/test_command_lines.py)."""
    ours = any(b"lxd_image_server" in a or b"lxd-image-server" in a for a in argv)
    return ours and b"watch" in argv


def check_all(
    state_dir: str, url: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[Check]:
    state = StateDir(state_dir)
    url = url or noted_url(state_dir)
    nginx = (
        check_nginx(url, timeout)
        if url
        else Check("nginx", False, f"no URL: {state.url_file} is missing (is `run` up?)")
    )
    return [
        nginx,
        check_upload_socket(state.upload_socket, timeout),
        check_watcher(state.watch_pid),
    ]
