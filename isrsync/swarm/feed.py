"""LAN peers fed live into a running resume (issue 12, part 2), as media are (site/run.py).

While a parcel runs, its :class:`~isrsync.swarm.lanswarm.LanSwarm` announces the
site and browses; the parcel's peer source joins the resume's source registry
when the first site that holds the parcel shows up, and leaves it when discovery
drops the last one. The registry orders sources by cost: a medium, then the LAN
peers (:data:`~isrsync.swarm.lanswarm.LAN_COST`), then the home server. Every chunk
a peer answers is checked by the registry like any other source's.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ..site.runtime import Runtime
from .join import join

if TYPE_CHECKING:  # libtorrent loads only when the swarm starts (join)
    from .peer import PeerSource

log = logging.getLogger("isrsync.swarm.feed")

#: Seconds a resume waits for discovery before its first reads (only when no peer answers).
SETTLE = 2.0

Events = Callable[[str, dict[str, Any]], None]


@contextlib.asynccontextmanager
async def swarm_feeder(rt: Runtime, parcel: uuid.UUID, say: Events) -> AsyncIterator[None]:
    """Announce, browse and feed peers into ``rt`` for the block; off (one warning) if the swarm fails."""
    site = rt.site

    def changed(_parcel: uuid.UUID, src: PeerSource, has_peers: bool) -> None:
        if has_peers:
            rt.offer(src)
            say("source", {"message": f"LAN peers can help: {', '.join(f'{h}:{p}' for h, p in src.peers)}",
                           "name": src.name})
        else:
            # Taken out without closing it: the same source comes back with the next peer.
            if rt.chain is not None:
                rt.chain.remove(src.name)
            else:
                rt.lookaside = [s for s in rt.lookaside if s is not src]
            say("source", {"message": "no LAN peer holds the parcel any more: withdrawn", "name": src.name})

    lan = await join(site.cache.path, uuid.UUID(site.cache.site_id), site.store, [parcel],
                              lambda m: say("warning", {"message": m}), on_peers=changed, cache=site.cache)
    if lan is not None:
        # Browsing starts at once (the announcement registers in the background); the
        # resume's first reads (the boot files, the memory image) are most of what it
        # fetches, so they wait up to SETTLE seconds for a peer that holds the parcel.
        await lan.settle(parcel, SETTLE)
    try:
        yield None
    finally:
        if lan is not None:
            if rt.chain is not None and parcel in lan.sources and rt.chain.get("lan") is lan.sources[parcel]:
                rt.chain.remove("lan")
            await lan.close()
