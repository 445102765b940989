"""The direct path (issue 12, part 5): a LAN peer answers chunk ranges from its cache by tag.

For a demand miss the torrent path costs a piece deadline, libtorrent's request
round, a merkle check and a ``read_piece`` alert: tens of milliseconds
(benchmarks/peer_miss.py). The direct path asks the peer for the chunks
themselves over one kept-open TCP connection, and the answer is checked by tag:
the peer's cache is as trustworthy as any other source's, which is to say not at
all. Bulk work keeps the torrent path (bulk.py): many peers, low priority,
pieces that peers pass on as they arrive.

:class:`DirectServer` runs at every site beside its libtorrent session, bound on
the addresses the site announces; its port is the TXT key ``d``. It answers only
ciphertext it checked by tag (a site never gets itself banned by its own bit rot),
from the site cache or from pack pieces its session verified. Hostile clients
are bounded: a request names at most :data:`~.directfmt.MAX_WANTS` chunks, every
read and write has a timeout, at most ``max_connections`` are served at once (the
rest get ``BUSY``), and anything malformed gets one error status and a closed
connection, never a traceback.

Within an organisation (a swarm secret, org.py) both sides speak TLS 1.3 and
each must show a certificate signed by the CA derived from the secret, as in the
SSL torrents: an outsider's handshake fails before it can ask for anything.

:class:`DirectClient` keeps a few connections per peer and hands back what the
peer sent, split into chunks that match their tags and those that do not; the
caller (:class:`~isrsync.swarm.peer.PeerSource`) bans a peer that sent any of the
latter, as the torrent path does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..chunk import tag_of
from ..errors import FormatError, IsrError, PeerUnreachable, UnsupportedVersion
from ..site.cache import SiteCache
from . import directfmt as fmt
from .directfmt import Status, Want
from .org import OrgTls
from .session import SwarmSession

log = logging.getLogger("isrsync.swarm.direct")

#: Seconds a served connection may sit idle between requests.
IDLE_TIMEOUT = 30.0
#: Seconds one read or write of a request or response may take.
IO_TIMEOUT = 5.0
#: Connections served at once; more get BUSY and are closed.
MAX_CONNECTIONS = 32
#: Connections a client opens to one peer at most, kept between misses (concurrent
#: misses do not queue behind one; a burst of them does not open a connection each).
POOL = 4
#: Threads reading the cache for the server: its own, so a hung disk or a flood of
#: requests never takes the threads the site's own work runs on (asyncio's default pool).
READERS = 4
#: Bytes of answers past which the client checks tags on a worker, not on the loop.
VERIFY_INLINE = 512 * 1024


class ChunkLookup(Protocol):
    """Where a server finds chunks. Called on a worker thread; answers only bytes whose tag matched."""

    def lookup(self, wants: Sequence[Want]) -> list[bytes | None]: ...


DirectError = PeerUnreachable


class SiteChunks:
    """A site's chunks for the direct path: its cache by tag, then the pack pieces its
    swarm session verified. Only bytes that match their tag are answered."""

    def __init__(self, cache: SiteCache | None, session: SwarmSession | None) -> None:
        self.cache = cache
        self.session = session

    def lookup(self, wants: Sequence[Want]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for w in wants:
            data = self.cache.get(w.tag) if self.cache is not None else None  # get() checks the tag
            if data is None and self.session is not None:
                data = self.session.read_verified(w.pack_id, w.offset, w.length)
                if data is not None and tag_of(data) != w.tag:
                    data = None  # the asker's pack index was wrong (or stale): not ours to send
            out.append(data)
        return out


# -- TLS within an organisation ----------------------------------------------------------


def tls_contexts(org: OrgTls) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3, each side's certificate checked against the org's CA."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # the leaf is issued to "*": the CA signature is the check
    with tempfile.TemporaryDirectory(prefix="isrsync-tls-") as d:
        # ssl loads a private key only from a file: a private directory, gone at once.
        cert, key = Path(d) / "cert.pem", Path(d) / "key.pem"
        cert.write_text(org.cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(org.key_pem)
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=org.ca_pem.decode("ascii"))
            ctx.load_cert_chain(cert, key)
    return server, client


# -- server ------------------------------------------------------------------------------


@dataclass
class ServerStats:
    requests: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    refused: int = 0  # bad requests, unsupported versions, busy
    connections: int = 0


class DirectServer:
    """Serve chunks by tag on ``hosts`` (one port for all). ``await start()``, ``await close()``."""

    def __init__(self, lookup: ChunkLookup, *, org: OrgTls | None = None, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT, io_timeout: float = IO_TIMEOUT) -> None:
        self.lookup = lookup
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.stats = ServerStats()
        self._ssl = tls_contexts(org)[0] if org is not None else None
        self._servers: list[asyncio.Server] = []
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._readers = concurrent.futures.ThreadPoolExecutor(READERS, thread_name_prefix="isrsync-direct")
        self.port = 0

    async def start(self, hosts: Sequence[str], port: int = 0) -> DirectServer:
        try:
            for host in hosts:
                # TLS is started per connection, after the connection bound: a flood of
                # half-done handshakes counts against it like any other connection.
                srv = await asyncio.start_server(self._accept, host, port or self.port,
                                                 limit=fmt.MAX_CHUNK, backlog=128)
                self._servers.append(srv)
                self.port = self.port or srv.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        servers, self._servers = self._servers, []
        for srv in servers:
            srv.close()
        for t in list(self._tasks):
            t.cancel()
        for srv in servers:
            await srv.wait_closed()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        # A reader stuck in a hung disk must not hold the close: it ends when the disk does.
        self._readers.shutdown(wait=False, cancel_futures=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        try:
            if self._active >= self.max_connections:
                self.stats.refused += 1
                await self._say(writer, Status.BUSY)
                return
            self._active += 1
            try:
                if self._ssl is not None:
                    await writer.start_tls(self._ssl, ssl_handshake_timeout=self.io_timeout)
                await self._serve(reader, writer)
            finally:
                self._active -= 1
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError):
            pass  # a client that went away, stalled or broke TLS: nothing to answer
        except asyncio.CancelledError:
            pass  # the server is closing
        except Exception as e:  # noqa: BLE001 - a hostile request must never take the server down
            log.warning("direct path: dropped a connection after an unexpected %s: %s", type(e).__name__, e)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await asyncio.wait_for(reader.readexactly(fmt.REQUEST_HEAD_SIZE), self.idle_timeout)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    await self._say(writer, Status.BAD_REQUEST)
                return  # a clean hang-up between requests
            try:
                count = fmt.decode_request_head(head)
                body = await asyncio.wait_for(reader.readexactly(count * fmt.WANT_SIZE), self.io_timeout)
                wants = fmt.decode_wants(body, count)
            except UnsupportedVersion:
                await self._say(writer, Status.UNSUPPORTED)
                return
            except (FormatError, asyncio.IncompleteReadError):
                await self._say(writer, Status.BAD_REQUEST)  # malformed, over a bound, or cut short
                return
            self.stats.requests += 1
            try:
                answers = await asyncio.get_running_loop().run_in_executor(self._readers, self.lookup.lookup, wants)
            except (IsrError, OSError) as e:
                log.info("direct path: reading the cache failed: %s", e)
                await self._say(writer, Status.ERROR)
                return
            writer.write(fmt.encode_response_head(Status.OK, len(wants)))
            for data in answers:
                writer.write(fmt.encode_answer(data))
                if data is not None:
                    writer.write(data)
                    self.stats.chunks_sent += 1
                    self.stats.bytes_sent += len(data)
            await asyncio.wait_for(writer.drain(), self.io_timeout)

    async def _say(self, writer: asyncio.StreamWriter, status: Status) -> None:
        if status is not Status.OK:
            self.stats.refused += 1
        writer.write(fmt.encode_response_head(status, 0))
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.drain(), self.io_timeout)


# -- client ------------------------------------------------------------------------------


@dataclass
class Answer:
    """What one peer sent: chunks that match their tags, tags it answered wrongly, and why
    part of a split request went unanswered (the peer failed midway: treat it as down)."""

    good: dict[bytes, bytes] = field(default_factory=dict)
    bad: list[bytes] = field(default_factory=list)
    failed: str | None = None


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class DirectClient:
    """Asks peers' :class:`DirectServer` for chunks; each read is bounded by ``stall`` seconds."""

    def __init__(self, *, org: OrgTls | None = None, connect_timeout: float = 0.5, stall: float = 1.0) -> None:
        self.connect_timeout = connect_timeout
        self.stall = stall
        self._ssl = tls_contexts(org)[1] if org is not None else None
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._closed = False

    async def fetch(self, host: str, port: int, wants: Sequence[Want]) -> Answer:
        """Ask ``host:port`` for ``wants`` (any number: split into bounded requests, up to
        :data:`POOL` at once). DirectError if the peer fails, stalls or answers nonsense
        before answering anything; after that, what came is kept and ``failed`` says why the rest did not."""
        groups = [wants[i : i + fmt.MAX_WANTS] for i in range(0, len(wants), fmt.MAX_WANTS)]
        out = Answer()
        for at in range(0, len(groups), POOL):
            parts = await asyncio.gather(*(self._ask(host, port, g) for g in groups[at : at + POOL]),
                                         return_exceptions=True)
            for part in parts:
                if isinstance(part, DirectError):
                    out.failed = out.failed or str(part)
                elif isinstance(part, BaseException):
                    raise part
                else:
                    out.good.update(part.good)
                    out.bad.extend(part.bad)
            if out.failed is not None:
                break  # every part of this round ended (each is bounded by the stall): ask no more
        if out.failed is not None and not out.good and not out.bad:
            raise DirectError(out.failed)
        return out

    def forget(self, host: str, port: int) -> None:
        """Close the kept connections to a peer (it left, or was banned)."""
        for c in self._idle.pop((host, port), []):
            c.close()

    async def close(self) -> None:
        self._closed = True
        for key in list(self._idle):
            self.forget(*key)

    async def _ask(self, host: str, port: int, wants: Sequence[Want]) -> Answer:
        if self._closed:
            raise DirectError("the direct client is closed")
        slots = self._slots.setdefault((host, port), asyncio.Semaphore(POOL))
        try:
            # Bounded too: the slots may all be held by requests to a peer that stalled.
            await asyncio.wait_for(slots.acquire(), self.stall)
        except TimeoutError:
            raise DirectError(f"every connection to {host}:{port} is stuck in a request") from None
        try:
            conn = await self._connect(host, port)
            try:
                raw = await self._exchange(conn, wants)
            except BaseException:
                conn.close()
                raise
            pool = self._idle.setdefault((host, port), [])
            if len(pool) < POOL and not self._closed:
                pool.append(conn)
            else:
                conn.close()
        finally:
            slots.release()
        if sum(len(d) for d in raw.values()) > VERIFY_INLINE:
            return await asyncio.to_thread(_check, raw)
        return _check(raw)

    async def _connect(self, host: str, port: int) -> _Conn:
        pool = self._idle.get((host, port))
        while pool:
            conn = pool.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self._ssl, limit=fmt.MAX_CHUNK,
                                        ssl_handshake_timeout=self.connect_timeout if self._ssl else None),
                self.connect_timeout)
        except (OSError, TimeoutError) as e:
            raise DirectError(f"cannot reach the direct path of {host}:{port}: {e or type(e).__name__}") from None
        return _Conn(r, w)

    async def _exchange(self, conn: _Conn, wants: Sequence[Want]) -> dict[bytes, bytes]:
        try:
            conn.writer.write(fmt.encode_request(wants))
            await asyncio.wait_for(conn.writer.drain(), self.stall)
            head = await asyncio.wait_for(conn.reader.readexactly(fmt.RESPONSE_HEAD_SIZE), self.stall)
            status = fmt.decode_response_head(head, len(wants))
            if status is not Status.OK:
                raise DirectError(f"the peer refused a direct request: {status.name.lower()}")
            raw: dict[bytes, bytes] = {}
            for w in wants:
                n = fmt.decode_length(await asyncio.wait_for(conn.reader.readexactly(fmt.LENGTH_SIZE), self.stall))
                if n is not None:
                    raw[w.tag] = await asyncio.wait_for(conn.reader.readexactly(n), self.stall)
            return raw
        except FormatError as e:
            raise DirectError(f"the peer's direct answer is malformed: {e}") from None
        except (OSError, EOFError, asyncio.IncompleteReadError) as e:
            raise DirectError(f"the peer's direct connection broke: {e or type(e).__name__}") from None
        except TimeoutError:
            raise DirectError(f"the peer sent nothing for {self.stall:g} s") from None


def _check(raw: dict[bytes, bytes]) -> Answer:
    out = Answer()
    for tag, data in raw.items():
        if tag_of(data) == tag:
            out.good[tag] = data
        else:
            out.bad.append(tag)
    return out
