"""The mirrors' state file (<state>/mirrors.json) and `mirror status`'s text.

Each worker records its mirror's last push, last error and pending push; `mirror status` reads
the file back, maybe while the watcher is not running, and says what it means.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lxd_image_server.config import StateDir
from lxd_image_server.fsutil import write_atomic
from lxd_image_server.mirror.transport import describe_target
from lxd_image_server.procs import pid_alive
from lxd_image_server.settings import MirrorConfig

log = logging.getLogger(__name__)


def utc_stamp(ts: float) -> str:
    """`ts` (seconds since the epoch) as the state file writes times."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class MirrorStatus:
    """What `mirror status` shows of one mirror (also its JSON form)."""

    target: str
    #: never (no push yet), ok, failing
    state: str = "never"
    pending: bool = False
    pushing: bool = False
    last_success: str | None = None
    last_duration: float | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    #: failed pushes in a row
    failures: int = 0
    next_attempt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> MirrorStatus | None:
        if not isinstance(doc, dict):
            return None
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return None


def state_path(state_dir: str) -> str:
    return StateDir(state_dir).mirror_state


def read_state(state_dir: str) -> dict[str, Any] | None:
    try:
        with open(state_path(state_dir), "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_state(state_dir: str, mirrors: dict[str, MirrorStatus], merge: bool = False) -> None:
    """Writes <state>/mirrors.json atomically. `merge`: keeps the other mirrors' entries."""
    entries: dict[str, Any] = {}
    if merge:
        old = (read_state(state_dir) or {}).get("mirrors")
        if isinstance(old, dict):
            entries.update(old)
    entries.update({name: st.to_json() for name, st in mirrors.items()})
    doc = {"pid": os.getpid(), "updated": utc_stamp(time.time()), "mirrors": entries}
    os.makedirs(state_dir, exist_ok=True)
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(state_path(state_dir), data)


def _ago(iso: str | None, now: float) -> str:
    if not iso:
        return "never"
    try:
        ts = dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return iso
    secs = now - ts
    if secs < 0:
        return f"{iso} (in {_span(-secs)})"
    return f"{iso} ({_span(secs)} ago)"


def _span(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f} s"
    if secs < 5400:
        return f"{secs / 60:.0f} min"
    if secs < 172800:
        return f"{secs / 3600:.1f} h"
    return f"{secs / 86400:.0f} days"


def describe(
    doc: dict[str, Any] | None, configured: Sequence[MirrorConfig], now: float
) -> tuple[list[str], bool]:
    """`mirror status`: the lines to print, and whether every mirror's last push worked."""
    lines: list[str] = []
    recorded = doc.get("mirrors") if doc else None
    entries = recorded if isinstance(recorded, dict) else {}
    if doc is None:
        lines.append("no mirror state recorded yet (the watcher writes it once it pushes)")
    else:
        pid = doc.get("pid")
        alive = "" if pid_alive(pid) else ", which is no longer running"
        lines.append(f"recorded {_ago(doc.get('updated'), now)} by pid {pid}{alive}")
    names = sorted({*entries, *(m.name for m in configured)})
    if not names:
        lines.append("no mirrors configured ([mirrors.NAME] in the configuration)")
        return lines, True
    all_ok = True
    by_name = {m.name: m for m in configured}
    for name in names:
        st = MirrorStatus.from_json(entries.get(name))
        m = by_name.get(name)
        lines.append("")
        if m is None:
            lines.append(f"{name}: {st.target if st else '?'} (no longer configured)")
        else:
            lines.append(f"{name}: {describe_target(m)}")
            if st is not None and st.target != describe_target(m):
                lines.append(f"  recorded for {st.target} (reload to push to the new target)")
        if st is None:
            lines.append("  state:        not pushed yet")
            all_ok = False
            continue
        state = st.state
        if st.state == "failing":
            state = f"failing ({st.failures} attempt(s) in a row)"
        extra = [x for x, on in (("pushing now", st.pushing), ("push pending", st.pending)) if on]
        lines.append(f"  state:        {state}{'; ' + ', '.join(extra) if extra else ''}")
        took = f", took {st.last_duration:.1f} s" if st.last_duration is not None else ""
        lines.append(
            f"  last success: {_ago(st.last_success, now)}{took if st.last_success else ''}"
        )
        if st.last_error:
            lines.append(f"  last error:   {_ago(st.last_error_at, now)}: {st.last_error}")
        if st.next_attempt and st.state == "failing":
            lines.append(f"  next attempt: {_ago(st.next_attempt, now)}")
        if st.state != "ok":
            all_ok = False
    return lines, all_ok
