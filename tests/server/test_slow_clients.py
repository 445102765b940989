"""Issue 14, defect 2: slow and abandoned clients against a real `isrsync serve`
whose limits are shrunk for the test (40 connections, 1 s to send a request
head, 1 s of silence in a body, 2 uploads and 4 partial uploads per user).

A bounded run of clients that trickle request heads, stall pack bodies and
abandon uploads must leave the server answering a well-behaved client at once,
with its open files, partial uploads and memory bounded, and must see every
slow connection closed by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from isrsync.store.http import HttpStore

from srvkit import API, araw, fast_pack

MAX_CONN, HEAD_S, BODY_S, UPLOADS, PARTIALS = 40, 1.0, 1.0, 2, 4
LIMIT_FLAGS = ["--max-connections", str(MAX_CONN), "--header-timeout", str(HEAD_S), "--body-timeout", str(BODY_S),
               "--uploads-per-user", str(UPLOADS), "--partials-per-user", str(PARTIALS)]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Watch:
    """Samples the server's open files while the attack runs."""

    pid: int
    peak: int = 0
    samples: list[int] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            n = fds(self.pid)
            self.samples.append(n)
            self.peak = max(self.peak, n)
            await asyncio.sleep(0.05)


async def trickle_head(port: int, closed_after: list[float], until: float) -> None:
    """Send a request head one byte every 0.2 s, never finishing it; note when the server hangs up."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed_after.append(0.0)
        return
    head = b"GET /v1/parcels HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200

    async def feed() -> None:
        for b in head:
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.2)

    feeder = asyncio.create_task(feed())
    try:
        # The server either closes the connection (EOF or reset) or answers 503 and closes.
        async with asyncio.timeout(max(0.1, until - time.monotonic())):
            while await reader.read(4096):
                pass
        closed_after.append(time.monotonic() - t0)
    except (TimeoutError, ConnectionError, OSError):
        if time.monotonic() < until:
            closed_after.append(time.monotonic() - t0)  # reset by the server
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def stalled_upload(port: int, token: str, parcel: uuid.UUID, send: int, declared: int,
                         hold: float) -> tuple[int | None, float]:
    """A pack upload that sends ``send`` of its ``declared`` bytes, then waits ``hold`` s.
    Returns the status it got (None: none) and when."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pack = os.urandom(32).hex()
    writer.write(f"PUT {API}/parcels/{parcel}/packs/{pack} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + os.urandom(send))
    status = None
    try:
        async with asyncio.timeout(hold):
            line = await reader.readline()
            if line.startswith(b"HTTP/1."):
                status = int(line.split()[1])
    except (TimeoutError, ConnectionError, OSError):
        pass
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return status, time.monotonic() - t0


async def test_slow_and_abandoned_clients_leave_the_server_responsive_and_bounded(
    server_factory, tmp_path: Path
) -> None:
    srv = server_factory(extra=LIMIT_FLAGS)
    pid = srv.proc.pid
    alice, bob = srv.add_user("alice"), srv.add_user("bob")
    good = HttpStore(srv.url, bob, retries=5, backoff=0.05)
    slow = HttpStore(srv.url, alice)
    try:
        bobs, alices = uuid.uuid4(), uuid.uuid4()
        await good.create_parcel(bobs, "bobs")
        await slow.create_parcel(alices, "alices")
        pack_id, _ = fast_pack(tmp_path / "good.pack", 300_000)
        await good.list_parcels()
        base_fds, base_rss = fds(pid), rss(pid)

        # -- 1. 150 connections trickling request heads, with bob working meanwhile.
        stop = asyncio.Event()
        watch = Watch(pid)
        watcher = asyncio.create_task(watch.run(stop))
        closed_after: list[float] = []
        until = time.monotonic() + 5.0
        attackers = []
        for _ in range(150):
            attackers.append(asyncio.create_task(trickle_head(srv.port, closed_after, until)))
            await asyncio.sleep(0.01)
        latencies = []
        for i in range(8):
            t0 = time.monotonic()
            assert [p.name for p in await good.list_parcels()] == ["bobs"]
            if i == 4:
                await good.put_pack(bobs, pack_id, tmp_path / "good.pack")
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(0.1)
        await asyncio.gather(*attackers)
        assert len(closed_after) == 150, f"{150 - len(closed_after)} trickling connection(s) were never closed"
        assert max(closed_after) < HEAD_S + 2.0, sorted(closed_after)[-5:]
        assert max(latencies) < 2.0, f"bob waited {max(latencies):.2f} s under the attack: {latencies}"
        assert await good.have_packs(bobs, [pack_id]) == {pack_id}

        # -- 2. alice stalls pack bodies: two are served (and time out), the rest refused at once.
        results = await asyncio.gather(*(stalled_upload(srv.port, alice, alices, 1000, 1 << 20, HEAD_S + BODY_S + 3)
                                         for _ in range(6)))
        statuses = sorted(s for s, _ in results)
        assert statuses.count(429) >= 6 - UPLOADS and statuses.count(408) >= 1, results
        assert all(dt < BODY_S + 2.0 for _, dt in results), results
        assert [p.name for p in await good.list_parcels()] == ["bobs"]

        # -- 3. alice abandons many uploads: her partial files stay within the bound.
        for _ in range(3):  # 6 abandoned uploads, against a bound of 4 partials
            await asyncio.gather(*(stalled_upload(srv.port, alice, alices, 5000, 1 << 20, 0.2) for _ in range(UPLOADS)))
            await asyncio.sleep(0.3)  # the server notices the cuts and frees the slots
        parts = [p for p in (srv.data / "uploads" / "alice").iterdir() if p.name.endswith(".part")]
        assert 1 <= len(parts) <= PARTIALS, [p.name for p in parts]

        stop.set()
        await watcher
        # Open files: never more than the connection bound (plus the server's own files).
        assert watch.peak <= base_fds + MAX_CONN + 5, (base_fds, watch.peak)
        await asyncio.sleep(HEAD_S + 0.5)
        assert fds(pid) <= base_fds + 5, (base_fds, fds(pid))
        assert rss(pid) - base_rss < 64 << 20, f"server memory grew by {(rss(pid) - base_rss) >> 20} MiB"
        assert srv.proc.poll() is None
        a = await araw(srv.port, f"GET {API}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert a is not None and a.status == 200
    finally:
        await good.close()
        await slow.close()


async def test_past_the_bound_with_every_connection_busy_is_a_clear_503(server_factory, tmp_path: Path) -> None:
    """When every connection has a request in progress, a new one gets a JSON 503 that says why."""
    srv = server_factory(extra=["--max-connections", "3", "--body-timeout", "3", "--uploads-per-user", "8"])
    alice = srv.add_user("alice")
    st = HttpStore(srv.url, alice)
    try:
        parcel = uuid.uuid4()
        await st.create_parcel(parcel, "p")
    finally:
        await st.close()
    busy = [asyncio.create_task(stalled_upload(srv.port, alice, parcel, 10, 1 << 20, 4.0)) for _ in range(3)]
    await asyncio.sleep(0.5)
    a = await araw(srv.port, f"GET {API}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert a is not None and a.status == 503, a
    err = a.json()
    assert err["kind"] == "Busy" and "connections" in err["error"], err
    assert a.headers.get("retry-after") == "1"
    await asyncio.gather(*busy)
    a = await araw(srv.port, f"GET {API}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert a is not None and a.status == 200


async def test_connections_that_came_and_went_do_not_count(server_factory) -> None:
    """Many short connections, one after another, far more than the bound: each one
    is served (a closed connection no longer counts against the bound)."""
    srv = server_factory(extra=["--max-connections", "5"])
    for i in range(40):
        a = await araw(srv.port, f"GET {API}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert a is not None and a.status == 200, (i, a)
