"""How much to ask a source at once, how long to wait for it, and who goes first (issue 15).

A fixed timeout cannot fit every link: 30 s is four 128 KiB chunks at 100 Kb/s
and ten thousand at 1 Gb/s. A request that outlived it was cancelled, counted as
a failure and asked again, so a slow link carried the same bytes twice. Here each
source's link is measured (:class:`LinkMeter`: its rate over the time it was
busy, and its round trip), a request's deadline grows with the bytes ahead of it
over that rate, and requests are cut so that none is larger than a few seconds
of the link.

Priority: the guest waits on a fault (a page of memory, a disk read it has not
got); nobody waits on bulk (the post-copy push, the hoard, prefetch). A bulk
request waits while a fault is in flight to the same source, and bulk keeps at
most about one bandwidth-delay product in flight, so that a fault queues behind
at most that much, not behind a megabyte of hoard in the link's buffers.

A guest's faults come in runs (a resume touches page after page, a program
start reads file after file), each fault issued a moment after the last one is
served. Admitting bulk in those moments put one bulk request ahead of nearly
every fault of the run: the paper harness measured ``auto`` (demand plus
prefetch and hoard) resuming a Debian guest 45 % slower than pure demand at
10 Mb/s, with 10 MB more crossing the link before the guest answered. So bulk
also waits until the source has been free of faults for a short quiet time
(:meth:`LinkMeter.quiet`, a couple of chunks' worth of the link): it fills the
gaps between runs of faults, not those within one.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass
from typing import Callable

from ..chunk import CHUNK_SIZE


class Priority(enum.IntEnum):
    """Who waits for a fetch: the guest (FAULT) or nobody in particular (BULK)."""

    FAULT = 0  # a page fault or a disk demand miss: the guest is stalled on it
    BULK = 1  # the post-copy push, prefetch, the background hoard


@dataclass(frozen=True)
class Pacing:
    """The knobs; one set per registry."""

    floor: float = 2.0  # no deadline is shorter: a loaded server takes a moment even for a byte
    slack: float = 3.0  # the deadline is this many times the expected time (the rate drifts)
    piece_seconds: float = 4.0  # a fault's request is cut to about this much of the link
    probe_bytes: int = 2 * CHUNK_SIZE  # per request until the source has answered once (rate unknown)
    pipeline: int = 2  # requests of one fetch in flight to one source at a time
    patience: float = 5.0  # a caller told a chunk is slow is told again after this long, not at once
    # A source that took this long to say it lacks chunks (a LAN peer waiting out its
    # idle timeout) is not asked for the rest of that fetch: each further piece would
    # cost as much again. One that lacks them at once (a medium) is asked on.
    miss_wait: float = 0.5
    # Bulk waits until no fault has been in flight for this many full chunks' time on
    # the link (see the module's docstring), and never longer than quiet_max seconds.
    quiet_chunks: float = 2.0
    quiet_max: float = 5.0


@dataclass
class LinkMeter:
    """A source's delivery rate and round trip, learned from its answers.

    The rate is bytes over *busy* time (time with at least one request in
    flight), so that concurrent requests sharing a link are not each taken for
    the whole link's speed. The round trip is learned from requests that had
    the link to themselves: their time less their bytes over the rate.
    """

    rate: float | None = None  # bytes per second; None until something came
    rtt: float | None = None  # seconds
    chunk: float = float(CHUNK_SIZE)  # mean bytes of one chunk from this source
    inflight: int = 0  # bytes asked for and not yet answered
    _active: int = 0
    _mark: float = 0.0
    _starts: int = 0
    _b: float = 0.0
    _t: float = 0.0
    decay: float = 0.8  # weight of the past in the rate estimate, per answer

    def begin(self, nbytes: int, now: float | None = None) -> "Request":
        now = time.monotonic() if now is None else now
        if self._active == 0:
            self._mark = now
        self._active += 1
        self._starts += 1
        self.inflight += nbytes
        return Request(self, nbytes, now, self.inflight, self._active == 1, self._starts)

    def _end(self, req: "Request", got: int, chunks: int, now: float) -> None:
        self._active -= 1
        self.inflight -= req.nbytes
        interval, self._mark = now - self._mark, now
        if got <= 0:
            # Nothing came: this time says nothing of the rate (a failure is judged elsewhere).
            return
        self._b = self.decay * self._b + got
        self._t = self.decay * self._t + max(interval, 1e-6)
        self.rate = self._b / self._t
        if chunks:
            self.chunk = 0.8 * self.chunk + 0.2 * (got / chunks)
        if req.alone and self._starts == req.serial:
            # Nobody shared the link with it: what is not transfer time is the round trip.
            sample = max(5e-4, (now - req.started) - got / self.rate)
            self.rtt = sample if self.rtt is None else 0.8 * self.rtt + 0.2 * sample

    @property
    def measured(self) -> bool:
        return self.rate is not None

    def bdp(self) -> float:
        """Bytes of one bandwidth-delay product (0 until measured)."""
        if self.rate is None:
            return 0.0
        return self.rate * (self.rtt if self.rtt is not None else 0.0)

    def bulk_budget(self) -> float:
        """Bytes of bulk allowed in flight: one BDP, but never less than one full chunk.

        A full (128 KiB) chunk, not the mean one: that is what a fault may be kept
        waiting for, and compressed chunks (memory compresses to about a quarter)
        then go several to a request, so bulk is not one round trip per small chunk.
        """
        return max(float(CHUNK_SIZE), self.chunk, self.bdp())

    def quiet(self, pacing: Pacing) -> float:
        """Seconds bulk waits after the last fault: a few full chunks' link time (0 until measured).

        That long is what one bulk request can make a fault wait, so a fault that
        follows sooner is worth waiting for, and one that follows later can wait
        behind bulk no longer than it would have waited for the quiet time.
        """
        if self.rate is None:
            return 0.0
        return min(pacing.quiet_max, pacing.quiet_chunks * CHUNK_SIZE / self.rate)

    def eta(self, nbytes: float) -> float | None:
        """Seconds until ``nbytes`` more are in, at the measured rate (None if unmeasured)."""
        if self.rate is None:
            return None
        return (self.rtt or 0.0) + nbytes / self.rate


@dataclass
class Request:
    """One request in flight to a source, as the meter sees it."""

    meter: LinkMeter
    nbytes: int  # estimated bytes asked for
    started: float
    ahead: int  # bytes in flight to the source when it started, its own included
    alone: bool
    serial: int
    closed: bool = False

    def end(self, got: int = 0, chunks: int = 0, now: float | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.meter._end(self, got, chunks, time.monotonic() if now is None else now)


def deadline(meter: LinkMeter, ahead: float, pacing: Pacing) -> float | None:
    """Seconds a request with ``ahead`` bytes before and including it may take, or None if the
    source has not been measured (its first answers are bounded by the source timeout)."""
    eta = meter.eta(ahead)
    if eta is None:
        return None
    return max(pacing.floor, pacing.slack * eta)


def piece_bytes(meter: LinkMeter, priority: Priority, pacing: Pacing) -> float:
    """How many bytes one request to this source should ask for."""
    if priority is Priority.BULK:
        return meter.bulk_budget()
    if meter.rate is None:
        return float(pacing.probe_bytes)
    return max(meter.chunk, meter.rate * pacing.piece_seconds)


def split(tags: list[bytes], meter: LinkMeter, priority: Priority, pacing: Pacing) -> list[list[bytes]]:
    """``tags`` cut into requests of about :func:`piece_bytes` each (at least one chunk each)."""
    per = max(1, int(piece_bytes(meter, priority, pacing) // max(meter.chunk, 1.0)))
    return [tags[i : i + per] for i in range(0, len(tags), per)]


class Gate:
    """Admission to one source: faults go at once; bulk waits for faults, a quiet time and room.

    ``priority`` is read each time the request is looked at, so that a bulk fetch
    a fault has joined (the hoard was already fetching the chunk the guest now
    reads) stops waiting as soon as it is promoted.
    """

    def __init__(self, meter: LinkMeter, pacing: Pacing | None = None) -> None:
        self.meter = meter
        self.pacing = pacing or Pacing()
        self.faults = 0  # fault requests in flight
        self.bulk = 0  # bulk bytes in flight
        self.last_fault = -math.inf  # monotonic time the last fault request ended
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def _quiet_left(self, now: float) -> float:
        return self.last_fault + self.meter.quiet(self.pacing) - now

    def _room(self, nbytes: int) -> bool:
        # One bulk request always may go when none is in flight, however large
        # its chunks: the budget only says how many may share the link.
        return (self.faults == 0 and self._quiet_left(time.monotonic()) <= 0
                and (self.bulk == 0 or self.bulk + nbytes <= self.meter.bulk_budget()))

    async def enter(self, priority: Callable[[], Priority], nbytes: int) -> Priority:
        """Wait for admission; returns the priority it went in with (pass it to :meth:`leave`)."""
        while priority() is Priority.BULK and not self._room(nbytes):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            self._wake_after_quiet()
            await fut
        p = priority()
        if p is Priority.FAULT:
            self.faults += 1
        else:
            self.bulk += nbytes
        return p

    def leave(self, priority: Priority, nbytes: int) -> None:
        if priority is Priority.FAULT:
            self.faults -= 1
            self.last_fault = time.monotonic()
        else:
            self.bulk -= nbytes
        self.wake()

    def _wake_after_quiet(self) -> None:
        # Nothing else wakes a bulk waiter when the quiet time simply runs out.
        left = self._quiet_left(time.monotonic())
        if self.faults or left <= 0:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(left, self.wake)

    def wake(self) -> None:
        self._timer = None
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)


def estimate(tags: list[bytes], meter: LinkMeter) -> int:
    return int(math.ceil(len(tags) * meter.chunk))
