"""Issue 15, parts 1 and 2, over a real slow link: a network namespace holding a real
`isrsync serve`, a veth pair into it shaped with `tc tbf` on both ends, and the
real ServerSource over HttpStore at this end.

* A fault (a chunk the guest waits for) while the background hoard fills the link
  is served within 2 x (one chunk / rate + RTT): it queues behind at most one
  bandwidth-delay product of bulk, not behind the hoard.
* On a slow link a batch that takes far longer than the source timeout comes in
  without a single failure, and the server sends under 2 % more pack bytes than
  the chunks hold (its own access log says what it sent).

The chunks are disk-like: 128 KiB of plaintext, half of it random and half
zeros, so about 64 KiB each on the wire, as a real guest disk's chunks compress.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shapedlink import Link, NsServer
from sourcekit import commit_chunks

from isrsync.chunk import CHUNK_SIZE, encode
from isrsync.errors import ChunkSlow
from isrsync.keys import new_convergence_secret
from isrsync.site.cache import SiteCache
from isrsync.site.pacing import Priority
from isrsync.site.serversource import ServerSource
from isrsync.site.registry import SourceRegistry
from isrsync.store.http import HttpStore


def disk_chunks(n: int) -> dict[bytes, bytes]:
    secret = new_convergence_secret()
    out = {}
    for _ in range(n):
        e = encode(os.urandom(CHUNK_SIZE // 2) + bytes(CHUNK_SIZE // 2), secret)
        out[e.tag] = e.data
    return out


class Home:
    def __init__(self, link: Link, server: NsServer, store: HttpStore) -> None:
        self.link, self.server, self.store = link, server, store


@pytest.fixture
async def home(tmp_path: Path) -> AsyncIterator[Home]:
    link = Link(prefix="isrsync-slow", octet=214)
    server = NsServer(tmp_path / "home")
    store = None
    try:
        link.up()
        server.start_in(link)
        store = HttpStore(server.url, server.add_user("alice"), retries=2, backoff=0.05)
        yield Home(link, server, store)
    finally:
        if store is not None:
            await store.close()
        server.kill()
        link.unshape()
        link.down()


async def registry_over(home: Home, chunks: dict[bytes, bytes], tmp_path: Path) -> SourceRegistry:
    """A registry whose one source is the server holding ``chunks``."""
    pid, _ = await commit_chunks(home.store, chunks, tmp_path)
    reg = SourceRegistry(SiteCache(tmp_path / "site"))
    src = ServerSource(home.store, pid)
    reg.add(src)
    await src.learn(list(chunks))  # the pack index, as a resume learns it for its keyring
    return reg


async def round_trip(home: Home) -> float:
    """The median time of a small request on the idle link: the RTT as a request sees it."""
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        await home.store.list_parcels()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


async def test_a_fault_is_served_ahead_of_the_hoard_over_a_shaped_link(home: Home, tmp_path: Path) -> None:
    chunks = disk_chunks(64)
    tags = list(chunks)
    reg = await registry_over(home, chunks, tmp_path)
    rate = 4e6 / 8  # bytes/s
    home.link.shape(4e6)
    try:
        rtt = await round_trip(home)
        await reg.fetch_many(tags[:2])  # the link is measured by its first answers
        hoard = asyncio.ensure_future(reg.fetch_many(tags[2:54], required=False, priority=Priority.BULK))
        await asyncio.sleep(1.0)
        waits = []
        for t in tags[54:64]:
            t0 = time.monotonic()
            assert await reg.fetch_many([t]) == {t: chunks[t]}
            waits.append(time.monotonic() - t0)
            assert not hoard.done(), "the hoard ended before the faults did: nothing was shown"
            await asyncio.sleep(0.3)
        got = await asyncio.wait_for(hoard, 120)
    finally:
        home.link.unshape()
    assert got == {t: chunks[t] for t in tags[2:54]}
    target = 2 * (CHUNK_SIZE / rate + rtt)
    waits.sort()
    assert waits[-1] <= target, f"fault service {[round(w, 3) for w in waits]} s, target {target:.3f} s"
    s = reg.stats()["server"]
    assert s.errors == 0 and s.hits == len(tags)
    reg.cache.close()


async def test_a_slow_link_makes_no_failures_and_wastes_under_2_percent(home: Home, tmp_path: Path) -> None:
    chunks = disk_chunks(24)
    tags = list(chunks)
    useful = sum(map(len, chunks.values()))
    reg = await registry_over(home, chunks, tmp_path)
    reg.source_timeout = 5.0  # one request for all of it would take 12 s at this rate
    rate = 1e6 / 8
    assert useful / rate > 2 * reg.source_timeout
    sent0 = home.server.pack_bytes_sent()
    home.link.shape(1e6)
    try:
        t0 = time.monotonic()
        while True:  # as the disk does: told a chunk is slow, ask again (it joins the request)
            try:
                got = await asyncio.wait_for(reg.fetch_many(tags), 120)
                break
            except ChunkSlow:
                assert time.monotonic() - t0 < 120
    finally:
        home.link.unshape()
    assert got == chunks
    sent = home.server.pack_bytes_sent() - sent0
    s = reg.stats()["server"]
    assert s.errors == 0, s
    assert s.hits == len(tags)
    assert useful <= sent <= 1.02 * useful, (sent, useful)
    assert reg.wasted("server") <= 0.02 * useful
    reg.cache.close()
