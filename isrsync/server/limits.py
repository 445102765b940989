"""What one home server grants its clients: connections, time to send, uploads at once.

A client that opens connections and never finishes a request, or trickles a
body a byte at a time, must not be able to hold the server's sockets, memory or
disk. The limits here are enforced where they can be:

* open connections: :class:`ConnectionGate` wraps aiohttp's protocol factory.
  At the bound, the oldest connection with no request in progress (an idle
  keep-alive, or one still trickling its request headers) is closed to make
  room; if every connection is busy, the newcomer gets a ``503`` JSON answer
  and is closed;
* request headers: aiohttp's keep-alive timer also runs from the moment a
  connection is accepted and closes it if no complete request has arrived, so
  it is the header timeout (``keepalive_timeout`` of the runner);
* request bodies: :func:`body_chunks` gives up when no byte arrives for the
  body timeout (``408``); an upload's bytes so far stay resumable;
* uploads: :class:`UploadSlots` caps one user's uploads in progress (``429``),
  and :func:`trim_partials` caps their partial files, dropping the longest
  untouched ones, so abandoned partials cannot pile up until the daily GC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientPayloadError, web

from ..errors import BodyCut, Busy, RequestTimeout, TooManyUploads
from ..store import wire

log = logging.getLogger("isrsync.server")


@dataclass(frozen=True)
class Limits:
    """The server's bounds (``isrsync serve`` options; tests shrink them)."""

    max_connections: int = 512
    header_timeout: float = 30.0  # connect (or last answer) to a complete request head
    body_timeout: float = 60.0  # longest wait for the next byte of a body
    uploads_per_user: int = 8  # a site uploads at most HttpStore's concurrency at once
    partials_per_user: int = 32  # partial uploads kept per user; the oldest go first
    # A partial upload is kept this long after its last byte so its client can
    # resume it; a client that died (a killed suspend) never comes back, and
    # its partial must not sit on the server's disk for a day.
    partial_idle: float = 600.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.uploads_per_user < 1 or self.partials_per_user < 1:
            raise ValueError("limits must be at least 1")
        if self.header_timeout <= 0 or self.body_timeout <= 0 or self.partial_idle <= 0:
            raise ValueError("timeouts must be positive")


def _refusal() -> bytes:
    err = Busy("the server has as many open connections as it allows")
    body = json.dumps(wire.error_body(err), separators=(",", ":")).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class _Refuse(asyncio.Protocol):
    """Answers 503 and hangs up; reads (and drops) what the client sends for a
    moment first, so the answer is not lost to a reset."""

    def __init__(self, gate: "ConnectionGate", linger: float) -> None:
        self._gate = gate
        self._linger = linger

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._gate.refusing += 1
        transport.write(_refusal())
        asyncio.get_running_loop().call_later(self._linger, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close now

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.refusing -= 1


class ConnectionGate:
    """The protocol factory of the listening socket: aiohttp's, with a bound."""

    def __init__(self, server: web.Server, max_connections: int, handshake_timeout: float = 60.0) -> None:
        self._server = server
        self._max = max_connections
        self._handshake = handshake_timeout
        # Handlers in the order they were accepted -> when; and those aiohttp has
        # registered (a handler is registered only once its connection is made,
        # a moment after it is accepted: until then it counts, and is not dropped).
        self._order: dict[object, float] = {}
        self._seen: set[object] = set()
        self.refusing = 0
        self.refused = 0
        self.evicted = 0

    def __call__(self) -> asyncio.BaseProtocol:
        self._forget_closed()
        if len(self._order) >= self._max and not self._evict_idle():
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("refused a connection: %d open, the bound (%d refusals so far)",
                            len(self._order), self.refused)
            # In a flood of refusals, their lingering must not hold sockets too.
            return _Refuse(self, 1.0 if self.refusing < self._max else 0.0)
        h = self._server()
        self._order[h] = time.monotonic()
        return h

    def _forget_closed(self) -> None:
        live = set(self._server.connections)
        self._seen.update(h for h in self._order if h in live)
        # A TLS handshake that fails never makes the connection: forget it later.
        stale = time.monotonic() - 2 * self._handshake
        for h in [h for h, t in self._order.items() if h not in live and (_lost(h, h in self._seen) or t < stale)]:
            del self._order[h]
            self._seen.discard(h)

    def _evict_idle(self) -> bool:
        for h in self._order:
            # aiohttp marks a connection busy from a request's head to the end of
            # its answer (a download included); anything else is idle.
            if h in self._seen and not getattr(h, "_request_in_progress", True):
                del self._order[h]
                self._seen.discard(h)
                h.force_close()  # type: ignore[attr-defined]
                self.evicted += 1
                return True
        return False


_UNKNOWN = object()


def _lost(handler: object, seen: bool) -> bool:
    """Whether a handler's connection is over. aiohttp clears a handler's manager
    when its connection is lost (and only then); a short connection can come and
    go between two accepts, never seen among the server's connections."""
    manager = getattr(handler, "_manager", _UNKNOWN)
    return seen if manager is _UNKNOWN else manager is None


async def body_chunks(request: web.Request, size: int, timeout: float) -> AsyncIterator[bytes]:
    """The request body, up to ``size`` bytes at a time; ``RequestTimeout`` when
    nothing arrives for ``timeout`` seconds."""
    while True:
        try:
            async with asyncio.timeout(timeout):
                data = await request.content.read(size)
        except TimeoutError:
            raise RequestTimeout(f"no byte of the request body arrived for {timeout:g} s") from None
        except (ConnectionError, ClientPayloadError) as e:
            raise BodyCut(f"the client's connection closed in the middle of the request body ({e})") from None
        if not data:
            return
        yield data


class UploadSlots:
    """How many uploads each user has in progress, against a cap."""

    def __init__(self, per_user: int) -> None:
        self._per_user = per_user
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def take(self, user: str) -> Iterator[None]:
        n = self._held.get(user, 0)
        if n >= self._per_user:
            raise TooManyUploads(f"{n} uploads of yours are already in progress (the server allows {self._per_user})")
        self._held[user] = n + 1
        try:
            yield
        finally:
            left = self._held[user] - 1
            if left:
                self._held[user] = left
            else:
                del self._held[user]


def trim_partials(updir: Path, keep: int, busy: Collection[str]) -> int:
    """Make room for one more partial upload in ``updir``: delete the least recently
    written ones beyond ``keep - 1``, sparing those named in ``busy`` (being
    written now). Returns how many went."""
    parts = []
    with os.scandir(updir) as it:
        for e in it:
            if e.name.endswith(".part"):
                with contextlib.suppress(FileNotFoundError):
                    parts.append((e.stat().st_mtime, e.name))
    excess = len(parts) - (keep - 1)
    removed = 0
    idle = [name for _, name in sorted(parts) if name not in busy]
    for name in idle[: max(0, excess)]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(updir / name)
            removed += 1
    return removed
