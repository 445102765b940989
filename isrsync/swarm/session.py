"""One libtorrent session, driven from asyncio (DESIGN.md, "Packs and swarming", "Sharp edges").

A site runs one :class:`SwarmSession`: every pack it seeds or fetches is a
torrent in it, stored as one file per pack (named by the pack id) in the
directory the caller gives, so two torrents never share a file. Settings
follow the sharp edges: no DHT, UPnP, NAT-PMP or LSD (mDNS finds peers);
seed connections stay open when nothing is wanted (a later demand miss needs
them); several connections per IP (several sites on one host); optionally an
IP filter that admits only private, loopback and link-local addresses.

Alerts are read with ``set_alert_fd`` and ``loop.add_reader`` (never
``set_alert_notify``, which deadlocks from Python), from a queue sized so a
burst of piece reads does not overflow it; no caller relies on one alert
alone: every wait is bounded by a timeout.

Urgent reads set a piece deadline with ``alert_when_available``: libtorrent
fetches the piece ahead of everything else (from a peer, or the web seed),
checks it against the torrent's merkle tree and hands it back in a
``read_piece_alert``. Only verified pieces ever come out of :meth:`read`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from ..errors import UsageError
from .org import OrgTls
from .torrent import PackTorrent

log = logging.getLogger("isrsync.swarm")

# The address ranges a LAN-only swarm talks to (everything else is blocked).
LAN_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
              "::1/128", "fc00::/7", "fe80::/10")
_BLOCKED = 1  # lt.ip_filter access flag
_TOP = 7  # libtorrent's highest piece priority
_SLICE = 256  # alert events handled per turn of the loop
_INLINE_WANTS = 4  # a demand miss's few pieces are asked for on the loop, without a thread hop


@dataclass(frozen=True)
class SwarmSettings:
    """How a site's session listens and whom it talks to."""

    interface: str = "0.0.0.0"
    port: int = 0  # 0: any free port
    lan_only: bool = True
    allow: tuple[str, ...] = ()  # more networks a LAN-only filter admits (the web seed's host)
    alert_queue: int = 50_000  # alerts kept between two reads; a 128 KiB miss is 9 piece alerts
    # Restrict the swarm to one's organisation (org.py): every torrent becomes an SSL
    # torrent under the organisation's CA and the session listens for TLS only.
    org: OrgTls | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WebSeed:
    """The home server as a BEP 19 web seed of one pack, with the user's credentials."""

    url: str  # the parcel's packs "directory": .../v1/parcels/{parcel}/packs/ (see packs_url)
    token: str

    @staticmethod
    def packs_url(server: str, parcel: object) -> str:
        # libtorrent appends the file name to a web seed URL for a v2 torrent even
        # with one file (its layout gains a pad file), so the seed is the
        # directory and the pack id, the torrent's file name, completes it.
        return f"{server.rstrip('/')}/v1/parcels/{parcel}/packs/"

    def headers(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.token}")]


@dataclass
class SwarmStats:
    hash_failures: int = 0  # pieces libtorrent refused (a peer or the web seed sent bad data)
    banned: int = 0  # peers banned for the session for it (SwarmSession.banned)
    pieces_read: int = 0


@dataclass
class _Torrent:
    torrent: PackTorrent
    handle: lt.torrent_handle
    waiting: dict[int, list[asyncio.Future[bytes]]] = field(default_factory=lambda: defaultdict(list))
    # Pieces known to be verified in this site's storage, read straight from the pack
    # file with no alert per piece. Value: None for a seeded pack (the whole file was
    # verified by its id), else the digest of the bytes libtorrent handed back. The digest
    # is needed: libtorrent may hand a piece back before it has written it to the file
    # (its write cache), and a read then found zeros; a mismatch falls back to libtorrent.
    held: dict[int, bytes | None] = field(default_factory=dict)


class SwarmSession:
    """An asyncio wrapper around one ``lt.session``; :meth:`start` it, :meth:`close` it."""

    def __init__(self, storage: str | os.PathLike[str], settings: SwarmSettings = SwarmSettings()) -> None:
        self.storage = Path(storage)
        self.settings = settings
        self.stats = SwarmStats()
        self._torrents: dict[str, _Torrent] = {}  # pack id hex (the torrent's name) -> torrent
        self.banned: set[tuple[str, int]] = set()  # peers that sent bad data: never connected again
        self._ses: lt.session | None = None
        self._pipe: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop time any piece last arrived. A stall is judged session-wide: a big batch
        # queues one pack's pieces behind another's (all deadlines are "now"), and a pack
        # waiting its turn while pieces keep arriving is busy, not stalled.
        self._progress = 0.0
        self._drain: asyncio.Future[list[_Event]] | None = None  # alerts being popped on a worker
        self._again = False  # alerts came while a drain ran: drain once more after it

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> SwarmSession:
        self.storage.mkdir(parents=True, exist_ok=True)
        s = self.settings
        cats = lt.alert.category_t
        pack = {
            # The "s" suffix: an SSL listen socket (libtorrent routes by SNI, the info-hash).
            "listen_interfaces": f"{s.interface}:{s.port}{'s' if s.org is not None else ''}",
            "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
            # uTP's delay-based congestion control only slows a LAN; TCP is enough there.
            "enable_outgoing_utp": False, "enable_incoming_utp": False,
            "close_redundant_connections": False,
            "allow_multiple_connections_per_ip": True,
            # Every pack is its own torrent, so one LAN peer means one connection per pack: a
            # resume touching 40 packs opens 40 at once. libtorrent's default of 30 connection
            # attempts a second (made for the internet) left a third of them unconnected when
            # the miss gave up waiting: the "91 of 300 chunks missing" batch.
            "connection_speed": 1000,
            "smooth_connects": False,
            # Unchoke every peer the filter admits: on a LAN, 8 unchoke slots would make the
            # other packs' connections wait for the next unchoke round (15 s).
            "unchoke_slots_limit": -1,
            # ...and those connections arrive at a peer together: with libtorrent's listen
            # backlog of 5, Linux drops the rest's final ACK, the connecting side believes
            # itself connected and waits in the handshake for SYN-ACK retransmits (1, 2, 4 s):
            # whole packs stalled past the read timeout.
            "listen_queue_size": 256,
            "alert_queue_size": s.alert_queue,
            "alert_mask": int(cats.error_notification | cats.status_notification | cats.storage_notification
                              | cats.peer_notification),
        }
        # Creating a session starts its threads and binds sockets: not on the loop.
        self._ses = await asyncio.to_thread(lt.session, pack)
        if s.lan_only:
            self._ses.set_ip_filter(_lan_filter(s.allow))
        self._loop = asyncio.get_running_loop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        self._ses.set_alert_fd(w)
        self._loop.add_reader(r, self._on_alerts)
        return self

    @property
    def port(self) -> int:
        assert self._ses is not None, "start() the session first"
        # An organisation's session listens for TLS only: listen_port() names no socket then.
        return self._ses.ssl_listen_port() if self.settings.org is not None else self._ses.listen_port()

    async def close(self) -> None:
        """Fail every waiting read, stop the session; idempotent."""
        ses, self._ses = self._ses, None
        if ses is None:
            return
        if self._pipe is not None and self._loop is not None:
            self._loop.remove_reader(self._pipe[0])
        if self._drain is not None:
            # The worker may be inside pop_alerts(): the session must outlive it.
            await asyncio.wait([self._drain])
        for t in self._torrents.values():
            _fail_all(t, ConnectionError("the swarm session closed"))
        self._torrents.clear()
        # Destroying a session joins its threads (and may wait for a peer to hang up): off the loop.
        await asyncio.to_thread(_destroy, ses)
        if self._pipe is not None:
            for fd in self._pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipe = None

    # -- torrents --------------------------------------------------------------------------

    def has(self, pack_id: bytes) -> bool:
        return pack_id.hex() in self._torrents

    def file_of(self, pack_id: bytes) -> Path:
        """Where the pack's bytes live (a sparse file while it is being fetched)."""
        return self.storage / pack_id.hex()

    async def add(self, torrent: PackTorrent, *, web_seed: WebSeed | None = None, seed: bool = False) -> None:
        """Add a pack's torrent (again: nothing happens).

        ``seed``: the pack file is complete and verified (by its id) at
        :meth:`file_of`; libtorrent trusts it instead of hashing it all again.
        Otherwise nothing is downloaded until :meth:`read` asks for pieces.
        """
        ses = self._live()
        name = torrent.pack_id.hex()
        if name in self._torrents:
            return
        org = self.settings.org
        if org is not None:
            torrent = org.seal(torrent)
        # Parsing the torrent (its piece layer) and adding it are libtorrent calls that
        # let go of the GIL and wait to get it back: a worker waits, not the loop.
        atp = await asyncio.to_thread(_add_params, torrent, self.storage, web_seed, seed)
        handle = await asyncio.to_thread(ses.add_torrent, atp)
        if org is not None:
            # No DH parameters: TLS 1.3 and ECDHE need none (libtorrent then posts one
            # harmless torrent_error about them; the torrent runs on).
            handle.set_ssl_certificate_buffer(org.cert_pem, org.key_pem, "")
        held: dict[int, bytes | None] = {}
        if seed and torrent.size:
            held = dict.fromkeys(range(torrent.pieces_of(0, torrent.size).stop))
        self._torrents[name] = _Torrent(torrent, handle, held=held)

    async def remove(self, pack_id: bytes) -> None:
        t = self._torrents.pop(pack_id.hex(), None)
        if t is None or self._ses is None:
            return
        _fail_all(t, ConnectionError("the torrent was removed"))
        await asyncio.to_thread(self._ses.remove_torrent, t.handle)

    async def connect(self, pack_id: bytes, host: str, port: int, *, attempts: int = 20) -> None:
        """Connect the pack's torrent to a peer (libtorrent refuses while it checks: retry)."""
        t = self._get(pack_id)
        if (host, port) in self.banned:
            return
        for _ in range(attempts):
            try:
                t.handle.connect_peer((host, port))
                return
            except RuntimeError:
                await asyncio.sleep(0.05)
        log.info("could not connect pack %s to %s:%d", pack_id.hex()[:16], host, port)

    # libtorrent's getters (peer info, status, piece priority, have_piece) wait for its
    # network thread, which a big batch keeps busy for up to seconds: never on the loop.
    async def peers(self, pack_id: bytes) -> int:
        """How many peers the pack's torrent is connected to (web seeds included).

        A connection still in its handshake is not counted: a peer that lacks the torrent
        accepts the TCP connection and drops it at the handshake, and counting it in that
        window took a pack no peer holds for one a peer serves (a flaky CI failure)."""
        h = self._get(pack_id).handle
        pending = lt.peer_info.connecting | lt.peer_info.handshake
        return sum(1 for p in await asyncio.to_thread(h.get_peer_info) if not p.flags & pending)

    async def is_seed(self, pack_id: bytes) -> bool:
        h = self._get(pack_id).handle
        return bool((await asyncio.to_thread(h.status)).is_seeding)

    async def seeds(self, pack_id: bytes) -> int:
        """How many connected peers hold the whole pack (a jukebox, a site that hoarded it)."""
        h = self._get(pack_id).handle
        return int((await asyncio.to_thread(h.status)).num_seeds)

    def want_all(self, pack_id: bytes, priority: int = 1) -> None:
        """Fetch the whole pack in the background, at ``priority`` (1: lowest, under every
        demand deadline): how a hoard or a jukebox fills its copy to seed it whole."""
        t = self._get(pack_id)
        t.handle.prioritize_pieces([priority] * t.handle.torrent_file().num_pieces())

    def feed(self, pack_id: bytes, offset: int, data: bytes) -> None:
        """Hand libtorrent pack bytes fetched by other means (whole pieces from ``offset``, a
        piece boundary): it checks them against the torrent's hashes, stores them, and serves
        them to peers like any piece it downloaded (a bad one fails its hash, it is not kept)."""
        t = self._get(pack_id)
        size = t.torrent.piece_size
        if offset % size:
            raise UsageError(f"pack bytes fed at {offset}, not a piece boundary")
        for at in range(0, len(data), size):
            t.handle.add_piece((offset + at) // size, data[at : at + size], 0)

    def holds_whole(self, pack_id: bytes) -> bool:
        """Every piece of the pack is read straight from this site's file (seeded or held whole)."""
        t = self._torrents.get(pack_id.hex())
        return t is not None and t.torrent.size > 0 and len(t.held) == t.torrent.pieces_of(0, t.torrent.size).stop

    def holds_some(self, pack_id: bytes) -> bool:
        """Some piece of the pack is in this site's file (fetched before, or held whole)."""
        t = self._torrents.get(pack_id.hex())
        return t is not None and bool(t.held)

    def holds_any(self) -> bool:
        return any(self.holds_whole(bytes.fromhex(name)) for name in self._torrents)

    async def hold_whole(self, pack_id: bytes) -> None:
        """The pack is complete here (every piece verified): reads become plain reads of
        the pack file, with no deadline and no alert per piece. A site that fetched a pack
        whole and then has no peer left (they disconnect seed to seed) would otherwise
        pay a read_piece alert per piece, and a batch of them overran the idle timeout."""
        t = self._get(pack_id)
        # Written pieces may still sit in libtorrent's store buffer: flush them first.
        t.handle.flush_cache()
        await asyncio.sleep(0.2)
        if t.torrent.size:
            t.held.update(dict.fromkeys(range(t.torrent.pieces_of(0, t.torrent.size).stop)))

    def read_verified(self, pack_id: bytes, offset: int, length: int) -> bytes | None:
        """On a worker thread (libtorrent's have_piece waits for its network thread): the
        bytes if every piece they touch is verified here, else None. Nothing is fetched.
        The direct path's server reads chunks here; it checks their tags before sending."""
        t = self._torrents.get(pack_id.hex())
        if t is None or self._ses is None or length <= 0 or offset + length > t.torrent.size:
            return None
        pieces = t.torrent.pieces_of(offset, length)
        try:
            if not all(p in t.held or t.handle.have_piece(p) for p in pieces):
                return None
            with open(self.file_of(pack_id), "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except (OSError, RuntimeError):
            return None
        return data if len(data) == length else None

    def ban(self, host: str, port: int, why: str) -> None:
        """Never connect to this peer again, for every pack (as a libtorrent ban does)."""
        if (host, port) not in self.banned:
            self.banned.add((host, port))
            self.stats.banned += 1
            log.warning("banned peer %s:%d for the session: %s", host, port, why)

    async def progress(self, pack_id: bytes) -> tuple[int, int]:
        """(bytes verified here, the pack's size): how far a whole-pack fetch has come."""
        t = self._get(pack_id)
        st = await asyncio.to_thread(t.handle.status)
        pieces = t.torrent.pieces_of(0, t.torrent.size).stop if t.torrent.size else 0
        if st.is_seeding or st.num_pieces >= pieces:
            return t.torrent.size, t.torrent.size
        return min(st.num_pieces * t.torrent.piece_size, t.torrent.size - 1), t.torrent.size

    async def uploaded(self) -> int:
        """Payload bytes the session's torrents have sent to peers (what left this site)."""
        handles = [t.handle for t in self._torrents.values()]
        return sum(await asyncio.to_thread(lambda: [h.status().total_payload_upload for h in handles]))

    async def uploading(self) -> bool:
        """Whether any torrent of the session is sending pieces to a peer right now."""
        handles = [t.handle for t in self._torrents.values()]
        rates = await asyncio.to_thread(lambda: [h.status().upload_payload_rate for h in handles])
        return any(rates)

    def complete(self, pack_id: bytes) -> bool:
        """Every piece of the pack is here and verified (after libtorrent's check of old data)."""
        h = self._get(pack_id).handle
        st = h.status()
        return bool(st.is_seeding) or st.num_pieces == h.torrent_file().num_pieces()

    # -- reads -----------------------------------------------------------------------------

    async def read(self, pack_id: bytes, offset: int, length: int, *, timeout: float,
                   deadline_ms: int = 0) -> bytes:
        """Bytes ``offset .. offset + length`` of a pack, from verified pieces only.

        Pieces the site lacks are fetched first of all (a piece deadline).
        ``TimeoutError`` once no piece at all has arrived for ``timeout``
        seconds (a vanished or silent peer: a stall, not a slow batch, ends a
        read), with the deadlines withdrawn so the pieces go back to their priority.
        """
        t = self._get(pack_id)
        loop = self._live_loop()
        pieces = t.torrent.pieces_of(offset, length)
        if all(p in t.held for p in pieces):
            # Every piece passed libtorrent's check into this file already: a plain read
            # (a batch of held pieces used to cost a deadline and an alert each, thousands
            # of Python objects that held the loop).
            sums = [t.held[p] for p in pieces]
            got = await asyncio.to_thread(_read_held, self.file_of(pack_id), pieces, t.torrent.piece_size, sums)
            if got is not None:
                start = offset - pieces.start * t.torrent.piece_size
                return got[start : start + length]
        futs = []
        wanted = []
        for p in pieces:
            fut: asyncio.Future[bytes] = self._live_loop().create_future()
            t.waiting[p].append(fut)
            futs.append(fut)
            if len(t.waiting[p]) == 1:
                wanted.append(p)
        if len(wanted) <= _INLINE_WANTS:
            _want(t.handle, wanted, deadline_ms)
        else:
            # Each call lets go of the GIL and must get it back: with a worker holding it,
            # a wait of up to the switch interval per call, thousands of them for a batch.
            await asyncio.to_thread(_want, t.handle, wanted, deadline_ms)
        everything = asyncio.gather(*futs)
        started = loop.time()
        try:
            while True:
                done, _ = await asyncio.wait([everything], timeout=timeout / 4)
                if done:
                    parts = everything.result()
                    break
                if loop.time() - max(started, self._progress) > timeout:
                    raise TimeoutError(f"no piece of pack {pack_id.hex()[:16]} arrived for {timeout:g} s")
        except BaseException:
            everything.cancel()
            everything.add_done_callback(_retrieve)
            for p, fut in zip(pieces, futs):
                fut.cancel()
                w = t.waiting.get(p)
                if w is not None:
                    with contextlib.suppress(ValueError):
                        w.remove(fut)
                    if not w:
                        del t.waiting[p]
                        with contextlib.suppress(RuntimeError):
                            t.handle.reset_piece_deadline(p)
            raise
        blob = b"".join(parts)
        start = offset - pieces.start * t.torrent.piece_size
        return blob[start : start + length]

    # -- alerts ----------------------------------------------------------------------------

    def _on_alerts(self) -> None:
        assert self._pipe is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(self._pipe[0], 4096):
                pass
        if self._ses is None:
            return
        if self._drain is not None:
            self._again = True  # the running drain may have popped before this alert came
            return
        self._start_drain()

    def _start_drain(self) -> None:
        # pop_alerts() turns every alert into a Python object, and a batch of 2,400 piece
        # alerts took 100+ ms: longer than a guest may wait for the loop. So alerts are
        # popped and copied out on a worker thread (one at a time: an alert dies at the
        # next pop_alerts), and only plain values come back to the loop.
        assert self._ses is not None and self._loop is not None
        self._again = False
        self._drain = self._loop.run_in_executor(None, _pop_events, self._ses)
        self._drain.add_done_callback(self._on_drained)

    def _on_drained(self, fut: asyncio.Future[list[_Event]]) -> None:
        self._drain = None
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:
            log.warning("reading the swarm's alerts failed: %s", err)
            return
        self._apply(fut.result(), 0)

    def _apply(self, events: list[_Event], at: int) -> None:
        # Waking thousands of waiters at once held the loop for 100+ ms: a slice per turn.
        if self._ses is None:
            return
        end = at + _SLICE
        for ev in events[at:end]:
            if isinstance(ev, _Piece):
                self._on_piece(ev)
            elif isinstance(ev, _HashFailed):
                self.stats.hash_failures += 1
                log.info("pack %s: piece %d failed its hash check", ev.name[:16], ev.piece)
            elif (ev.host, ev.port) not in self.banned:
                # libtorrent bans the peer in one torrent (its smart ban); the site bans it
                # in all: connect() refuses it from now on, for every pack, this session.
                self.banned.add((ev.host, ev.port))
                self.stats.banned += 1
                log.warning("banned peer %s:%d for the session: it sent data that failed pack %s's hashes",
                            ev.host, ev.port, ev.pack[:16])
        if end < len(events):
            assert self._loop is not None
            self._loop.call_soon(self._apply, events, end)
        elif self._again:
            self._start_drain()

    def _on_piece(self, a: _Piece) -> None:
        t = self._torrents.get(a.name)
        if t is None:
            return
        waiters = t.waiting.pop(a.piece, [])
        if a.error is not None:
            # A read that failed (a storage error): the waiters fail, the miss falls through.
            err: BaseException = OSError(f"piece {a.piece} of pack {a.name[:16]}: {a.error}")
            for f in waiters:
                if not f.done():
                    f.set_exception(err)
            return
        self.stats.pieces_read += 1
        t.held[a.piece] = a.digest
        self._progress = self._loop.time() if self._loop is not None else 0.0
        for f in waiters:
            if not f.done():
                f.set_result(a.data)

    # -- helpers ---------------------------------------------------------------------------

    def _live(self) -> lt.session:
        if self._ses is None:
            raise ConnectionError("the swarm session is not running")
        return self._ses

    def _live_loop(self) -> asyncio.AbstractEventLoop:
        self._live()
        assert self._loop is not None
        return self._loop

    def _get(self, pack_id: bytes) -> _Torrent:
        self._live()
        t = self._torrents.get(pack_id.hex())
        if t is None:
            raise UsageError(f"pack {pack_id.hex()[:16]} is not in the swarm session")
        return t


@dataclass(frozen=True)
class _Piece:
    name: str
    piece: int
    data: bytes
    digest: bytes  # of data: what the pack file must hold for a later direct read
    error: str | None  # a storage error reading the piece


@dataclass(frozen=True)
class _HashFailed:
    name: str
    piece: int


@dataclass(frozen=True)
class _Banned:
    host: str
    port: int
    pack: str


_Event = _Piece | _HashFailed | _Banned


def _pop_events(ses: lt.session) -> list[_Event]:
    """On a worker thread: the alerts that matter, as plain values (alerts die at the next pop)."""
    out: list[_Event] = []
    for a in ses.pop_alerts():
        if isinstance(a, lt.read_piece_alert):
            err = a.error.message() if a.error.value() else None
            data = b"" if err else bytes(a.buffer)
            out.append(_Piece(a.torrent_name, a.piece, data, _digest(data), err))
        elif isinstance(a, lt.hash_failed_alert):
            out.append(_HashFailed(a.torrent_name, a.piece_index))
        elif isinstance(a, lt.peer_ban_alert):
            host, port = a.endpoint
            out.append(_Banned(str(host), int(port), a.torrent_name))
    return out


def _add_params(torrent: PackTorrent, storage: Path, web_seed: WebSeed | None, seed: bool) -> lt.add_torrent_params:
    ti = torrent.torrent_info()
    if web_seed is not None:
        # Only torrent_info's add_url_seed carries headers, and only before the add.
        ti.add_url_seed(web_seed.url, "", web_seed.headers())
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(storage)
    flags = (atp.flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused) | lt.torrent_flags.disable_pex
    atp.flags = flags | (lt.torrent_flags.seed_mode if seed else 0)
    if not seed:
        # Nothing is wanted until a read asks (every piece at priority 0), but the file
        # keeps its priority: libtorrent puts pieces of a priority-0 file in a hidden
        # part file, and the pack file at file_of() must hold what was fetched.
        atp.file_priorities = [4]
        atp.piece_priorities = [0] * ti.num_pieces()
    return atp


def _want(handle: lt.torrent_handle, pieces: list[int], deadline_ms: int) -> None:
    # Setters are posted to libtorrent's thread without waiting (the getters would
    # wait). Top priority on a piece already held changes nothing.
    for p in pieces:
        handle.piece_priority(p, _TOP)
        handle.set_piece_deadline(p, deadline_ms, lt.deadline_flags_t.alert_when_available)


def _fail_all(t: _Torrent, err: BaseException) -> None:
    for waiters in t.waiting.values():
        for f in waiters:
            if not f.done():
                f.set_exception(err)
                f.exception()  # retrieved: the waiter may be gone
    t.waiting.clear()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _read_held(path: Path, pieces: range, piece_size: int, sums: list[bytes | None]) -> bytes | None:
    """On a worker: the pieces' bytes from the pack file, or None if one is not yet what
    libtorrent handed back (still in its write cache) or the file is short or gone."""
    try:
        with open(path, "rb") as f:
            blob = os.pread(f.fileno(), len(pieces) * piece_size, pieces.start * piece_size)
    except OSError:
        return None
    for i, want in enumerate(sums):
        if want is not None and _digest(blob[i * piece_size : (i + 1) * piece_size]) != want:
            return None
    return blob


def _retrieve(fut: asyncio.Future[list[bytes]]) -> None:
    # A read given up on: its gathered result is nobody's, and must not be logged as lost.
    if not fut.cancelled():
        fut.exception()


def _destroy(ses: lt.session) -> None:
    ses.pause()
    del ses


def _lan_filter(allow: tuple[str, ...]) -> lt.ip_filter:
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", _BLOCKED)
    f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", _BLOCKED)
    for net in (*LAN_RANGES, *allow):
        n = ipaddress.ip_network(net, strict=False)
        f.add_rule(str(n.network_address), str(n.broadcast_address), 0)
    return f
