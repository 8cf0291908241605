"""`run`: nginx, the upload server and the watcher in the foreground, as one unit (and, with
[sync.NAME] configured, `sync --repeat`).

What the seeds' container did with supervisord: prepares what `init` would (into the state
directory, not /etc), starts the three as child processes (supervise.py), logs to stdout, stops
them all on SIGTERM/SIGINT, and stops the rest if one of them dies; `run` returns which
(supervise.Ended), and the command line exits 0 or 1 for it.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxd_image_server import envnames, htpasswd
from lxd_image_server.config import NGINX_USER, Paths, ServiceError
from lxd_image_server.fsutil import can_traverse
from lxd_image_server.service import health, nginx, run_user, tls
from lxd_image_server.service.initialize import (
    InitReport,
    credentials_group,
    ensure_credentials,
    ensure_tree,
    instructions_for,
)
from lxd_image_server.service.supervise import Ended, Ready, Supervisor
from lxd_image_server.settings import Settings

log = logging.getLogger(__name__)

#: The user nginx's workers take when `run` is root (Debian's nginx package makes it)
WORKER_USER = NGINX_USER
#: nginx first (no new requests), then uploads and syncs, then the watcher publishes what
#: landed
STOP_ORDER = ("nginx", "upload", "syncer", "watcher")


class RunError(ServiceError):
    """`run` will not start this way; the message says what to change."""


@dataclass(frozen=True)
class RunOptions:
    paths: Paths
    #: HOST:PORT or PORT
    listen: str = "8443"
    #: HOST:PORT or PORT of a plain-HTTP listener serving image files only (None: none)
    http_listen: str | None = None
    ssl_dir: str | None = None
    htpasswd: str | None = None
    allow_anonymous_uploads: bool = False
    #: False: never make an upload user; with none in the htpasswd file, uploads get 401
    create_user: bool = True
    hostnames: tuple[str, ...] = ()
    plain_http: bool = False
    private: bool = False
    verbose: bool = False
    #: what the parts get: --config is handed to the watcher (which re-reads it on reload),
    #: the settings as resolved here (every layer) to the upload app
    config: str | None = None
    settings: Settings = field(default_factory=Settings)
    #: where the watcher logs (the --log-file given to `run`)
    log_file: str = "STDOUT"
    #: started as root: the user the upload server and the watcher run as (run_user.py)
    user: str | None = None

    @property
    def run_dir(self) -> str:
        return self.paths.state.run_dir

    @property
    def nginx_dir(self) -> str:
        return self.paths.state.nginx_dir

    @property
    def upload_socket(self) -> str:
        return self.paths.state.upload_socket

    @property
    def url_file(self) -> str:
        """Where `prepare` notes the URL nginx serves on (for `lxd-image-server health`)."""
        return self.paths.state.url_file

    def local_url(self) -> str:
        """The URL of the catalog's root as seen from this machine."""
        host, _, port = self.listen.rpartition(":")
        if host in ("", "*", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "[::]":
            host = "[::1]"
        return f"{'http' if self.plain_http else 'https'}://{host}:{port}/"


def _worker_user(must_reach: Sequence[str]) -> str | None:
    """The user nginx's workers run as: None (ours) unless we are root, where they drop to
    www-data. Never root: a link planted in the tree must not reach /etc/shadow or the key."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(WORKER_USER)
    except KeyError:
        raise RunError(
            f"nginx's workers would run as root: there is no user {WORKER_USER} for them "
            f"(create it, e.g. `adduser --system --group {WORKER_USER}`, or run "
            "`lxd-image-server run` as a user other than root)"
        ) from None
    gids = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem)}
    blocked = [p for p in must_reach if not can_traverse(p, pw.pw_uid, gids)]
    if blocked:
        raise RunError(
            f"nginx's workers would run as root: {WORKER_USER} cannot reach "
            f"{', '.join(blocked)}. Make these directories and their parents traversable "
            f"(e.g. chmod o+x, or group {WORKER_USER} with g+x), move them somewhere it can "
            "reach, or run `lxd-image-server run` as a user other than root"
        )
    return f"{WORKER_USER} {WORKER_USER}"


@dataclass(frozen=True)
class Prepared:
    #: nginx.conf for the nginx `run` starts
    conf: str
    #: "USER GROUP" of nginx's workers; None: ours
    worker_user: str | None
    #: the credentials nginx (and the upload app) check; None: anonymous uploads
    htpasswd: str | None
    report: InitReport
    #: started as root: who the upload server and the watcher run as
    run_user: run_user.RunUser | None = None


def prepare(opts: RunOptions) -> Prepared:
    """Tree, catalog, certificate, credentials, nginx config; started as root, also who the
    upload server and the watcher run as (run_user.py)."""
    if opts.private and opts.allow_anonymous_uploads:
        raise RunError("--private needs credentials: it cannot go with --allow-anonymous-uploads")
    report = InitReport()
    htpasswd_path = None
    if not opts.allow_anonymous_uploads:
        htpasswd_path = opts.htpasswd or opts.paths.state.htpasswd
    ssl_dir = opts.ssl_dir or opts.paths.state.ssl_dir
    as_user = _run_user(opts)
    if as_user is None:
        ensure_tree(opts.paths, report)
        state = opts.paths.state
        for d in (opts.run_dir, opts.nginx_dir, state.upload_digests, state.upload_run_dir):
            os.makedirs(d, exist_ok=True)
    else:
        owned = [p for p in (htpasswd_path, None if opts.plain_http else ssl_dir) if p]
        run_user.prepare(opts.paths, as_user, grp.getgrnam(WORKER_USER).gr_gid, owned)
        if not opts.plain_http:
            run_user.root_dir_of_its_own(ssl_dir, 0o700)
        if htpasswd_path:
            run_user.root_file(htpasswd_path)
    if htpasswd_path:
        os.makedirs(os.path.dirname(os.path.abspath(htpasswd_path)), exist_ok=True)
    must_reach = [opts.paths.root_dir, opts.paths.state_dir]
    if htpasswd_path:
        must_reach.append(os.path.dirname(os.path.abspath(htpasswd_path)))
    # as root: nginx's workers' (run_user.prepare gave them STATE/run and the socket's dir)
    user = _worker_user(must_reach)
    if as_user is not None:
        for path in (opts.paths.root_dir, opts.paths.state_dir):
            if not can_traverse(path, as_user.uid, {as_user.gid, *as_user.watcher.groups}):
                raise RunError(
                    f"{as_user.name} cannot reach {path}: make it and its parents traversable"
                )
        if not os.path.exists(os.path.join(opts.paths.streams_dir, "index.json")):
            _first_catalog(opts, as_user, report)
    if not opts.plain_http:
        report.cert = tls.ensure_certificate(ssl_dir, opts.hostnames or ("localhost",))
    if htpasswd_path:
        if opts.create_user:
            ensure_credentials(htpasswd_path, "upload", report)
        elif not htpasswd.read_users(htpasswd_path):
            if not os.path.exists(htpasswd_path):
                Path(htpasswd_path).touch(0o640)  # nginx answers 500, not 401, without it
            log.warning(
                "uploads are refused (401): %s has no users; add one with "
                "`lxd-image-server passwd USER --htpasswd %s` (no restart needed)",
                htpasswd_path,
                htpasswd_path,
            )
        if as_user is not None and not run_user.can_read(htpasswd_path, as_user.upload):
            raise RunError(
                f"{as_user.name} (the upload server) cannot read {htpasswd_path}: make it "
                f"readable by group {WORKER_USER} (chgrp {WORKER_USER}, chmod g+r)"
            )
    settings = nginx.SiteSettings(
        root_dir=opts.paths.root_dir,
        upload_socket=opts.upload_socket,
        listen=(opts.listen,),
        tls=not opts.plain_http,
        ssl_dir=ssl_dir,
        htpasswd=htpasswd_path,
        private=opts.private,
        http_listen=(opts.http_listen,) if opts.http_listen else (),
        server_names=opts.hostnames,
    )
    base = Path(opts.nginx_dir)
    http_snippet = base / "http-locations.conf"
    (base / "locations.conf").write_text(nginx.render_locations(settings))
    if opts.http_listen:
        http_snippet.write_text(nginx.render_http_locations(settings))
    else:
        http_snippet.unlink(missing_ok=True)
    (base / "site.conf").write_text(
        nginx.render_site(settings, str(base / "locations.conf"), None, str(http_snippet))
    )
    conf = base / "nginx.conf"
    conf.write_text(
        nginx.render_standalone(opts.run_dir, str(base / "site.conf"), user, opts.verbose)
    )
    nginx.check(str(conf), prefix=opts.run_dir)
    Path(opts.url_file).write_text(opts.local_url() + "\n")
    return Prepared(str(conf), user, htpasswd_path, report, as_user)


def _run_user(opts: RunOptions) -> run_user.RunUser | None:
    """Started as root: the user the upload server and the watcher run as (RunError if there
    is none fit for it). Otherwise None: they run as we do."""
    if os.geteuid() != 0:
        if opts.user and opts.user != pwd.getpwuid(os.geteuid()).pw_name:
            raise RunError(f"--user {opts.user}: only `run` started as root changes users")
        return None
    pw = run_user.choose(opts.user, opts.paths.root_dir)
    group = credentials_group()
    extra = [grp.getgrnam(group).gr_gid] if group else []
    try:
        return run_user.identities(pw, WORKER_USER, extra)
    except KeyError:
        raise RunError(f"there is no group {WORKER_USER} for the upload socket") from None


#: what `init` does for the catalog (ensure_tree), run as the user the watcher runs as
_FIRST_CATALOG = (
    "import sys\n"
    "from lxd_image_server.config import Paths\n"
    "from lxd_image_server.service.initialize import InitReport, ensure_tree\n"
    "ensure_tree(Paths(*sys.argv[1:5]), InitReport())\n"
)


def _first_catalog(opts: RunOptions, as_user: run_user.RunUser, report: InitReport) -> None:
    """The tree and its first catalog, made by the user the watcher runs as, so that nginx
    serves a catalog from its first answer and nothing in the tree is root's."""
    p = opts.paths
    cmd = [sys.executable, "-c", _FIRST_CATALOG, p.root_dir, p.img_dir, p.streams_dir]
    cmd.append(p.state_dir)
    env = {**os.environ, "HOME": as_user.home, "USER": as_user.name, "LOGNAME": as_user.name}
    done = subprocess.run(cmd, env=env, check=False, **as_user.watcher.popen())
    if done.returncode != 0:
        raise RunError(f"the first catalog, made as {as_user.name}, failed (see above)")
    report.changes.append(f"published the catalog in {p.streams_dir}")


def _commands(opts: RunOptions, conf: str, user: str | None) -> dict[str, list[str]]:
    py = sys.executable
    tree = ["--root-dir", opts.paths.root_dir]
    watch = [py, "-m", "lxd_image_server", "--state-dir", opts.paths.state_dir]
    watch += ["--log-file", opts.log_file]
    if opts.config:
        watch += ["--config", opts.config]
    if opts.verbose:
        watch.append("--verbose")
    watch += ["watch", *tree]
    upload = [
        py,
        "-m",
        "gunicorn",
        "-c",
        "python:lxd_image_server.web.gunicorn_conf",
        "--bind",
        f"unix:{opts.upload_socket}",
    ]
    if opts.verbose:
        upload += ["--access-logfile", "-"]  # off in gunicorn_conf
    if user:
        # started as root: it runs with nginx's workers' group (run_user.py); what it stores
        # is theirs to read, nobody else's
        upload += ["--umask", "0o007"]
    upload.append("lxd_image_server.web.upload:app_from_env()")
    commands = {
        "watcher": watch,
        "upload": upload,
        "nginx": [nginx.nginx_binary(), "-p", opts.run_dir, "-c", conf, "-e", "stderr"],
    }
    if opts.settings.syncs:
        # [sync.NAME]: on their schedule, as the package's timer runs them
        commands["syncer"] = [*watch[: watch.index("watch")], "sync", "--repeat", *tree]
    return commands


def readiness(opts: RunOptions) -> dict[str, Ready]:
    """What `run` waits for before nginx takes connections: the upload server answers HTTP on
    its socket, and the watcher (that very child) watches the tree: it writes its pid file
    once its watches are set (catalog/watch.py). `health` checks the same things."""

    def upload_ready(_pid: int) -> bool:
        return health.check_upload_socket(opts.upload_socket, timeout=2.0).ok

    def watcher_ready(pid: int) -> bool:
        try:
            with open(opts.paths.state.watch_pid, encoding="ascii") as f:
                return f.read().strip() == str(pid)
        except OSError:
            return False

    return {"upload": upload_ready, "watcher": watcher_ready}


def upload_env(
    opts: RunOptions, htpasswd_path: str | None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The children's environment. The upload app reads its settings from the environment,
    which outranks every configuration file: it gets the values `run` resolved, --config
    included, and the credentials nginx checks (the app checks them too, so its socket is no
    way around them). The names are envnames', which the app reads (web/upload_settings.py)."""
    env = dict(os.environ if base is None else base)
    s = opts.settings
    env[envnames.IMG_DIR] = opts.paths.img_dir
    env[envnames.DIGEST_DIR] = opts.paths.state.upload_digests
    if htpasswd_path:
        env[envnames.HTPASSWD] = os.path.abspath(htpasswd_path)
        env.pop(envnames.ANONYMOUS_UPLOADS, None)
    else:
        env.pop(envnames.HTPASSWD, None)
        env[envnames.ANONYMOUS_UPLOADS] = "yes"
    env[envnames.ALLOW_OVERWRITES] = "1" if s.allow_overwrites else "0"
    env[envnames.ALLOW_DELETES] = "1" if s.allow_deletes else "0"
    env[envnames.DEBUG] = "1" if opts.verbose else "0"
    env[envnames.UPLOAD_MAX_SIZE] = str(s.max_upload_size or 0)
    env[envnames.UPLOAD_MAX_PARALLEL] = str(s.max_parallel_uploads)
    env[envnames.UPLOAD_SLOTS_DIR] = opts.paths.state.upload_slots
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(opts: RunOptions, hostnames_for_help: Sequence[str] = ()) -> Ended:
    """Prepares, then runs the parts until a stop signal or one of them dies (or is not ready
    in time): which, the value says (the command line makes it the exit status)."""
    prepared = prepare(opts)
    report = prepared.report
    for change in report.changes:
        log.info("%s", change)
    if report.new_credentials:
        upload_user, password = report.new_credentials
        log.warning(
            "upload credentials created: user %s password %s (shown once)", upload_user, password
        )
    if opts.allow_anonymous_uploads:
        log.warning("anonymous uploads are allowed: anyone who reaches this server may upload")
    names = hostnames_for_help or opts.hostnames
    text = instructions_for(
        report, names, opts.listen, default_host="127.0.0.1", private=opts.private
    )
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    started = time.monotonic()
    # a watcher's pid file of an earlier run must not pass for this one's
    with contextlib.suppress(FileNotFoundError):
        os.unlink(opts.paths.state.watch_pid)
    env = upload_env(opts, prepared.htpasswd)
    users: dict[str, run_user.Identity] = {}
    if prepared.run_user is not None:
        ru = prepared.run_user
        users = {"upload": ru.upload, "watcher": ru.watcher}
        env.update(HOME=ru.home, USER=ru.name, LOGNAME=ru.name)
        log.info("the upload server and the watcher run as %s", ru.name)
    ended = Supervisor(
        _commands(opts, prepared.conf, prepared.worker_user),
        env,
        ready=readiness(opts),
        # nginx comes last: the port answers only when an upload it passes on reaches a
        # listening upload server and lands in a watched tree
        gated=frozenset({"nginx"}),
        users=users,
        stop_order=STOP_ORDER,
        stop_signals={"nginx": signal.SIGQUIT},
    ).run()
    log.info("stopped after %.0f s", time.monotonic() - started)
    return ended
