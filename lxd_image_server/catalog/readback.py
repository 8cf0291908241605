"""Reading back a published document (images.json, index.json) as bounded, untrusted input.

The catalog writer wrote it, but streams/ may have been tampered with before the ownership
split (finding 3: a nested images.json, or a symlink to /dev/zero), and a reader must never
crash or grow without bound on it: a regular file only (no link followed, no FIFO waited on),
at most MAX_CATALOG_BYTES, nested at most MAX_CATALOG_DEPTH levels.
"""

from __future__ import annotations

from typing import Any

from lxd_image_server.fsutil import TooLarge, load_json_bounded, read_regular

#: images.json grows with the versions published: 256 MiB is far beyond any real tree
MAX_CATALOG_BYTES = 256 << 20
#: products -> product -> versions -> version -> items -> item -> field is 7 levels
MAX_CATALOG_DEPTH = 32


def read_document(path: str) -> Any:
    """The JSON value in the regular file `path` (the caller checks its shape).

    Raises FileNotFoundError when it does not exist, another OSError when it cannot be read
    (NotRegularFile for a link or FIFO), ValueError (one line) when it is too large, too deep
    or not JSON."""
    try:
        data = read_regular(path, MAX_CATALOG_BYTES)
    except TooLarge:
        raise ValueError(f"larger than {MAX_CATALOG_BYTES} bytes") from None
    return load_json_bounded(data, MAX_CATALOG_BYTES, MAX_CATALOG_DEPTH)
