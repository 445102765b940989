"""The registry that asks the lookaside sources (DESIGN.md, "Site").

Sources are asked in order of their cost estimate; they are added and withdrawn
while a guest runs (a USB key plugged in or yanked, a directory named by the
user), and the disk code never knows which one answered. Every answer is checked
against its tag; a source that fails the check only fails to help. Feeders (the
CLI, a udev watcher, an mDNS browser) only add and withdraw; they never fetch.

The site cache is not a Source here: it is consulted first and every chunk the
registry fetches is stored in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import InitVar, dataclass, field
from typing import Callable, Sequence

from ..chunk import VerifiedChunk, verified
from ..errors import ChunkLate, ChunkSlow, ChunkUnavailable, DamagedChunk, NotFound, UsageError
from .cache import SiteCache
from .pacing import Gate, LinkMeter, Pacing, Priority, deadline, estimate, split
from .sources import Source, SourceInfo, SourceKind, SourceStats

log = logging.getLogger("isrsync.sources")


@dataclass
class _Entry:
    source: Source
    stats: SourceStats = field(default_factory=SourceStats)
    # Seconds added to the source's own cost estimate after it failed: a
    # silent peer or a dying medium drops behind the server instead of making
    # every miss wait for it. Halved by each answer that helps.
    penalty: float = 0.0
    meter: LinkMeter = field(default_factory=LinkMeter)
    pacing: InitVar[Pacing | None] = None
    gate: Gate = field(init=False)

    def __post_init__(self, pacing: Pacing | None) -> None:
        self.gate = Gate(self.meter, pacing)

    def failed(self, waited: float) -> None:
        self.penalty = min(3600.0, max(2 * self.penalty, 1.0, 2 * waited))

    def helped(self) -> None:
        self.penalty = self.penalty / 2 if self.penalty > 0.01 else 0.0


def _kind(source: Source) -> SourceKind:
    return getattr(source, "kind", SourceKind.OTHER)


class _Group:
    """One fetch of some tags, run as a task of its own: whoever asks for one of its
    tags meanwhile waits on it instead of fetching again, and a caller that stops
    waiting (told the chunk is slow) leaves it running, so a retry finds it."""

    def __init__(self, priority: Priority) -> None:
        self.priority = priority
        self.task: asyncio.Task[None] | None = None
        self.waiters = 0


@dataclass
class _Pending:
    fut: asyncio.Future[bytes]
    group: _Group
    late: bool = False  # a request for it is past its deadline (still coming)
    urgent: bool = False  # a fault joined a bulk fetch of it
    eta: float | None = None  # when late: seconds the link needs for what is in flight to its source


class SourceRegistry:
    """The sources of one site (or one running parcel), asked cheapest first.

    Fetches chunks by tag from the cheapest source that has them, once each:
    concurrent requests for one tag share one fetch. Cache hits are counted
    here too (the disk reports them), so one table says who served what.

    Requests are paced by each source's measured link (:mod:`.pacing`): cut to
    a few seconds of it each, given a deadline that grows with the bytes ahead
    of them, and ordered so that a fault never queues behind bulk. A request
    past its deadline is late, not failed: callers that need the chunk are told
    it is slow (ChunkSlow) and find the same request still running when they
    ask again. Only a source that never answered within ``source_timeout``, or
    a request far past its deadline, counts as a failure.
    """

    def __init__(self, cache: SiteCache, pacing: Pacing | None = None) -> None:
        self.cache = cache
        self.pacing = pacing or Pacing()
        self._sources: dict[str, _Entry] = {}
        self._inflight: dict[bytes, _Pending] = {}
        self._groups: set[asyncio.Task[None]] = set()
        self.cache_stats = SourceStats()
        # The cache counts its damaged reads from any thread; this registry
        # shows those since it began, and says once that they happen.
        self._damaged_base = cache.damaged_reads
        self._damage_said = False
        self.warn: Callable[[str], None] = log.warning
        # Seconds a source that has not answered yet may take for its first
        # answer; a measured source gets deadlines from its rate instead.
        self.source_timeout = 30.0
        # Chunks the home server answered with bytes that failed their tag: tag -> pack.
        self.server_damaged: dict[bytes, bytes | None] = {}

    # -- membership ----------------------------------------------------------------

    def add(self, source: Source) -> None:
        """Add a source (or replace the one of the same name, keeping its statistics)."""
        if not isinstance(getattr(source, "name", None), str) or not source.name:
            raise UsageError("a source needs a name")
        old = self._sources.get(source.name)
        self._sources[source.name] = _Entry(source, old.stats if old else SourceStats(), pacing=self.pacing)

    def remove(self, name: str) -> Source | None:
        """Forget a source at once (in-flight requests to it finish on their own)."""
        e = self._sources.pop(name, None)
        return None if e is None else e.source

    async def withdraw(self, name: str) -> Source:
        """Remove a source and close it; NotFound if there is none of that name."""
        src = self.remove(name)
        if src is None:
            raise NotFound(f"no source named {name!r}", hint="`isrsync sources` lists them")
        close = getattr(src, "close", None)
        if close is not None:
            try:
                await close()
            except Exception as e:  # noqa: BLE001 - a source failing to close is its own problem
                log.info("source %s failed to close: %s", name, e)
        return src

    def get(self, name: str) -> Source | None:
        e = self._sources.get(name)
        return None if e is None else e.source

    def names(self) -> list[str]:
        return [e.source.name for e in self._ordered()]

    def stats(self) -> dict[str, SourceStats]:
        self._cache_damage()
        return {"cache": self.cache_stats, **{n: e.stats for n, e in self._sources.items()}}

    def meter(self, name: str) -> LinkMeter | None:
        """What has been learned of a source's link (None if there is no such source)."""
        e = self._sources.get(name)
        return None if e is None else e.meter

    def wasted(self, name: str) -> int:
        """Bytes from source ``name`` that crossed the link for nothing."""
        e = self._sources.get(name)
        if e is None:
            return 0
        return e.stats.wasted + int(getattr(e.source, "discarded_bytes", 0) or 0)

    def fetching(self, tag: bytes) -> bool:
        """A fetch of ``tag`` is under way (slow, perhaps, but not given up)."""
        return tag in self._inflight

    def note_cache_hits(self, n: int, nbytes: int) -> None:
        """Reads served by the cache (called after each batch of cache reads, hits or not)."""
        self.cache_stats.hits += n
        self.cache_stats.bytes += nbytes
        self._cache_damage()

    def _cache_damage(self) -> None:
        self.cache_stats.bad = self.cache.damaged_reads - self._damaged_base
        if self.cache_stats.bad and not self._damage_said:
            self._damage_said = True
            self.warn("this site's cache held damaged copies of some chunks (a failing disk, or a change made "
                      "outside isrsync): they were dropped and fetched again, and the guest got correct data; "
                      "`isrsync cache verify` checks the rest of the cache")

    def infos(self) -> list[SourceInfo]:
        """The cache first, then every source in the order it is asked."""
        self._cache_damage()
        c = self.cache_stats
        rows = [SourceInfo("cache", "cache", 0.0, c.hits, c.bytes, c.bad, c.errors, 0.0)]
        for e in self._ordered():
            s = e.stats
            rate = None if e.meter.rate is None else round(e.meter.rate / 1024, 1)
            rows.append(SourceInfo(
                e.source.name, _kind(e.source).value, round(e.source.cost() * 1000, 3), s.hits, s.bytes, s.bad,
                s.errors, round(s.mean_latency * 1000, 2), round(e.penalty, 3), s.late, self.wasted(e.source.name),
                rate))
        return rows

    async def close(self) -> None:
        groups = list(self._groups)
        for t in groups:
            t.cancel()
        for t in groups:
            with contextlib.suppress(BaseException):
                await t
        for name in list(self._sources):
            await self.withdraw(name)

    def _ordered(self) -> list[_Entry]:
        return sorted(self._sources.values(), key=lambda e: e.source.cost() + e.penalty)

    # -- fetching ------------------------------------------------------------------

    async def fetch(self, tag: bytes, *, priority: Priority = Priority.FAULT) -> bytes:
        """The verified ciphertext of one chunk (also stored in the cache)."""
        got = await self.fetch_many([tag], priority=priority)
        return got[tag]

    async def fetch_many(self, tags: Sequence[bytes], *, required: bool = True,
                         priority: Priority = Priority.FAULT) -> dict[bytes, bytes]:
        """Fetch several chunks, sharing in-flight fetches with other callers.

        With ``required``, raises ChunkUnavailable if any tag could not be
        found, and ChunkSlow as soon as one is late (its fetch goes on: asking
        again waits for the same one). Without, waits for what the sources
        deliver, however slowly, and returns what was found. A FAULT joining a
        BULK fetch promotes the request of the chunks it wants.
        """
        loop = asyncio.get_running_loop()
        waits: dict[bytes, _Pending] = {}
        mine: list[bytes] = []
        for t in dict.fromkeys(tags):
            p = self._inflight.get(t)
            if p is None:
                mine.append(t)
            else:
                waits[t] = p
                if priority is Priority.FAULT and p.group.priority is Priority.BULK and not p.urgent:
                    # Only this chunk's request jumps the queue, not the rest of the hoard's batch.
                    p.urgent = True
                    for e in self._sources.values():
                        e.gate.wake()
        if mine:
            group = _Group(priority)
            for t in mine:
                waits[t] = self._inflight[t] = _Pending(loop.create_future(), group)
            group.task = loop.create_task(self._run(group, mine))
            self._groups.add(group.task)
            group.task.add_done_callback(self._groups.discard)
        return await self._wait(waits, required)

    async def fetch_patiently(self, tags: Sequence[bytes], *,
                              priority: Priority = Priority.FAULT) -> dict[bytes, bytes]:
        """:meth:`fetch_many` for a caller with nothing to do but wait: a chunk that is late
        but still coming is waited for; one no source has, or whose source gave up, raises."""
        while True:
            try:
                return await self.fetch_many(tags, priority=priority)
            except ChunkLate:
                continue  # asking again waits on the same request, and is told again only later

    async def _wait(self, waits: dict[bytes, _Pending], required: bool) -> dict[bytes, bytes]:
        groups = {id(p.group): p.group for p in waits.values()}
        for g in groups.values():
            g.waiters += 1
        t0 = time.monotonic()
        late_before = {t for t, p in waits.items() if p.late}
        pending = dict(waits)
        out: dict[bytes, bytes] = {}
        try:
            while pending:
                await asyncio.wait([p.fut for p in pending.values()], timeout=0.2)
                for t, p in list(pending.items()):
                    if not p.fut.done():
                        continue
                    del pending[t]
                    try:
                        out[t] = p.fut.result()
                    except ChunkUnavailable:
                        if required:
                            raise
                if not required or not pending:
                    continue
                # Told once per wait: at once if it turned late while we waited, else
                # after a while (a caller asking again must not spin on the same news).
                patient = time.monotonic() - t0 >= self.pacing.patience
                late = [t for t, p in pending.items() if p.late and (patient or t not in late_before)]
                if late:
                    raise self._slow(late[0], pending[late[0]].eta)
        except asyncio.CancelledError:
            for g in groups.values():
                if g.waiters == 1 and g.task is not None:
                    g.task.cancel()  # nobody wants it any more (a hoard stopped for a suspend)
            raise
        finally:
            # A caller told "slow" leaves the fetch running: it is the one its retry joins.
            for g in groups.values():
                g.waiters -= 1
        return out

    def _ours(self, tag: bytes, group: _Group) -> bool:
        """``tag`` is still awaited from ``group`` (not resolved, and not asked for anew since)."""
        p = self._inflight.get(tag)
        return p is not None and p.group is group

    def _resolve(self, tag: bytes, data: bytes | None = None, err: BaseException | None = None) -> None:
        p = self._inflight.pop(tag, None)
        if p is None or p.fut.done():
            return
        if err is None:
            p.fut.set_result(data)  # type: ignore[arg-type]
        else:
            p.fut.set_exception(err)
            p.fut.exception()  # retrieved: the waiter may have gone

    async def _run(self, group: _Group, tags: list[bytes]) -> None:
        try:
            # Another fetch may have landed some since the caller looked. The
            # lookup reads SQLite and files: off the loop that serves the guest.
            found = await asyncio.to_thread(self._cached, tags)
            self._cache_damage()
            for t, data in found.items():
                self._resolve(t, data)
            need = [t for t in tags if t not in found]
            damaged, failed = await self._from_sources(need, group) if need else (set(), False)
            for t in need:
                if self._ours(t, group):
                    self._resolve(t, err=self._unavailable(t, t in damaged, failed))
        except BaseException as e:
            err = e if isinstance(e, Exception) else ChunkUnavailable("the fetch was stopped")
            for t in tags:
                if self._ours(t, group):
                    self._resolve(t, err=err)
            if not isinstance(e, Exception):
                raise

    def _slow(self, tag: bytes, eta: float | None) -> ChunkLate:
        rates = [e.meter.rate for e in self._sources.values() if e.meter.rate]
        rate = max(rates) if rates else 0.0
        how = f"; the sources deliver about {rate / 1024:.0f} KiB/s" if rate else ""
        when = f", expected within about {eta:.0f} s" if eta is not None else ""
        return ChunkLate(f"chunk {tag.hex()[:16]} is slow to arrive (a source is still sending it{how}{when})",
                         details={"rate": round(rate), "eta": None if eta is None else round(eta, 1)})

    def _unavailable(self, tag: bytes, damaged: bool, slow: bool = False) -> ChunkUnavailable:
        if damaged:
            pack = self.server_damaged[tag]
            where = f" of pack {pack.hex()[:16]}" if pack else ""
            return DamagedChunk(f"the home server answered with damaged data for chunk {tag.hex()[:16]}{where}",
                                details={"chunk": tag.hex(), "pack": pack.hex() if pack else None})
        if slow:
            rate = self._rate()
            how = f"; the sources deliver about {rate / 1024:.0f} KiB/s lately" if rate else ""
            return ChunkSlow(f"chunk {tag.hex()[:16]} did not come in time: a source did not answer in time{how}",
                             details={"rate": round(rate)})
        return ChunkUnavailable(f"no source has chunk {tag.hex()[:16]}")

    def _rate(self) -> float:
        """Bytes per second the sources delivered, over their answers that helped."""
        nbytes = sum(e.stats.bytes for e in self._sources.values())
        secs = sum(e.stats.seconds for e in self._sources.values())
        return nbytes / secs if secs > 0 else 0.0

    def _cached(self, tags: list[bytes]) -> dict[bytes, bytes]:
        # Callers mostly looked already and missed: one query says which to read.
        absent = set(self.cache.missing(tags))
        out = {}
        for t in tags:
            if t not in absent and (data := self.cache.get(t)) is not None:
                out[t] = data
        return out

    async def _from_sources(self, tags: list[bytes], group: _Group) -> tuple[set[bytes], bool]:
        """Resolve what the sources have; return the tags the home server answered with
        damaged bytes, and whether a source failed to answer (what it lacks may only be slow)."""
        damaged: set[bytes] = set()
        failed = False
        missing = list(tags)
        for entry in self._ordered():
            if not missing:
                break
            todo = list(missing)
            # Until a source has answered once its link is unknown: one small request
            # at a time, so a dead source costs one timeout, not one per piece.
            while todo and not entry.meter.measured:
                probe = split(todo, entry.meter, group.priority, self.pacing)[0]
                todo = todo[len(probe):]
                t0 = time.monotonic()
                ok, bad = await self._ask(entry, probe, group)
                damaged.update(bad)
                if not ok:
                    failed, todo = True, []
                elif self._lacked(probe, group, t0):
                    todo = []
                elif not entry.meter.measured:
                    break  # it answers but had none of them: nothing to measure, nothing to fear
            if todo:
                pieces = split(todo, entry.meter, group.priority, self.pacing)
                # Two at a time keep the link busy; more would be parallel TCP flows
                # overflowing a slow link's short queue (measured at 1 Mb/s: 57 % of
                # the rate with every piece at once, lost to drops and retransmits).
                # Bulk needs no such limit: the gate holds it to one BDP, and a piece
                # a fault promotes must not wait for a turn.
                turns = asyncio.Semaphore(self.pacing.pipeline if group.priority is Priority.FAULT else len(pieces))

                stop = False

                async def piece(p: list[bytes]) -> tuple[bool, list[bytes]]:
                    nonlocal stop
                    async with turns:
                        if stop:
                            return True, []  # left to the next source
                        t0 = time.monotonic()
                        answer = await self._ask(entry, p, group)
                        stop = stop or self._lacked(p, group, t0)
                        return answer

                for ok, bad in await asyncio.gather(*(piece(p) for p in pieces)):
                    failed = failed or not ok
                    damaged.update(bad)
            missing = [t for t in missing if self._ours(t, group)]
        return damaged, failed

    def _lacked(self, asked: list[bytes], group: _Group, since: float) -> bool:
        """A request answered without some of its chunks, and slowly (see Pacing.miss_wait)."""
        return time.monotonic() - since >= self.pacing.miss_wait and any(self._ours(t, group) for t in asked)

    async def _ask(self, entry: _Entry, tags: list[bytes], group: _Group) -> tuple[bool, list[bytes]]:
        """One request to one source; resolves what it brings. (answered, tags it damaged)."""
        est = estimate(tags, entry.meter)
        def priority() -> Priority:
            if group.priority is Priority.FAULT or any(
                    self._ours(t, group) and self._inflight[t].urgent for t in tags):
                return Priority.FAULT
            return Priority.BULK

        prio = await entry.gate.enter(priority, est)
        req = entry.meter.begin(est)
        answer: dict | None = None
        task = asyncio.ensure_future(entry.source.get_many(tags))
        try:
            late = False
            while True:
                # Recomputed each time: a source measured meanwhile gets a deadline from its rate.
                dl = deadline(entry.meter, req.ahead, self.pacing)
                soft = self.source_timeout if dl is None else dl
                hard = self.source_timeout if dl is None else max(self.source_timeout, 4 * dl)
                left = (hard if late else soft) - (time.monotonic() - req.started)
                if left > 0:
                    await asyncio.wait({task}, timeout=min(left, 1.0))
                if task.done():
                    break
                waited = time.monotonic() - req.started
                if waited >= hard:
                    raise TimeoutError(f"no answer in {waited:.1f} s")
                if waited >= soft and not late:
                    # A source is never trusted to answer in time, but a slow answer is
                    # still an answer: the request goes on, its waiters hear it is slow.
                    late = True
                    entry.stats.late += 1
                    eta = entry.meter.eta(entry.meter.inflight)
                    for t in tags:
                        if self._ours(t, group):
                            self._inflight[t].late, self._inflight[t].eta = True, eta
            answer = task.result()
            if not isinstance(answer, dict):
                raise TypeError(f"source answered {type(answer).__name__}, not a dict")
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - a source can only fail to help
            task.cancel()
            answer = None
            entry.stats.errors += 1
            entry.failed(time.monotonic() - req.started)
            log.info("source %s failed: %s", entry.source.name, e or type(e).__name__)
            return False, []
        finally:
            entry.gate.leave(prio, est)
            sizes = [len(v) for v in answer.values() if isinstance(v, (bytes, bytearray, memoryview))] \
                if answer else []
            req.end(sum(sizes), len(sizes))
        got = sum(sizes)
        dt = time.monotonic() - req.started
        # Hashing a batch takes milliseconds: on the loop it would stall the guest's disk for as long.
        good, bad = await asyncio.to_thread(_check_answer, tags, answer)
        # Only chunks someone still waits for are kept; the rest came for nothing.
        keep = {t: c for t, c in good.items() if self._ours(t, group)}
        entry.stats.wasted += got - sum(len(c.data) for c in keep.values())
        entry.stats.bad += len(bad)
        if bad and _kind(entry.source) is SourceKind.SERVER:
            pack_of = getattr(entry.source, "pack_of", None)
            for t in bad:
                self.server_damaged[t] = pack_of(t) if pack_of is not None else None
            log.warning("the home server answered with damaged data for %d chunk(s), first %s",
                        len(bad), bad[0].hex()[:16])
        entry.stats.hits += len(keep)
        entry.stats.bytes += sum(len(c.data) for c in keep.values())
        entry.stats.seconds += dt if keep else 0.0
        if keep:
            entry.helped()
            # Stored without an fsync of its own, faults too: the cache's next commit
            # point makes it durable, and a power cut before it only costs a fetch again
            # (a lost record reads as damaged and is forgotten). The fsync was on the
            # guest's path: up to 24 ms of a fault served in 10 at 100 Mb/s.
            await asyncio.to_thread(functools.partial(self.cache.put_verified, list(keep.values()),
                                                      durable=False))
            for t, c in keep.items():
                self._resolve(t, c.data)
        return True, bad if _kind(entry.source) is SourceKind.SERVER else []


def _check_answer(
    asked: list[bytes], answer: dict[bytes, object]
) -> tuple[dict[bytes, VerifiedChunk], list[bytes]]:
    """Worker thread: the chunks of ``answer`` that match the tags asked for, and the tags that did not."""
    good: dict[bytes, VerifiedChunk] = {}
    bad: list[bytes] = []
    for t in asked:
        data = answer.get(t)
        if data is None:
            continue
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        v = verified(t, data) if isinstance(data, bytes) else None
        if v is None:
            bad.append(t)
        else:
            good[t] = v
    return good, bad
