"""LAN peers as a lookaside source: chunks by tag through the site's libtorrent session.

One :class:`PeerSource` stands for the whole LAN swarm of a parcel: libtorrent
picks which peer sends which piece, and discovery (mDNS, the user) only adds and
withdraws peer addresses (:meth:`add_peer`, :meth:`remove_peer`); this module
never learns how a peer was found.

A tag becomes (pack, offset, length) through the home server's pack index
(learned in bulk and on demand, as :class:`~isrsync.site.serversource.ServerSource`
does), the pack's torrent comes from the home server beside the pack, and the
chunk's pieces are read with piece deadlines (:meth:`SwarmSession.read`). What
comes back passed libtorrent's merkle check; the registry checks the tag again.
A pack without a torrent (made before torrents were) is simply not asked here.

Time is bounded: a peer that vanishes mid-piece costs at most ``read_timeout``
seconds, after which the miss falls through to the next source; with no peer
connected at all a read waits only ``idle_timeout`` (pieces already fetched are
still answered from the site's own torrent storage), and only a few times per
pack: a pack no peer would serve in ``NO_PEER_STRIKES`` fetches in a row is not
asked again for ``NO_PEER_RETRY`` seconds or until discovery adds a peer. Without that, a resume beside a jukebox holding only an
older version paid the idle wait on every fetch of the new version's packs
(its memory image, the user's changes): 110 s before the guest answered where
the server alone took 2 s (benchmarks/paper, the jukebox column).

The direct path (direct.py) is asked first when a peer runs one (the ``d`` port of
its announcement): demand misses cost a few milliseconds there against tens on the
deadline path (benchmarks/peer_miss.py). Its answers are checked by tag here; a
peer that sends one bad chunk is banned for the session, on both paths. A peer
that fails a direct request (gone, stalled) is skipped for :data:`DOWN_FOR`
seconds, so only one miss pays its ``stall`` timeout. What the direct peers did
not answer goes the deadline path only when it can help: a peer that runs no
direct path, or a web seed (a direct peer answers from every verified piece it
holds, so asking its libtorrent again would only wait on it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from ..chunk import tag_of
from ..errors import FormatError, IsrError
from ..pack import PackEntry
from ..site.sources import SourceKind
from ..store.base import Store
from .direct import DirectClient, DirectError
from .directfmt import Want
from .session import SwarmSession, WebSeed
from .torrent import PackTorrent, load_torrent

log = logging.getLogger("isrsync.swarm.peer")

#: Seconds a peer whose direct path failed is not asked on it again.
DOWN_FOR = 5.0
#: Seconds a pack that found no peer within ``idle_timeout`` is left to the next source.
NO_PEER_RETRY = 30.0
#: Fetches in a row that found no peer for a pack before it is left alone: one can be a
#: connection still coming up (libtorrent on a loaded machine), not a peer without it.
NO_PEER_STRIKES = 2

WebSeedFor = Callable[[bytes], "WebSeed | None"]  # pack id -> the home server as its web seed


class PeerSource:
    """Chunks by tag from LAN peers (and, if given, the home server as web seed)."""

    kind = SourceKind.PEER

    def __init__(
        self,
        swarm: SwarmSession,
        store: Store,
        parcel: uuid.UUID,
        *,
        name: str = "lan",
        web_seed: WebSeedFor | None = None,
        owns_swarm: bool = False,
        read_timeout: float = 3.0,
        idle_timeout: float = 0.5,
        per_chunk: float = 0.02,
        direct: DirectClient | None = None,
    ) -> None:
        self.name = name
        self.swarm = swarm
        self.store = store
        self.parcel = parcel
        self._web_seed = web_seed
        self._owns = owns_swarm
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._per_chunk = per_chunk
        self._peers: set[tuple[str, int]] = set()
        self._where: dict[bytes, PackEntry] = {}
        self._torrents: dict[bytes, PackTorrent | None] = {}  # None: the pack has no torrent
        self._direct = direct
        self._direct_ports: dict[tuple[str, int], int] = {}  # (host, BitTorrent port) -> direct port
        self._down: dict[tuple[str, int], float] = {}  # peer -> monotonic time its direct path may retry
        self.bad_chunks = 0  # chunks a peer sent on the direct path that failed their tag
        self._no_peer: dict[bytes, tuple[int, float]] = {}  # pack id -> (fetches in a row without a peer, last)
        self._closed = False

    def cost(self) -> float:
        return self._per_chunk

    # -- membership (what discovery feeds) -------------------------------------------------

    def add_peer(self, host: str, port: int, direct_port: int | None = None) -> None:
        """A peer at ``host``: its BitTorrent port, and its direct path's port if it runs one."""
        if (host, port) not in self._peers:
            self._no_peer.clear()  # the newcomer may hold what nobody did
        self._peers.add((host, port))
        if direct_port is not None:
            self._direct_ports[(host, port)] = direct_port
        else:
            self._direct_ports.pop((host, port), None)

    def remove_peer(self, host: str, port: int) -> None:
        # libtorrent keeps an open connection until it breaks; new packs will not meet the peer.
        self._peers.discard((host, port))
        direct = self._direct_ports.pop((host, port), None)
        if direct is not None and self._direct is not None:
            self._direct.forget(host, direct)

    @property
    def peers(self) -> list[tuple[str, int]]:
        """The peers this source asks: those discovery named, less any banned for bad data."""
        return sorted(self._peers - self.swarm.banned)

    def learn_entries(self, entries: Sequence[PackEntry]) -> None:
        """Locations known already (a resume's bulk ``locate``): no request per miss."""
        self._where.update((e.tag, e) for e in entries)

    # -- Source ----------------------------------------------------------------------------

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        if self._closed:
            raise ConnectionError(f"the peer source {self.name} is closed")
        tags = list(dict.fromkeys(tags))
        if not tags:
            return {}
        if not self.peers and self._web_seed is None and not self.swarm.holds_any():
            return {}
        unknown = [t for t in tags if t not in self._where]
        for i in range(0, len(unknown), 50_000):
            self._where.update(await self.store.locate(self.parcel, unknown[i : i + 50_000]))
        wanted = [self._where[t] for t in tags if t in self._where]
        t0 = time.perf_counter()
        out: dict[bytes, bytes] = {}
        if self._direct is not None:
            # Pieces already verified here (a bulk prefetch's packs) first, then the direct peers.
            local = [e for e in wanted if self.swarm.has(e.pack_id)]
            if local:
                out = await asyncio.to_thread(_read_local, self.swarm, local)
            direct = self._direct_peers()
            left = [e for e in wanted if e.tag not in out]
            if direct and left:
                out.update(await self._get_direct(left, direct))
            wanted = [e for e in wanted if e.tag not in out]
            # Every peer runs a direct path (answering from every piece it verified) and
            # none had the rest, or is down: the deadline path would only wait on them.
            if not wanted or (self._web_seed is None and all(p in self._direct_ports for p in self.peers)):
                self._learn_cost(t0, len(out))
                return out
        now = time.monotonic()
        wanted = [e for e in wanted if not self._left(e.pack_id, now)]
        packs = {e.pack_id for e in wanted}
        ready = {p for p, ok in zip(packs, await asyncio.gather(*(self._ensure(p) for p in packs))) if ok}
        if self._direct is None:
            t0 = time.perf_counter()  # the torrent path's cost: fetching torrents is a one-off
        ready = list(ready)
        linked = dict(zip(ready, await asyncio.gather(*(self._linked(p) for p in ready))))
        jobs = [self._read(e, linked[e.pack_id]) for e in wanted if e.pack_id in linked]
        got = await asyncio.gather(*jobs)
        out.update((tag, data) for tag, data in got if data is not None)
        self._learn_cost(t0, len(out))
        return out

    def _learn_cost(self, t0: float, n: int) -> None:
        if n:
            self._per_chunk = 0.8 * self._per_chunk + 0.2 * (time.perf_counter() - t0) / n

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns:
            if self._direct is not None:
                await self._direct.close()
            await self.swarm.close()

    # -- the direct path -------------------------------------------------------------------

    def _direct_peers(self) -> list[tuple[str, int, int]]:
        """(host, BitTorrent port, direct port) of the peers to ask directly now."""
        if self._direct is None:
            return []
        now = time.monotonic()
        return [(h, p, self._direct_ports[(h, p)]) for h, p in self.peers
                if (h, p) in self._direct_ports and self._down.get((h, p), 0.0) <= now]

    async def _get_direct(self, wanted: list[PackEntry], peers: list[tuple[str, int, int]]) -> dict[bytes, bytes]:
        """Ask the direct peers in turn (each for what the ones before did not have)."""
        assert self._direct is not None
        out: dict[bytes, bytes] = {}
        # Spread the first ask: with several peers, concurrent misses do not all queue at one.
        start = hash(wanted[0].tag) % len(peers)
        for host, port, dport in peers[start:] + peers[:start]:
            left = [Want(e.tag, e.pack_id, e.offset, e.length) for e in wanted if e.tag not in out]
            if not left:
                break
            try:
                answer = await self._direct.fetch(host, dport, left)
            except DirectError as e:
                self._down[(host, port)] = time.monotonic() + DOWN_FOR
                log.info("LAN peer %s:%d: %s; skipping its direct path for %g s", host, dport, e, DOWN_FOR)
                continue
            out.update(answer.good)
            if answer.failed is not None:
                self._down[(host, port)] = time.monotonic() + DOWN_FOR
                log.info("LAN peer %s:%d failed midway: %s", host, dport, answer.failed)
            if answer.bad:
                # Its good chunks were checked one by one and stay; the peer does not.
                self.bad_chunks += len(answer.bad)
                self._direct.forget(host, dport)
                self.swarm.ban(host, port, f"{len(answer.bad)} chunk(s) on the direct path failed their tag")
        return out

    # -- helpers ---------------------------------------------------------------------------

    async def _ensure(self, pack_id: bytes) -> bool:
        """The pack's torrent is in the session and connected to the peers known now."""
        if pack_id not in self._torrents:
            raw = await self.store.get_torrent(self.parcel, pack_id)
            torrent = None
            if raw is not None:
                try:
                    torrent = load_torrent(pack_id, raw)
                except FormatError as e:
                    log.info("pack %s: its torrent is unusable: %s", pack_id.hex()[:16], e)
            self._torrents[pack_id] = torrent
        torrent = self._torrents[pack_id]
        if torrent is None:
            return False
        if not self.swarm.has(pack_id):
            seed = self._web_seed(pack_id) if self._web_seed is not None else None
            await self.swarm.add(torrent, web_seed=seed)
        for host, port in self.peers:
            await self.swarm.connect(pack_id, host, port)
        return True

    async def _linked(self, pack_id: bytes) -> bool:
        """Whether the pack's torrent has a peer (or web seed) to fetch from, waiting
        up to ``idle_timeout`` for a connection just asked for to come up."""
        if self.swarm.holds_whole(pack_id):
            return True  # read from this site's own file: nobody to wait for
        end = time.monotonic() + self.idle_timeout
        while await self.swarm.peers(pack_id) == 0:
            if time.monotonic() >= end:
                if not self.swarm.holds_some(pack_id):  # held pieces still answer at once
                    self._no_peer[pack_id] = (self._no_peer.get(pack_id, (0, 0.0))[0] + 1, time.monotonic())
                return False
            await asyncio.sleep(0.02)
        self._no_peer.pop(pack_id, None)
        return True

    def _left(self, pack_id: bytes, now: float) -> bool:
        """Whether the pack is left to the next source for now (no peer, several times, lately)."""
        strikes, last = self._no_peer.get(pack_id, (0, 0.0))
        return strikes >= NO_PEER_STRIKES and now - last < NO_PEER_RETRY

    async def _read(self, e: PackEntry, linked: bool) -> tuple[bytes, bytes | None]:
        # Nobody to fetch from: only pieces this site already holds can answer,
        # and they do at once; don't make the miss wait for a peer that is not there.
        try:
            data = await self.swarm.read(e.pack_id, e.offset, e.length,
                                         timeout=self.read_timeout if linked else self.idle_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            log.info("chunk %s: no peer answered in time", e.tag.hex()[:16])
            return e.tag, None
        except (IsrError, OSError) as err:
            log.info("chunk %s: %s", e.tag.hex()[:16], err)
            return e.tag, None
        self._no_peer.pop(e.pack_id, None)  # the connection came up after all
        return e.tag, data


def _read_local(swarm: SwarmSession, entries: list[PackEntry]) -> dict[bytes, bytes]:
    """On a worker: the chunks whose pieces this site's session verified, checked by tag."""
    out = {}
    for e in entries:
        data = swarm.read_verified(e.pack_id, e.offset, e.length)
        if data is not None and tag_of(data) == e.tag:
            out[e.tag] = data
    return out
