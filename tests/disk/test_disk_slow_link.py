"""Issue 15, part 2, at the disk: the guest's demand misses go ahead of the hoard.

The parcel's disk is served by a real `isrsync serve` in a network namespace,
behind a veth pair shaped with `tc tbf` at 4 Mb/s on both ends (tests/shapedlink.py);
the site is the real ParcelDisk over the real registry and ServerSource over
HttpStore. While ``prefetch`` (what the background hoard calls, at bulk priority)
pulls most of the disk, the guest reads other chunks one at a time; each read
must be served within 2 x (one 128 KiB chunk / rate + RTT).

The image is disk-like: each 128 KiB chunk half random, half zeros.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from diskkit import CH, make_parcel, open_site
from shapedlink import Link, NsServer

from isrsync.store.http import HttpStore

CHUNKS = 64
RATE_BPS = 4e6


@pytest.fixture
async def shaped_store(tmp_path: Path) -> AsyncIterator[tuple[Link, HttpStore]]:
    link = Link(prefix="isrsync-dslow", octet=216)
    server = NsServer(tmp_path / "home")
    store = None
    try:
        link.up()
        server.start_in(link)
        store = HttpStore(server.url, server.add_user("alice"), retries=2, backoff=0.05)
        yield link, store
    finally:
        if store is not None:
            await store.close()
        server.kill()
        link.unshape()
        link.down()


async def test_demand_misses_go_ahead_of_the_hoard(shaped_store: tuple[Link, HttpStore], tmp_path: Path) -> None:
    link, store = shaped_store
    image = b"".join(os.urandom(CH // 2) + bytes(CH // 2) for _ in range(CHUNKS))
    parcel = await make_parcel(store, tmp_path / "work", image)
    site = await open_site(parcel, tmp_path / "site", store=store)
    try:
        assert site.server is not None
        await site.server.learn(list(parcel.keyring.tags()))  # as a resume learns the keyring's locations
        link.shape(RATE_BPS)
        try:
            times = []
            for _ in range(5):
                t0 = time.monotonic()
                await store.list_parcels()
                times.append(time.monotonic() - t0)
            rtt = statistics.median(times)
            assert await site.disk.read(0, 4096) == image[:4096]  # the link is measured
            hoard = asyncio.ensure_future(site.disk.prefetch(list(range(1, 52))))
            await asyncio.sleep(1.0)
            waits = []
            for i in range(54, 64):
                t0 = time.monotonic()
                got = await site.disk.read(i * CH + 100, 4096)
                waits.append(time.monotonic() - t0)
                assert got == image[i * CH + 100 : i * CH + 100 + 4096]
                assert not hoard.done(), "the hoard ended before the guest's reads did: nothing was shown"
                await asyncio.sleep(0.3)
            assert await asyncio.wait_for(hoard, 120) == 51
        finally:
            link.unshape()
        target = 2 * (CH / (RATE_BPS / 8) + rtt)
        assert max(waits) <= target, f"demand misses took {[round(w, 3) for w in sorted(waits)]} s, target {target:.3f} s"
        assert sorted(site.disk.stats.miss_times)[-1] <= target
        s = site.chain.stats()["server"]
        assert s.errors == 0
    finally:
        await site.close()
