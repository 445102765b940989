"""A running site's part in the LAN swarm (issue 12, part 2): one libtorrent session,
its mDNS announcement, and a browser whose finds become LAN peer sources.

A resume, a hoard and ``isrsync jukebox`` each run one :class:`LanSwarm`. It
announces ``_isrsync._tcp`` with the session's listen port and the salted hashes
of the parcels it can help with (never a name), browses for the other sites, and
keeps one :class:`~isrsync.swarm.peer.PeerSource` per parcel it works on, whose
peer set follows discovery: a site that says it holds the parcel is added, one
that discovery drops (goodbye or failed probes) is withdrawn.

Beside the session runs the direct path's server (direct.py), bound on the same
addresses and announced as TXT key ``d``: it answers other sites' demand misses
from this site's cache (``cache``) and from the pieces the session verified.

The swarm is an optimisation, never a requirement: :func:`start_or_none` turns any
failure to start libtorrent or mDNS into one warning line and ``None``, and the
caller goes on with the home server alone. ``ISRSYNC_SWARM=off`` (the global
``--no-swarm`` flag) turns it off without trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import IsrError
from ..site.cache import SiteCache
from ..store.base import Store
from . import announce
from .direct import DirectClient, DirectServer, SiteChunks
from .discovery import Browser, Peer, announcing, lan, lan_addresses
from .join import enabled
from .org import site_org
from .peer import PeerSource
from .session import SwarmSession, SwarmSettings

log = logging.getLogger("isrsync.swarm.lan")

#: The swarm's storage under the site cache: one file per pack, named by its id.
SWARM_DIR = "swarm"
#: Seconds between two reconciliations of the peer sources with discovery's table.
RECONCILE = 0.5
#: A LAN peer's first cost estimate (seconds per chunk): below the home server's, so a
#: peer is asked first; the registry's running estimate corrects it after a batch.
LAN_COST = 0.002

PeerHook = Callable[[uuid.UUID, PeerSource, bool], None]  # parcel, source, True: now has peers


class LanSwarm:
    """Session + announcement + browser of one site. ``await start()``, ``await close()``."""

    def __init__(self, cache_dir: Path, site_id: uuid.UUID, store: Store | None, parcels: Sequence[uuid.UUID], *,
                 interfaces: Sequence[str] | None = None, name: str | None = None,
                 cached_bytes: int = 0, on_peers: PeerHook | None = None,
                 probe_interval: float = 1.0, role: str = "site", cache: SiteCache | None = None) -> None:
        self.storage = cache_dir / SWARM_DIR
        self.site_id = site_id
        self.store = store
        self.parcels = list(dict.fromkeys(parcels))
        self.interfaces = list(interfaces) if interfaces else None
        self.name = name or socket.gethostname()
        self.cached_bytes = cached_bytes
        # One fixed port for every interface: with port 0, libtorrent binds each
        # interface on its own ephemeral port, and listen_port() names only one of
        # them (seen: loopback's), so the announced port would not answer on the LAN.
        # A site cache with a swarm secret talks only to its organisation (org.py).
        org = site_org(cache_dir)
        self.session = SwarmSession(self.storage, SwarmSettings(port=_free_port(), org=org))
        # The direct path is restricted to the organisation the same way (TLS under its CA).
        self.direct = DirectServer(SiteChunks(cache, self.session), org=org)
        self.client = DirectClient(org=org)
        self.sources: dict[uuid.UUID, PeerSource] = {}
        self._on_peers = on_peers
        self._probe = probe_interval
        # Part of the mDNS instance name: a jukebox and a resume on one cache share the
        # site id, and two registrations of one name fail zeroconf's conflict probe.
        self._role = role
        self._stack = contextlib.AsyncExitStack()
        self._browser: Browser | None = None
        self._task: asyncio.Task[None] | None = None
        self.addresses: list[str] = []
        self._announcer: asyncio.Task[None] | None = None
        self._registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self) -> LanSwarm:
        try:
            await self.session.start()
            self._stack.push_async_callback(self.session.close)
            self.addresses = self.interfaces or lan_addresses()
            if not self.addresses:
                raise IsrError("this host has no LAN address to announce")
            await self.direct.start(self.addresses)
            self._stack.push_async_callback(self.direct.close)
            self._stack.push_async_callback(self.client.close)
            zc = await self._stack.enter_async_context(lan(self.addresses))
            # Browse first: finding peers does not wait for our own registration,
            # whose mDNS probing alone takes about 2 s (it runs on in the background).
            self._browser = await self._stack.enter_async_context(
                Browser(zc, parcels=self.parcels, own_site=self.site_id, probe_interval=self._probe))
            ann = announce.make(self.site_id, self.name, self.session.port, self.cached_bytes, self.parcels,
                                direct_port=self.direct.port)
            self._announcer = asyncio.create_task(self._announce(ann, zc))
            self._stack.push_async_callback(self._stop_announcing)
        except BaseException:
            await self._stack.aclose()
            raise
        if self.store is not None:
            for p in self.parcels:
                # No web seed: the home server is a source of its own, asked after the peers.
                self.sources[p] = PeerSource(self.session, self.store, p, name="lan", per_chunk=LAN_COST,
                                             direct=self.client)
        self._task = asyncio.create_task(self._reconcile())
        return self

    async def settle(self, parcel: uuid.UUID, seconds: float, *, once_announced: bool = False) -> int:
        """Wait up to ``seconds`` for a peer that holds ``parcel``; returns how many there are.

        A bulk fetch that starts before discovery has answered would take its
        first batches from the home server; a few seconds of waiting is cheap next to that.
        """
        loop = asyncio.get_running_loop()
        if once_announced:
            # The window opens once others can see this site: two sites hoarding at once
            # (one slower to load) then wait for each other alike.
            with contextlib.suppress(Exception):  # unannounced: it still finds the others
                await asyncio.wait_for(self.announced(), seconds)
        end = loop.time() + seconds
        while loop.time() < end:
            n = sum(1 for p in self.peers() if self._helps(p, parcel))
            if n:
                await asyncio.sleep(RECONCILE * 1.5)  # let the reconciler hand them to the source
                return n
            await asyncio.sleep(0.1)
        return 0

    async def announced(self) -> None:
        """Wait until the announcement is registered (raises what registering raised)."""
        await asyncio.shield(self._registered)

    async def _announce(self, ann: announce.Announcement, zc: object) -> None:
        try:
            async with announcing(ann, self.addresses, zc=zc,  # type: ignore[arg-type]
                                  host=f"{self._role}-{socket.gethostname()}"):
                self._registered.set_result(None)
                await asyncio.Event().wait()  # until cancelled: the goodbye goes out on the way out
        except Exception as e:  # noqa: BLE001 - an unannounced site still fetches from its peers
            if not self._registered.done():
                self._registered.set_exception(e)
            log.warning("this site is not announced on the LAN: %s", e)

    async def _stop_announcing(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
        if self._registered.done() and not self._registered.cancelled():
            self._registered.exception()  # retrieved: nobody may have waited for it

    @property
    def port(self) -> int:
        return self.session.port

    def peers(self) -> list[Peer]:
        return self._browser.peers() if self._browser is not None else []

    def peers_of(self, parcel: uuid.UUID) -> list[Peer]:
        """The live peers that say they hold or work on ``parcel``."""
        return [p for p in self.peers() if self._helps(p, parcel)]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for src in self.sources.values():
            await src.close()
        await self._stack.aclose()

    async def _reconcile(self) -> None:
        # Polling the table (not its event stream) cannot miss a peer that came up
        # before the first read, and costs nothing next to the probes behind it.
        while True:
            table = self.peers()
            for parcel, src in self.sources.items():
                direct = {(p.address, p.port): p.direct_port for p in table if self._helps(p, parcel)}
                want = set(direct)
                have = set(src.peers)
                for host, port in want - have:
                    src.add_peer(host, port, direct[(host, port)])
                    log.info("LAN peer %s:%d can help parcel %s", host, port, str(parcel)[:8])
                for host, port in have - want:
                    src.remove_peer(host, port)
                    log.info("LAN peer %s:%d is gone", host, port)
                if self._on_peers is not None and bool(want) != bool(have):
                    self._on_peers(parcel, src, bool(want))
            await asyncio.sleep(RECONCILE)

    def _helps(self, peer: Peer, parcel: uuid.UUID) -> bool:
        # The table counts parcels in common against all of ours; with one parcel
        # per resume or hoard that is the parcel itself. The announcement is the
        # authority: ask it directly when the browser kept it.
        ann = self._browser.announcement(peer.instance) if self._browser is not None else None
        return ann.has_parcel(parcel) if ann is not None else peer.parcels_in_common > 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


async def start_or_none(cache_dir: Path, site_id: uuid.UUID, store: Store | None, parcels: Sequence[uuid.UUID],
                        warn: Callable[[str], None], **kw: object) -> LanSwarm | None:
    """A started :class:`LanSwarm`, or ``None`` (off by setting, or it failed: one warning line)."""
    if not enabled():
        return None
    try:
        return await LanSwarm(cache_dir, site_id, store, parcels, **kw).start()  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - libtorrent and zeroconf fail in many ways; the server still serves
        warn(f"the LAN swarm is off ({type(e).__name__}: {e}); fetching from the home server alone")
        return None
