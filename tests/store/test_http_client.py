"""HttpStore against the real server: retries, dead servers, resumable uploads, TLS.

What the conformance suite cannot see from the Store protocol alone: which
failures are retried (and which are not), how long a dead home takes to be
reported, that a cut upload continues where it stopped, and certificate checks.
Faults are injected by a small TCP proxy on loopback (:class:`Proxy`); requests
are counted in the server's JSON access log (one object per line).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from isrsync.chunk import tag_of
from isrsync.errors import (
    AuthError,
    Conflict,
    FormatError,
    LockHeld,
    NotFound,
    Unreachable,
    UsageError,
)
from isrsync.pack import PackInfo, PackWriter
from isrsync.store import http as http_mod
from isrsync.store.base import Holder
from isrsync.store.http import HttpStore

MiB = 1 << 20
GiB = 1 << 30


# -- helpers -----------------------------------------------------------------------------


class Proxy:
    """A TCP proxy on loopback that can answer 503, refuse, or cut an upload.

    ``fail_503``: that many new connections get one ``503`` answer and are closed.
    ``cut_at``: when the client->server byte count reaches it, forward exactly up
    to it, close the server side and reset the client side (once).
    ``down``: new connections are closed at once (``down_after_cut`` sets it).
    """

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.up = (u.hostname or "127.0.0.1", u.port or 80)
        self.c2s = 0
        self.cut_at: int | None = None
        self.cuts = 0
        self.down = False
        self.down_after_cut = False
        self.fail_503 = 0
        self.answered_503 = 0
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(cw)
        uw: asyncio.StreamWriter | None = None
        try:
            if self.down:
                return
            if self.fail_503 > 0:
                self.fail_503 -= 1
                head = await cr.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await cr.readexactly(int(line.split(b":")[1]))
                body = b'{"error":"busy","kind":"Unreachable"}'
                cw.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                await cw.drain()
                self.answered_503 += 1
                return
            ur, uw = await asyncio.open_connection(*self.up)
            self._writers.add(uw)
            await asyncio.gather(self._upstream(cr, uw, cw), self._downstream(ur, cw), return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for w in (uw, cw):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    async def _upstream(self, cr: asyncio.StreamReader, uw: asyncio.StreamWriter, cw: asyncio.StreamWriter) -> None:
        try:
            while data := await cr.read(1 << 18):
                if self.cut_at is not None and self.c2s + len(data) >= self.cut_at:
                    keep = self.cut_at - self.c2s
                    uw.write(data[:keep])
                    self.c2s += keep
                    await uw.drain()
                    self.cut_at = None
                    self.cuts += 1
                    if self.down_after_cut:
                        self.down = True
                    uw.close()  # the server gets every byte that made it, then EOF
                    cw.transport.abort()  # the client sees its connection reset
                    return
                uw.write(data)
                self.c2s += len(data)
                await uw.drain()
        finally:
            uw.close()

    async def _downstream(self, ur: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            while data := await ur.read(1 << 18):
                cw.write(data)
                await cw.drain()
        finally:
            cw.close()


def access_log(srv: Any) -> list[dict[str, Any]]:
    out = []
    for line in srv.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and "path" in d and "status" in d:
                out.append(d)
    return out


async def requests_to(srv: Any, method: str, path: str, *, settle: float = 0.4) -> list[dict[str, Any]]:
    """Access-log lines for ``method path``: waits for the first, then for stragglers."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(d["method"] == method and d["path"] == path for d in access_log(srv)):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(settle)
    return [d for d in access_log(srv) if d["method"] == method and d["path"] == path]


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_big_pack(path: Path, size: int) -> PackInfo:
    """A valid pack of about ``size`` bytes, quickly: distinct, incompressible chunks."""
    block = os.urandom(MiB)
    with open(path, "wb", buffering=1 << 22) as f:
        w = PackWriter(f)
        i = 0
        while w.size < size - 44 * (i + 1) - 200_000:
            off = (i * 4096) % (MiB // 2)
            data = os.urandom(32) + block[off : off + 128 * 1024 - 32]
            w.add(tag_of(data), data)
            i += 1
        info = w.finish()
    assert path.stat().st_size == info.size
    return info


async def upload_offset(url: str, token: str, parcel: uuid.UUID, pack: bytes) -> dict[str, Any]:
    """The server's view of a partial upload, asked directly (not through HttpStore)."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s, \
            s.get(f"{url}/v1/parcels/{parcel}/uploads/{pack.hex()}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.fixture
async def open_http() -> AsyncIterator[Callable[..., HttpStore]]:
    """``open_http(url, token, **kw)``: HttpStores that are closed at teardown."""
    made: list[HttpStore] = []

    def make(url: str, token: str, **kw: Any) -> HttpStore:
        s = HttpStore(url, token, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Any]]:
    made: list[Proxy] = []

    async def make(upstream: str, port: int = 0) -> Proxy:
        p = await Proxy(upstream).start(port)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()


# -- retries -------------------------------------------------------------------------------


async def test_transient_503_is_retried(live_server, proxies, open_http) -> None:
    token = live_server.add_user("alice")
    proxy = await proxies(live_server.url)
    proxy.fail_503 = 2
    store = open_http(proxy.url, token, retries=6, backoff=0.05)
    pid = uuid.uuid4()
    info = await store.create_parcel(pid, "through-503s")
    assert info.parcel == pid
    assert proxy.answered_503 == 2
    # The 503s never reached the server; the one that did created the parcel once.
    assert [d["status"] for d in await requests_to(live_server, "POST", "/v1/parcels")] == [201]


async def test_persistent_503_gives_up_after_the_retries(live_server, proxies, open_http) -> None:
    token = live_server.add_user("alice")
    proxy = await proxies(live_server.url)
    proxy.fail_503 = 1000
    store = open_http(proxy.url, token, retries=3, backoff=0.02)
    with pytest.raises(Unreachable) as e:
        await store.list_parcels()
    assert "503" in str(e.value)
    assert proxy.answered_503 == 4  # the first try and 3 retries, no more


async def test_server_that_comes_up_late_is_reached_by_backoff(server_factory, tmp_path, open_http) -> None:
    from isrsync.server.repo import Repository

    data = tmp_path / "late-data"
    repo = Repository(data, create=True)
    token = repo.add_user("alice")
    repo.close()
    port = free_port()
    store = open_http(f"http://127.0.0.1:{port}", token, retries=6, backoff=0.2)

    async def start_later() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server_factory, data, ["--listen", f"127.0.0.1:{port}"])

    starter = asyncio.create_task(start_later())
    t0 = time.monotonic()
    assert await store.list_parcels() == []
    elapsed = time.monotonic() - t0
    await starter
    assert elapsed >= 0.45  # it really waited for the server, it was not up at first


async def test_a_server_found_gone_is_tried_once_per_call_until_it_answers(live_server, proxies, open_http) -> None:
    """An offline suspend makes several calls: only the first waits out the retries."""
    token = live_server.add_user("alice")
    proxy = await proxies(live_server.url)
    proxy.fail_503 = 1000
    store = open_http(proxy.url, token, retries=3, backoff=0.02)
    with pytest.raises(Unreachable):
        await store.list_parcels()
    assert proxy.answered_503 == 4
    for _ in range(2):
        with pytest.raises(Unreachable):
            await store.list_parcels()
    assert proxy.answered_503 == 6  # one try each, no retries
    proxy.fail_503 = 1  # back, after one more refusal: that call gets no retry either
    with pytest.raises(Unreachable):
        await store.list_parcels()
    assert await store.list_parcels() == []
    # It answered: the next outage is retried in full again.
    await store.close()  # a new connection, so the proxy's 503s reach it
    proxy.fail_503 = 2
    assert await store.list_parcels() == []
    assert proxy.answered_503 == 9


@pytest.mark.parametrize("case", ["not-found", "conflict", "lock-held", "format", "auth"])
async def test_client_errors_are_not_retried(live_server, open_http, case: str) -> None:
    token = live_server.add_user("alice")
    store = open_http(live_server.url, token, retries=5, backoff=0.05)
    other = open_http(live_server.url, token, retries=5, backoff=0.05)
    pid = uuid.uuid4()
    await store.create_parcel(pid, "vm")
    if case == "not-found":
        ghost = uuid.uuid4()
        with pytest.raises(NotFound):
            await store.lock_status(ghost)
        method, path, status = "GET", f"/v1/parcels/{ghost}/lock", 404
    elif case == "conflict":
        await store.put_key_bundle(b"one", None)
        with pytest.raises(Conflict):
            await store.put_key_bundle(b"two", None)
        method, path, status = "PUT", "/v1/keybundle", 409
    elif case == "lock-held":
        await store.acquire(pid, Holder("site-a", "host-a"))
        with pytest.raises(LockHeld):
            await other.acquire(pid, Holder("site-b", "host-b"))
        method, path, status = "POST", f"/v1/parcels/{pid}/lock", 423
    elif case == "format":
        from isrsync.store.base import CommitRequest

        with pytest.raises(FormatError):
            await store.commit(pid, CommitRequest(epoch=1, parent=0, manifest=b"not a manifest"))
        method, path, status = "POST", f"/v1/parcels/{pid}/commit", 400
    else:
        bad = open_http(live_server.url, "not-a-token", retries=5, backoff=0.05)
        with pytest.raises(AuthError):
            await bad.list_parcels()
        method, path, status = "GET", "/v1/parcels", 401
    lines = [d for d in await requests_to(live_server, method, path) if d["status"] == status]
    assert len(lines) == 1, lines


# -- dead or hung servers -----------------------------------------------------------------


async def test_dead_server_is_unreachable_quickly(open_http) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = open_http(url, "token", retries=3, backoff=0.05, connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as e:
        await store.list_parcels()
    assert time.monotonic() - t0 < 3.0
    assert url in str(e.value) and "cannot reach" in str(e.value)
    # A sentence, not aiohttp's connector internals ("ssl:default", "Connect call failed").
    assert "(connection refused)" in str(e.value), e.value
    assert "ssl:" not in str(e.value) and "Connect call" not in str(e.value) and "[" not in str(e.value)
    assert e.value.exit_code == 8 and "network" in e.value.hint


async def test_killed_server_is_unreachable(live_server, open_http) -> None:
    store = open_http(live_server.url, live_server.add_user("alice"), retries=2, backoff=0.05)
    assert await store.list_parcels() == []  # a pooled connection now exists
    live_server.kill()
    t0 = time.monotonic()
    with pytest.raises(Unreachable):
        await store.list_parcels()
    assert time.monotonic() - t0 < 3.0


async def test_hung_server_times_out(open_http) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)  # read nothing, answer nothing

    srv = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        store = open_http(url, "token", retries=1, backoff=0.05, read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(Unreachable) as e:
            await store.list_parcels()
        assert time.monotonic() - t0 < 5.0
        assert "timed out" in str(e.value)
        assert len(accepted) == 2  # one try, one retry
    finally:
        for w in accepted:
            w.transport.abort()
        srv.close()
        await srv.wait_closed()


def test_bad_url_is_a_usage_error() -> None:
    for url in ("ftp://host/", "127.0.0.1:8470", "http://"):
        with pytest.raises(UsageError):
            HttpStore(url, "token")


# -- resumable uploads ---------------------------------------------------------------------


def spy_ranges(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (start, end) of every upload piece HttpStore sends."""
    ranges: list[tuple[int, int]] = []
    orig = HttpStore._call_once

    async def spy(self: HttpStore, method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
        cr = headers.get("Content-Range", "")
        if cr.startswith("bytes ") and not cr.startswith("bytes */"):
            a, b = cr[6:].split("/")[0].split("-")
            ranges.append((int(a), int(b)))
        return await orig(self, method, path, body, headers)

    monkeypatch.setattr(HttpStore, "_call_once", spy)
    return ranges


async def stable_offset(url: str, token: str, parcel: uuid.UUID, pack: bytes) -> int:
    """The partial upload's size once the server has written all it received."""
    last = -1
    for _ in range(50):
        st = await upload_offset(url, token, parcel, pack)
        assert st["complete"] is False
        if st["offset"] == last:
            return last
        last = st["offset"]
        await asyncio.sleep(0.1)
    raise AssertionError("the partial upload kept growing")


async def test_cut_upload_of_1gib_continues_in_a_second_call(
    live_server, proxies, open_http, tmp_path, monkeypatch
) -> None:
    """The issue's case: a 1 GiB upload cut at 90 % continues, it does not start over."""
    path = tmp_path / "big.pack"
    info = make_big_pack(path, GiB)
    size = info.size
    token = live_server.add_user("alice")
    direct = open_http(live_server.url, token)
    pid = uuid.uuid4()
    await direct.create_parcel(pid, "big")
    proxy = await proxies(live_server.url)
    proxy.cut_at, proxy.down_after_cut = int(0.9 * size), True
    ranges = spy_ranges(monkeypatch)
    site = open_http(proxy.url, token, retries=1, backoff=0.05)

    with pytest.raises(Unreachable):
        await site.put_pack(pid, info.pack_id, path)
    assert proxy.cuts == 1 and ranges[0][0] == 0
    offset = await stable_offset(live_server.url, token, pid, info.pack_id)
    assert 0.8 * size < offset < size, (offset, size)
    assert await direct.have_packs(pid, [info.pack_id]) == set()

    proxy.down = False
    first_call = len(ranges)
    await site.put_pack(pid, info.pack_id, path)
    resumed = ranges[first_call:]
    assert resumed and resumed[0][0] == offset, (offset, resumed)
    assert resumed[-1][1] == size - 1
    assert proxy.c2s < 1.3 * size, (proxy.c2s, size)
    assert await direct.have_packs(pid, [info.pack_id]) == {info.pack_id}
    assert await direct.pack_size(pid, info.pack_id) == size
    # The bytes around the cut are the file's.
    assert await direct.get_pack(pid, info.pack_id, offset - 4096, 8192) == read_at(path, offset - 4096, 8192)
    puts = await requests_to(live_server, "POST", f"/v1/parcels/{pid}/packs/{info.pack_id.hex()}")
    assert [d["status"] for d in puts][-1] == 201


async def test_cut_upload_resumes_within_one_call(
    live_server, proxies, open_http, tmp_path, monkeypatch
) -> None:
    """One put_pack call survives a cut and sends only what the server lacks.

    A single-piece pack (64 MiB = UPLOAD_PIECE) cut at 90 %: the call must
    continue from the server's offset; re-sending the cut piece from its start
    (with a stale Content-Range the server refuses) would nearly double the
    bytes on the wire.
    """
    path = tmp_path / "piece.pack"
    info = make_big_pack(path, http_mod.UPLOAD_PIECE)
    size = info.size
    assert size <= http_mod.UPLOAD_PIECE
    token = live_server.add_user("alice")
    pid = uuid.uuid4()
    direct = open_http(live_server.url, token)
    await direct.create_parcel(pid, "piece")
    proxy = await proxies(live_server.url)
    proxy.cut_at = int(0.9 * size)
    ranges = spy_ranges(monkeypatch)
    site = open_http(proxy.url, token, retries=2, backoff=0.3)
    await site.put_pack(pid, info.pack_id, path)
    assert proxy.cuts == 1
    starts = [a for a, _ in ranges]
    assert len(starts) == 2 and starts[0] == 0 and 0.8 * size < starts[1] < size, starts
    assert await direct.pack_size(pid, info.pack_id) == size
    assert await direct.get_pack(pid, info.pack_id) == path.read_bytes()
    puts = await requests_to(live_server, "POST", f"/v1/parcels/{pid}/packs/{info.pack_id.hex()}")
    assert proxy.c2s < 1.3 * size, (
        f"{proxy.c2s} bytes sent for a pack of {size}; "
        f"server saw PUT statuses {[d['status'] for d in puts]}"
    )


async def test_upload_streams_each_piece_in_blocks_read_off_the_loop(
    live_server, open_http, tmp_path, monkeypatch
) -> None:
    """A piece (64 MiB at most) is neither held whole in memory nor read on the
    loop that may be serving a guest's disk: it goes out READ_BLOCK at a time,
    read on worker threads. Sizes here leave a short last block and piece."""
    monkeypatch.setattr(http_mod, "UPLOAD_PIECE", MiB + 4096)
    monkeypatch.setattr(http_mod, "READ_BLOCK", 100_003)
    path = tmp_path / "p.pack"
    info = make_big_pack(path, 3 * MiB)
    token = live_server.add_user("alice")
    store = open_http(live_server.url, token)
    pid = uuid.uuid4()
    await store.create_parcel(pid, "vm")

    blocks: list[int] = []
    bodies: list[type] = []
    orig = HttpStore._call_once

    async def spy(self: HttpStore, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        bodies.append(type(body))
        if not isinstance(body, bytes):
            inner = body

            async def counted() -> AsyncIterator[bytes]:
                async for b in inner:
                    blocks.append(len(b))
                    yield b

            body = counted()
        return await orig(self, method, path, body, headers)

    readers: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        readers.append(threading.get_ident())
        return real_pread(fd, n, off)

    monkeypatch.setattr(HttpStore, "_call_once", spy)
    monkeypatch.setattr(os, "pread", pread)
    await store.put_pack(pid, info.pack_id, path)

    assert len(bodies) == 3 and bytes not in bodies, bodies
    assert sum(blocks) == info.size and max(blocks) == 100_003 and len(blocks) > 3 * 10
    assert readers and threading.get_ident() not in readers
    assert await store.have_packs(pid, [info.pack_id]) == {info.pack_id}
    assert await store.get_pack(pid, info.pack_id) == path.read_bytes()


@pytest.mark.parametrize("part", ["intact", "damaged"])
async def test_full_length_partial_upload_is_finished_not_skipped(
    live_server, open_http, tmp_path, part: str
) -> None:
    """A crash after an upload's last byte landed, before the pack was verified
    and staged, leaves a full-length partial (repo.py: "a partial upload
    (resumed, ...)"). put_pack must end with the pack staged, not return early
    because the offset already equals the size."""
    token = live_server.add_user("alice")
    store = open_http(live_server.url, token, retries=2, backoff=0.05)
    pid = uuid.uuid4()
    await store.create_parcel(pid, "vm")
    path = tmp_path / "p.pack"
    info = make_big_pack(path, 4 * MiB)
    partial = live_server.data / "uploads" / "alice" / f"{info.pack_id.hex()}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(path.read_bytes() if part == "intact" else os.urandom(info.size))
    assert await upload_offset(live_server.url, token, pid, info.pack_id) == {"complete": False, "offset": info.size}
    await store.put_pack(pid, info.pack_id, path)
    assert await store.have_packs(pid, [info.pack_id]) == {info.pack_id}
    assert await store.get_pack(pid, info.pack_id) == path.read_bytes()


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_with_the_servers_ca(server_factory, tls_pair, open_http, tmp_path) -> None:
    cert, key = tls_pair
    srv = server_factory(extra=["--tls-cert", str(cert), "--tls-key", str(key)])
    assert srv.url.startswith("https://127.0.0.1:")
    store = open_http(srv.url, srv.add_user("alice"), cafile=cert)
    pid = uuid.uuid4()
    await store.create_parcel(pid, "tls-vm")
    assert [p.parcel for p in await store.list_parcels()] == [pid]
    pack = make_big_pack(tmp_path / "small.pack", 2 * MiB)
    await store.put_pack(pid, pack.pack_id, tmp_path / "small.pack")
    assert await store.get_pack(pid, pack.pack_id) == (tmp_path / "small.pack").read_bytes()


async def test_tls_without_the_ca_fails_fast(server_factory, tls_pair, open_http) -> None:
    cert, key = tls_pair
    srv = server_factory(extra=["--tls-cert", str(cert), "--tls-key", str(key)])
    store = open_http(srv.url, srv.add_user("alice"), retries=5, backoff=1.0)
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as e:
        await store.list_parcels()
    # With retries the backoff alone would take > 15 s; a certificate is not transient.
    assert time.monotonic() - t0 < 3.0
    assert "certificate" in str(e.value).lower()
    assert srv.url in str(e.value)
    assert "--cacert" in e.value.hint
    assert access_log(srv) == []  # no request ever got through


async def test_plain_http_client_against_tls_server_is_unreachable(server_factory, tls_pair, open_http) -> None:
    cert, key = tls_pair
    srv = server_factory(extra=["--tls-cert", str(cert), "--tls-key", str(key)])
    url = "http://" + srv.url.split("://", 1)[1]
    store = open_http(url, srv.add_user("alice"), retries=1, backoff=0.05, read_timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(Unreachable):
        await store.list_parcels()
    assert time.monotonic() - t0 < 6.0
