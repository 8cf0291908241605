"""The names of the environment variables this program reads, each in one place: the side that
sets one (`run` for its children, the units, /etc/default/lxd-image-server) and the side that
reads it (settings.py, the upload app in web/) import it from here. tests/lint/test_couplings.py
checks that no module spells one out and that the shipped files set only these.
"""

from __future__ import annotations

# -- read by settings.py (every command, the upload app too): the last word on the files ----
#: one more configuration file
CONFIG = "LXD_IMAGE_SERVER_CONFIG"
ALLOW_OVERWRITES = "ALLOW_OVERWRITES"
ALLOW_DELETES = "ALLOW_DELETES"
DEBUG = "DEBUG"
#: bytes per uploaded file ([upload] max_size)
UPLOAD_MAX_SIZE = "UPLOAD_MAX_SIZE"
#: uploads in progress per credential ([upload] max_parallel)
UPLOAD_MAX_PARALLEL = "UPLOAD_MAX_PARALLEL"

# -- read by the upload app (web/upload_settings.py); `run` sets them for its child -----------
#: the image directory it writes
IMG_DIR = "LXD_IMAGE_SERVER_IMG_DIR"
#: the credentials it checks (unset: the default file)
HTPASSWD = "LXD_IMAGE_SERVER_HTPASSWD"
#: uploads without credentials (a proxy in front authenticates)
ANONYMOUS_UPLOADS = "ALLOW_ANONYMOUS_UPLOADS"
#: where it hands the digests of what it stored to the catalog writer (tree/handover.py)
DIGEST_DIR = "LXD_IMAGE_SERVER_DIGEST_DIR"
#: seconds one read of a body may take
UPLOAD_READ_TIMEOUT = "UPLOAD_READ_TIMEOUT"
#: where its workers count the uploads in progress together (web/upload_slots.py)
UPLOAD_SLOTS_DIR = "UPLOAD_SLOTS_DIR"
#: systemd's RuntimeDirectory= (the unit's), the slots' directory when UPLOAD_SLOTS_DIR is unset
RUNTIME_DIRECTORY = "RUNTIME_DIRECTORY"

# -- read by the command line and its helpers -------------------------------------------------
#: `run` started as root: the user its children run as (--user)
RUN_USER = "LXD_IMAGE_SERVER_RUN_USER"
#: `push`: the upload password
PASSWORD = "LXD_IMAGE_SERVER_PASSWORD"
#: another directory of nginx templates (service/nginx.py)
TEMPLATES = "LXD_IMAGE_SERVER_TEMPLATES"

ALL = (
    CONFIG,
    ALLOW_OVERWRITES,
    ALLOW_DELETES,
    DEBUG,
    UPLOAD_MAX_SIZE,
    UPLOAD_MAX_PARALLEL,
    IMG_DIR,
    HTPASSWD,
    ANONYMOUS_UPLOADS,
    DIGEST_DIR,
    UPLOAD_READ_TIMEOUT,
    UPLOAD_SLOTS_DIR,
    RUNTIME_DIRECTORY,
    RUN_USER,
    PASSWORD,
    TEMPLATES,
)
