"""Demand fetch through the real product path: ParcelDisk served by NbdServer, read by
real NBD clients, chunks coming from a Store through the SourceRegistry into the SiteCache."""

from __future__ import annotations

import asyncio
import errno
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from diskkit import CH, RecordingServerSource, SlowSource, kit

from isrsync.chunk import ZERO_TAG
from isrsync.store.http import HttpStore
from isrsync.vm import nbd


@pytest.mark.parametrize("backend", ["local", "http"])
async def test_demand_fetch_reads_the_image_once(backend, request, make_parcel, make_site, tmp_path: Path) -> None:
    store = None
    if backend == "http":
        srv = request.getfixturevalue("live_server")
        store = HttpStore(srv.url, srv.add_user("alice"), retries=3, backoff=0.05)
    try:
        parcel = await make_parcel(seed=5, store=store)
        site = await make_site(parcel)
        tags = parcel.keyring.tags()
        assert len(parcel.zero()) >= 8 and len(tags) < len(parcel.nonzero())  # zeros and dedup present

        got = await kit.export_bytes(site.uri, tmp_path / "a.img", "nbdcopy")
        assert got == parcel.image, kit.first_difference(got, parcel.image)
        stats = site.chain.stats()["server"]
        assert stats.hits == len(tags)
        assert stats.bad == 0 and stats.errors == 0
        assert ZERO_TAG not in site.server.asked
        assert set(site.server.asked) == tags
        assert len(site.server.asked) == len(tags), "a chunk was asked for twice"
        assert set(site.cache.tags()) == tags

        # everything is cached now: a second full read asks nobody
        calls = site.server.calls
        got = await kit.export_bytes(site.uri, tmp_path / "b.img", "qemu-img")
        assert got == parcel.image
        assert site.chain.stats()["server"].hits == len(tags)
        assert site.server.calls == calls
        assert site.disk.dirty == {} and site.state.dirty() == {}
    finally:
        if store is not None:
            await store.close()


async def test_zero_chunks_are_never_fetched(make_parcel, make_site) -> None:
    parcel = await make_parcel(seed=6)
    site = await make_site(parcel)
    zeros = parcel.zero()
    cmds = [f"read -q -P 0 {i * CH + 3} {min(CH, parcel.size - i * CH) - 3}" for i in zeros]
    (await kit.qemu_io(site.uri, *cmds)).check()
    assert site.server.calls == 0 and site.chain.stats()["server"].hits == 0
    assert site.cache.tags() == []


async def test_concurrent_reads_of_one_missed_chunk_fetch_it_once(make_parcel, make_site) -> None:
    parcel = await make_parcel(seed=7)
    site = await make_site(parcel, server=False)

    inner = RecordingServerSource(parcel.store, parcel.id)
    slow = SlowSource(inner, 0.3, name="slow-server")
    site.chain.add(slow)
    i = 2  # mixed_image: chunk i % 5 == 2 is random, 3 is sparse, 4 repeats chunk 2
    tag = parcel.keyring[i].tag
    offs = [(i * CH + k * 4099) for k in range(30)]
    datas = await asyncio.gather(*(site.disk.read(o, 777) for o in offs))
    for o, d in zip(offs, datas):
        assert d == parcel.image[o : o + 777]
    assert slow.calls == 1 and slow.asked == [tag]
    assert inner.asked == [tag]
    assert site.chain.stats()["slow-server"].hits == 1

    # the same through NBD: many in-flight reads of two missed chunks (one request
    # straddling both) fetch each chunk once
    j, k = 7, 8
    assert len({tag, parcel.keyring[j].tag, parcel.keyring[k].tag}) == 3
    cmds = [f"aio_read -q {j * CH + n * 1000} 5000" for n in range(20)]
    cmds += [f"aio_read -q {k * CH - 2500} 5000"] + [f"aio_read -q {k * CH + n * 999} 3000" for n in range(20)]
    (await kit.qemu_io(site.uri, *cmds, "aio_flush")).check()
    assert sorted(slow.asked[1:]) == sorted([parcel.keyring[j].tag, parcel.keyring[k].tag])
    got = await site.disk.read(j * CH, 2 * CH)
    assert got == parcel.image[j * CH : (j + 2) * CH]


async def test_nbd_cache_command_prefetches(make_parcel, make_site) -> None:
    parcel = await make_parcel(seed=8)
    site = await make_site(parcel)
    c, _ = await kit.RawClient.connect(site.served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    c.option(nbd.OPT_EXPORT_NAME, b"disk")
    size, tflags = struct.unpack(">QH", await c.read_exactly(10))
    assert size == parcel.size and tflags & nbd.TF_SEND_CACHE
    lo, hi = 10 * CH + 5, 20 * CH - 5  # chunks 10..19
    c.request(nbd.CMD_CACHE, lo, hi - lo)
    assert (await c.simple_reply())[0] == 0
    want = {parcel.keyring[i].tag for i in range(10, 20) if not parcel.keyring[i].is_zero}
    assert set(site.cache.tags()) == want
    assert set(site.server.asked) == want
    c.request(nbd.CMD_CACHE, parcel.size - 1, 2)  # past the end
    assert (await c.simple_reply())[0] == errno.EINVAL
    # reading the prefetched range needs no source
    calls = site.server.calls
    c.request(nbd.CMD_READ, lo, hi - lo)
    err, _, data = await c.simple_reply(hi - lo)
    assert err == 0 and data == parcel.image[lo:hi]
    assert site.server.calls == calls
    await c.close()


async def test_a_chunk_fetched_meanwhile_is_not_fetched_again(make_parcel, make_site) -> None:
    """Reader B looks in the cache and misses; before B reaches the chain, reader A
    fetches the same chunk, caches it and finishes. B must not ask the server again
    (the in-flight table is empty by then, but the cache has the chunk)."""
    parcel = await make_parcel(seed=9)
    pool = ThreadPoolExecutor(4, thread_name_prefix="test-codec")
    try:
        site = await make_site(parcel, pool=pool)
        tag = parcel.keyring[2].tag
        cache_get = site.cache.get
        gate = threading.Event()
        gated: list[bytes] = []

        def get(t: bytes, **kw) -> bytes | None:
            r = cache_get(t, **kw)
            if t == tag and r is None and not gated:
                gated.append(t)
                gate.wait(10)  # B's worker thread is descheduled right after its lookup
            return r

        site.cache.get = get  # type: ignore[method-assign]
        b = asyncio.create_task(site.disk.read(2 * CH, 100))
        for _ in range(200):
            if gated:
                break
            await asyncio.sleep(0.01)
        assert gated, f"reader B never looked the chunk up: {b.done() and b.exception()!r}"
        assert await site.disk.read(2 * CH + 500, 100) == parcel.image[2 * CH + 500 : 2 * CH + 600]
        assert site.cache.has(tag)
        gate.set()
        assert await b == parcel.image[2 * CH : 2 * CH + 100]
        assert site.server.asked.count(tag) == 1, "the chunk was fetched from the server twice"
    finally:
        gate.set()
        pool.shutdown(wait=True)
