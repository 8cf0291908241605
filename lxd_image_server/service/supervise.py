"""Child processes run as one unit (what `run` does with nginx, the upload server, the watcher
and the syncer): started in order, each in its own session and ended with us even by SIGKILL;
on SIGTERM/SIGINT, or when one of them dies, the rest are stopped in a given order.

Knows nothing of what the children are: `run` (run.py) names them, says when each is ready, in
which order they stop and with which signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from lxd_image_server.service.run_user import Identity

log = logging.getLogger(__name__)

#: Seconds a child may take to stop before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds the children may take to be ready (a loaded machine, a large tree to watch) before
#: the supervisor gives up and stops them all.
READY_TIMEOUT = 600.0

#: A child's readiness, given its pid: True once it serves.
Ready = Callable[[int], bool]


@dataclass(frozen=True)
class Ended:
    """How the children ended: `failed` says which one died or was not ready, and how; ""
    when a stop signal (`signal_name`) ended them all."""

    failed: str = ""
    signal_name: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Starts children, waits for a stop signal or a death, stops the rest.

    A child named in `gated` starts only once every other one is ready (`ready[name](pid)`,
    or just started when it has no check). `stop_order`: the children in the order they are
    stopped (the others after them); `stop_signals`: a child's own stop signal (SIGTERM if
    none).
    """

    def __init__(
        self,
        commands: dict[str, list[str]],
        env: dict[str, str],
        ready: dict[str, Ready] | None = None,
        gated: frozenset[str] = frozenset(),
        ready_timeout: float = READY_TIMEOUT,
        users: dict[str, Identity] | None = None,
        stop_order: Sequence[str] = (),
        stop_signals: Mapping[str, signal.Signals] | None = None,
    ) -> None:
        self.commands = commands
        self.env = env
        #: who each child runs as (started as root); missing: as we do
        self.users = users or {}
        self.ready = ready or {}
        self.gated = gated
        self.ready_timeout = ready_timeout
        self.stop_order = [*stop_order, *(n for n in commands if n not in stop_order)]
        self.stop_signals = dict(stop_signals or {})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stop = threading.Event()
        self.signal_name = ""

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stop.set()

    def _start(self, names: Sequence[str]) -> None:
        for name in names:
            cmd = self.commands[name]
            log.info("starting %s: %s", name, " ".join(cmd))
            # own process group: a terminal's Ctrl-C reaches us only, we stop them in order
            who = self.users.get(name)
            self.procs[name] = subprocess.Popen(
                cmd,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # runs after the change of user: it stays set
                **(who.popen() if who else {}),
            )

    def _dead(self) -> str:
        return next((n for n, p in self.procs.items() if p.poll() is not None), "")

    def _wait_ready(self) -> str:
        """Waits until every started child is ready. Returns "" when they are, else why not
        (one died, or took too long); "" also when asked to stop."""
        deadline = time.monotonic() + self.ready_timeout
        waiting = [n for n in self.procs if n in self.ready]
        while waiting:
            dead = self._dead()
            if dead:
                return (
                    f"{dead} exited with status {self.procs[dead].returncode} before it was ready"
                )
            waiting = [n for n in waiting if not self.ready[n](self.procs[n].pid)]
            if not waiting:
                break
            if time.monotonic() > deadline:
                return f"{', '.join(waiting)} not ready after {self.ready_timeout:.0f} s"
            if self.stop.wait(0.05):
                return ""
        return ""

    def run(self) -> Ended:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start([n for n in self.commands if n not in self.gated])
            why = self._wait_ready()
            if why:
                log.error("%s; stopping everything", why)
                self._stop_all()
                return Ended(failed=why)
            if not self.stop.is_set():
                self._start([n for n in self.commands if n in self.gated])
                log.info("ready: %s", ", ".join(self.procs))
            failed = ""
            while not self.stop.wait(0.2):
                dead = self._dead()
                if dead:
                    failed = f"{dead} exited with status {self.procs[dead].returncode}"
                    log.error("%s; stopping everything", failed)
                    break
            if not failed:
                log.info("received %s; stopping", self.signal_name)
            self._stop_all()
            return Ended(failed=failed, signal_name="" if failed else self.signal_name)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._stop_all()

    def _stop_all(self) -> None:
        for name in self.stop_order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(self.stop_signals.get(name, signal.SIGTERM))
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, STOP_TIMEOUT)
                p.kill()
                p.wait()
