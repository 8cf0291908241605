"""Every catalog the integration tests publish passes `verify` (issue 19): the helpers the tests
call after an `update`, an import or a watcher's publish, before a client or a test reads it.

- `assert_verifies(root)`: what `lxd-image-server verify` does (ops/verify.py, in process: no
  interpreter start per call): the rules of every client on index.json and images.json, then
  every listed file's size, type, sha256 and combined fingerprints. A test tree holds a few MB
  (the real Debian image ~100 MB): reading it again is cheap next to publishing it.
- `assert_keeps_rules(doc)`: the rules alone on a parsed images.json, for a test that reads the
  catalog while files move under it (the watcher tests): the files are not looked at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lxd_image_server.catalog.model import catalog_from_json
from lxd_image_server.catalog.rules import check_catalog
from lxd_image_server.ops.listing import read_catalog
from lxd_image_server.ops.verify import read_index_problems, verify


def assert_verifies(root: Path | str, *, full: bool = True) -> None:
    """The catalog published below `root` (streams/v1/) keeps every client's rules and matches
    the files it lists; fails with verify's lines."""
    streams = os.path.join(root, "streams", "v1")
    catalog = read_catalog(streams)
    report = verify(str(root), catalog, full=full)
    problems = read_index_problems(streams, catalog) + report.problems
    assert not problems, f"verify {root}:\n" + "\n".join(map(str, problems))


def assert_keeps_rules(doc: dict[str, Any], *, allow_empty: bool = False) -> None:
    """The parsed images.json `doc` keeps every client's rules (not looking at any file);
    `allow_empty`: a catalog with no product yet (a watcher's first publish) is fine."""
    problems = check_catalog(catalog_from_json(doc))
    if allow_empty:
        problems = [p for p in problems if p.kind != "empty"]
    assert not problems, "images.json:\n" + "\n".join(map(str, problems))
