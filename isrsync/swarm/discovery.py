"""LAN discovery over mDNS/DNS-SD: announce this site, browse for the others (DESIGN.md "Site").

Discovery answers only "who is near and at which address" (syncthing's discover vs
protocol): it produces a table of typed :class:`Peer` rows and change events, and
knows nothing about torrents or chunks.

Liveness: mDNS only tells us a host left when it says goodbye; one that is killed or
unplugged lingers until its records expire (up to 75 minutes for TXT/SRV). So every
known peer is probed with a TCP connect to its announced BitTorrent port, every
``probe_interval`` seconds. The connect is what BitTorrent will do next anyway, so a
peer that refuses it is of no use even if its host still answers mDNS; a killed
process gives an immediate RST, a vanished host a timeout. The handshake time is the
round-trip time shown in the table. A dropped peer is kept in a shadow list and still
probed, so a peer that only stalled comes back without a new mDNS announcement.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ifaddr
from zeroconf import Error as ZeroconfError
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..errors import DiscoveryError, FormatError, UsageError
from . import announce
from .announce import Announcement

log = logging.getLogger(__name__)

#: Seconds between liveness probes of one peer.
PROBE_INTERVAL = 1.0
#: Seconds a TCP connect may take before the probe counts as failed.
PROBE_TIMEOUT = 1.0
#: Consecutive failed probes before a peer is dropped from the table.
PROBE_FAILURES = 2
#: Milliseconds a browser waits for a new service's SRV/TXT/A answers.
RESOLVE_TIMEOUT_MS = 3000
RESOLVE_TRIES = 5


@dataclass(frozen=True)
class Peer:
    """One live site on the LAN, as the table shows it."""

    site_id: uuid.UUID
    name: str
    address: str
    port: int
    cached_bytes: int
    parcels_in_common: int
    last_seen: float  # unix time of the last good probe (or of the announcement)
    rtt_ms: float | None  # TCP handshake time of the last good probe
    instance: str
    direct_port: int | None = None  # the direct path's port (direct.py), if the site runs one

    def to_json(self) -> dict[str, object]:
        return {"site_id": str(self.site_id), "name": self.name, "address": self.address, "port": self.port,
                "direct_port": self.direct_port,
                "cached_bytes": self.cached_bytes, "parcels_in_common": self.parcels_in_common,
                "last_seen": self.last_seen, "rtt_ms": self.rtt_ms}


class Change(str, enum.Enum):
    UP = "up"  # a peer appeared (or came back after being dropped)
    UPDATED = "updated"  # its announcement changed
    DOWN = "down"  # it said goodbye or failed its liveness probes


@dataclass(frozen=True)
class PeerEvent:
    change: Change
    peer: Peer


def check_interfaces(addresses: Sequence[str] | None) -> list[str] | None:
    """zeroconf's ``interfaces=`` wants IPv4 addresses (not interface names): check them early."""
    if not addresses:
        return None
    out = []
    for a in addresses:
        try:
            out.append(str(ipaddress.IPv4Address(a)))
        except ValueError:
            raise UsageError(f"{a!r} is not an IPv4 address", hint="give the address of the LAN interface, "
                             "e.g. --interface 192.168.1.10 (zeroconf binds by address, not by name)") from None
    return out


def lan_addresses() -> list[str]:
    """This host's IPv4 addresses worth announcing: not loopback, not link-local."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                a = ipaddress.IPv4Address(ip.ip)
                if not (a.is_loopback or a.is_link_local or a.is_unspecified):
                    out.append(str(a))
    return out


@contextlib.asynccontextmanager
async def lan(interfaces: Sequence[str] | None = None) -> AsyncIterator[AsyncZeroconf]:
    """One AsyncZeroconf on the given interface addresses (all IPv4 interfaces by default)."""
    addrs = check_interfaces(interfaces)
    try:
        azc = AsyncZeroconf(interfaces=addrs or InterfaceChoice.All, ip_version=IPVersion.V4Only)
    except OSError as e:
        where = ", ".join(addrs) if addrs else "all interfaces"
        raise DiscoveryError(f"cannot start mDNS on {where}: {e.strerror or e}") from None
    try:
        yield azc
    finally:
        await azc.async_close()


@contextlib.asynccontextmanager
async def announcing(ann: Announcement, addresses: Sequence[str], *, host: str | None = None,
                     zc: AsyncZeroconf | None = None) -> AsyncIterator[AsyncServiceInfo]:
    """Announce ``ann`` at ``addresses`` for the duration of the block; goodbye on the way out.

    ``addresses`` are this site's IPv4 addresses to announce (and to bind mDNS to);
    :func:`lan_addresses` gives all of them. Pass ``zc`` to share one AsyncZeroconf with
    a :class:`Browser` (the site then leaves itself out with ``own_site``).

    The unregister (the goodbye packets) runs on every exit, cancellation included,
    so peers drop this site at once instead of waiting for their liveness probes.
    Registering takes about 2 s of mDNS probing; the block starts after it.
    """
    host = host or socket.gethostname()
    addrs = check_interfaces(addresses)
    if not addrs:
        raise UsageError("announcing needs at least one IPv4 address of this site")
    info = AsyncServiceInfo(announce.SERVICE_TYPE, announce.instance_name(host, ann.site_id), port=ann.port,
                            properties=announce.encode(ann), server=f"isrsync-{ann.site_id.hex}.local.",
                            parsed_addresses=addrs)
    async with contextlib.AsyncExitStack() as stack:
        if zc is None:
            zc = await stack.enter_async_context(lan(addrs))
        try:
            await (await zc.async_register_service(info))
        except (ZeroconfError, OSError) as e:
            raise DiscoveryError(f"cannot announce {info.name} on the LAN: {type(e).__name__}: {e}") from None
        try:
            yield info
        finally:
            # Shielded: a cancelled task must still say goodbye, or peers keep us until the probes fail.
            await asyncio.shield(_unregister(zc, info))


async def _unregister(zc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    try:
        await (await zc.async_unregister_service(info))
    except Exception as e:  # noqa: BLE001 - a failed goodbye only delays the others' drop
        log.warning("mDNS goodbye failed: %s", e)


async def probe(address: str, port: int, timeout: float = PROBE_TIMEOUT) -> float | None:
    """Milliseconds of a TCP handshake with address:port, or None if it fails."""
    start = time.perf_counter()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    rtt = (time.perf_counter() - start) * 1000
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return rtt


@dataclass
class _Known:
    instance: str
    ann: Announcement
    address: str
    seen: float
    rtt_ms: float | None = None
    failures: int = 0
    alive: bool = True
    prober: asyncio.Task[None] | None = field(default=None, repr=False)


class Browser:
    """Browse ``_isrsync._tcp`` and keep a live table of peers.

    Use as ``async with Browser(zc, parcels=...) as b``: ``b.peers()`` is the table
    now, ``b.events()`` yields changes as they happen. Malformed or hostile records
    are logged and ignored. This site's own announcement (``own_site``) is left out.
    """

    def __init__(self, zc: AsyncZeroconf, *, parcels: Iterable[uuid.UUID] = (), own_site: uuid.UUID | None = None,
                 probe_interval: float = PROBE_INTERVAL, probe_timeout: float = PROBE_TIMEOUT,
                 failures: int = PROBE_FAILURES) -> None:
        self._zc = zc
        self._parcels = frozenset(parcels)
        self._own = own_site
        self._interval, self._timeout, self._failures = probe_interval, probe_timeout, failures
        self._listed: set[str] = set()  # names the browser lists now (resolved or not)
        self._known: dict[str, _Known] = {}
        self._queues: set[asyncio.Queue[PeerEvent]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._browser: AsyncServiceBrowser | None = None

    async def __aenter__(self) -> Browser:
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [announce.SERVICE_TYPE], handlers=[self._on_change])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        tasks = list(self._tasks) + [k.prober for k in self._known.values() if k.prober]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._known.clear()

    def peers(self) -> list[Peer]:
        return sorted((self._peer(k) for k in self._known.values() if k.alive), key=lambda p: (p.name, p.address))

    def announcement(self, instance: str) -> Announcement | None:
        """The decoded announcement behind a live peer of the table (to test parcels by hash)."""
        k = self._known.get(instance)
        return k.ann if k is not None and k.alive else None

    async def events(self) -> AsyncIterator[PeerEvent]:
        q: asyncio.Queue[PeerEvent] = asyncio.Queue()
        self._queues.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._queues.discard(q)

    # -- zeroconf side (called on the event loop thread, must not block) --------------------

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._listed.discard(name)
            self._forget(name)
            return
        self._listed.add(name)
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        info = AsyncServiceInfo(announce.SERVICE_TYPE, name)
        try:
            # An answer can be lost (multicast on a busy LAN, two sites starting at
            # once): ask again while the name is listed, or the site would stay
            # unknown until its record happened to change.
            for _ in range(RESOLVE_TRIES):
                if await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
                    break
                if name not in self._listed:
                    return
            else:
                log.info("no answer to resolving %r after %d tries", name, RESOLVE_TRIES)
                return
            ann = announce.decode(info.properties)
        except FormatError as e:
            log.info("ignored the mDNS record of %r: %s", name, e)
            return
        except Exception as e:  # noqa: BLE001 - a hostile packet must never take the browser down
            log.info("ignored the mDNS record of %r: %s: %s", name, type(e).__name__, e)
            return
        if ann.site_id == self._own:
            return
        addrs = info.parsed_addresses(IPVersion.V4Only)
        if not addrs:
            return
        old = self._known.get(name)
        k = _Known(name, ann, addrs[0], time.time())
        if old is not None:
            k.rtt_ms, k.prober = old.rtt_ms, old.prober
        self._known[name] = k
        if k.prober is None or k.prober.done():
            k.prober = asyncio.get_running_loop().create_task(self._probe_loop(name))
        # The first probe decides whether it is up: a record of a dead host can still be cached.
        if old is not None and old.alive:
            k.alive = True
            self._emit(Change.UPDATED, k)
        else:
            k.alive = False

    def _forget(self, name: str) -> None:
        k = self._known.pop(name, None)
        if k is None:
            return
        if k.prober:
            k.prober.cancel()
        if k.alive:
            self._emit(Change.DOWN, k)

    async def _probe_loop(self, name: str) -> None:
        while True:
            k = self._known.get(name)
            if k is None:
                return
            rtt = await probe(k.address, k.ann.port, self._timeout)
            k = self._known.get(name)
            if k is None:
                return
            if rtt is not None:
                k.rtt_ms, k.seen, k.failures = rtt, time.time(), 0
                if not k.alive:
                    k.alive = True
                    self._emit(Change.UP, k)
            else:
                k.failures += 1
                if k.alive and k.failures >= self._failures:
                    k.alive = False
                    self._emit(Change.DOWN, k)
            await asyncio.sleep(self._interval if k.alive or k.failures < 10 else self._interval * 5)

    def _peer(self, k: _Known) -> Peer:
        return Peer(k.ann.site_id, k.ann.name, k.address, k.ann.port, k.ann.cached_bytes,
                    k.ann.in_common(self._parcels), k.seen, None if k.rtt_ms is None else round(k.rtt_ms, 3),
                    k.instance, k.ann.direct_port)

    def _emit(self, change: Change, k: _Known) -> None:
        ev = PeerEvent(change, self._peer(k))
        for q in self._queues:
            q.put_nowait(ev)


def local_parcels(cache_dir: Path) -> list[uuid.UUID]:
    """The parcels with local state in a site cache (``parcels/<uuid>/``): what "in common" is counted against."""
    out = []
    with contextlib.suppress(OSError):
        for d in (cache_dir / "parcels").iterdir():
            with contextlib.suppress(ValueError):
                out.append(uuid.UUID(d.name))
    return out


async def browse_once(*, wait: float, interfaces: Sequence[str] | None = None,
                      parcels: Iterable[uuid.UUID] = ()) -> list[Peer]:
    """The peers seen within ``wait`` seconds (the `isrsync peers` snapshot)."""
    async with lan(interfaces) as zc, Browser(zc, parcels=parcels) as b:
        await asyncio.sleep(wait)
        return b.peers()
