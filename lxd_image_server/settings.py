"""The layered configuration: defaults < /etc/lxd-image-server/config.toml < conf.d/*.toml
< ~/.config/lxd-image-server/config.toml < --config FILE < $LXD_IMAGE_SERVER_CONFIG < the
environment flags (ALLOW_OVERWRITES, ALLOW_DELETES, DEBUG). Later wins, key by key.

A missing file is fine; a malformed one is a ConfigError naming the file and the line.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lxd_image_server import envnames
from lxd_image_server.config import (
    DEFAULT_MIRROR_USER,
    DEFAULT_ROOT,
    DEFAULT_STATE_DIR,
    ConfigError,
)
from lxd_image_server.retention_policy import KeepRule, PolicyError, RetentionPolicy

SYSTEM_DIR = "/etc/lxd-image-server"
DEFAULT_GRACE = 3600
#: uploads in progress per credential: one CI job's `xargs -P8 curl`
DEFAULT_PARALLEL_UPLOADS = 8
MAX_PARALLEL_UPLOADS = 16
#: [deltas] min_size: roots smaller than this get no delta made. A delta saves at most the
#: root's bytes; below about a MiB that is less than what it costs each client (a second
#: request, an xdelta3 run, a fingerprint check) and the server (an xdelta3 run per new version and
#: base, then a check). The smallest distribution images (Alpine) are a few MiB and keep theirs.
DEFAULT_DELTA_MIN_SIZE = 1 << 20
#: [deltas] check_interval: an uploader renaming a delta back and forth (a new ctime each time)
#: buys one xdelta3 run per hour for it, each at most [deltas] timeout long
DEFAULT_DELTA_CHECK_INTERVAL = 3600
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class MirrorConfig:
    name: str
    host: str
    user: str = DEFAULT_MIRROR_USER
    key_path: str | None = None
    port: int = 22
    path: str = DEFAULT_ROOT


@dataclass(frozen=True)
class DeltaSettings:
    """[deltas]: delta updates (the configuration of catalog/deltawork.DeltaService)."""

    enabled: bool = True
    bases: int = 1
    max_ratio: float = 0.5
    timeout: int = 1800
    #: roots smaller than this (bytes) get no delta made
    min_size: int = DEFAULT_DELTA_MIN_SIZE
    #: seconds between two xdelta3 runs (make or check) for the same delta path in the
    #: watcher, whatever its files became meanwhile; a FAILED run waits this, doubled after
    #: each failure in a row (catalog/deltas.due)
    check_interval: int = DEFAULT_DELTA_CHECK_INTERVAL


#: [sync.NAME] interval when none is given: once a day
DEFAULT_SYNC_INTERVAL = 86400
DEFAULT_SYNC_TIMEOUT = 60.0


@dataclass(frozen=True)
class SyncConfig:
    """[sync.NAME]: an upstream remote synced on a schedule (ops/syncing.py)."""

    name: str
    url: str
    #: KEY=VALUE, as `sync --filter` takes them (checked by the sync itself)
    filters: tuple[str, ...] = ()
    keep: int = 1
    #: seconds between two syncs
    interval: int = DEFAULT_SYNC_INTERVAL
    ca: str | None = None
    timeout: float = DEFAULT_SYNC_TIMEOUT


@dataclass(frozen=True)
class Settings:
    root_dir: str = DEFAULT_ROOT
    state_dir: str = DEFAULT_STATE_DIR
    allow_overwrites: bool = False
    allow_deletes: bool = False
    #: bytes per uploaded file; None: no limit
    max_upload_size: int | None = None
    #: uploads one credential (anonymous: one client address) may have in progress at once
    max_parallel_uploads: int = DEFAULT_PARALLEL_UPLOADS
    debug: bool = False
    #: seconds between a version leaving the catalog (prune/remove) and its files going
    prune_grace: int = DEFAULT_GRACE
    #: [retention]: versions kept per product, applied at every publish
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    mirrors: tuple[MirrorConfig, ...] = ()
    #: [sync.NAME]: upstreams synced on a schedule
    syncs: tuple[SyncConfig, ...] = ()
    deltas: DeltaSettings = DeltaSettings()
    #: a logging.config.dictConfig table, or None for the built-in setup
    logging: dict[str, Any] | None = None
    #: the files read, in order
    sources: tuple[str, ...] = field(default=())


# -- reading ----------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from e
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        # the message ends with "(at line N, column M)"
        raise ConfigError(f"{path}: {e}") from e


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_files(
    explicit: str | None, env: Mapping[str, str], system_dir: str, home: str | None
) -> list[tuple[Path, bool]]:
    """(path, must_exist) in the order they apply."""
    base = Path(system_dir)
    files: list[tuple[Path, bool]] = [(base / "config.toml", False)]
    conf_d = base / "conf.d"
    if conf_d.is_dir():
        files += [(p, False) for p in sorted(conf_d.glob("*.toml"))]
    if home:
        files.append((Path(home) / ".config" / "lxd-image-server" / "config.toml", False))
    if explicit:
        files.append((Path(explicit), True))
    if env.get(envnames.CONFIG):
        files.append((Path(env[envnames.CONFIG]), True))
    return files


def load(
    explicit: str | None = None,
    env: Mapping[str, str] | None = None,
    system_dir: str = SYSTEM_DIR,
    home: str | None = None,
) -> Settings:
    """Reads every layer and validates the result. Raises ConfigError."""
    env = os.environ if env is None else env
    if home is None:
        home = env.get("HOME")
    merged: dict[str, Any] = {}
    sources: list[str] = []
    where: dict[str, str] = {}  # top-level section -> last file that set it, for errors
    for path, must_exist in config_files(explicit, env, system_dir, home):
        doc = _read(path)
        if doc is None:
            if must_exist:
                raise ConfigError(f"{path}: no such file")
            continue
        sources.append(str(path))
        for key in doc:
            where[key] = str(path)
        merged = _merge(merged, doc)
    return _validate(merged, env, tuple(sources), where)


# -- validating --------------------------------------------------------------------------------

_SECTIONS = {"paths", "upload", "prune", "retention", "deltas", "mirrors", "sync", "logging"}
_KEYS = {
    "paths": {"root", "state_dir"},
    "upload": {"allow_overwrites", "allow_deletes", "max_size", "max_parallel"},
    "prune": {"grace_period"},
    "retention": {"keep", "rule"},
    "deltas": {"enabled", "bases", "max_ratio", "timeout", "min_size", "check_interval"},
}
_RULE_KEYS = {"match", "keep"}
_MIRROR_KEYS = {"remote", "url", "user", "key_path", "port", "path"}
_SYNC_KEYS = {"url", "filters", "keep", "interval", "ca", "timeout"}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"environment {name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def _typed(value: Any, kind: type, what: str, src: str) -> Any:
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{src}: {what} must be a number, not {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{src}: {what} must be a {kind.__name__}, not {value!r}")
    return value


def _bytes(value: Any, what: str, src: str) -> int:
    """A size: bytes as a number, or a string with K/M/G/T (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        factor = 1
        for i, unit in enumerate("KMGT", start=1):
            if text.endswith(unit):
                factor, text = 1024**i, text[:-1]
        try:
            n = int(float(text) * factor)
        except ValueError:
            raise ConfigError(f"{src}: {what} {value!r} is not a size") from None
    else:
        raise ConfigError(f"{src}: {what} must be a number of bytes or like '10G'")
    if n < 0:
        raise ConfigError(f"{src}: {what} must not be negative")
    return n


def _size(value: Any, src: str) -> int | None:
    """max_size: bytes as a number, or a string with K/M/G/T (powers of 1024); 0: no limit."""
    return _bytes(value, "upload.max_size", src) or None


def _parallel(value: Any, src: str) -> int:
    """max_parallel: 1 to MAX_PARALLEL_UPLOADS (the upload app has 32 threads: one
    credential must leave most of them to the others)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    n = _typed(value, int, "upload.max_parallel", src)
    assert isinstance(n, int)
    if not 1 <= n <= MAX_PARALLEL_UPLOADS:
        raise ConfigError(f"{src}: upload.max_parallel must be 1 to {MAX_PARALLEL_UPLOADS}")
    return n


def _count(value: Any, what: str, src: str) -> int:
    n = _typed(value, int, what, src)
    if n < 0:
        raise ConfigError(f"{src}: {what} must not be negative (0 keeps every version)")
    assert isinstance(n, int)
    return n


def _retention(table: Mapping[str, Any], src: str) -> RetentionPolicy:
    keep = _count(table.get("keep", 0), "retention.keep", src)
    rules = table.get("rule", [])
    if not isinstance(rules, list):
        raise ConfigError(
            f'{src}: retention.rule must be a list of tables: [[retention.rule]] match = "os/*" '
            "keep = N"
        )
    parsed: list[KeepRule] = []
    for i, rule in enumerate(rules, start=1):
        what = f"retention.rule #{i}"
        if not isinstance(rule, Mapping):
            raise ConfigError(f"{src}: {what} must be a table ([[retention.rule]])")
        if set(rule) != _RULE_KEYS:
            raise ConfigError(
                f"{src}: {what} must have exactly match and keep "
                f"(has {', '.join(sorted(rule)) or 'nothing'})"
            )
        pattern = _typed(rule["match"], str, f"{what} match", src)
        count = _count(rule["keep"], f"{what} keep", src)
        try:
            parsed.append(KeepRule(pattern, count))
        except PolicyError as e:
            raise ConfigError(f"{src}: {what}: {e}") from None
    return RetentionPolicy(keep, tuple(parsed))


def _mirror(name: str, table: Any, src: str) -> MirrorConfig:
    what = f"mirrors.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{src}: [{what}] must be a table")
    unknown = set(table) - _MIRROR_KEYS
    if unknown:
        raise ConfigError(f"{src}: unknown key(s) in [{what}]: {', '.join(sorted(unknown))}")
    host = table.get("remote")
    if host is None and "url" in table:
        # the original tool's `url = "https://host:8443"`: the host is what matters for ssh
        host = urlsplit(_typed(table["url"], str, f"{what}.url", src)).hostname
    if not host:
        raise ConfigError(f'{src}: [{what}] needs remote = "host" (or url)')
    _typed(host, str, f"{what}.remote", src)
    port = _typed(table.get("port", 22), int, f"{what}.port", src)
    if not 0 < port < 65536:
        raise ConfigError(f"{src}: {what}.port {port} is not a port")
    key = table.get("key_path")
    return MirrorConfig(
        name=name,
        host=host,
        user=_typed(table.get("user", DEFAULT_MIRROR_USER), str, f"{what}.user", src),
        key_path=_typed(key, str, f"{what}.key_path", src) if key is not None else None,
        port=port,
        path=_typed(table.get("path", DEFAULT_ROOT), str, f"{what}.path", src),
    )


def _duration(value: Any, what: str, src: str) -> int:
    """Seconds: a number, or a string like "30m", "6h", "1d"."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip()[-1:].lower() in _DURATION_UNITS:
        text = value.strip()
        try:
            n = int(float(text[:-1]) * _DURATION_UNITS[text[-1].lower()])
        except ValueError:
            raise ConfigError(f"{src}: {what} {value!r} is not a duration") from None
    else:
        raise ConfigError(f'{src}: {what} must be seconds or like "6h", "30m", "1d"')
    if n < 60:
        raise ConfigError(f"{src}: {what} must be at least a minute")
    return n


def _filters(value: Any, what: str, src: str) -> tuple[str, ...]:
    """["os=debian", ...], or a table {os = "debian", variant = ["default", "cloud"]}."""
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return tuple(value)
    if isinstance(value, Mapping):
        out = []
        for key, v in value.items():
            values = v if isinstance(v, list) else [v]
            if not all(isinstance(x, str) for x in values):
                raise ConfigError(f"{src}: {what}.{key} must be a string or a list of strings")
            out += [f"{key}={x}" for x in values]
        return tuple(out)
    raise ConfigError(f'{src}: {what} must be a list like ["os=debian", "arch=amd64"] or a table')


def _sync(name: str, table: Any, src: str) -> SyncConfig:
    what = f"sync.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{src}: [{what}] must be a table")
    unknown = set(table) - _SYNC_KEYS
    if unknown:
        raise ConfigError(f"{src}: unknown key(s) in [{what}]: {', '.join(sorted(unknown))}")
    if "url" not in table:
        raise ConfigError(f'{src}: [{what}] needs url = "https://HOST"')
    url = _typed(table["url"], str, f"{what}.url", src)
    if urlsplit(url).scheme != "https":
        raise ConfigError(f"{src}: {what}.url must be https://")
    keep = _typed(table.get("keep", 1), int, f"{what}.keep", src)
    if keep < 1:
        raise ConfigError(f"{src}: {what}.keep must be at least 1")
    timeout = table.get("timeout", DEFAULT_SYNC_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{src}: {what}.timeout must be a number of seconds above 0")
    ca = table.get("ca")
    return SyncConfig(
        name=name,
        url=url,
        filters=_filters(table.get("filters", []), f"{what}.filters", src),
        keep=keep,
        interval=_duration(table.get("interval", DEFAULT_SYNC_INTERVAL), f"{what}.interval", src),
        ca=_typed(ca, str, f"{what}.ca", src) if ca is not None else None,
        timeout=float(timeout),
    )


def _deltas(table: Mapping[str, Any], src: str) -> DeltaSettings:
    d = DeltaSettings()
    enabled = _typed(table.get("enabled", d.enabled), bool, "deltas.enabled", src)
    bases = _typed(table.get("bases", d.bases), int, "deltas.bases", src)
    if not 1 <= bases <= 10:
        raise ConfigError(f"{src}: deltas.bases must be between 1 and 10, not {bases}")
    ratio = table.get("max_ratio", d.max_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ConfigError(f"{src}: deltas.max_ratio must be a number above 0 and at most 1")
    timeout = _typed(table.get("timeout", d.timeout), int, "deltas.timeout", src)
    if timeout < 1:
        raise ConfigError(f"{src}: deltas.timeout must be at least 1 (seconds)")
    min_size = _bytes(table.get("min_size", d.min_size), "deltas.min_size", src)
    interval = _typed(
        table.get("check_interval", d.check_interval), int, "deltas.check_interval", src
    )
    if interval < 1:
        raise ConfigError(f"{src}: deltas.check_interval must be at least 1 (seconds)")
    return DeltaSettings(enabled, bases, float(ratio), timeout, min_size, interval)


def _validate(
    doc: dict[str, Any], env: Mapping[str, str], sources: tuple[str, ...], where: dict[str, str]
) -> Settings:
    def src(section: str) -> str:
        return where.get(section, "configuration")

    unknown = set(doc) - _SECTIONS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{src(key)}: unknown section or key {key!r}")
    for section, keys in _KEYS.items():
        table = doc.get(section, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{src(section)}: [{section}] must be a table")
        bad = set(table) - keys
        if bad:
            raise ConfigError(
                f"{src(section)}: unknown key(s) in [{section}]: {', '.join(sorted(bad))}"
            )
    paths, upload, prune = doc.get("paths", {}), doc.get("upload", {}), doc.get("prune", {})
    values: dict[str, Any] = {"sources": sources}
    if "root" in paths:
        values["root_dir"] = _typed(paths["root"], str, "paths.root", src("paths"))
    if "state_dir" in paths:
        values["state_dir"] = _typed(paths["state_dir"], str, "paths.state_dir", src("paths"))
    for key in ("allow_overwrites", "allow_deletes"):
        if key in upload:
            values[key] = _typed(upload[key], bool, f"upload.{key}", src("upload"))
    if "max_size" in upload:
        values["max_upload_size"] = _size(upload["max_size"], src("upload"))
    if "max_parallel" in upload:
        values["max_parallel_uploads"] = _parallel(upload["max_parallel"], src("upload"))
    if "grace_period" in prune:
        grace = _typed(prune["grace_period"], int, "prune.grace_period", src("prune"))
        if grace < 0:
            raise ConfigError(f"{src('prune')}: prune.grace_period must not be negative")
        values["prune_grace"] = grace
    if "retention" in doc:
        values["retention"] = _retention(doc["retention"], src("retention"))
    if "deltas" in doc:
        values["deltas"] = _deltas(doc["deltas"], src("deltas"))
    mirrors = doc.get("mirrors", {})
    if not isinstance(mirrors, Mapping):
        raise ConfigError(f"{src('mirrors')}: [mirrors] must hold [mirrors.NAME] tables")
    values["mirrors"] = tuple(_mirror(n, t, src("mirrors")) for n, t in sorted(mirrors.items()))
    syncs = doc.get("sync", {})
    if not isinstance(syncs, Mapping):
        raise ConfigError(f"{src('sync')}: [sync] must hold [sync.NAME] tables")
    values["syncs"] = tuple(_sync(n, t, src("sync")) for n, t in sorted(syncs.items()))
    if "logging" in doc:
        table = doc["logging"]
        if not isinstance(table, Mapping) or "version" not in table:
            raise ConfigError(
                f"{src('logging')}: [logging] must be a logging.config.dictConfig table "
                "(with version = 1)"
            )
        values["logging"] = dict(table)
    # the environment has the last word
    for key, name in (
        ("allow_overwrites", envnames.ALLOW_OVERWRITES),
        ("allow_deletes", envnames.ALLOW_DELETES),
        ("debug", envnames.DEBUG),
    ):
        flag = _flag(env, name)
        if flag is not None:
            values[key] = flag
    size, parallel = envnames.UPLOAD_MAX_SIZE, envnames.UPLOAD_MAX_PARALLEL
    if env.get(size, "").strip():
        values["max_upload_size"] = _size(env[size].strip(), size)
    if env.get(parallel, "").strip():
        values["max_parallel_uploads"] = _parallel(env[parallel], parallel)
    return Settings(**values)
