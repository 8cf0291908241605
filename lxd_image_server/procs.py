"""Whether a process is alive."""

from __future__ import annotations

import os


def pid_alive(pid: object) -> bool:
    """True if `pid` (anything read from a pid file or a state file) names a live process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
