"""The direct path (issue 12, part 5; isrsync/swarm/direct.py): chunks by tag from a LAN
peer's cache over TCP, checked by tag, restricted to the organisation, bounded in time.

Real servers and clients on loopback: an honest peer answering from a real site
cache, a lying peer (a real DirectServer whose cache hands out rotten bytes: the
peer is malicious, since an honest server checks tags before it sends), a peer in
its own process that is stopped or killed (seedproc.py --direct), and hostile
clients speaking raw bytes at a server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_peer_vanish import Fallback, PackHome
from test_torrent_pack import write_pack

from isrsync.errors import FormatError
from isrsync.site.cache import SiteCache
from isrsync.site.registry import SourceRegistry
from isrsync.swarm import directfmt as fmt
from isrsync.swarm.direct import DirectClient, DirectError, DirectServer, SiteChunks
from isrsync.swarm.directfmt import Status, Want
from isrsync.swarm.org import org_tls
from isrsync.swarm.peer import PeerSource
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent

LOOP = SwarmSettings(interface="127.0.0.1")
HOST = "127.0.0.1"
NO_BT = 9  # a peer's BitTorrent port the test never connects to (only its direct path is asked)
STALL = 1.0
SLACK = 2.0  # a loaded 2-core machine
SECRET = "correct horse battery staple, lab 3"


def packs(tmp: Path, n: int = 2, per: int = 12):
    infos, chunks, paths = [], {}, []
    for k in range(n):
        info, path = write_pack(tmp / f"made-{k}", n=per)
        blob = path.read_bytes()
        chunks.update((e.tag, blob[e.offset : e.offset + e.length]) for e in info.entries)
        infos.append(info)
        paths.append(path)
    return infos, paths, chunks


def wants(infos, tags: Sequence[bytes] | None = None) -> list[Want]:
    out = [Want(e.tag, e.pack_id, e.offset, e.length) for i in infos for e in i.entries]
    return out if tags is None else [w for w in out if w.tag in set(tags)]


def honest_cache(path: Path, chunks: dict[bytes, bytes]) -> SiteCache:
    cache = SiteCache(path)
    cache.put_many(chunks.items())
    return cache


class Liar:
    """A peer's cache that answers every other chunk with one byte flipped."""

    def __init__(self, chunks: dict[bytes, bytes]) -> None:
        self.chunks = chunks
        self.lied: set[bytes] = set()

    def lookup(self, ws: Sequence[Want]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i, w in enumerate(ws):
            data = self.chunks.get(w.tag)
            if data is not None and i % 2 == 0:
                data = bytes([data[0] ^ 1]) + data[1:]
                self.lied.add(w.tag)
            out.append(data)
        return out


async def test_an_honest_peer_answers_from_its_site_cache_and_says_what_it_lacks(tmp_path: Path) -> None:
    infos, _, chunks = packs(tmp_path)
    tags = list(chunks)
    held = dict(list(chunks.items())[: len(tags) // 2])
    cache = honest_cache(tmp_path / "peer-cache", held)
    server = await DirectServer(SiteChunks(cache, None)).start([HOST])
    client = DirectClient()
    try:
        got = await client.fetch(HOST, server.port, wants(infos))  # 24 chunks: one request, one connection
        assert got.good == held and got.bad == []
        again = await client.fetch(HOST, server.port, wants(infos, tags[:1]))
        assert again.good == {tags[0]: chunks[tags[0]]}
        assert server.stats.connections == 1, "the connection was not kept for the next miss"
        assert server.stats.chunks_sent == len(held) + 1
    finally:
        await client.close()
        await server.close()
        cache.close()


class StuckOn:
    """A peer's cache whose disk hangs on one chunk (until released)."""

    def __init__(self, inner: SiteChunks, tag: bytes) -> None:
        self.inner, self.tag = inner, tag
        self.release = threading.Event()

    def lookup(self, ws: Sequence[Want]) -> list[bytes | None]:
        if any(w.tag == self.tag for w in ws):
            self.release.wait()
        return self.inner.lookup(ws)


async def test_a_peer_failing_midway_keeps_what_it_answered_and_is_skipped(tmp_path: Path) -> None:
    infos, _, chunks = packs(tmp_path, n=3, per=30)  # 90 chunks: two requests, 64 and 26
    tags = list(chunks)
    cache = honest_cache(tmp_path / "peer-cache", chunks)
    stuck = StuckOn(SiteChunks(cache, None), tags[-1])
    server = await DirectServer(stuck).start([HOST])
    site = await SwarmSession(tmp_path / "site", LOOP).start()
    source = PeerSource(site, PackHome(infos, {}), uuid.uuid4(), owns_swarm=True,  # type: ignore[arg-type]
                        direct=DirectClient(stall=0.5))
    source.add_peer(HOST, NO_BT, server.port)
    try:
        t0 = time.monotonic()
        got = await source.get_many(tags)
        assert time.monotonic() - t0 < 0.5 + SLACK
        assert got == {t: chunks[t] for t in tags[:64]}, "the answered request was thrown away"
        # The peer is skipped for a while: the next miss does not wait on it again.
        t0 = time.monotonic()
        assert await source.get_many(tags[-3:]) == {}
        assert time.monotonic() - t0 < 0.2
        assert site.stats.banned == 0
    finally:
        stuck.release.set()
        await source.close()
        await server.close()
        cache.close()


async def test_a_peer_sending_bad_chunks_is_banned_and_the_reads_are_right(tmp_path: Path) -> None:
    infos, _, chunks = packs(tmp_path)
    tags = list(chunks)
    liar = Liar(chunks)
    server = await DirectServer(liar).start([HOST])
    site = await SwarmSession(tmp_path / "site", LOOP).start()
    source = PeerSource(site, PackHome(infos, {}), uuid.uuid4(), owns_swarm=True,  # type: ignore[arg-type]
                        direct=DirectClient())
    source.add_peer(HOST, NO_BT, server.port)
    cache = SiteCache(tmp_path / "cache")
    try:
        registry = SourceRegistry(cache)
        fallback = Fallback(chunks)
        registry.add(source)
        registry.add(fallback)
        assert await asyncio.wait_for(registry.fetch_many(tags), 30) == chunks
        assert liar.lied, "the liar was never asked"
        assert source.bad_chunks == len(liar.lied)
        assert site.banned == {(HOST, NO_BT)} and site.stats.banned == 1
        assert source.peers == []
        # The liar's honest half was checked chunk by chunk and kept; the lies came from the next source.
        lan, nxt = registry.stats()[source.name], registry.stats()[fallback.name]
        assert lan.bad == 0 and lan.hits >= 1 and lan.hits + nxt.hits == len(tags)
        assert liar.lied <= set(fallback.asked)
        assert all(cache.get(t) == chunks[t] for t in tags)

        # Banned: never asked again, on this path or the torrent path.
        asked = server.stats.requests
        assert await source.get_many(tags[:3]) == {}
        assert server.stats.requests == asked
    finally:
        await source.close()
        await server.close()
        cache.close()


async def test_an_outsider_without_the_org_secret_gets_nothing(tmp_path: Path) -> None:
    infos, _, chunks = packs(tmp_path, n=1)
    cache = honest_cache(tmp_path / "peer-cache", chunks)
    server = await DirectServer(SiteChunks(cache, None), org=org_tls(SECRET)).start([HOST])
    insider = DirectClient(org=org_tls(SECRET))
    outsiders = {"no secret": DirectClient(), "another secret": DirectClient(org=org_tls(SECRET + " (not ours)"))}
    try:
        assert (await insider.fetch(HOST, server.port, wants(infos))).good == chunks
        sent = server.stats.chunks_sent
        for why, client in outsiders.items():
            with pytest.raises(DirectError):
                await client.fetch(HOST, server.port, wants(infos))
            await client.close()
            assert server.stats.chunks_sent == sent, f"an outsider with {why} was sent chunks"
        # A plain request on the wire is a broken TLS handshake: not one response byte comes back.
        r, w = await asyncio.open_connection(HOST, server.port)
        w.write(fmt.encode_request(wants(infos)[:1]))
        back = await asyncio.wait_for(r.read(), 10)
        w.close()
        assert fmt.RESPONSE_MAGIC not in back and chunks[infos[0].entries[0].tag] not in back
        # ... and the insider still gets everything.
        assert (await insider.fetch(HOST, server.port, wants(infos))).good == chunks
    finally:
        await insider.close()
        await server.close()
        cache.close()


async def test_unfinished_tls_handshakes_count_against_the_connection_bound(tmp_path: Path) -> None:
    infos, _, chunks = packs(tmp_path, n=1)
    cache = honest_cache(tmp_path / "peer-cache", chunks)
    server = await DirectServer(SiteChunks(cache, None), org=org_tls(SECRET), max_connections=1,
                                io_timeout=0.5).start([HOST])
    insider = DirectClient(org=org_tls(SECRET))
    try:
        _, silent = await asyncio.open_connection(HOST, server.port)  # never starts its handshake
        await asyncio.sleep(0.1)
        with pytest.raises(DirectError):  # turned away: the silent one holds the only slot
            await insider.fetch(HOST, server.port, wants(infos))
        assert server.stats.chunks_sent == 0
        await asyncio.sleep(0.5 + 0.3)  # the handshake timeout frees the slot
        assert (await insider.fetch(HOST, server.port, wants(infos))).good == chunks
        silent.close()
    finally:
        await insider.close()
        await server.close()
        cache.close()


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["sigstop", "sigkill"])
async def test_a_stopped_or_killed_peer_falls_through_fast(tmp_path: Path, sig: signal.Signals) -> None:
    seed_dir = tmp_path / "peer"
    seed_dir.mkdir()
    infos, paths, chunks = packs(tmp_path, n=3, per=20)
    torrents = {}
    for info, path in zip(infos, paths):
        t = await make_torrent(path, info.pack_id)
        shutil.copyfile(path, seed_dir / path.name)
        (seed_dir / f"{path.name}.torrent").write_bytes(t.data)
        torrents[info.pack_id] = t.data
    tags = list(chunks)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    peer = await asyncio.create_subprocess_exec(sys.executable, str(Path(__file__).with_name("seedproc.py")),
                                                str(seed_dir), "--direct", stdout=asyncio.subprocess.PIPE, env=env)
    site = await SwarmSession(tmp_path / "site", LOOP).start()
    source = PeerSource(site, PackHome(infos, torrents), uuid.uuid4(), owns_swarm=True,  # type: ignore[arg-type]
                        direct=DirectClient(stall=STALL))
    cache = SiteCache(tmp_path / "cache")
    try:
        assert peer.stdout is not None
        bt, direct = map(int, (await asyncio.wait_for(peer.stdout.readline(), 30)).split())
        source.add_peer(HOST, bt, direct)
        first = tags[:5]
        assert await source.get_many(first) == {t: chunks[t] for t in first}  # live, connection kept

        os.kill(peer.pid, sig)
        rest = tags[5:]
        t0 = time.monotonic()
        got = await asyncio.wait_for(source.get_many(rest), 30)
        took = time.monotonic() - t0
        assert got == {}
        assert took < STALL + SLACK, f"the miss waited {took:.1f} s on a peer that went"

        # Through the registry: the next source answers at once (the peer is skipped for a while).
        registry = SourceRegistry(cache)
        fallback = Fallback(chunks)
        registry.add(source)
        registry.add(fallback)
        t0 = time.monotonic()
        assert await asyncio.wait_for(registry.fetch_many(rest), 30) == {t: chunks[t] for t in rest}
        assert time.monotonic() - t0 < SLACK
        assert registry.stats()[source.name].bad == 0 and site.stats.banned == 0
    finally:
        if peer.returncode is None:
            peer.send_signal(signal.SIGCONT)
            peer.kill()
        await peer.wait()
        await source.close()
        cache.close()


async def _raw(port: int, data: bytes, *, close: bool = False) -> bytes:
    """Send ``data`` on a fresh connection; everything the server sends until it hangs up."""
    r, w = await asyncio.open_connection(HOST, port)
    try:
        w.write(data)
        if close:
            w.write_eof()
        return await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()


def _status(answer: bytes) -> Status:
    assert len(answer) == fmt.RESPONSE_HEAD_SIZE, answer
    return fmt.decode_response_head(answer, 0) if answer[5] else Status.OK


async def test_hostile_clients_get_an_error_never_a_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    infos, _, chunks = packs(tmp_path, n=1)
    cache = honest_cache(tmp_path / "peer-cache", chunks)
    server = await DirectServer(SiteChunks(cache, None), max_connections=2, idle_timeout=0.5).start([HOST])
    port = server.port
    good = wants(infos)[:1]
    head = bytes(fmt.encode_request(good))[: fmt.REQUEST_HEAD_SIZE]
    want = bytes(fmt.encode_request(good))[fmt.REQUEST_HEAD_SIZE :]
    try:
        assert _status(await _raw(port, b"GET / HTTP/1.1\r\n\r\n")) is Status.BAD_REQUEST
        assert _status(await _raw(port, b"ISRq\x09\x01\x00" + want)) is Status.UNSUPPORTED
        assert _status(await _raw(port, b"ISRq\x01\x00\x00")) is Status.BAD_REQUEST  # no chunk
        assert _status(await _raw(port, b"ISRq\x01\xff\xff")) is Status.BAD_REQUEST  # 65535: over the bound
        long = want[:-4] + (fmt.MAX_CHUNK + 1).to_bytes(4, "little")
        assert _status(await _raw(port, head + long)) is Status.BAD_REQUEST
        assert _status(await _raw(port, head + want[:10], close=True)) is Status.BAD_REQUEST  # cut short
        assert await _raw(port, head[:3], close=True) == fmt.encode_response_head(Status.BAD_REQUEST, 0)
        assert await _raw(port, b"", close=True) == b""  # connected, asked nothing, left: nothing said

        # A silent client is hung up on after the idle timeout, and holds no slot after it.
        t0 = time.monotonic()
        assert await _raw(port, b"") == b""
        assert time.monotonic() - t0 < 0.5 + SLACK

        # Over the connection bound: BUSY at once, the served ones unaffected.
        held = [await asyncio.open_connection(HOST, port) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert _status(await _raw(port, b"")) is Status.BUSY
        r, w = held[0]
        w.write(fmt.encode_request(good))
        await w.drain()
        assert (await r.readexactly(fmt.RESPONSE_HEAD_SIZE))[5] == Status.OK
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)

        # Random garbage: an error status or a hang-up, every time, and the server lives on.
        rng = random.Random(7)
        for _ in range(50):
            junk = rng.choice([b"ISRq\x01", b""]) + rng.randbytes(rng.randrange(1, 300))
            answer = await _raw(port, junk, close=True)
            assert answer == b"" or _status(answer) is not Status.OK or answer[:4] == fmt.RESPONSE_MAGIC

        client = DirectClient()
        assert (await client.fetch(HOST, port, wants(infos))).good == chunks
        await client.close()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    finally:
        await server.close()
        cache.close()


def test_the_wire_format_refuses_anything_off_bounds() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        raw = rng.randbytes(fmt.REQUEST_HEAD_SIZE)
        try:
            n = fmt.decode_request_head(raw)
        except FormatError:
            continue
        assert 1 <= n <= fmt.MAX_WANTS
        with pytest.raises(FormatError):
            fmt.decode_wants(rng.randbytes(n * fmt.WANT_SIZE - 1), n)
    w = Want(os.urandom(32), os.urandom(32), 0, 10)
    with pytest.raises(ValueError):
        fmt.encode_request([w] * (fmt.MAX_WANTS + 1))
    with pytest.raises(FormatError):
        fmt.decode_length((fmt.MAX_CHUNK + 1).to_bytes(4, "little"))
    assert fmt.decode_length(fmt.ABSENT.to_bytes(4, "little")) is None
    assert fmt.MAX_RESPONSE == fmt.MAX_WANTS * fmt.MAX_CHUNK  # what a reader may ever hold
