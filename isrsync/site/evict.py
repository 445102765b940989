"""A size limit for the site cache (issue 12, part 4): evict least-recently-used chunks,
never a parcel's own state.

What may go is what can be fetched again: chunks of committed versions, which the
home server (and the swarm) still hold. What must stay is what exists nowhere else:
every parcel's dirty chunks (written by its guest, not committed), its staged
chunks (a commit in flight) and its locally saved memory image. Those are found
through each parcel's local state, which is sealed with the user's keys, so
eviction needs a logged-in site (:func:`protected_tags`); without one the caller
must not evict at all.

Eviction only forgets index rows (:meth:`SiteCache.drop`); the bytes of a segment
are reclaimed when it is compacted, so the limit bounds the cached bytes the
index names, which is what the site would otherwise re-serve and re-announce.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .cache import SiteCache
from .state import ParcelState

log = logging.getLogger("isrsync.evict")

StateOf = Callable[[uuid.UUID], ParcelState]  # Site.state


@dataclass(frozen=True)
class EvictResult:
    chunks: int  # chunks evicted
    bytes: int  # their bytes
    cached_bytes: int  # what the index names after eviction
    protected_bytes: int  # bytes that would have gone but are a parcel's own state

    def to_json(self) -> dict[str, int]:
        return {"chunks": self.chunks, "bytes": self.bytes, "cached_bytes": self.cached_bytes,
                "protected_bytes": self.protected_bytes}


def protected_tags(state_of: StateOf, parcels: Iterable[uuid.UUID]) -> set[bytes]:
    """Tags no eviction may touch: each parcel's dirty, staged and saved-memory chunks.

    A parcel whose state cannot be read raises: guessing would risk the only copy.
    """
    keep: set[bytes] = set()
    for p in parcels:
        st = state_of(p)
        try:
            keep.update(ref.tag for ref in st.dirty().values())
            keep.update(st.staged()[1])
            mem = st.load_memory()
            if mem is not None:
                keep.update(mem.tags())
        finally:
            st.close()
    return keep


def evict_lru(cache: SiteCache, limit: int, protected: set[bytes]) -> EvictResult:
    """Drop the least recently used chunks until the cached bytes are at most ``limit``. Blocks."""
    rows = cache.lru()
    total = sum(n for _, n in rows)
    goes: list[bytes] = []
    freed = skipped = 0
    for tag, n in rows:
        if total - freed <= limit:
            break
        if tag in protected:
            skipped += n
            continue
        goes.append(tag)
        freed += n
    if goes:
        for i in range(0, len(goes), 10_000):
            cache.drop(goes[i : i + 10_000])
        log.info("evicted %d chunks (%d bytes) to keep the cache under %d bytes", len(goes), freed, limit)
    return EvictResult(len(goes), freed, total - freed, skipped if total - freed > limit else 0)


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``2TiB``, ``1000000``: bytes (binary units). ValueError on anything else."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    value = float(t)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError(text)
    return int(value * mult)
