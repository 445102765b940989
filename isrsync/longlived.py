"""The cyclic garbage collector in processes whose event loop serves a guest.

A full collection walks every tracked object, and stops the loop while it does:
about 20 ms for the objects a resume has at rest on this hardware, and 250 ms in
a process as large as a test run. A guest waiting on a page fault or a disk read
waits that long too. Almost all of those objects (modules, the cache index, the
keyring, the run's sources) live as long as the process, so they are moved to
the collector's permanent generation once they exist: later collections walk
only what the run makes afterwards.
"""

from __future__ import annotations

import gc


def settle(*, collect: bool = True) -> None:
    """Keep what is alive now out of later collections.

    ``collect`` first frees what is already garbage, which costs one full
    collection: do it where nothing waits on the loop (before a guest runs).
    Without it, garbage alive now is kept for the process's life; that is the
    price of not pausing a guest that is already running.
    """
    if collect:
        gc.collect()
    gc.freeze()


def unsettle() -> None:
    """Let the collector walk everything again (for a process that outlives its run, such as a test)."""
    gc.unfreeze()
