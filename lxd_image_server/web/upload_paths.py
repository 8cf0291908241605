"""Which paths below images/ an upload may name: the layout's, and strictly so.

Before the layout is asked, a path must be printable ASCII (no control characters, no
non-ASCII digits or letters), short enough for any file system, and free of empty, `.`, `..`
and hidden components. So a name like `x\\n` or a serial of full-width digits never reaches the
layout's patterns, whatever they accept.
"""

from __future__ import annotations

import time

from lxd_image_server.tree.layout import (
    VERSION_DEPTH,
    LayoutError,
    VersionKey,
    check_serial_not_ahead,
    parse_file_path,
    parse_version_dir,
)
from lxd_image_server.web.upload_errors import HTTPError, clip, quote

#: Longest accepted path (below images/) and path component, in characters (= bytes: ASCII).
MAX_PATH = 1024
MAX_COMPONENT = 200
_PRINTABLE = frozenset(range(0x21, 0x7F))  # printable ASCII without the space


def _check_text(rel: str) -> list[str]:
    if not rel:
        raise HTTPError(400, "empty path")
    if len(rel) > MAX_PATH:
        raise HTTPError(400, f"invalid path {quote(rel)}: longer than {MAX_PATH} characters")
    bad = next((c for c in rel if ord(c) not in _PRINTABLE), None)
    if bad is not None:
        raise HTTPError(
            400,
            f"invalid path {quote(rel)}: {bad!a} is not allowed "
            "(printable ASCII only, no spaces or control characters)",
        )
    if rel.startswith("/"):
        raise HTTPError(400, f"invalid path {quote(rel)}: must be relative to images/")
    parts = rel.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise HTTPError(400, f"invalid path {quote(rel)}: has an empty, '.' or '..' component")
        if p.startswith("."):
            raise HTTPError(400, f"invalid path {quote(rel)}: has a hidden component")
        if len(p) > MAX_COMPONENT:
            raise HTTPError(
                400, f"invalid path {quote(rel)}: a component is over {MAX_COMPONENT} characters"
            )
    return parts


def check_file_path(rel: str) -> tuple[VersionKey, str]:
    """'os/release/arch/variant/serial/file' -> (key, name), or HTTPError 400."""
    _check_text(rel)
    try:
        return parse_file_path(rel)
    except LayoutError as e:
        raise HTTPError(400, f"invalid path {quote(rel)}: {clip(str(e))}") from None


def check_new_file_path(rel: str) -> tuple[VersionKey, str]:
    """check_file_path, for a file to be written: its serial may also not be more than a day
    ahead of this server's clock (the scanner would skip it; layout.MAX_SERIAL_AHEAD)."""
    key, name = check_file_path(rel)
    try:
        check_serial_not_ahead(key.serial, time.time())
    except LayoutError as e:
        raise HTTPError(400, f"invalid path {quote(rel)}: {clip(str(e))}") from None
    return key, name


def check_version_path(rel: str) -> VersionKey:
    """'os/release/arch/variant/serial' -> key, or HTTPError 400."""
    parts = _check_text(rel)
    if len(parts) != VERSION_DEPTH:
        raise HTTPError(400, f"invalid path {quote(rel)}: not a file or a version directory")
    try:
        return parse_version_dir(parts)
    except LayoutError as e:
        raise HTTPError(400, f"invalid path {quote(rel)}: {clip(str(e))}") from None
