"""The running watcher's pid file: the watcher writes it once it sees every upload (`run`
waits for it; `health` reads it), and `lxd-image-server reload` finds the watcher by it to
send it SIGHUP."""

from __future__ import annotations

import os
import signal

#: the largest pid Linux gives (PID_MAX_LIMIT on 64 bits); a larger number names no process
#: (and os.kill would raise OverflowError for some)
PID_MAX_LIMIT = 1 << 22


def write_pid_file(path: str) -> None:
    """Where `lxd-image-server reload` finds the running watcher."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(path + ".tmp", path)


def signal_watcher(pid_file: str, signum: int = signal.SIGHUP) -> int:
    """Sends `signum` to the watcher named in `pid_file`; returns its pid.

    Raises ProcessLookupError (with a clear message) when no watcher runs.
    """
    pid = read_pid_file(pid_file)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        raise ProcessLookupError(
            f"no running watcher (pid {pid} from {pid_file} is gone)"
        ) from None
    if b"watch" not in cmdline.split(b"\0"):  # an argument, not a part of one ('watchdog')
        raise ProcessLookupError(f"pid {pid} from {pid_file} is not a watcher")
    os.kill(pid, signum)
    return pid


def read_pid_file(pid_file: str) -> int:
    """The pid `pid_file` names (read bounded); ProcessLookupError (with a clear message) when
    it is missing, empty or names no process (0 or less: os.kill would take it for a group)."""
    try:
        with open(pid_file, "rb") as f:
            pid = int(f.read(32).strip())
    except (OSError, ValueError):
        raise ProcessLookupError(f"no running watcher ({pid_file} is missing or empty)") from None
    if not 0 < pid <= PID_MAX_LIMIT:
        raise ProcessLookupError(f"no running watcher ({pid_file} names no process)")
    return pid
