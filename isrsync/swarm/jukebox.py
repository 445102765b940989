"""`isrsync jukebox`: an idle site cache that seeds what it holds and keeps announcing
(issue 12, part 4; the paper's jukebox).

The site cache keeps chunks by tag in segments; BitTorrent wants packs. So the
jukebox lays the chunks it holds of each parcel back into sparse pack files (the
home server's pack index says where each chunk sits in its pack) under the
swarm's storage, and adds each pack's torrent: libtorrent checks those files
against the torrent's merkle tree and seeds every piece that verifies. A pack the
cache covers almost whole (:data:`FILL_AT`) is completed from the home server as
web seed at the lowest priority, so the few bytes between chunks (the pack's
header) do not leave holes; a pack covered less is seeded as far as it goes and
fetches nothing (a jukebox is no reason to download what nobody ran here).

Every :data:`ROUND` seconds the jukebox re-reads the cache (a resume at this site
may have fetched more), applies the cache limit (LRU, never a parcel's own state:
:mod:`isrsync.site.evict`) and reports a state line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, IsrError
from ..longlived import settle
from ..pack import PackEntry
from ..site.cache import SiteCache
from ..site.evict import evict_lru, protected_tags
from ..site.state import ParcelState
from ..store.base import Store
from .discovery import local_parcels
from .lanswarm import LanSwarm
from .session import SwarmSession, WebSeed
from .torrent import load_torrent

log = logging.getLogger("isrsync.jukebox")

#: Seconds between two rounds (re-read the cache, evict, report).
ROUND = 30.0
#: Share of a pack's bytes the cache must hold before the rest is fetched to seed it whole.
FILL_AT = 0.9

Say = Callable[[str, dict[str, Any]], None]  # event kind, data (the CLI prints or emits JSON)


@dataclass
class JukeboxConfig:
    cache_limit: int | None = None  # bytes of cached chunks; None: no limit
    interfaces: list[str] | None = None
    round_seconds: float = ROUND


@dataclass
class _Seeded:
    packs: dict[bytes, uuid.UUID] = field(default_factory=dict)  # pack id -> parcel


async def seed_parcel(cache: SiteCache, store: Store, parcel: uuid.UUID, session: SwarmSession,
                      web_seed: Callable[[bytes], WebSeed | None], seeded: _Seeded) -> int:
    """Lay the cached chunks of ``parcel`` into pack files and add their torrents; returns new packs."""
    tags = await asyncio.to_thread(cache.tags)
    where: dict[bytes, PackEntry] = {}
    for i in range(0, len(tags), 50_000):
        where.update(await store.locate(parcel, tags[i : i + 50_000]))
    by_pack: dict[bytes, list[PackEntry]] = defaultdict(list)
    for e in where.values():
        by_pack[e.pack_id].append(e)
    added = 0
    for pack_id, entries in by_pack.items():
        if session.has(pack_id):
            continue
        raw = await store.get_torrent(parcel, pack_id)
        if raw is None:
            continue  # a pack made before torrents were: the server alone serves it
        try:
            torrent = load_torrent(pack_id, raw)
        except FormatError as e:
            log.info("pack %s: its torrent is unusable: %s", pack_id.hex()[:16], e)
            continue
        covered = await asyncio.to_thread(_lay_out, cache, session.file_of(pack_id), torrent.size, entries)
        fill = covered >= FILL_AT * torrent.size
        await session.add(torrent, web_seed=web_seed(pack_id) if fill else None)
        if fill:
            session.want_all(pack_id, 1)  # lowest priority: under every demand read
        seeded.packs[pack_id] = parcel
        added += 1
        log.info("pack %s: %d of %d bytes from the cache%s", pack_id.hex()[:16], covered, torrent.size,
                 ", the rest from the server" if fill else "")
    return added


def _lay_out(cache: SiteCache, path: Path, size: int, entries: list[PackEntry]) -> int:
    """Write the cached chunks at their pack offsets into a sparse file; returns the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        done = 0
        for e in sorted(entries, key=lambda e: e.offset):
            data = cache.get(e.tag)  # verified against its tag: only good bytes go in
            if data is None or len(data) != e.length or e.offset + e.length > size:
                continue
            os.pwrite(fd, data, e.offset)
            done += e.length
        return done
    finally:
        os.close(fd)


async def run_jukebox(cache: SiteCache, store: Store | None, *, server: str | None, token: str,
                      state_of: Callable[[uuid.UUID], ParcelState] | None, config: JukeboxConfig,
                      say: Say, stop: asyncio.Event, name: str | None = None) -> dict[str, Any]:
    """Announce, seed, evict, report, until ``stop`` is set; the mDNS goodbye goes out on the way out."""
    parcels = local_parcels(cache.path)
    stats = await asyncio.to_thread(cache.stats)
    lan = LanSwarm(cache.path, uuid.UUID(cache.site_id), None, parcels, interfaces=config.interfaces, name=name,
                   cached_bytes=stats.chunk_bytes, role="jukebox", cache=cache)
    await lan.start()
    await lan.announced()  # a jukebox is its announcement: say "announcing" only once it is true
    settle()  # peers' misses wait on this loop: later collections skip the start-up objects
    say("announcing", {"message": f"announcing on {', '.join(lan.addresses)}, BitTorrent port {lan.port}, "
                                  f"direct port {lan.direct.port}, {len(parcels)} parcel(s)", "port": lan.port,
                       "direct_port": lan.direct.port, "addresses": lan.addresses,
                       "parcels": len(parcels)})
    seeded = _Seeded()

    def web_seed(parcel: uuid.UUID) -> Callable[[bytes], WebSeed | None]:
        if server is None or not server.startswith(("http://", "https://")) or not token:
            return lambda _p: None
        return lambda _p: WebSeed(WebSeed.packs_url(server, parcel), token)

    rounds = 0
    try:
        while not stop.is_set():
            evicted = None
            if config.cache_limit is not None and state_of is not None:
                keep = await asyncio.to_thread(protected_tags, state_of, parcels)
                evicted = await asyncio.to_thread(evict_lru, cache, config.cache_limit, keep)
                if evicted.chunks:
                    say("evicted", {"message": f"evicted {evicted.chunks} chunks ({evicted.bytes} bytes) "
                                               f"to keep the cache under {config.cache_limit} bytes",
                                    **evicted.to_json()})
            if store is not None:
                for p in parcels:
                    try:
                        n = await seed_parcel(cache, store, p, lan.session, web_seed(p), seeded)
                    except (IsrError, OSError) as e:
                        say("warning", {"message": f"parcel {str(p)[:8]}: cannot seed now: {e}"})
                        continue
                    if n:
                        say("seeding", {"message": f"seeding {n} more pack(s) of a parcel", "packs": n})
            complete = sum(1 for p in seeded.packs if lan.session.has(p) and lan.session.complete(p))
            direct = lan.direct.stats
            say("state", {"message": f"{len(seeded.packs)} pack(s) seeded ({complete} whole), "
                                     f"{len(lan.peers())} peer(s) on the LAN, "
                                     f"{direct.chunks_sent} chunk(s) sent on the direct path",
                          "packs": len(seeded.packs), "complete": complete, "peers": len(lan.peers()),
                          "direct_chunks": direct.chunks_sent, "direct_bytes": direct.bytes_sent,
                          "round": rounds})
            rounds += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), config.round_seconds)
    finally:
        await lan.close()
    return {"how": "stopped", "packs": len(seeded.packs), "rounds": rounds}

