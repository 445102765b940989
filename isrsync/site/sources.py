"""Lookaside sources and the registry that asks them (DESIGN.md, "Site").

A :class:`Source` is anything that may hold an encoded chunk by tag: the home
server, another site's cache directory, a USB medium, a LAN peer. It need not be
trusted: the registry checks every answer against the tag and asks the next
source when the check fails, so a stale or hostile source can only fail to help.
Sources are asked in order of their cost estimate; they are added and withdrawn
while a guest runs (a USB key plugged in or yanked, a directory named by the
user), and the disk code never knows which one answered. Feeders (the CLI, a
udev watcher, an mDNS browser) only add and withdraw; they never fetch.

The site cache is not a Source here: it is consulted first and every chunk the
registry fetches is stored in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, TypeVar, runtime_checkable

from ..chunk import VerifiedChunk, verified
from ..errors import ChunkUnavailable, NotFound, UsageError
from ..pack import PackEntry
from ..store.base import Store
from .cache import SiteCache

log = logging.getLogger("isrsync.sources")


class SourceKind(str, enum.Enum):
    """What a source is; decides nothing about trust (every answer is verified)."""

    SERVER = "server"
    CACHE_DIR = "cache-dir"
    MEDIUM = "medium"
    SEED = "seed"  # a plaintext image the user has, encoded on the fly (sneakernet seed)
    PEER = "peer"
    OTHER = "other"


@runtime_checkable
class Source(Protocol):
    """Something that may hold encoded chunks by tag.

    ``name`` is unique within a registry (adding a second source of the same
    name replaces the first); ``kind`` says what it is, for people.
    """

    name: str
    kind: SourceKind

    def cost(self) -> float:
        """Estimated seconds to fetch one chunk (lower is asked first)."""

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        """Whatever of ``tags`` this source can supply (unverified bytes).

        Never raises for a missing chunk; raises only when the source as a whole
        failed (it is then skipped for this request). Must not block the event
        loop: file or socket work runs in a thread or is awaited.
        """

    async def close(self) -> None:
        """Release what the source holds open (called when it is withdrawn)."""


@dataclass
class SourceStats:
    hits: int = 0
    bytes: int = 0
    bad: int = 0  # answers that failed the tag check
    errors: int = 0
    seconds: float = 0.0

    @property
    def mean_latency(self) -> float:
        return self.seconds / self.hits if self.hits else 0.0


@dataclass(frozen=True)
class SourceInfo:
    """One row of ``isrsync sources``: a source and what it has done so far."""

    name: str
    kind: str
    cost_ms: float
    hits: int
    bytes: int
    bad: int
    errors: int
    mean_latency_ms: float
    penalty_s: float = 0.0

    @classmethod
    def from_json(cls, d: dict) -> "SourceInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class _Entry:
    source: Source
    stats: SourceStats = field(default_factory=SourceStats)
    # Seconds added to the source's own cost estimate after it failed: a
    # silent peer or a dying medium drops behind the server instead of making
    # every miss wait for it. Halved by each answer that helps.
    penalty: float = 0.0

    def failed(self, waited: float) -> None:
        self.penalty = min(3600.0, max(2 * self.penalty, 1.0, 2 * waited))

    def helped(self) -> None:
        self.penalty = self.penalty / 2 if self.penalty > 0.01 else 0.0


def _kind(source: Source) -> SourceKind:
    return getattr(source, "kind", SourceKind.OTHER)


class SourceRegistry:
    """The sources of one site (or one running parcel), asked cheapest first.

    Fetches chunks by tag from the cheapest source that has them, once each:
    concurrent requests for one tag share one fetch. Cache hits are counted
    here too (the disk reports them), so one table says who served what.
    """

    def __init__(self, cache: SiteCache) -> None:
        self.cache = cache
        self._sources: dict[str, _Entry] = {}
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self.cache_stats = SourceStats()
        self.source_timeout = 30.0  # seconds one source may take for one request

    # -- membership ----------------------------------------------------------------

    def add(self, source: Source) -> None:
        """Add a source (or replace the one of the same name, keeping its statistics)."""
        if not isinstance(getattr(source, "name", None), str) or not source.name:
            raise UsageError("a source needs a name")
        self._sources[source.name] = _Entry(source, self._sources.get(source.name, _Entry(source)).stats)

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
        return {"cache": self.cache_stats, **{n: e.stats for n, e in self._sources.items()}}

    def note_cache_hits(self, n: int, nbytes: int) -> None:
        self.cache_stats.hits += n
        self.cache_stats.bytes += nbytes

    def infos(self) -> list[SourceInfo]:
        """The cache first, then every source in the order it is asked."""
        c = self.cache_stats
        rows = [SourceInfo("cache", "cache", 0.0, c.hits, c.bytes, c.bad, c.errors, 0.0)]
        for e in self._ordered():
            s = e.stats
            rows.append(SourceInfo(
                e.source.name, _kind(e.source).value, round(e.source.cost() * 1000, 3), s.hits, s.bytes, s.bad,
                s.errors, round(s.mean_latency * 1000, 2), round(e.penalty, 3)))
        return rows

    async def close(self) -> None:
        for name in list(self._sources):
            await self.withdraw(name)

    def _ordered(self) -> list[_Entry]:
        return sorted(self._sources.values(), key=lambda e: e.source.cost() + e.penalty)

    # -- fetching ------------------------------------------------------------------

    async def fetch(self, tag: bytes) -> bytes:
        """The verified ciphertext of one chunk (also stored in the cache)."""
        got = await self.fetch_many([tag])
        return got[tag]

    async def fetch_many(self, tags: Sequence[bytes], *, required: bool = True) -> dict[bytes, bytes]:
        """Fetch several chunks, sharing in-flight fetches with other callers.

        With ``required``, raises ChunkUnavailable if any tag could not be
        found; otherwise returns what was found.
        """
        loop = asyncio.get_running_loop()
        mine: list[bytes] = []
        waits: dict[bytes, asyncio.Future[bytes]] = {}
        out: dict[bytes, bytes] = {}
        for t in dict.fromkeys(tags):
            fut = self._inflight.get(t)
            if fut is None:
                fut = loop.create_future()
                self._inflight[t] = fut
                mine.append(t)
            waits[t] = fut
        if mine:
            try:
                # Another fetch may have landed some since the caller looked. The
                # lookup reads SQLite and files: off the loop that serves the guest.
                found = await asyncio.to_thread(self._cached, mine)
                need = [t for t in mine if t not in found]
                fetched = await self._from_sources(need) if need else {}
                if fetched:
                    await asyncio.to_thread(self.cache.put_verified, list(fetched.values()))
                found.update((t, c.data) for t, c in fetched.items())
            except BaseException as e:
                for t in mine:
                    fut = self._inflight.pop(t)
                    if not fut.done():
                        fut.set_exception(e)
                        fut.exception()  # retrieved: others may not be waiting
                raise
            for t in mine:
                fut = self._inflight.pop(t)
                if t in found:
                    fut.set_result(found[t])
                else:
                    fut.set_exception(ChunkUnavailable(f"no source has chunk {t.hex()[:16]}"))
                    fut.exception()
        for t, fut in waits.items():
            try:
                out[t] = await asyncio.shield(fut)
            except ChunkUnavailable:
                if required:
                    raise
        return out

    def _cached(self, tags: list[bytes]) -> dict[bytes, bytes]:
        out = {}
        for t in tags:
            data = self.cache.get(t)
            if data is not None:
                out[t] = data
        return out

    async def _from_sources(self, tags: list[bytes]) -> dict[bytes, VerifiedChunk]:
        found: dict[bytes, VerifiedChunk] = {}
        missing = list(tags)
        for entry in self._ordered():
            if not missing:
                break
            t0 = time.perf_counter()
            try:
                # A source is never trusted to answer, or to answer in time: a
                # silent peer or a buggy medium reader can only fail to help.
                answer = await asyncio.wait_for(entry.source.get_many(missing), self.source_timeout)
                if not isinstance(answer, dict):
                    raise TypeError(f"source answered {type(answer).__name__}, not a dict")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - see above
                entry.stats.errors += 1
                entry.failed(time.perf_counter() - t0)
                log.info("source %s failed: %s", entry.source.name, e or type(e).__name__)
                continue
            dt = time.perf_counter() - t0
            # Hashing a batch takes milliseconds: on the loop it would stall the
            # guest's disk for as long.
            good, bad = await asyncio.to_thread(_check_answer, missing, answer)
            found.update(good)
            entry.stats.bad += bad
            entry.stats.hits += len(good)
            entry.stats.bytes += sum(len(c.data) for c in good.values())
            entry.stats.seconds += dt if good else 0.0
            if good:
                entry.helped()
            missing = [t for t in missing if t not in found]
        return found


def _check_answer(asked: list[bytes], answer: dict[bytes, object]) -> tuple[dict[bytes, VerifiedChunk], int]:
    """Worker thread: the chunks of ``answer`` that match the tags asked for, and how many did not."""
    good: dict[bytes, VerifiedChunk] = {}
    bad = 0
    for t in asked:
        data = answer.get(t)
        if data is None:
            continue
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        v = verified(t, data) if isinstance(data, bytes) else None
        if v is None:
            bad += 1
        else:
            good[t] = v
    return good, bad


T = TypeVar("T")


class WorkerSource:
    """The asyncio side of a source whose file work runs on a worker thread of its own.

    A directory on a slow or hung network filesystem, or a dying USB key, must
    block neither the event loop serving a guest's disk nor the shared thread
    pool: a subclass does its reads in :meth:`_read` (on the worker) and
    releases its files in :meth:`_release` (on the worker, at close). Its cost
    is learned from answers, starting at ``per_chunk`` seconds a chunk.
    """

    name: str

    def __init__(self, per_chunk: float, thread_name: str) -> None:
        self._per_chunk = per_chunk
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=thread_name)

    def cost(self) -> float:
        return self._per_chunk

    def _read(self, tags: list[bytes]) -> dict[bytes, bytes]:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _closed_error(self) -> OSError:
        return OSError(f"the source {self.name} is closed")

    async def _on_worker(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            # Checked here, not only on the worker: the pool is shut down by now,
            # and submitting to it would fail with a RuntimeError, not as a source.
            raise self._closed_error()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        if not tags and not self._closed:
            return {}
        t0 = time.perf_counter()
        out = await self._on_worker(self._read, list(tags))
        if out:
            self._per_chunk = 0.8 * self._per_chunk + 0.2 * (time.perf_counter() - t0) / len(out)
        return out

    async def close(self) -> None:
        if self._closed:
            return
        # Set on the loop, before the worker gets to _release: reads already queued
        # behind a hung one then fail instead of reopening files.
        self._closed = True
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._release)
        with contextlib.suppress(asyncio.TimeoutError):
            # A hung filesystem or a dying medium may hold the worker: give it a moment, never wait forever.
            await asyncio.wait_for(asyncio.shield(fut), 2.0)
        self._pool.shutdown(wait=False, cancel_futures=True)


class ServerSource:
    """The home server as a source: tag -> (pack, offset, length) -> a Range read.

    Locations come from the server's pack index, learned in bulk (one request
    for a whole keyring at resume) and on demand for anything not yet known.
    Adjacent chunks of one pack are fetched in one range.
    """

    name = "server"
    kind = SourceKind.SERVER
    GAP = 256 << 10  # merge ranges separated by less than this

    def __init__(self, store: Store, parcel: uuid.UUID, rtt: float = 0.05) -> None:
        self.store = store
        self.parcel = parcel
        self._where: dict[bytes, PackEntry] = {}
        self._rtt = rtt

    def cost(self) -> float:
        return self._rtt + 0.01

    async def close(self) -> None:
        """The store belongs to the site and is closed with it."""

    async def learn(self, tags: Sequence[bytes]) -> None:
        unknown = [t for t in tags if t not in self._where]
        for i in range(0, len(unknown), 50_000):
            self._where.update(await self.store.locate(self.parcel, unknown[i : i + 50_000]))

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        await self.learn(tags)
        by_pack: dict[bytes, list[PackEntry]] = defaultdict(list)
        for t in tags:
            e = self._where.get(t)
            if e is not None:
                by_pack[e.pack_id].append(e)
        out: dict[bytes, bytes] = {}
        jobs = []
        for pack_id, entries in by_pack.items():
            entries.sort(key=lambda e: e.offset)
            run = [entries[0]]
            for e in entries[1:]:
                if e.offset - (run[-1].offset + run[-1].length) <= self.GAP:
                    run.append(e)
                else:
                    jobs.append(self._range(pack_id, run, out))
                    run = [e]
            jobs.append(self._range(pack_id, run, out))
        await asyncio.gather(*jobs)
        return out

    async def _range(self, pack_id: bytes, run: list[PackEntry], out: dict[bytes, bytes]) -> None:
        lo, hi = run[0].offset, run[-1].offset + run[-1].length
        t0 = time.perf_counter()
        blob = await self.store.get_pack(self.parcel, pack_id, lo, hi - lo)
        # A running estimate of the round trip keeps the cost order honest.
        self._rtt = 0.8 * self._rtt + 0.2 * (time.perf_counter() - t0)
        for e in run:
            out[e.tag] = blob[e.offset - lo : e.offset - lo + e.length]
