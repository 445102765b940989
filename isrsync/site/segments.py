"""Keyring segments fetched on demand (docs/manifest.md, "Keyring segments").

A version whose keyring is held as segments resolves to a
:class:`isrsync.keyring.LazyKeyring`: the resume starts on the device state, the
hot set and the segments of the chunks it touches, and the rest arrive later
(the disk asks for a segment before it reads an entry; the background hoard,
a commit and the tools ask for all of them). Segments are chunks: any source
may serve them, their tags are checked, and the cache keeps them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Iterable

from ..chunk import default_pool
from ..keyring import Keyring, LazyKeyring, decode_segment
from .pacing import Priority
from .registry import SourceRegistry


class SegmentLoader:
    """Fetches the segments of one lazy keyring through a source registry, each once."""

    def __init__(self, ring: LazyKeyring, chain: SourceRegistry, pool: Executor | None = None) -> None:
        self.ring = ring
        self.chain = chain
        self._pool = pool or default_pool()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self.fetched = 0  # segments this loader brought in (from the cache or a source)
        ring.loader = self

    async def ensure(self, idxs: Iterable[int]) -> None:
        """Make the entries ``idxs`` readable."""
        want = self.ring.wanted(idxs)
        if want:
            await self._load(want, Priority.FAULT)

    async def load_all(self, group: int = 4) -> None:
        """Every segment, a few at a time (so a demand for one is never queued behind all)."""
        missing = self.ring.missing()
        for k in range(0, len(missing), group):
            await self._load(missing[k : k + group], Priority.BULK)

    async def _load(self, js: list[int], priority: Priority) -> None:
        loop = asyncio.get_running_loop()
        ring = self.ring
        waits = [self._inflight[j] for j in js if j in self._inflight]
        missing = set(ring.missing())
        mine = [j for j in js if j not in self._inflight and j in missing]
        if mine:
            fut: asyncio.Future[None] = loop.create_future()
            for j in mine:
                self._inflight[j] = fut
            try:
                refs = [ring.segment_ref(j) for j in mine]
                tags = [r.tag for r in refs if not r.is_zero]
                got = await self.chain.fetch_patiently(tags, priority=priority)
                n = ring.base_entries
                plains = await loop.run_in_executor(
                    self._pool, lambda: [decode_segment(r, got.get(r.tag), n, j) for j, r in zip(mine, refs)])
                for j, plain in zip(mine, plains):
                    ring.fill(j, plain)
                self.fetched += len(mine)
                fut.set_result(None)
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: nobody else may be waiting
                raise
            finally:
                for j in mine:
                    self._inflight.pop(j, None)
        for w in waits:
            await asyncio.shield(w)


async def whole(ring: Keyring, chain: SourceRegistry | None = None) -> Keyring:
    """``ring`` with every entry readable: a lazy one fetches its missing segments first
    (through its loader, or through ``chain``)."""
    if isinstance(ring, LazyKeyring) and not ring.complete:
        loader = ring.loader
        if loader is None:
            if chain is None:
                raise RuntimeError("a lazy keyring with no loader and no source registry")
            loader = SegmentLoader(ring, chain)
        await loader.load_all(group=16)
    return ring
