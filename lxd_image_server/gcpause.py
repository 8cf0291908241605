"""Pausing Python's cyclic garbage collector while a large, acyclic structure is built.

A full update of a big tree makes a few objects per file and version (the scan, the digests,
the catalog) that all live until it ends, none in a reference cycle. The cyclic collector
runs whenever allocations outnumber frees, walks every tracked object of the generations it
collects, and so walks the growing structure again and again: a quarter of a no-change
`update` of 20,000 versions. Reference counting frees everything as usual while it is
paused; cycles made meanwhile wait for the collector to resume.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """The collector off for the block, back on after it if it was on (nests)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def settle_heap() -> None:
    """After a pass over the whole tree: the objects describing it (hundreds of thousands at
    20,000 versions) live until the next such pass, and the garbage collector would walk them
    all at every full collection, stalling publishes by a tenth of a second or more. They are
    moved out of its sight (gc.freeze), after a collection when nothing is frozen yet (at
    start, and after a reload (SIGHUP) gave everything back to the collector). What is created
    later is collected as usual."""
    if gc.get_freeze_count() == 0:
        gc.collect()
    gc.freeze()
