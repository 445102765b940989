"""Memory images: guest RAM encoded in place from its memfd, and QEMU's
migration stream (device state) encoded as it is produced and fed back while
its chunks are still arriving.

Guest RAM lives in a memfd that QEMU maps shared. Saving reads it by address
while the guest is stopped: 128 KiB chunks at fixed offsets, so a chunk the
guest did not change since the image it was resumed from keeps its ref after
one hash (no compression, no encryption, no upload), and pages the guest
never touched are holes that are not even read. Restoring decodes the chunks
straight into a fresh memfd (:func:`~isrsync.site.parcel.write_blob`) while
QEMU starts. QEMU's own stream then carries only device state
(``x-ignore-shared``): a few hundred KiB instead of every page.

Saving the stream chunks it into 128 KiB plaintexts, encodes them on all
cores, and appends new chunks to packs in the site cache: the plaintext never
lands on disk and the encoded image is ready to upload (or to resume from
locally, offline) the moment QEMU finishes writing it.

Restoring walks the image's refs in order with a prefetch window: chunks come
from the cache or the source chain, are decoded on worker threads, and a
writer thread pushes them into QEMU's incoming pipe, so QEMU restores pages
while later chunks are still on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import tempfile
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..chunk import (
    BATCH, CHUNK_SIZE, ZERO_REF, ChunkRef, Encoded, background_pool, chunk_length, convergent_key,
    decode, default_pool, encode, in_order, is_zero,
)
from ..errors import ChunkUnavailable, QemuError
from ..manifest import Keyring, MemoryImage
from .cache import SiteCache
from .disk import decode_cached
from .packer import PackSink, fd_chunks, pack_chunks
from .pacing import Priority
from .registry import SourceRegistry

WINDOW = 16  # chunks per fetch batch
AHEAD = 4  # batches in flight ahead of the writer


@dataclass
class SavedImage:
    memory: MemoryImage
    pack_ids: list[bytes]
    stored_bytes: int
    seconds: float


@contextlib.contextmanager
def _staging(cache: SiteCache) -> Iterator[Path]:
    """A directory for new packs beside the cache's, removed with whatever is left in it."""
    staging = Path(tempfile.mkdtemp(prefix=".mem-", dir=cache.path / "packs"))
    try:
        yield staging
    finally:
        for p in staging.glob("*"):
            p.unlink(missing_ok=True)
        staging.rmdir()


def save_stream(fd: int, secret: bytes, cache: SiteCache) -> SavedImage:
    """Worker thread: read a migration stream to EOF and encode it into the cache."""
    t0 = time.perf_counter()
    total: list[int] = []
    with _staging(cache) as staging:
        refs, packed = pack_chunks(fd_chunks(fd, total), secret, staging, known=cache.has)
        for info, path in packed.packs:
            cache.add_pack(path, info.pack_id, info)  # just written here: no second hash pass
    length = total[0] if total else 0
    mem = MemoryImage.from_refs(length, refs)
    return SavedImage(mem, [i.pack_id for i, _ in packed.packs], packed.stored_bytes, time.perf_counter() - t0)


@dataclass
class SavedRam:
    ram: Keyring
    pack_ids: list[bytes]
    new_chunks: int  # encoded and packed now
    kept_chunks: int  # unchanged since the previous image: its ref kept


def data_chunks(fd: int, size: int) -> list[int]:
    """Indices of the chunks of ``fd``'s first ``size`` bytes that hold any data (not holes)."""
    out: list[int] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first = start // CHUNK_SIZE
        if out and out[-1] == first:
            first += 1
        out.extend(range(first, (end - 1) // CHUNK_SIZE + 1))
        off = end
    return out


def save_ram(fd: int, size: int, secret: bytes, cache: SiteCache, previous: Keyring | None) -> SavedRam:
    """Worker thread: encode guest RAM from its memfd into the cache (the guest is stopped).

    Chunk i is RAM bytes i*128 KiB onwards. Only chunks that hold data are
    read; each is hashed once (K, the convergent key), and one whose K is the
    one ``previous`` has at the same index is unchanged: its ref is kept
    without compressing, encrypting or storing anything.
    """
    if previous is not None and previous.size != size:
        previous = None  # the guest's RAM was resized: nothing lines up
    ring = Keyring(size)
    pool = default_pool()

    def job(idxs: list[int]) -> tuple[list[int], list[Encoded | ChunkRef]]:
        # ChunkRef: kept from ``previous``, or zero.
        out: list[Encoded | ChunkRef] = []
        for i in idxs:
            n = chunk_length(size, i)
            plain = os.pread(fd, n, i * CHUNK_SIZE)
            if len(plain) != n:
                raise QemuError(f"guest RAM is shorter than its {size} bytes")
            if is_zero(plain):
                out.append(ZERO_REF)
                continue
            key = convergent_key(plain, secret)
            if previous is not None and previous[i].key == key:
                out.append(previous[i])
            else:
                out.append(encode(plain, secret, key=key))
        return idxs, out

    todo = data_chunks(fd, size)
    work = (pool.submit(job, todo[k : k + BATCH]) for k in range(0, len(todo), BATCH))
    new = kept = 0
    with _staging(cache) as staging:
        sink = PackSink(staging)
        try:
            for idxs, results in in_order(work, pool):
                for i, r in zip(idxs, results):
                    if isinstance(r, Encoded):
                        ring[i] = r.ref
                        if r.tag not in sink and not cache.has(r.tag):
                            sink.add(r.tag, r.data)
                            new += 1
                    else:
                        ring[i] = r
                        kept += not r.is_zero
            sink.flush()
        except BaseException:
            sink.abort()
            raise
        for info, path in sink.done:
            cache.add_pack(path, info.pack_id, info)
    return SavedRam(ring, [i.pack_id for i, _ in sink.done], new, kept)


def ram_chunks(ram: Keyring) -> list[int]:
    """The chunks of guest RAM that hold data, in the order a lazy restore pushes them."""
    return ram.data_indexes()


class RamFetcher:
    """A RAM chunk's plaintext for a lazy restore: from the cache, else from the sources.

    Calls made in one turn of the event loop are served together, BATCH
    chunks per worker task and one source request for all the misses:
    per-chunk hand-offs cost a third more CPU (measured on a 180-chunk hot
    set) and a request per chunk would cost a round trip each on a real
    link. Chunks a fault waits for, and the hot chunks the guest's start waits
    for, decode on the full-priority pool; the rest of the background push
    decodes on the niced one, so that the guest keeps its core. (Niced, the hot
    chunks were still decoding 67 ms after QEMU was up, on the test guest's
    resume from a USB medium; at full priority they are ready within 6 ms of it.)

    On the link, the background push is bulk, but for the ``hot`` chunks: the
    guest's start waits for those, and with one bandwidth-delay product of bulk
    in flight they would come one at a time (measured at 10 Mb/s: the guest ran
    after 8.5 s against 4.3 s).
    """

    def __init__(self, ram: Keyring, cache: SiteCache, chain: SourceRegistry, hot: Iterable[int] = ()) -> None:
        self.ram = ram
        self.cache = cache
        self.chain = chain
        self.hot = set(hot)
        self._queued: dict[tuple[bool, Priority], list[tuple[int, asyncio.Future[bytes | None]]]] = {}
        # The loop holds tasks only weakly: a batch nobody else referred to could be
        # collected mid-fetch, and the guest's fault would never be answered.
        self._serving: set[asyncio.Task[None]] = set()
        self._early: dict[int, asyncio.Future[bytes | None]] = {}

    def warm(self) -> None:
        """Start on the hot chunks now, before anyone asks: the first call for each gets its fetch.

        A lazy restore calls this once the device state is in, while QEMU is still
        starting, so that the hot chunks are ready when QEMU is.
        """
        for i in self.hot:
            if 0 <= i < len(self.ram) and i not in self._early:
                self._early[i] = self(i, False)

    def forget(self) -> None:
        """Drop what :meth:`warm` started that nobody took (the restore went another way)."""
        early, self._early = self._early, {}
        for fut in early.values():
            fut.cancel()

    def __call__(self, index: int, urgent: bool) -> asyncio.Future[bytes | None]:
        early = self._early.pop(index, None)
        if early is not None:
            return early
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        ref = self.ram[index]
        if ref.is_zero:
            fut.set_result(None)
            return fut
        key = (urgent, Priority.FAULT if urgent or index in self.hot else Priority.BULK)
        queue = self._queued.setdefault(key, [])
        if not queue:
            loop.call_soon(self._flush, key)
        queue.append((index, fut))
        return fut

    def _flush(self, key: tuple[bool, Priority]) -> None:
        queue, self._queued[key] = self._queued[key], []
        for k in range(0, len(queue), BATCH):
            task = asyncio.ensure_future(self._serve(queue[k : k + BATCH], *key))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, items: list[tuple[int, asyncio.Future[bytes | None]]], urgent: bool,
                     priority: Priority) -> None:
        pool = default_pool() if urgent or priority is Priority.FAULT else background_pool()
        try:
            plains = await decode_chunks(self.ram, [i for i, _ in items], self.cache, self.chain, pool, priority)
        except BaseException as e:
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
                    fut.exception()  # retrieved: a caller may have gone
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for (i, fut), plain in zip(items, plains):
            if fut.done():
                continue
            if plain is None:  # a chunk no source has fails alone, not the batch it came in
                fut.set_exception(ChunkUnavailable(f"no source has guest memory chunk {i}"))
                fut.exception()
            else:
                fut.set_result(plain)


async def read_stream(mem: MemoryImage, cache: SiteCache, chain: SourceRegistry) -> bytes:
    """A small stream (device state only, RAM kept apart) decoded whole, in memory."""
    plains = await decode_chunks(mem.refs, list(range(len(mem.refs))), cache, chain, default_pool())
    if any(p is None for p in plains):
        raise ChunkUnavailable("no source has a chunk of the memory image's device state")
    return b"".join(plains)  # type: ignore[arg-type]


async def decode_chunks(ring: Keyring, idxs: list[int], cache: SiteCache, chain: SourceRegistry,
                        pool: Executor, priority: Priority = Priority.FAULT) -> list[bytes | None]:
    """Chunks ``idxs`` of ``ring`` decoded on ``pool``: from the cache, the misses in one source request.

    A zero chunk is zeros; a chunk no source has is None.
    """
    loop = asyncio.get_running_loop()
    refs = [ring[i] for i in idxs]
    lengths = [chunk_length(ring.size, i) for i in idxs]

    def local() -> list[bytes | None]:
        # One query for what the cache lacks (all of it, on a resume from a key) instead of
        # a read attempt per chunk.
        absent = set(cache.missing([r.tag for r in refs if not r.is_zero]))
        return [bytes(n) if r.is_zero else None if r.tag in absent else decode_cached(cache, r, n)
                for r, n in zip(refs, lengths)]

    out = await loop.run_in_executor(pool, local)
    miss = [k for k, p in enumerate(out) if p is None]
    hits = [k for k, p in enumerate(out) if p is not None and not refs[k].is_zero]
    if hits:
        chain.note_cache_hits(len(hits), sum(lengths[k] for k in hits))
    if miss:
        got = await chain.fetch_many([refs[k].tag for k in miss], required=False, priority=priority)
        found = [k for k in miss if refs[k].tag in got]
        # The registry checked their tags: a second hash pass would cost 0.15 ms a chunk.
        decoded = await loop.run_in_executor(
            pool, lambda: [decode(refs[k], got[refs[k].tag], lengths[k], check_tag=False) for k in found])
        for k, plain in zip(found, decoded):
            out[k] = plain
    return out


class Feeder:
    """Fetches and decodes an image in order into a bounded queue; ``produce`` writes it.

    Decoding runs a little ahead of QEMU, on niced threads so that QEMU, the
    critical path, keeps its core. Only a little: a queue that holds the whole
    image puts every decoded chunk in fresh pages, and those page faults cost
    a third more CPU than decoding into buffers the allocator recycles
    (measured on a 56 MB image: 60 ms against 40 ms on one core).
    """

    MAX_QUEUED = 8 << 20

    def __init__(self, mem: MemoryImage, cache: SiteCache, chain: SourceRegistry) -> None:
        self.mem = mem
        self.cache = cache
        self.chain = chain
        batches = max(AHEAD, self.MAX_QUEUED // (WINDOW * CHUNK_SIZE))
        self.q: queue.Queue[list[bytes] | BaseException | None] = queue.Queue(maxsize=batches)
        self.task: asyncio.Task | None = None
        self._stopped = False
        self.fetched = 0
        self.written = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def _put(self, item: list[bytes] | BaseException | None) -> None:
        # Give up if the writer is gone, rather than block a thread forever.
        while not self._stopped:
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pool = background_pool()
        n = len(self.mem.refs)
        batches = [list(range(i, min(n, i + WINDOW))) for i in range(0, n, WINDOW)]
        try:
            pending: list[asyncio.Task] = []
            for b in batches:
                pending.append(asyncio.create_task(self._batch(b, pool)))
                if len(pending) >= AHEAD:
                    await loop.run_in_executor(None, self._put, await pending.pop(0))
            for t in pending:
                await loop.run_in_executor(None, self._put, await t)
            await loop.run_in_executor(None, self._put, None)
        except asyncio.CancelledError:
            self._stopped = True
            raise
        except BaseException as e:  # hand the failure to the writer thread
            await loop.run_in_executor(None, self._put, e)
            raise

    async def _batch(self, idxs: list[int], pool) -> list[bytes]:
        plains = await decode_chunks(self.mem.refs, idxs, self.cache, self.chain, pool)
        lost = [i for i, p in zip(idxs, plains) if p is None]
        if lost:
            raise ChunkUnavailable(f"no source has chunk {self.mem.refs[lost[0]].tag.hex()[:16]}")
        self.fetched += len(idxs)
        return plains  # type: ignore[return-value]

    def produce(self, fd: int) -> None:
        """Worker thread: write the decoded image to QEMU's incoming pipe."""
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                write_all(fd, item)
                self.written += sum(len(b) for b in item)
        finally:
            self._stopped = True


def write_all(fd: int, bufs: list[bytes]) -> None:
    views = [memoryview(b) for b in bufs if b]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
