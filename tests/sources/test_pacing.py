"""Issue 15, parts 1 and 2: requests paced by the link, slow answers never failures nor
fetched twice, faults ahead of bulk.

The sources are real (the home server's ServerSource over a MemoryStore holding
real packs, and the honest DictSource), seen through :class:`Wire`: a link of a
given rate and round trip, first in first out, as a shaped link with a short
queue is. A request's answer leaves the wire when its bytes have crossed it
behind every byte asked for before it. (The same over a real `tc tbf`-shaped
veth and a real `isrsync serve` is tests/sources/test_slow_link.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sourcekit import DictSource, commit_chunks, make_chunks

from isrsync.chunk import CHUNK_SIZE
from isrsync.errors import ChunkSlow
from isrsync.site.cache import SiteCache
from isrsync.site.pacing import LinkMeter, Pacing, Priority, deadline, split
from isrsync.site.serversource import ServerSource
from isrsync.site.sources import Source
from isrsync.site.registry import SourceRegistry
from isrsync.store.memory import MemoryStore


class Wire:
    """A source behind a FIFO link of ``rate`` bytes/s and ``rtt`` seconds; records each request."""

    def __init__(self, inner: Source, rate: float, rtt: float = 0.01) -> None:
        self.inner, self.rate, self.rtt = inner, rate, rtt
        self.name, self.kind = inner.name, inner.kind
        self._free = 0.0  # when the link has sent everything asked so far
        self.log: list[tuple[float, float, list[bytes]]] = []  # (asked, answered, tags)

    def cost(self) -> float:
        return self.inner.cost()

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        asked = time.monotonic()
        answer = await self.inner.get_many(tags)
        nbytes = sum(len(v) for v in answer.values())
        self._free = max(asked + self.rtt / 2, self._free) + nbytes / self.rate
        await asyncio.sleep(self._free + self.rtt / 2 - time.monotonic())
        self.log.append((asked, time.monotonic(), list(tags)))
        return answer

    async def close(self) -> None:
        await self.inner.close()


async def server_source(chunks: dict[bytes, bytes], work: Path) -> ServerSource:
    store = MemoryStore("alice")
    pid, _ = await commit_chunks(store, chunks, work)
    return ServerSource(store, pid)


# -- the arithmetic ----------------------------------------------------------------------------


def test_the_rate_is_bytes_over_busy_time_not_per_request() -> None:
    m = LinkMeter()
    # Four requests of 100 KB share a 100 KB/s link: each takes about 4 s, the link does 100 KB/s.
    reqs = [m.begin(100_000, now=0.0) for _ in range(4)]
    for k, r in enumerate(reqs):
        r.end(100_000, 1, now=1.0 + k)
    assert m.rate == pytest.approx(100_000, rel=0.01)
    assert m.inflight == 0
    # Idle time does not count: one request 10 s later, alone, 0.2 s of round trip.
    m.begin(100_000, now=14.0).end(100_000, 1, now=15.2)
    assert m.rtt is not None and 0.1 < m.rtt < 0.4, m.rtt


def test_the_deadline_grows_with_the_bytes_ahead_and_has_a_floor() -> None:
    p = Pacing(floor=2.0, slack=3.0)
    m = LinkMeter(rate=125_000.0, rtt=0.05)  # 1 Mb/s
    assert deadline(LinkMeter(), 10 << 20, p) is None  # unmeasured: the source timeout bounds it
    assert deadline(m, 1000, p) == 2.0
    one, ten = deadline(m, CHUNK_SIZE, p), deadline(m, 10 * CHUNK_SIZE, p)
    assert one == pytest.approx(3 * (0.05 + CHUNK_SIZE / 125_000))
    assert ten == pytest.approx(3 * (0.05 + 10 * CHUNK_SIZE / 125_000))


def test_large_requests_are_cut_to_a_few_seconds_of_the_link() -> None:
    p = Pacing(piece_seconds=4.0)
    tags = [bytes([i]) * 32 for i in range(200)]
    slow = LinkMeter(rate=125_000.0, rtt=0.05, chunk=CHUNK_SIZE)
    pieces = split(tags, slow, Priority.FAULT, p)
    assert sum(map(len, pieces)) == 200 and all(len(x) <= 4 for x in pieces)  # 4 s of 1 Mb/s < 4 chunks
    fast = LinkMeter(rate=12.5e6, rtt=0.001, chunk=CHUNK_SIZE)
    assert max(map(len, split(tags, fast, Priority.FAULT, p))) > 100
    # Bulk: one bandwidth-delay product, and never less than one chunk.
    assert max(map(len, split(tags, slow, Priority.BULK, p))) == 1
    wide = LinkMeter(rate=12.5e6, rtt=0.1, chunk=CHUNK_SIZE)  # 1.25 MB in flight
    assert max(map(len, split(tags, wide, Priority.BULK, p))) == int(1.25e6 // CHUNK_SIZE)
    unknown = LinkMeter()
    assert max(map(len, split(tags, unknown, Priority.FAULT, p))) == p.probe_bytes // CHUNK_SIZE


# -- through the registry, real sources over a modelled link ----------------------------------


async def test_a_slow_answer_is_late_not_failed_and_never_fetched_twice(registry: SourceRegistry,
                                                                       tmp_path: Path) -> None:
    chunks = make_chunks(12, size=CHUNK_SIZE)
    tags = list(chunks)
    wire = Wire(await server_source(chunks, tmp_path), rate=400_000.0)
    registry.add(wire)
    registry.pacing = Pacing(floor=0.3, slack=1.5)
    registry.source_timeout = 30.0
    assert await registry.fetch_many(tags[:2]) == {t: chunks[t] for t in tags[:2]}  # measures the link
    assert registry.meter("server").rate is not None

    # The link drops to a tenth: the next request outlives its deadline.
    wire.rate = 40_000.0
    t0 = time.monotonic()
    with pytest.raises(ChunkSlow) as slow:
        await registry.fetch_many([tags[2]])
    assert "slow" in str(slow.value) and "expected within" in str(slow.value) and time.monotonic() - t0 < 3.0
    assert slow.value.details["rate"] > 0 and slow.value.details["eta"] > 0
    assert registry.fetching(tags[2])
    # Asked again (the disk's retry), it joins the request in flight.
    got = await asyncio.wait_for(registry.fetch_many([tags[2]], required=False), 30)
    assert got == {tags[2]: chunks[tags[2]]}
    s = registry.stats()["server"]
    assert s.errors == 0 and s.late == 1
    assert sum(tags[2] in asked for _, _, asked in wire.log) == 1
    assert registry.wasted("server") == 0
    assert {i.name: i.wasted_bytes for i in registry.infos()}["server"] == 0


async def test_many_chunks_on_a_slow_link_come_without_a_failure_and_waste_nothing(
        registry: SourceRegistry, tmp_path: Path) -> None:
    chunks = make_chunks(40)
    tags = list(chunks)
    total = sum(map(len, chunks.values()))
    # 40 chunks at 1 MB/s with a 2 s source timeout: one request for all of them would
    # take too long; cut into pieces of a fraction of a second each, none is late.
    wire = Wire(await server_source(chunks, tmp_path), rate=1e6, rtt=0.02)
    registry.add(wire)
    registry.source_timeout = 2.0
    registry.pacing = Pacing(floor=0.5, piece_seconds=0.3)
    assert total / 1e6 > 2.0
    got = await asyncio.wait_for(registry.fetch_many(tags), 60)
    assert got == chunks
    s = registry.stats()["server"]
    assert (s.errors, s.hits) == (0, len(tags))
    assert max(sum(len(chunks[t]) for t in asked) for _, _, asked in wire.log) < 1e6
    # Each chunk crossed once; what was bridged between them is under 2 %.
    assert sorted(t for _, _, asked in wire.log for t in asked) == sorted(tags)
    assert registry.wasted("server") < 0.02 * total


async def faults_beside_a_hoard(reg: SourceRegistry, chunks: dict[bytes, bytes], hoard: list[bytes],
                                faults: list[bytes], settle: float, gap: float) -> list[float]:
    """Once the link is measured, a BULK hoard of ``hoard`` in the background and the
    ``faults`` asked one at a time, ``gap`` apart: each fault's service time."""
    await reg.fetch_many(list(chunks)[:1])  # measured
    bulk = asyncio.ensure_future(reg.fetch_many(hoard, required=False, priority=Priority.BULK))
    await asyncio.sleep(settle)  # the hoard is busy
    waits = []
    for t in faults:
        t0 = time.monotonic()
        assert await reg.fetch_many([t]) == {t: chunks[t]}
        waits.append(time.monotonic() - t0)
        await asyncio.sleep(gap)
    await asyncio.wait_for(bulk, 60)
    return waits


async def test_a_fault_goes_ahead_of_the_hoard(registry: SourceRegistry, tmp_path: Path) -> None:
    chunks = make_chunks(30, size=CHUNK_SIZE)
    tags = list(chunks)
    rate, rtt = 500_000.0, 0.02
    wire = Wire(await server_source(chunks, tmp_path), rate=rate, rtt=rtt)
    registry.add(wire)
    waits = await faults_beside_a_hoard(registry, chunks, hoard=tags[1:25], faults=tags[25:30], settle=0.6, gap=0.1)
    target = 2 * (CHUNK_SIZE / rate + rtt)
    assert max(waits) <= target, (waits, target)
    # Without priorities a fault would wait for the whole hoard ahead of it (24 chunks, 6 s).
    assert len(wire.log) >= 25


async def _run_of_faults(tmp_path: Path, pacing: Pacing) -> tuple[list[float], float, bool]:
    """A hoard in the background and a run of faults, each asked 30 ms after the last came."""
    chunks = make_chunks(40, size=CHUNK_SIZE)
    tags = list(chunks)
    rate, rtt = 1_000_000.0, 0.01
    cache = SiteCache(tmp_path / f"site-{pacing.quiet_chunks}")
    try:
        reg = SourceRegistry(cache, pacing)
        reg.add(Wire(await server_source(chunks, tmp_path), rate=rate, rtt=rtt))
        waits = await faults_beside_a_hoard(reg, chunks, hoard=tags[1:28], faults=tags[28:40], settle=0.3, gap=0.03)
        return waits, CHUNK_SIZE / rate + rtt, all(cache.has(t) for t in tags[1:28])
    finally:
        cache.close()


async def test_bulk_waits_out_a_run_of_faults_and_fills_the_gap_after_it(tmp_path: Path) -> None:
    # A guest's faults come one just after another. Without the quiet time the hoard
    # puts a request on the link in each gap, and nearly every fault waits behind it.
    ours, one, hoarded = await _run_of_faults(tmp_path, Pacing())
    rival, _, _ = await _run_of_faults(tmp_path, Pacing(quiet_chunks=0.0))
    assert hoarded  # bulk still gets the link once the faults stop
    # The first fault of the run may find one bulk request on the link; the rest find none.
    assert statistics.median(ours[1:]) <= 1.3 * one, (ours, one)
    assert statistics.median(rival[1:]) >= 1.5 * one, (rival, one)


async def test_a_fault_on_a_chunk_the_hoard_queued_promotes_it(registry: SourceRegistry, tmp_path: Path) -> None:
    chunks = make_chunks(12, size=CHUNK_SIZE)
    tags = list(chunks)
    wire = Wire(await server_source(chunks, tmp_path), rate=500_000.0, rtt=0.02)
    registry.add(wire)
    await registry.fetch_many(tags[:1])
    hoard = asyncio.ensure_future(registry.fetch_many(tags[1:], required=False, priority=Priority.BULK))
    await asyncio.sleep(0.3)
    last = tags[-1]  # queued behind ten others
    t0 = time.monotonic()
    assert await registry.fetch_many([last]) == {last: chunks[last]}
    assert time.monotonic() - t0 < 2 * (CHUNK_SIZE / 500_000.0 + 0.02) + 0.1
    await asyncio.wait_for(hoard, 30)
    assert sum(last in asked for _, _, asked in wire.log) == 1  # joined, not fetched again


async def test_a_cancelled_bulk_fetch_stops_and_a_slow_one_left_by_its_caller_does_not(
        registry: SourceRegistry, tmp_path: Path) -> None:
    chunks = make_chunks(10, size=CHUNK_SIZE)
    tags = list(chunks)
    wire = Wire(await server_source(chunks, tmp_path), rate=500_000.0, rtt=0.02)
    registry.add(wire)
    await registry.fetch_many(tags[:1])
    hoard = asyncio.ensure_future(registry.fetch_many(tags[1:], required=False, priority=Priority.BULK))
    await asyncio.sleep(0.4)
    hoard.cancel()  # a suspend stops the hoard
    await asyncio.sleep(0.6)
    asked = sum(len(a) for _, _, a in wire.log)
    assert asked < len(tags) - 3 and not any(registry.fetching(t) for t in tags)


async def test_a_source_that_never_answered_still_fails_at_the_source_timeout(
        registry: SourceRegistry, tmp_path: Path) -> None:
    chunks = make_chunks(6)

    class Silent(DictSource):
        async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
            self.asked.update(tags)
            await asyncio.sleep(3600)
            return {}

    silent = Silent(chunks, name="silent", cost=0.0)
    registry.add(silent)
    registry.add(DictSource(chunks))
    registry.source_timeout = 0.3
    t0 = time.monotonic()
    assert await registry.fetch_many(list(chunks)) == chunks
    assert time.monotonic() - t0 < 2.0
    assert registry.stats()["silent"].errors == 1 and registry.stats()["silent"].late == 0
    assert sum(silent.asked.values()) <= 2  # one probe, not every piece


async def test_status_shows_late_and_wasted_bytes_per_source(registry: SourceRegistry, tmp_path: Path) -> None:
    """`isrsync status` and `isrsync sources` print these rows; --json carries the same values."""
    from rich.console import Console

    from isrsync.cli.render import sources_table
    from isrsync.site.sources import SourceInfo

    chunks = make_chunks(3)
    liar = DictSource({t: b"x" * 1000 for t in chunks}, name="liar", cost=0.0)
    registry.add(liar)
    registry.add(DictSource(chunks))
    assert await registry.fetch_many(list(chunks)) == chunks
    rows = registry.infos()
    (row,) = [r for r in rows if r.name == "liar"]
    assert (row.bad, row.wasted_bytes, row.late) == (3, 3000, 0)
    assert SourceInfo.from_json(dataclasses.asdict(row)) == row
    con = Console(record=True, width=200)
    con.print(sources_table(rows))
    text = con.export_text()
    assert "wasted" in text and "late" in text and "2.9 KiB (100.0%)" in text.replace("KB", "KiB"), text


async def test_a_fetch_two_callers_wait_for_survives_one_of_them_going(registry: SourceRegistry,
                                                                        tmp_path: Path) -> None:
    chunks = make_chunks(4, size=CHUNK_SIZE)
    tags = list(chunks)
    wire = Wire(await server_source(chunks, tmp_path), rate=300_000.0)
    registry.add(wire)
    first = asyncio.ensure_future(registry.fetch_many(tags))
    second = asyncio.ensure_future(registry.fetch_many(tags[:2]))
    await asyncio.sleep(0.1)
    first.cancel()
    assert await asyncio.wait_for(second, 30) == {t: chunks[t] for t in tags[:2]}
    assert sum(len(a) for _, _, a in wire.log) <= len(tags)  # nothing asked twice
