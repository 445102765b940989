"""The parcel's virtual disk as an NBD backend: demand fetch, read-modify-write, dirty map.

Reads resolve each 128 KiB chunk to its ref (the dirty map first, then the
keyring of the base version), take the ciphertext from the site cache, or
fetch it through the source chain on a miss, then verify and decode it on a
worker thread. Writes re-encode whole chunks (read-modify-write for partial
ones) under the user's convergence secret, store the ciphertext in the cache
and record the new ref in the dirty map: the plaintext never touches disk.

Concurrency: chunk-level locks serialize writers of one chunk; readers do not
wait for them (NBD leaves overlapping in-flight requests unordered).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

from ..chunk import (
    CHUNK_SIZE,
    ChunkRef,
    VerifiedChunk,
    chunk_length,
    decode,
    default_pool,
    encode,
)
from ..errors import ChunkSlow, ChunkUnavailable, IntegrityError, IsrError
from ..keyring import Keyring, LazyKeyring
from ..vm.nbd import NbdError
from ..vm.waits import Waits
from .cache import SiteCache
from .pacing import Priority
from .registry import SourceRegistry
from .state import ParcelState

log = logging.getLogger("isrsync.disk")
EIO = 5


@dataclass
class DiskStats:
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    cache_hits: int = 0
    misses: int = 0
    miss_seconds: float = 0.0
    # Seconds each demand miss kept the guest waiting (the latest ones): fault service times.
    miss_times: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    first_access: list[int] = field(default_factory=list)


def decode_cached(cache: SiteCache, ref: ChunkRef, length: int) -> bytes | None:
    """Decode a chunk from the cache, or None if it is absent or damaged there.

    The tag was checked when the chunk entered the cache; here the AEAD is
    the check (see :func:`isrsync.chunk.decode`). A chunk that fails it is
    forgotten, so a source is asked instead.
    """
    data = cache.get(ref.tag, verify=False)
    if data is None:
        return None
    try:
        return decode(ref, data, length, check_tag=False)
    except IntegrityError:
        cache.forget(ref.tag, damaged=True)
        return None


class ParcelDisk:
    """A :class:`isrsync.vm.nbd.BlockBackend` over a parcel version plus local changes."""

    # Decoded chunks kept in RAM (a random 4 KiB read would otherwise decode a
    # whole 128 KiB chunk): the guest's own page cache is plaintext in RAM too;
    # nothing here is ever written to disk in the clear.
    HOT_BYTES = int(os.environ.get("ISRSYNC_HOT_MIB", "256")) << 20

    def __init__(
        self,
        keyring: Keyring,
        secret: bytes,
        cache: SiteCache,
        chain: SourceRegistry,
        state: ParcelState,
        *,
        read_only: bool = False,
        pool: Executor | None = None,
        fetch_timeout: float = 300.0,
    ) -> None:
        self.keyring = keyring
        self.size = keyring.size
        self.read_only = read_only
        self._secret = secret
        self._cache = cache
        self.chain = chain
        self._state = state
        self._pool = pool or default_pool()
        self.dirty: dict[int, ChunkRef] = state.dirty()
        self._locks: dict[int, asyncio.Lock] = {}
        self._hot: OrderedDict[int, bytes] = OrderedDict()
        self._gen: dict[int, int] = {}  # per-chunk write generation
        self._seen: set[int] = set()
        self.stats = DiskStats()
        self.fetch_timeout = fetch_timeout
        # Hooks for policies: called with chunk indices the guest just missed.
        self.on_miss: Callable[[list[int]], None] | None = None
        self._waits = Waits(log.warning, "disk chunk(s)", first_after=0.0)

    # -- refs ------------------------------------------------------------------------

    def ref(self, i: int) -> ChunkRef:
        r = self.dirty.get(i)
        return r if r is not None else self.keyring[i]

    async def current_keyring(self) -> Keyring:
        """The keyring of the disk as the guest sees it now (base + dirty); a lazy base
        fetches the segments it still lacks first."""
        await self.whole_keyring()
        return self.keyring.overlay(self.dirty)

    async def whole_keyring(self, group: int = 16) -> None:
        """Every segment of a lazy base (``group`` at a time: small in the background, so a
        guest's demand for one segment never waits behind many)."""
        ring = self.keyring
        if isinstance(ring, LazyKeyring) and not ring.complete:
            try:
                await ring.loader.load_all(group=group)
            except ChunkUnavailable as e:
                # Said as what it is: a suspend or sync lacking these stays local and says so.
                raise type(e)(f"{len(ring.missing())} segment(s) of the disk's keyring could not be fetched "
                              f"({e.message})", details=e.details) from None

    async def _entries(self, idxs: list[int]) -> None:
        """Fetch the keyring segments of chunks ``idxs`` this disk cannot name yet (a lazy
        base): the guest waits as on a miss, with the same patience."""
        ring = self.keyring
        if not isinstance(ring, LazyKeyring) or ring.complete:
            return
        want = [i for i in idxs if i not in self.dirty]
        if not ring.wanted(want):
            return
        deadline = time.monotonic() + self.fetch_timeout
        delay = 0.25
        while True:
            try:
                await ring.loader.ensure(want)
                return
            except ChunkUnavailable:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)

    def _note(self, idxs: range) -> None:
        for i in idxs:
            if i not in self._seen:
                self._seen.add(i)
                self.stats.first_access.append(i)

    # -- chunk plaintexts --------------------------------------------------------------

    def _local(self, refs: list[tuple[int, ChunkRef]]) -> list[bytes | None]:
        """Worker thread: decode what the cache holds; None for misses."""
        out: list[bytes | None] = []
        for i, r in refs:
            n = chunk_length(self.size, i)
            if r.is_zero:
                out.append(bytes(n))
                continue
            out.append(decode_cached(self._cache, r, n))
        return out

    async def plains(self, idxs: list[int]) -> list[bytes]:
        loop = asyncio.get_running_loop()
        await self._entries(idxs)
        refs = [(i, self.ref(i)) for i in idxs]
        gens = [self._gen.get(i, 0) for i in idxs]
        result: list[bytes | None] = [None] * len(refs)
        todo = []
        for k, (i, r) in enumerate(refs):
            hot = self._hot.get(i)
            if hot is not None:  # writers keep hot entries current
                self._hot.move_to_end(i)
                result[k] = hot
            else:
                todo.append(k)
        if todo:
            local = await loop.run_in_executor(self._pool, self._local, [refs[k] for k in todo])
            missing = []
            hit_bytes = hits = 0
            for k, plain in zip(todo, local):
                if plain is None:
                    missing.append(k)
                else:
                    result[k] = plain
                    if not refs[k][1].is_zero:
                        hits += 1
                        hit_bytes += len(plain)
            self.stats.cache_hits += hits
            self.chain.note_cache_hits(hits, hit_bytes)
            if missing:
                await self._fetch([refs[k] for k in missing], result, missing)
        for k, (i, _) in enumerate(refs):
            # A write that finished while we fetched owns the hot entry now.
            if self._gen.get(i, 0) == gens[k]:
                self._remember(i, result[k])  # type: ignore[arg-type]
        return result  # type: ignore[return-value]

    async def _fetch(self, refs: list[tuple[int, ChunkRef]], result: list, slots: list[int]) -> None:
        t0 = time.perf_counter()
        self.stats.misses += len(refs)
        if self.on_miss is not None:
            self.on_miss([i for i, _ in refs])
        since = time.monotonic()
        deadline = since + self.fetch_timeout
        self.chain.source_timeout = min(self.chain.source_timeout, self.fetch_timeout)
        delay = 0.25
        while True:
            try:
                got = await self.chain.fetch_many([r.tag for _, r in refs], priority=Priority.FAULT)
                break
            except ChunkUnavailable as e:
                # The guest blocks, as on a slow disk, while sources may come back
                # (the server reconnects, a USB key is plugged in); one last try
                # is made at the deadline itself.
                for i, _ in refs:
                    self._waits.failed(i, since, e)
                left = deadline - time.monotonic()
                if left <= 0:
                    for i, _ in refs:
                        self._waits.arrived(i)  # given up on: the error says so
                    raise
                if isinstance(e, ChunkSlow):
                    continue  # still coming: asking again waits on the same request, at once
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)
        for i, _ in refs:
            self._waits.arrived(i)
        loop = asyncio.get_running_loop()
        plains = await loop.run_in_executor(
            self._pool,
            # The registry checked their tags already.
            lambda: [decode(r, got[r.tag], chunk_length(self.size, i), check_tag=False) for i, r in refs],
        )
        for k, plain in zip(slots, plains):
            result[k] = plain
        took = time.perf_counter() - t0
        self.stats.miss_seconds += took
        self.stats.miss_times.append(took)

    def _remember(self, i: int, plain: bytes) -> None:
        self._hot[i] = plain
        self._hot.move_to_end(i)
        while len(self._hot) * CHUNK_SIZE > self.HOT_BYTES:
            self._hot.popitem(last=False)

    # -- BlockBackend ------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        first, last = offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE
        idxs = list(range(first, last + 1))
        self._note(range(first, last + 1))
        try:
            plains = await self.plains(idxs)
        except IsrError as e:
            raise NbdError(EIO, str(e)) from None
        self.stats.reads += 1
        self.stats.read_bytes += length
        start = offset - first * CHUNK_SIZE
        if len(plains) == 1:
            p = plains[0]
            return p if start == 0 and length == len(p) else p[start : start + length]
        whole = b"".join(plains)
        return whole if start == 0 and length == len(whole) else whole[start : start + length]

    async def write(self, offset: int, data: bytes) -> None:
        await self._update(offset, len(data), data)
        self.stats.writes += 1
        self.stats.written_bytes += len(data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._update(offset, length, None)

    async def trim(self, offset: int, length: int) -> None:
        # Reading a trimmed range returns zeros (we advertise no hole semantics
        # beyond that), which also lets a trimmed chunk become ZERO and free.
        await self._update(offset, length, None)

    async def _update(self, offset: int, length: int, data: bytes | None) -> None:
        if length == 0:
            return
        first, last = offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE
        idxs = list(range(first, last + 1))
        self._note(range(first, last + 1))
        locks = [self._locks.setdefault(i, asyncio.Lock()) for i in idxs]
        for lk in locks:  # in index order: no two writers deadlock
            await lk.acquire()
        try:
            partial = [
                i for i in idxs
                if not (offset <= i * CHUNK_SIZE and (i * CHUNK_SIZE + chunk_length(self.size, i)) <= offset + length)
            ]
            try:
                old = dict(zip(partial, await self.plains(partial))) if partial else {}
            except IsrError as e:
                raise NbdError(EIO, str(e)) from None
            news: dict[int, bytes] = {}
            for i in idxs:
                base = i * CHUNK_SIZE
                n = chunk_length(self.size, i)
                lo, hi = max(offset, base), min(offset + length, base + n)
                piece = bytes(hi - lo) if data is None else data[lo - offset : hi - offset]
                if i in old:
                    buf = bytearray(old[i])
                    buf[lo - base : hi - base] = piece
                    news[i] = bytes(buf)
                else:
                    news[i] = piece
            loop = asyncio.get_running_loop()
            encs = await loop.run_in_executor(
                self._pool, lambda: {i: encode(p, self._secret) for i, p in news.items()}
            )
            # encode() computed each tag from these very bytes: hashing them again
            # would only take codec threads from the guest's reads.
            blobs = [VerifiedChunk(e.tag, e.data) for e in encs.values() if e.data]
            refs = {i: e.ref for i, e in encs.items()}
            await loop.run_in_executor(self._pool, self._store, blobs, refs)
            for i, r in refs.items():
                self.dirty[i] = r
                self._gen[i] = self._gen.get(i, 0) + 1
                self._remember(i, news[i])
        finally:
            for lk in locks:
                lk.release()

    def _store(self, blobs: list[VerifiedChunk], refs: dict[int, ChunkRef]) -> None:
        # Bytes first, then the map that names them: a crash never leaves the map
        # pointing at a chunk the cache lacks.
        if blobs:
            self._cache.put_verified(blobs, durable=False)
        self._state.set_dirty(refs, durable=False)

    async def flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._sync)
        except IsrError as e:
            raise NbdError(28 if "space" in str(e) else EIO, str(e)) from None

    def _sync(self) -> None:
        self._cache.sync()
        self._state.sync()

    async def cache(self, offset: int, length: int) -> None:
        first, last = offset // CHUNK_SIZE, (offset + max(length, 1) - 1) // CHUNK_SIZE
        await self.prefetch(list(range(first, last + 1)))

    async def prefetch(self, idxs: list[int], priority: Priority = Priority.BULK) -> int:
        """Bring chunks into the cache without decoding them; returns how many were fetched.

        Bulk by default: nobody waits on it, so it goes behind the guest's misses."""
        await self._entries(idxs)
        tags = [r.tag for r in (self.ref(i) for i in idxs) if not r.is_zero]
        missing = await asyncio.get_running_loop().run_in_executor(self._pool, self._cache.missing, tags)
        if missing:
            await self.chain.fetch_many(missing, required=False, priority=priority)
        return len(missing)
