"""The configured syncs ([sync.NAME]): run all, or those due, or forever on their schedule.

Each sync's last run (its start, and whether it went through) is recorded in the state
directory (config.StateDir.sync_state, syncs.json), so the package's timer (`sync --due`,
hourly) and `run` (`sync --repeat`) run each one every `interval` seconds, whoever ran it last.
A failed sync waits its interval too: a broken upstream is not asked again every hour.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lxd_image_server.config import Paths, StateDir
from lxd_image_server.fsutil import (
    TooLarge,
    exclusive_lock,
    load_json_bounded,
    read_regular,
    write_atomic,
)
from lxd_image_server.ops.sync_fetch import SyncError
from lxd_image_server.ops.sync_select import FilterError, parse_filters
from lxd_image_server.ops.syncing import SyncRequest, SyncResult, sync
from lxd_image_server.progress import ProgressStart
from lxd_image_server.settings import Settings, SyncConfig

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 1 << 20
#: the longest `--repeat` sleeps before it looks again (a reload of the settings aside)
MAX_TICK = 300.0


@dataclass(frozen=True)
class Outcome:
    name: str
    result: SyncResult | None
    #: why it failed as a whole (bad filters, the upstream's index or catalog), or ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.result is not None and not self.result.failed


def load_state(state_dir: str) -> dict[str, dict[str, Any]]:
    """name -> {"started": seconds, "ok": bool}; {} when missing or unreadable (logged)."""
    path = StateDir(state_dir).sync_state
    try:
        doc = load_json_bounded(read_regular(path, MAX_STATE_BYTES), MAX_STATE_BYTES, 4)
    except FileNotFoundError:
        return {}
    except (OSError, TooLarge, ValueError) as e:
        log.warning("%s: unreadable (%s); every configured sync counts as due", path, e)
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, dict)}


def _record(state_dir: str, name: str, started: float, ok: bool) -> None:
    sd = StateDir(state_dir)
    with exclusive_lock(sd.sync_state + ".lock"):
        state = load_state(state_dir)
        state[name] = {"started": int(started), "ok": ok}
        write_atomic(sd.sync_state, (_dump(state) + "\n").encode())


def _dump(state: dict[str, dict[str, Any]]) -> str:
    return json.dumps(state, sort_keys=True, indent=1)


def next_due(cfg: SyncConfig, state: dict[str, dict[str, Any]]) -> float:
    """When `cfg` is due (seconds since the epoch; 0: never ran)."""
    started = state.get(cfg.name, {}).get("started")
    if isinstance(started, int | float) and not isinstance(started, bool):
        return float(started) + cfg.interval
    return 0.0


def due(
    syncs: Iterable[SyncConfig], state: dict[str, dict[str, Any]], now: float
) -> list[SyncConfig]:
    return [c for c in syncs if next_due(c, state) <= now]


def request_of(cfg: SyncConfig) -> SyncRequest:
    """FilterError when its filters are not KEY=VALUE with known keys."""
    return SyncRequest(cfg.url, parse_filters(cfg.filters), cfg.keep, cfg.ca, cfg.timeout)


def run_one(
    cfg: SyncConfig,
    paths: Paths,
    settings: Settings,
    progress_start: ProgressStart | None = None,
) -> Outcome:
    started = time.time()
    log.info("sync %s: %s", cfg.name, cfg.url.split("@")[-1])
    try:
        result = sync(request_of(cfg), paths, settings, progress_start)
    except (FilterError, SyncError, OSError) as e:
        log.error("sync %s: %s", cfg.name, e)
        outcome = Outcome(cfg.name, None, str(e))
    else:
        outcome = Outcome(cfg.name, result)
    try:
        _record(paths.state_dir, cfg.name, started, outcome.ok)
    except OSError as e:
        log.error("sync %s: cannot record its run in %s: %s", cfg.name, paths.state_dir, e)
    return outcome


def run_configured(
    paths: Paths,
    settings: Settings,
    only_due: bool = False,
    progress_start: ProgressStart | None = None,
) -> list[Outcome]:
    """Every configured sync (or those due), one after the other."""
    chosen: Iterable[SyncConfig] = settings.syncs
    if only_due:
        chosen = due(settings.syncs, load_state(paths.state_dir), time.time())
    return [run_one(c, paths, settings, progress_start) for c in chosen]


def repeat(
    paths: Paths,
    load_settings: Callable[[], Settings],
    stop: threading.Event,
) -> None:
    """Runs the configured syncs on their schedule until `stop` is set (what `run` runs):
    the settings are read again before each round, so an edit needs no restart."""
    while not stop.is_set():
        settings = load_settings()
        run_configured(paths, settings, only_due=True)
        state = load_state(paths.state_dir)
        now = time.time()
        waits = [next_due(c, state) - now for c in settings.syncs]
        stop.wait(max(1.0, min([MAX_TICK, *waits])))
