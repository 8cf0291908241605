"""Where things are: the image root, its images/ and streams/v1/, the state directory and the
names inside it, and the default names of things (one place for each)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_ROOT = "/var/www/simplestreams"
DEFAULT_STATE_DIR = "/var/lib/lxd-image-server"
DEFAULT_SSL_DIR = "/etc/nginx/ssl"
DEFAULT_HTPASSWD = "/etc/lxd-image-server/htpasswd"
DEFAULT_NGINX_DIR = "/etc/nginx"
DEFAULT_UPLOAD_SOCKET = "/run/lxd-image-server/upload.sock"
#: nginx's workers' user and group, as Debian's nginx package makes them (the upload socket's
#: group in systemd/lxd-image-server-upload.socket)
NGINX_USER = "www-data"
#: the package's group of those who read the upload credentials (debian/*.postinst makes it)
CREDENTIALS_GROUP = "lxd-image-server-auth"
#: the user a mirror's pushes log in as (`mirror authorize --user`, [mirrors.NAME] user)
DEFAULT_MIRROR_USER = "lxdmirror"


class ServiceError(Exception):
    """A part the server relies on (nginx, the certificate, ...) refused; the message says why."""


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


@dataclass(frozen=True)
class StateDir:
    """The names in the state directory. Only the catalog writer writes here (in `run` mode and
    the container, one uid runs everything)."""

    path: str

    def _in(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    @property
    def hash_cache(self) -> str:
        return self._in("hashes.sqlite3")

    @property
    def catalog_lock(self) -> str:
        """Held by every writer of streams/ while it builds and writes the catalog."""
        return self._in("catalog.lock")

    @property
    def upload_digests(self) -> str:
        """The digests the upload app hands to the catalog writer (tree/handover.py)."""
        return self._in("upload-digests")

    @property
    def catalog_inputs(self) -> str:
        """What the published catalog was made of, for a no-change `update` (unchanged.py)."""
        return self._in("catalog-inputs.json")

    @property
    def published(self) -> str:
        """What the last publish listed, and its `updated` (catalog/published.py)."""
        return self._in("published.json")

    @property
    def pruned(self) -> str:
        """Versions out of the catalog whose files go after a grace period (retention.py)."""
        return self._in("pruned.json")

    @property
    def pruned_lock(self) -> str:
        return self._in(".pruned.lock")

    @property
    def deltas(self) -> str:
        """The deltas made or refused, and why (deltas.py)."""
        return self._in("deltas.json")

    @property
    def deltas_lock(self) -> str:
        return self._in(".deltas.lock")

    @property
    def mirror_state(self) -> str:
        """Each mirror's last push, for `mirror status` (mirror/state.py)."""
        return self._in("mirrors.json")

    @property
    def mirror_work(self) -> str:
        """The mirrors' working files (snapshots of what was pushed)."""
        return self._in("mirrors")

    @property
    def sync_state(self) -> str:
        """Each configured sync's last run, to tell which are due (ops/sync_schedule.py)."""
        return self._in("syncs.json")

    @property
    def sync_lock(self) -> str:
        """Held by a sync while it downloads and places: one at a time (its leftovers, hidden
        .sync-* directories of one that was killed, are cleared under it)."""
        return self._in(".sync.lock")

    @property
    def watch_pid(self) -> str:
        return self._in("watch.pid")

    @property
    def publish_socket(self) -> str:
        """Where the running watcher takes publish requests (catalog/publish_requests.py)."""
        return self._in("publish.sock")

    # what `run` makes: nginx's prefix and config, its certificate and credentials

    @property
    def run_dir(self) -> str:
        return self._in("run")

    @property
    def upload_run_dir(self) -> str:
        """The upload server's own directory in `run`'s: its socket, its slots."""
        return self._in("run", "upload")

    @property
    def upload_socket(self) -> str:
        return self._in("run", "upload", "upload.sock")

    @property
    def upload_slots(self) -> str:
        """Where the upload app's workers count the uploads in progress per credential."""
        return self._in("run", "upload", "slots")

    @property
    def url_file(self) -> str:
        """The URL `run` serves on, noted at start for `health`."""
        return self._in("run", "url")

    @property
    def nginx_dir(self) -> str:
        return self._in("nginx")

    @property
    def ssl_dir(self) -> str:
        return self._in("ssl")

    @property
    def htpasswd(self) -> str:
        return self._in("htpasswd")


@dataclass(frozen=True)
class Paths:
    #: The directory served as the remote's URL root.
    root_dir: str
    img_dir: str
    streams_dir: str
    state_dir: str

    @property
    def state(self) -> StateDir:
        return StateDir(self.state_dir)

    @property
    def cache_path(self) -> str:
        return self.state.hash_cache

    @property
    def served_images(self) -> str:
        """images/ as the catalog's item paths name it: relative to the served root, with a
        trailing slash ("images/" by default)."""
        return os.path.relpath(self.img_dir, self.root_dir) + "/"

    @classmethod
    def resolve(
        cls,
        root_dir: str | None = None,
        img_dir: str | None = None,
        streams_dir: str | None = None,
        state_dir: str | None = None,
    ) -> Paths:
        """Fills in defaults: img = <root>/images, streams = <root>/streams/v1.

        Without --root-dir, the root is taken from --streams-dir (its grandparent) or
        --img-dir (its parent), since clients find the catalog at <root>/streams/v1/.
        """
        if root_dir is None:
            if streams_dir is not None:
                root_dir = os.path.dirname(os.path.dirname(os.path.abspath(streams_dir)))
            elif img_dir is not None:
                root_dir = os.path.dirname(os.path.abspath(img_dir))
            else:
                root_dir = DEFAULT_ROOT
        root = os.path.abspath(root_dir)
        img = os.path.abspath(img_dir) if img_dir else os.path.join(root, "images")
        streams = (
            os.path.abspath(streams_dir) if streams_dir else os.path.join(root, "streams", "v1")
        )
        if os.path.commonpath([img, root]) != root or img == root:
            raise ConfigError(
                f"the image directory {img} must be inside the served root {root}: "
                "clients download files by their path below the root"
            )
        if streams != os.path.join(root, "streams", "v1"):
            raise ConfigError(
                f"the streams directory must be <root>/streams/v1 ({root}/streams/v1), "
                f"not {streams}: clients look for streams/v1/index.json below the root"
            )
        state = os.path.abspath(state_dir or DEFAULT_STATE_DIR)
        return cls(root_dir=root, img_dir=img, streams_dir=streams, state_dir=state)
