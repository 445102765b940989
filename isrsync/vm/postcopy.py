"""Lazy memory: isrsync plays the source of a QEMU post-copy migration.

The guest starts as soon as its device state is in; its RAM follows. QEMU
(``postcopy-ram`` on the destination) catches the guest's first touch of each
page with userfaultfd and asks for it on the return path; we answer with the
page's 128 KiB chunk, decoded from the cache or fetched from the source chain,
the page asked for first. Meanwhile every other chunk with data is pushed in
the background, in the order given, until the whole image is in; then the
stream ends and QEMU stops trapping faults. Pages that hold only zeros are
never sent unless asked for: after the end they read as zeros anyway (holes
of the RAM memfd, or fresh anonymous pages).

The stream is built by :mod:`isrsync.vm.migstream` from the saved device
state. Invariants QEMU 7.2 holds us to: a page is placed at most once (a
second copy of it is a fatal error there), and nothing but the stream places
pages once QEMU listens. ``_sent`` is the one record of what went, updated in
the same step as the write, with no ``await`` in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from ..chunk import CHUNK_SIZE
from ..errors import ChunkSlow, ChunkUnavailable, IsrError, QemuError
from . import migstream as ms
from .migstream import PAGE, PageRequest, SavedState
from .waits import Waits

log = logging.getLogger("isrsync.postcopy")

# fetch(chunk index, urgent) -> the chunk's plaintext, or None if it is all zeros.
Fetch = Callable[[int, bool], Awaitable["bytes | None"]]
Say = Callable[[str], None]
Progress = Callable[[int, int], None]  # chunks of RAM in place, chunks with data in all

_ZERO_PAGE = bytes(PAGE)
_RETRY = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds between tries of a chunk that could not be had
_STALL_NOTE = 10.0  # say a chunk is stuck after this long without it
_QUIET = 0.005  # the background push waits this long after the guest's last fault
# The push leaves the cores to the guest for this long after it starts: that is when its
# user waits on it. Measured on 2 cores (benchmarks/usb_resume.py, RAM from a USB key):
# the guest answered 130-320 ms after it started with the push beside it, 100-150 ms with
# the push 0.3 s later. Faults meanwhile are served as ever; ``finish`` ends the wait.
_START_GRACE = 0.3
_HOT_WAIT = 30.0  # at most this long the guest's start waits for its hot chunks


@dataclass
class PostcopyStats:
    hot_chunks: int = 0  # chunks in place before the guest started
    requests: int = 0  # page requests QEMU sent (a guest or device fault each)
    requested_chunks: int = 0  # chunks sent because a fault asked for them
    pushed_chunks: int = 0  # chunks sent by the background push
    pages: int = 0  # pages sent, zero pages included
    zero_pages: int = 0  # zero pages sent because they were asked for
    fault_seconds: list[float] = field(default_factory=list)  # request -> its page written
    started: float = 0.0  # perf_counter when the device state went out
    resident: float | None = None  # seconds from started until every page with data was sent
    completed: float | None = None  # seconds from started until QEMU said it has all of it

    def summary(self) -> dict[str, float | int | None]:
        f = self.fault_seconds
        return {
            "hot_chunks": self.hot_chunks, "requests": self.requests, "requested_chunks": self.requested_chunks,
            "pushed_chunks": self.pushed_chunks, "pages": self.pages, "zero_pages": self.zero_pages,
            "fault_ms_median": round(statistics.median(f) * 1000, 3) if f else None,
            "fault_ms_p99": round(percentile(f, 0.99) * 1000, 3) if f else None,
            "fault_ms_max": round(max(f) * 1000, 3) if f else None,
            "resident_seconds": None if self.resident is None else round(self.resident, 3),
            "completed_seconds": None if self.completed is None else round(self.completed, 3),
        }


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank; ``xs`` not empty)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 1)) - 1))]


class PostcopySource:
    """Serve one post-copy restore over a connected stream socket.

    ``ram_block`` is the block that lives in chunks (``pc.ram``); ``chunks``
    lists every chunk index of it that holds data, in the order to push them
    (chunks not listed must be all zeros). Other blocks (ROMs, ACPI tables)
    come from the saved stream itself. ``say`` gets one line when a chunk has
    been stuck for a while (the guest waits on it) and when it comes loose.

    ``hot`` chunks (what the guest touched first last time) are written
    straight into ``ram_fd``, the memfd QEMU maps as that block, in the one
    window where that is safe: after QEMU has emptied its RAM for post-copy
    (ADVISE) and before it traps faults (LISTEN). The fetcher may have
    started on them already, while QEMU was still building its machine
    (``RamFetcher.warm``); :meth:`warm` takes them up. Measured on the
    test guest: the guest touches about 180 chunks (23 MB) before it first
    answers; faulting each in costs a round trip through QEMU (about 1 ms),
    and placing them up front roughly halves the time to that first answer.
    """

    def __init__(self, saved: SavedState, ram_block: str, chunks: Sequence[int], fetch: Fetch, *,
                 ram_fd: int | None = None, hot: Sequence[int] = (), window: int = 8,
                 say: Say | None = None, progress: Progress | None = None) -> None:
        block = saved.block(ram_block)
        if CHUNK_SIZE % PAGE or block.length % PAGE:
            raise ms.StreamError("RAM does not split into whole pages")
        self.saved = saved
        self.ram_block = ram_block
        self.ram_length = block.length
        self.order = list(chunks)  # hot chunks first, once ``hot`` is known
        self.fetch = fetch
        self.window = max(1, window)
        self.say = say or (lambda msg: None)
        self._waits = Waits(self.say, "chunk(s) of guest memory", first_after=_STALL_NOTE)
        self.progress = progress or (lambda done, total: None)
        self._in_place = 0
        self._listed = set(chunks)
        self.stats = PostcopyStats()
        self._sent = {b.name: bytearray(b.length // PAGE) for b in saved.blocks}
        self._chunk_done = bytearray((block.length + CHUNK_SIZE - 1) // CHUNK_SIZE)
        self._fetching: dict[int, asyncio.Task[bytes | None]] = {}
        self._faulting: dict[int, asyncio.Task[bytes | None]] = {}  # urgent fetches, by chunk
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task] = set()
        self._push: asyncio.Task | None = None
        self._shut: asyncio.Future[int] | None = None
        self._ended = False
        self._hurry = False
        self.failure: BaseException | None = None
        self.ram_fd = ram_fd
        self.hot = [i for i in dict.fromkeys(hot) if 0 <= i < len(self._chunk_done)]
        listed, hot_set = set(self.order), set(self.hot)
        self.order = [i for i in self.hot if i in listed] + [i for i in self.order if i not in hot_set]
        if ram_fd is None:
            self.hot = []  # nowhere to put them before the start: they are just pushed first
        self._hot_tasks: dict[int, asyncio.Task[bytes | None]] = {}
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._last_request = 0.0
        # RAM chunks in the order faults first asked for them: the next resume's ``hot``.
        self.touched: list[int] = []

    def warm(self) -> None:
        """Start decoding the hot chunks now (they go in before the guest starts).

        On the niced pool: QEMU building its machine meanwhile is the critical path.
        """
        for i in self.hot:
            if i not in self._hot_tasks:
                self._hot_tasks[i] = self._chunk(i, urgent=False)

    # -- the stream up to the guest's start ---------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Send everything up to POSTCOPY_RUN; the background push starts behind it.

        ``sock`` is our end of the socketpair whose other end QEMU reads its
        incoming migration from (and writes its return path to).
        """
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        # A little queued at a time, so that a page a fault asks for is not
        # stuck behind megabytes of background push.
        writer.transport.set_write_buffer_limits(high=256 << 10)
        self._writer = writer
        self._shut = asyncio.get_running_loop().create_future()
        self._spawn(self._read_return_path(reader))
        st = self.saved
        writer.write(ms.header(st) + ms.command(ms.CMD_OPEN_RETURN_PATH) + ms.postcopy_advise() + ms.ram_setup(st))
        # The blocks carried by the stream, precopy-style: nothing traps faults yet.
        for name, pages in st.pages.items():
            if pages:
                self._write(name, sorted(pages.items()))
        if self.hot:
            self.warm()
            pong = self._pongs[1] = asyncio.get_running_loop().create_future()
            writer.write(ms.ping(1))
            await writer.drain()
            # A hot chunk still missing after a while (a slow link) is left to the push.
            await asyncio.wait(self._hot_tasks.values(), timeout=_HOT_WAIT)
            await asyncio.wait_for(pong, 30)  # ADVISE done: QEMU emptied guest RAM
            # An all-zero chunk is left a hole: a fault on it gets zero pages.
            ready = [(i, t.result()) for i, t in self._hot_tasks.items()
                     if t.done() and not t.cancelled() and t.exception() is None and t.result() is not None]
            await asyncio.to_thread(self._place, ready)
            sent, per = self._sent[self.ram_block], CHUNK_SIZE // PAGE
            for i, _ in ready:
                self._chunk_done[i] = 1
                sent[i * per : (i + 1) * per] = b"\x01" * len(sent[i * per : (i + 1) * per])
            self.stats.hot_chunks = len(ready)
            self._in_place += len(ready)
        self.progress(self._in_place, len(self.order))
        writer.write(ms.postcopy_discard(*self._unsent_page()) + ms.package(st))
        self.stats.started = time.perf_counter()
        await writer.drain()
        self._push = asyncio.create_task(self._push_all())

    def _place(self, chunks: list[tuple[int, bytes]]) -> None:
        assert self.ram_fd is not None
        for i, plain in chunks:
            view, off = memoryview(plain), i * CHUNK_SIZE
            view = view[: max(0, min(len(view), self.ram_length - off))]
            while view:
                n = os.pwrite(self.ram_fd, view, off)
                view, off = view[n:], off + n

    def _unsent_page(self) -> tuple[str, int, int]:
        # DISCARD needs a range; one the destination has nothing in is harmless.
        for name, sent in self._sent.items():
            k = sent.find(0)
            if k >= 0:
                return name, k * PAGE, PAGE
        raise ms.StreamError("every page was sent before the guest started")

    # -- writing -------------------------------------------------------------------------

    def _write(self, block: str, pages: list[tuple[int, bytes | memoryview | None]]) -> None:
        """One section of pages, marked sent in the same step (no await in here)."""
        sent = self._sent[block]
        todo = [(off, data) for off, data in pages if not sent[off // PAGE]]
        if not todo or self._ended or self._writer is None:
            return
        for off, _ in todo:
            sent[off // PAGE] = 1
        self._writer.write(b"".join(ms.page_section(self.saved.ram_section_id, block, todo)))
        self.stats.pages += len(todo)
        self.stats.zero_pages += sum(1 for _, d in todo if d is None)

    def _send_chunk(self, index: int, plain: bytes | None, first: Sequence[int] = ()) -> None:
        """Chunk ``index``: the pages in ``first`` (zero or not), then its other pages with data."""
        base = index * CHUNK_SIZE
        wanted = set(first)
        pages = [(p * PAGE, self._page(plain, p * PAGE - base)) for p in first]
        if plain is not None:
            for off in range(0, len(plain), PAGE):
                if (base + off) // PAGE not in wanted and (data := self._page(plain, off)) is not None:
                    pages.append((base + off, data))
        self._write(self.ram_block, pages)
        if not self._chunk_done[index]:
            self._chunk_done[index] = 1
            # Only chunks with data count: a zero chunk a fault asked for is no part of the total.
            if index in self._listed:
                self._in_place += 1
                self.progress(self._in_place, len(self.order))

    @staticmethod
    def _page(plain: bytes | None, off: int) -> bytes | None:
        # Slices of bytes compare with memcmp; memoryviews compare byte by byte (30x slower).
        if plain is None or off >= len(plain):
            return None
        page = plain[off : off + PAGE]
        if len(page) < PAGE:  # a short last chunk: RAM sizes are whole pages, so never in practice
            page += bytes(PAGE - len(page))
        return None if page == _ZERO_PAGE else page

    # -- fetching --------------------------------------------------------------------------

    def _chunk(self, index: int, urgent: bool) -> asyncio.Task[bytes | None]:
        """One fetch per chunk and kind at a time, shared by faults and the push.

        A fault on a chunk the push is fetching asks again, urgently: the fetch
        below joins the push's request and raises it ahead of the bulk it
        queues with, instead of waiting its turn behind it.
        """
        own = self._faulting if urgent else self._fetching
        task = own.get(index) or (None if urgent else self._faulting.get(index))
        if task is None:
            task = asyncio.create_task(self._fetch_retrying(index, urgent))
            own[index] = task
            task.add_done_callback(lambda t, i=index: own.pop(i, None))
        return task

    async def _fetch_retrying(self, index: int, urgent: bool) -> bytes | None:
        """A chunk, however long it takes: a guest waiting on it has nothing else to do."""
        t0 = time.monotonic()
        tries = 0
        while True:
            try:
                plain = await self.fetch(index, urgent or self._hurry)
                self.failure = None
                self._waits.arrived(index)
                return plain
            except Exception as raw:  # noqa: BLE001 - any error ending this task would freeze the guest
                e = raw if isinstance(raw, IsrError) else ChunkUnavailable(
                    f"reading guest memory chunk {index} failed: {type(raw).__name__}: {raw}")
                if not isinstance(raw, IsrError) and tries == 0:
                    log.warning("%s; trying again", e.message)
                self.failure = e
                self._waits.failed(index, t0, e)
                if isinstance(e, ChunkSlow):
                    continue  # still coming: asking again waits on the request in flight
                await asyncio.sleep(_RETRY[min(tries, len(_RETRY) - 1)])
                tries += 1

    # -- the return path -------------------------------------------------------------------

    async def _read_return_path(self, reader: asyncio.StreamReader) -> None:
        assert self._shut is not None
        last: str | None = None
        try:
            while True:
                kind, n = ms.RP_HEADER.unpack(await reader.readexactly(ms.RP_HEADER.size))
                msg = ms.parse_rp(kind, await reader.readexactly(n))
                if isinstance(msg, PageRequest):
                    last = msg.block or last
                    if last not in self._sent:
                        raise ms.StreamError(f"QEMU asked for a page of unknown RAM block {last!r}")
                    self.stats.requests += 1
                    self._last_request = time.monotonic()
                    self._spawn(self._serve(last, msg, time.perf_counter()))
                elif kind == ms.RP_PONG:
                    fut = self._pongs.pop(int(msg), None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif kind == ms.RP_SHUT:
                    if not self._shut.done():
                        self._shut.set_result(int(msg))
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ms.StreamError) as e:
            why = e if isinstance(e, ms.StreamError) else "it closed the stream"
            err = QemuError(f"QEMU gave up restoring guest memory: {why}")
            for fut in [self._shut, *self._pongs.values()]:
                if not fut.done():
                    fut.set_exception(err)
                    fut.exception()

    async def _serve(self, block: str, req: PageRequest, t0: float) -> None:
        sent = self._sent[block]
        first = list(range(req.offset // PAGE, (req.offset + max(req.length, 1) + PAGE - 1) // PAGE))
        if any(p >= len(sent) for p in first):
            log.warning("QEMU asked for pages beyond RAM block %s", block)
            return
        if all(sent[p] for p in first):
            return  # already on its way (the push, or another thread's fault)
        if block != self.ram_block:
            pages = self.saved.pages.get(block, {})
            self._write(block, [(p * PAGE, pages.get(p * PAGE)) for p in first])
        else:
            per = CHUNK_SIZE // PAGE
            for index in sorted({p // per for p in first}):
                plain = await self._chunk(index, urgent=True)
                if not self._chunk_done[index]:
                    self.stats.requested_chunks += 1
                    self.touched.append(index)
                    self._send_chunk(index, plain, [p for p in first if p // per == index])
                else:  # the chunk went meanwhile; a zero page asked for did not
                    self._write(block, [(p * PAGE, None) for p in first if p // per == index])
        self.stats.fault_seconds.append(time.perf_counter() - t0)

    # -- the background push ---------------------------------------------------------------

    async def _push_all(self) -> None:
        assert self._writer is not None
        pending: list[tuple[int, asyncio.Task[bytes | None]]] = []
        todo = iter(self.order)
        grace = time.monotonic() + _START_GRACE
        while not self._hurry and time.monotonic() < grace:
            await asyncio.sleep(_QUIET)
        try:
            while True:
                while len(pending) < self.window:
                    i = next(todo, None)
                    if i is None:
                        break
                    if not self._chunk_done[i]:
                        pending.append((i, self._chunk(i, urgent=False)))
                if not pending:
                    break
                # Low priority: while the guest faults, its pages go first.
                while not self._hurry and time.monotonic() - self._last_request < _QUIET:
                    await asyncio.sleep(_QUIET)
                i, task = pending.pop(0)
                plain = await task
                if not self._chunk_done[i]:
                    self.stats.pushed_chunks += 1
                    self._send_chunk(i, plain)
                await self._writer.drain()
            # Every page with data is sent: end the stream. QEMU then stops
            # trapping faults, and untouched zero pages read as zeros.
            self._ended = True
            self._writer.write(ms.end_of_stream(self.saved.ram_section_id))
            await self._writer.drain()
            self.stats.resident = time.perf_counter() - self.stats.started
        finally:
            for _, t in pending:
                t.cancel()

    # -- ending --------------------------------------------------------------------------

    async def finish(self, *, hurry: bool = True, stall_timeout: float | None = 120.0) -> PostcopyStats:
        """Until QEMU has all of guest RAM, then its word on it.

        ``hurry``: what is left is decoded at full priority from now on (a
        suspend waits for it). Raises ChunkUnavailable if no chunk arrived for
        ``stall_timeout`` seconds while one was failing (the guest runs on;
        a later call can still finish), and QemuError if QEMU gave up.
        Several callers may wait at once.
        """
        assert self._push is not None and self._shut is not None
        self._hurry = self._hurry or hurry
        last_progress, seen = time.monotonic(), self.stats.pages
        while not self._push.done() and not self._shut.done():
            await asyncio.wait({self._push, self._shut}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if self.stats.pages != seen or self.failure is None:
                last_progress, seen = time.monotonic(), self.stats.pages
            elif stall_timeout is not None and time.monotonic() - last_progress > stall_timeout:
                why = self.failure.message if isinstance(self.failure, IsrError) else str(self.failure)
                raise ChunkUnavailable(f"guest memory is not all here yet and stopped coming in ({why})",
                                       hint="the guest runs on; try again once the home server or a "
                                            "medium with the parcel is reachable")
        if self._push.done() and not self._push.cancelled() and self._push.exception() is not None:
            e = self._push.exception()
            if not isinstance(e, (ConnectionError, OSError)):
                raise e  # type: ignore[misc]
            # The stream broke: QEMU's side of it (on the return path) says why.
            await asyncio.wait({self._shut}, timeout=5)
            if not self._shut.done():
                raise QemuError(f"the memory stream to QEMU broke: {e}")
        code = await asyncio.wait_for(asyncio.shield(self._shut), 30)
        if code:
            raise QemuError("QEMU reported an error at the end of the memory restore")
        if self.stats.completed is None:
            self.stats.completed = time.perf_counter() - self.stats.started
        return self.stats

    @property
    def done(self) -> bool:
        """QEMU has all of guest RAM (it said so)."""
        return self._shut is not None and self._shut.done() and not self._shut.cancelled() \
            and self._shut.exception() is None and self._shut.result() == 0

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reaped)

    def _reaped(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("post-copy task failed: %s", task.exception())

    async def close(self) -> None:
        tasks = [*self._tasks, *self._fetching.values(), *self._faulting.values()] + \
            ([self._push] if self._push else [])
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._shut is not None and not self._shut.done():
            self._shut.cancel()
