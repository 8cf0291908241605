"""The upload app's settings: from the layered configuration (upload.* in config.toml) and the
environment, whose names are in envnames.py (the side that sets them, `run` or the unit,
imports the same names):

- envnames.IMG_DIR: the image directory (default <root>/images);
- envnames.HTPASSWD: the credentials (default /etc/lxd-image-server/htpasswd);
- envnames.ANONYMOUS_UPLOADS: uploads without credentials (1/true/yes/on or 0/false/no/off);
- ALLOW_OVERWRITES, ALLOW_DELETES, DEBUG, UPLOAD_MAX_SIZE, UPLOAD_MAX_PARALLEL: through
  settings.py, as for every command;
- envnames.UPLOAD_READ_TIMEOUT: seconds a read of the body may take (default 60);
- envnames.DIGEST_DIR: where the digests of stored files are handed to the catalog writer
  (default config.StateDir.upload_digests, used only if it exists; see tree/handover.py);
- envnames.UPLOAD_SLOTS_DIR, else systemd's RUNTIME_DIRECTORY: where the workers count the
  uploads in progress together (upload_slots.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from lxd_image_server import envnames
from lxd_image_server import settings as settings_module
from lxd_image_server.config import DEFAULT_HTPASSWD, ConfigError, StateDir

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT = 60.0


@dataclass(frozen=True)
class UploadSettings:
    img_dir: str
    allow_overwrites: bool = False
    allow_deletes: bool = False
    #: Bytes per file; None: no limit.
    max_size: int | None = None
    #: Log every request (method, path, status, bytes, seconds).
    debug: bool = False
    #: The password file (nginx's auth_basic_user_file); None: nobody may upload, unless
    #: anonymous uploads are allowed.
    htpasswd: str | None = None
    #: Uploads without credentials (only when explicitly configured).
    allow_anonymous: bool = False
    #: Seconds one read of the body may take before the upload is cut off (408).
    read_timeout: float = DEFAULT_READ_TIMEOUT
    #: Where the digests of stored files are handed to the catalog writer (tree/handover.py),
    #: if that directory exists; None: nowhere.
    digest_dir: str | None = None
    #: Uploads one credential (anonymous uploads: one client address) may have in progress;
    #: more get 429 with Retry-After (upload_slots.py).
    max_parallel: int = settings_module.DEFAULT_PARALLEL_UPLOADS
    #: Where the workers count them together (a directory only the app writes); None: each
    #: worker process counts its own.
    slots_dir: str | None = None


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment {name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def settings_from_env(
    env: Mapping[str, str] | None = None, system_dir: str = settings_module.SYSTEM_DIR
) -> UploadSettings:
    """From the layered configuration (upload.* in config.toml, the system's in `system_dir`)
    and the environment (the module's docstring)."""
    env = os.environ if env is None else env
    cfg = settings_module.load(env=env, system_dir=system_dir)
    raw_timeout = env.get(envnames.UPLOAD_READ_TIMEOUT, "").strip()
    try:
        read_timeout = float(raw_timeout) if raw_timeout else DEFAULT_READ_TIMEOUT
    except ValueError:
        read_timeout = -1.0
    if not 0 < read_timeout < 86400:
        raise ConfigError(
            f"environment {envnames.UPLOAD_READ_TIMEOUT}={raw_timeout!r}: expected seconds"
        )
    return UploadSettings(
        img_dir=env.get(envnames.IMG_DIR, "").strip() or os.path.join(cfg.root_dir, "images"),
        allow_overwrites=cfg.allow_overwrites,
        allow_deletes=cfg.allow_deletes,
        max_size=cfg.max_upload_size,
        debug=cfg.debug,
        htpasswd=env.get(envnames.HTPASSWD, "").strip() or DEFAULT_HTPASSWD,
        allow_anonymous=_flag(env, envnames.ANONYMOUS_UPLOADS),
        read_timeout=read_timeout,
        digest_dir=_digest_dir(env, cfg.state_dir),
        max_parallel=cfg.max_parallel_uploads,
        slots_dir=_slots_dir(env),
    )


def _slots_dir(env: Mapping[str, str]) -> str | None:
    """UPLOAD_SLOTS_DIR (`run` sets it; made here, as the app's user, if missing), or the
    unit's RuntimeDirectory (systemd sets RUNTIME_DIRECTORY), if it exists."""
    path = env.get(envnames.UPLOAD_SLOTS_DIR, "").strip()
    if path:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            log.warning("no upload slots directory %s (%s): counted per worker", path, e)
    else:
        path = env.get(envnames.RUNTIME_DIRECTORY, "").strip()
    return path if path and os.path.isdir(path) else None


def _digest_dir(env: Mapping[str, str], state_dir: str) -> str | None:
    path = env.get(envnames.DIGEST_DIR, "").strip() or StateDir(state_dir).upload_digests
    return path if os.path.isdir(path) else None
