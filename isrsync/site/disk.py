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
from collections import OrderedDict
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
from ..errors import ChunkUnavailable, IntegrityError, IsrError
from ..manifest import Keyring
from ..vm.nbd import NbdError
from .cache import SiteCache
from .sources import SourceRegistry
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
        cache.forget(ref.tag)
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

    # -- refs ------------------------------------------------------------------------

    def ref(self, i: int) -> ChunkRef:
        r = self.dirty.get(i)
        return r if r is not None else self.keyring[i]

    def current_keyring(self) -> Keyring:
        """The keyring of the disk as the guest sees it now (base + dirty)."""
        return self.keyring.overlay(self.dirty)

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
        deadline = time.monotonic() + self.fetch_timeout
        self.chain.source_timeout = min(self.chain.source_timeout, self.fetch_timeout)
        delay = 0.25
        while True:
            try:
                got = await self.chain.fetch_many([r.tag for _, r in refs])
                break
            except ChunkUnavailable:
                # The guest blocks, as on a slow disk, while sources may come back
                # (the server reconnects, a USB key is plugged in); one last try
                # is made at the deadline itself.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.warning("waiting for %d chunk(s) no source has yet", len(refs))
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)
        loop = asyncio.get_running_loop()
        plains = await loop.run_in_executor(
            self._pool,
            lambda: [decode(r, got[r.tag], chunk_length(self.size, i)) for i, r in refs],
        )
        for k, plain in zip(slots, plains):
            result[k] = plain
        self.stats.miss_seconds += time.perf_counter() - t0

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

    async def prefetch(self, idxs: list[int]) -> int:
        """Bring chunks into the cache without decoding them; returns how many were fetched."""
        tags = [r.tag for r in (self.ref(i) for i in idxs) if not r.is_zero]
        missing = await asyncio.get_running_loop().run_in_executor(self._pool, self._cache.missing, tags)
        if missing:
            await self.chain.fetch_many(missing, required=False)
        return len(missing)
