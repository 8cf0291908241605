"""No version leaves the catalog without a reason the writer can name.

The catalog is what every client and every mirror acts on: a mirror deletes whatever the
catalog it receives does not list, LXD and Incus hosts stop seeing the image and its aliases
move. So the one writer of streams/ compares every catalog it is about to write with the one
published last (kept from its last publish, or, when it starts, the record the last publish
left in the state directory: published.py) and names why each version directory that was
listed is not any more:

- pruned: recorded in pruned.json (`prune`, `remove`, expired) or beyond [retention];
- gone: its directory is not a directory any more (images/ itself being there: an unmounted
  or vanished images/ is no reason to unpublish everything);
- invalid: the layout refuses its name now (a serial more than a day ahead of the clock, too);
- unreadable: the writer is refused access to it, or to a directory between images/ and it
  (EACCES, EPERM). An uploader owns what it uploaded and may chmod it: that must not stop the
  publishing of everyone else's versions, and what the writer cannot read it cannot vouch for
  (nginx, another user, most likely cannot serve it either). images/ itself refusing the writer
  is no reason (a restore or a mount gone wrong; no uploader owns it);
- changed: its files changed since they were hashed (it is listed again once hashed), or the
  scan found it without a file a client needs (products.py logged which).

A version directory that is there, valid, and that the scan did not find (a directory it could
not list, a partial view of the tree) has no such reason: the publish is refused with one line
(UnexplainedDepartures) and the catalog stays as it was.

Without a usable record (a catalog an older release published, a record damaged or replaced),
what was listed is what images.json lists, read as any client reads it (model.read_catalog,
bounded); when that cannot be read either, nothing is taken as listed (logged).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lxd_image_server.catalog import published
from lxd_image_server.catalog.model import read_catalog
from lxd_image_server.catalog.products import Products
from lxd_image_server.catalog.publish import PublishError
from lxd_image_server.tree.layout import LayoutError, check_serial_not_ahead, parse_version_dir

log = logging.getLogger(__name__)


class UnexplainedDepartures(PublishError):
    """A publish would drop versions whose directories are still there: not written."""


@dataclass(frozen=True)
class Listing:
    """What a published catalog lists: each item's file (path relative to the served root,
    'images/...') and its size."""

    sizes: dict[str, int]

    def versions(self, images: str = "images/") -> set[str]:
        """The version directories listed, relative to images/ (`images`: its path relative
        to the served root, with a slash)."""
        return {
            path[len(images) :].rpartition("/")[0] for path in self.sizes if path.startswith(images)
        }


EMPTY = Listing({})


def listing_of(products: Products) -> Listing:
    """The files the products list."""
    return Listing(
        {
            item.path: item.size
            for product in products.values()
            for version in product.versions.values()
            for item in version.items.values()
        }
    )


def listed(state_dir: str, streams_dir: str) -> Listing:
    """The files the catalog lists now: those the last publish recorded, else those
    images.json lists (read as a client reads it), else none (logged)."""
    record = published.read(state_dir)
    if record is not None:
        return Listing(record.files)
    path = os.path.join(streams_dir, "images.json")
    try:
        catalog = read_catalog(path)
    except FileNotFoundError:
        return EMPTY
    except (OSError, ValueError) as e:
        log.warning("cannot read the published %s (%s): taken as listing nothing", path, e)
        return EMPTY
    log.info("no record of the last publish: taking what %s lists", path)
    return listing_of(catalog.products)


@dataclass(frozen=True)
class Known:
    """What the writer knows of the versions it is about to leave out."""

    img_dir: str
    #: absolute version directories recorded as pruned, or beyond [retention] now
    pruned: Callable[[str], bool]
    #: version directories (relative to images/) the scan found, published or not
    scanned: Callable[[str], bool]
    #: the scanner's clock: a serial more than a day ahead of it is not scanned (layout.py)
    clock: Callable[[], float] = time.time


def reason(rel: str, known: Known) -> str | None:
    """Why the listed version directory `rel` (relative to images/) leaves; None: no reason."""
    path = os.path.join(known.img_dir, rel)
    if known.pruned(path):
        return "pruned"
    if known.scanned(rel):
        return "changed (being hashed again, or incomplete)"
    try:
        key = parse_version_dir(rel.split("/"))
        check_serial_not_ahead(key.serial, known.clock())
    except LayoutError as e:
        return f"invalid ({e})"
    try:
        is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        is_dir = False
    except PermissionError as e:  # a directory between images/ and it refuses the writer
        return _refused(known.img_dir, e)
    except OSError:
        return None  # cannot tell: not a reason
    if is_dir:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
        except PermissionError as e:
            return _refused(known.img_dir, e)
        except OSError:
            pass
        return None
    if not os.path.isdir(known.img_dir):
        return None  # images/ itself is missing (unmounted?): not a reason
    return "gone"


def _refused(img_dir: str, e: OSError) -> str | None:
    """ "unreadable" for a version the writer was refused (`e`), unless images/ itself refuses
    it (to list or to search): then no version can be told from another, and none has a
    reason to leave."""
    if not os.access(img_dir, os.R_OK | os.X_OK):
        return None
    return f"unreadable ({e.strerror})"


def check(before: Iterable[str], after: set[str], known: Known) -> None:
    """Raises UnexplainedDepartures when a version of `before` is not in `after` for no reason
    the writer can name; logs the others (one line for all)."""
    counts: dict[str, int] = {}
    unexplained: list[str] = []
    for rel in before:
        if rel in after:
            continue
        why = reason(rel, known)
        if why is None:
            unexplained.append(rel)
            continue
        key = why.partition(" ")[0]
        counts[key] = counts.get(key, 0) + 1
        log.debug("%s leaves the catalog: %s", rel, why)
    if unexplained:
        unexplained.sort()
        raise UnexplainedDepartures(
            f"not publishing: {len(unexplained)} version(s) would leave the catalog though their "
            f"directories are still there (e.g. {unexplained[0]!r}); the catalog stays as it was"
        )
    if counts:
        log.info(
            "%d version(s) leave the catalog: %s",
            sum(counts.values()),
            ", ".join(f"{n} {why}" for why, n in sorted(counts.items())),
        )
