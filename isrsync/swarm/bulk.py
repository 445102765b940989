"""Bulk fetching through the swarm: several LAN sites hoarding one parcel at once
(issue 12, "bulk work downloads at low priority underneath"; benchmarks/swarm_hoard.py).

Before a hoard fetches chunk by chunk, :func:`prefetch` fetches the packs that
hold its missing chunks whole through libtorrent, at priority 1 (under every
demand deadline). Each pack has one *leader* among the sites that hold or hoard
the parcel: the site whose keyed hash of (pack id, site id) is lowest, which
every site computes alike from discovery's table with no message exchanged.
Only the leader reads the pack from the home server (piece-aligned ranges through
its Store, handed to libtorrent with ``add_piece``, which checks and then serves
them); the others take the pieces from the LAN as the leader's arrive, so one
copy crosses the WAN link however many sites hoard. A leader first looks for a
peer that already holds its pack whole, for up to ``probe`` seconds, and then
takes it from that peer instead. The leader reads through its
own Store rather than giving libtorrent the server as web seed: the Store's client
has the site's TLS settings (a private CA libtorrent would not trust), retries and
auth, works with any Store, and asks exact piece-aligned ranges.

The prefetch is a help, never a need: it ends when everything is in, or when no
piece has arrived for ``stall`` seconds (a leader that left, a peer that holds
nothing), and the caller's chunk fetch then takes whatever is still missing from
the registry (LAN peers first, then the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import FormatError, IsrError
from ..pack import PackEntry
from ..store.base import Store
from .lanswarm import LanSwarm
from .session import SwarmSession
from .torrent import PackTorrent, load_torrent

log = logging.getLogger("isrsync.swarm.bulk")

POLL = 0.5  # seconds between two looks at the packs' progress
LEAD_BLOCK = 1 << 20  # bytes a leader asks the server for at once (a multiple of the piece size)


@dataclass(frozen=True)
class PrefetchResult:
    packs: int  # packs fetched whole through the swarm
    led: int  # of which this site had the server as web seed
    complete: bool  # every pack came in (else the chunk fetch takes the rest)


async def _lead(session: SwarmSession, store: Store, parcel: uuid.UUID, packs: list[PackTorrent]) -> None:
    # One stream of piece-aligned ranges, pack after pack: the WAN link is the bottleneck,
    # and whole packs finished early let the followers complete them early.
    for t in packs:
        for at in range(0, t.size, LEAD_BLOCK):
            data = await store.get_pack(parcel, t.pack_id, at, min(LEAD_BLOCK, t.size - at))
            session.feed(t.pack_id, at, data)


def leader(pack_id: bytes, sites: Iterable[uuid.UUID]) -> uuid.UUID:
    """The site that fetches ``pack_id`` from the home server for the LAN."""
    return min(sites, key=lambda s: hashlib.blake2b(pack_id + s.bytes, digest_size=16).digest())


async def _unless_seeded(session: SwarmSession, lan: LanSwarm, parcel: uuid.UUID, packs: list[PackTorrent],
                         probe: float) -> list[PackTorrent]:
    """The packs this site must still lead: a pack some peer already holds whole (a
    jukebox, a site that hoarded it) comes from that peer, not from the home server.
    The election alone cannot know that: discovery says who helps with a parcel, not
    who holds which pack, and a hoarder elected for a jukebox's pack took a whole
    copy over the WAN."""
    for t in packs:
        for p in lan.peers_of(parcel):
            await session.connect(t.pack_id, p.address, p.port, attempts=1)
    loop = asyncio.get_running_loop()
    end = loop.time() + probe
    lead = list(packs)
    while lead:
        seeded = await asyncio.gather(*(session.seeds(t.pack_id) for t in lead))
        lead = [t for t, n in zip(lead, seeded, strict=True) if not n]
        if loop.time() >= end:
            break
        await asyncio.sleep(0.2)
    for t in packs:
        if t not in lead:
            session.want_all(t.pack_id, 1)
    return lead


async def prefetch(lan: LanSwarm, parcel: uuid.UUID, entries: Iterable[PackEntry], *, stall: float = 5.0,
                   start: float = 20.0, linger: float = 10.0, probe: float = 2.0,
                   progress: Callable[[int, int], None] | None = None) -> PrefetchResult:
    """Fetch whole the packs holding ``entries`` through the LAN swarm (see the module doc).

    ``start`` bounds the wait for the first piece: a leader that found its peers a
    few seconds later than this site is still locating its packs. Giving up on it
    after ``stall`` made both sites take the whole parcel from the server.
    """
    session, store = lan.session, lan.store
    assert store is not None, "a prefetch needs the home server's torrents"
    packs = sorted({e.pack_id for e in entries})
    peers = lan.peers_of(parcel)
    if not peers:
        # Alone: the chunk fetch asks the server for exactly the chunks missing, where
        # whole packs could carry bytes no version in use needs.
        return PrefetchResult(0, 0, False)
    sites = [lan.site_id, *(p.site_id for p in peers)]
    todo: set[bytes] = set()
    led_packs: list[PackTorrent] = []
    leaders: set[uuid.UUID] = set()  # the sites this one waits on
    total = 0
    for pack_id in packs:
        if session.has(pack_id):
            continue  # already there (a demand read added it, without a web seed)
        raw = await store.get_torrent(parcel, pack_id)
        if raw is None:
            continue  # a pack without a torrent: the chunk fetch takes it from the server
        try:
            torrent = load_torrent(pack_id, raw)
        except FormatError as e:
            log.info("pack %s: its torrent is unusable: %s", pack_id.hex()[:16], e)
            continue
        lead = leader(pack_id, sites)
        mine = lead == lan.site_id
        if not mine:
            leaders.add(lead)
        await session.add(torrent)
        if mine:
            led_packs.append(torrent)
        else:
            session.want_all(pack_id, 1)
        total += torrent.size
        todo.add(pack_id)
    fetched = len(todo)
    loop = asyncio.get_running_loop()
    if led_packs:
        led_packs = await _unless_seeded(session, lan, parcel, led_packs, probe)
    last_change, seen, connected_at = loop.time(), -1, -10.0
    have: dict[bytes, int] = {}
    feeder = asyncio.create_task(_lead(session, store, parcel, led_packs))
    while todo:
        if loop.time() - connected_at > 1.0:
            # Peers that came up since (or whose first connect failed): connect is idempotent.
            connected_at = loop.time()
            for pack_id in todo:
                for p in lan.peers_of(parcel):
                    await session.connect(pack_id, p.address, p.port, attempts=1)
        await asyncio.sleep(POLL)
        whole = []
        for pack_id in list(todo):
            have[pack_id], size = await session.progress(pack_id)
            if have[pack_id] >= size:
                todo.discard(pack_id)
                whole.append(pack_id)
        await asyncio.gather(*(session.hold_whole(p) for p in whole))  # their flush waits overlap
        done_bytes = sum(have.values())
        if progress is not None:
            progress(done_bytes, total)
        if done_bytes != seen or not todo:
            seen, last_change = done_bytes, loop.time()
        elif loop.time() - last_change > (stall if done_bytes else start) and feeder.done():
            log.info("the LAN prefetch stalled with %d pack(s) left; the chunk fetch takes the rest", len(todo))
            break
        elif feeder.done() and leaders and not leaders & {p.site_id for p in lan.peers_of(parcel)}:
            log.info("the sites leading the LAN prefetch left; the chunk fetch takes the rest")
            break
    if not feeder.done():
        feeder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeder  # its error (the server went away) ends the prefetch: the chunk fetch takes over
    # Stay a while for the sites still taking pieces of the packs this site led.
    end = loop.time() + linger
    while loop.time() < end and await session.uploading():
        await asyncio.sleep(POLL)
    return PrefetchResult(fetched, len(led_packs), not todo)



async def hoard_prefetch(lan: LanSwarm, cache: object, parcel: uuid.UUID, tags: Iterable[bytes],
                         progress: Callable[[int, int], None] | None = None) -> PrefetchResult:
    """The hoard's entry: locate the chunks the cache lacks and prefetch their packs."""
    store = lan.store
    if store is None:
        return PrefetchResult(0, 0, False)
    missing = await asyncio.to_thread(cache.missing, sorted(set(tags)))  # type: ignore[attr-defined]
    where: dict[bytes, PackEntry] = {}
    for i in range(0, len(missing), 50_000):
        where.update(await store.locate(parcel, missing[i : i + 50_000]))

    try:
        return await prefetch(lan, parcel, where.values(), progress=progress)
    except (IsrError, OSError, RuntimeError) as e:  # the swarm helps, never fails a hoard
        log.warning("the LAN prefetch failed (%s); fetching chunk by chunk", e)
        return PrefetchResult(0, 0, False)
