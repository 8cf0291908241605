"""Where things are: the image root, its images/ and streams/v1/, and the state directory."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_ROOT = "/var/www/simplestreams"
DEFAULT_STATE_DIR = "/var/lib/lxd-image-server"
DEFAULT_SSL_DIR = "/etc/nginx/ssl"
DEFAULT_HTPASSWD = "/etc/lxd-image-server/htpasswd"
DEFAULT_NGINX_DIR = "/etc/nginx"
DEFAULT_UPLOAD_SOCKET = "/run/lxd-image-server/upload.sock"


class ServiceError(Exception):
    """A part the server relies on (nginx, the certificate, ...) refused; the message says why."""


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


@dataclass(frozen=True)
class Paths:
    #: The directory served as the remote's URL root.
    root_dir: str
    img_dir: str
    streams_dir: str
    state_dir: str

    @property
    def cache_path(self) -> str:
        return os.path.join(self.state_dir, "hashes.sqlite3")

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
