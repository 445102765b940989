"""The home server as a lookaside source (DESIGN.md, "Site").

Chunks are found through the server's pack index and read with HTTP ranges.
Neighbouring chunks of one pack are read in one range when the bytes between
them are few: those bytes cross the link for nothing, so they are counted
(``discarded_bytes``, shown as waste in ``isrsync status``) and a gap is only
bridged when it costs under 1 % of the range (a pack's entry headers always are).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from typing import Sequence

from ..pack import ENTRY_HEADER_SIZE, PackEntry
from ..store.base import Store
from .sources import SourceKind

class ServerSource:
    """The home server as a source: tag -> (pack, offset, length) -> a Range read.

    Locations come from the server's pack index, learned in bulk (one request
    for a whole keyring at resume) and on demand for anything not yet known.
    Adjacent chunks of one pack are fetched in one range.
    """

    name = "server"
    kind = SourceKind.SERVER
    GAP = 256 << 10  # never bridge more than this between two chunks
    GAP_SHARE = 0.01  # nor more than this share of the range so far

    def __init__(self, store: Store, parcel: uuid.UUID, rtt: float = 0.05) -> None:
        self.store = store
        self.parcel = parcel
        self._where: dict[bytes, PackEntry] = {}
        self._rtt = rtt
        self.discarded_bytes = 0  # read from the server but part of no chunk asked for

    def cost(self) -> float:
        return self._rtt + 0.01

    async def close(self) -> None:
        """The store belongs to the site and is closed with it."""

    def pack_of(self, tag: bytes) -> bytes | None:
        e = self._where.get(tag)
        return e.pack_id if e is not None else None

    async def learn(self, tags: Sequence[bytes]) -> None:
        unknown = [t for t in tags if t not in self._where]
        for i in range(0, len(unknown), 50_000):
            self._where.update(await self.store.locate(self.parcel, unknown[i : i + 50_000]))

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        await self.learn(tags)
        by_pack: dict[bytes, list[PackEntry]] = defaultdict(list)
        for t in tags:
            e = self._where.get(t)
            if e is not None:
                by_pack[e.pack_id].append(e)
        out: dict[bytes, bytes] = {}
        jobs = []
        for pack_id, entries in by_pack.items():
            entries.sort(key=lambda e: e.offset)
            run = [entries[0]]
            for e in entries[1:]:
                gap = e.offset - (run[-1].offset + run[-1].length)
                if gap <= max(ENTRY_HEADER_SIZE, min(self.GAP, self.GAP_SHARE * (run[-1].offset + run[-1].length - run[0].offset))):
                    run.append(e)
                else:
                    jobs.append(self._range(pack_id, run, out))
                    run = [e]
            jobs.append(self._range(pack_id, run, out))
        await asyncio.gather(*jobs)
        return out

    async def _range(self, pack_id: bytes, run: list[PackEntry], out: dict[bytes, bytes]) -> None:
        lo, hi = run[0].offset, run[-1].offset + run[-1].length
        t0 = time.perf_counter()
        blob = await self.store.get_pack(self.parcel, pack_id, lo, hi - lo)
        # A running estimate of the round trip keeps the cost order honest.
        self._rtt = 0.8 * self._rtt + 0.2 * (time.perf_counter() - t0)
        for e in run:
            out[e.tag] = blob[e.offset - lo : e.offset - lo + e.length]
        self.discarded_bytes += len(blob) - sum(e.length for e in run)
