"""Work a running parcel does in the background, chosen by its transfer policy.

Each piece is an object with a ``run`` coroutine that the runtime starts after
the guest runs and cancels before a suspend. What runs is decided once, by
:func:`background_for`, from the policy's properties, not by tests of its name
scattered over the runtime.

* :class:`TraceHoard` (policies that prefetch): the chunks the previous session
  touched, in the order it touched them, then everything else, at low priority.
* :class:`Trickle` (whenever the server is reachable): dirty chunks that have
  settled go up within a rate cap, so a suspend sends only the residue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..chunk import CHUNK_SIZE
from ..errors import IsrError
from ..manifest import Manifest
from .disk import ParcelDisk
from .policy import Policy
from .session import ParcelSession

log = logging.getLogger("isrsync.background")

Events = Callable[[str, dict[str, Any]], None]


class BackgroundWork(Protocol):
    name: str

    async def run(self) -> None:
        """Work until done or cancelled. An IsrError ends the work quietly (it is only an optimisation)."""


@dataclass
class TraceHoard:
    """Trace order first (what the last session touched), then the rest slowly."""

    disk: ParcelDisk
    base: Manifest
    events: Events
    batch: int = 16
    # Low priority: pauses between batches yield to demand misses. The trace is
    # what the guest will want soon, so it goes faster than the rest.
    trace_pause: float = 0.05
    hoard_pause: float = 0.2
    name: str = "hoard"

    def order(self) -> list[int]:
        assert self.base.keyring is not None
        order = list(dict.fromkeys(self.base.trace))
        seen = set(order)
        return order + [i for i in range(len(self.base.keyring)) if i not in seen]

    async def run(self) -> None:
        order, traced = self.order(), len(set(self.base.trace))
        try:
            for k in range(0, len(order), self.batch):
                await self.disk.prefetch(order[k : k + self.batch])
                await asyncio.sleep(self.trace_pause if k < traced else self.hoard_pause)
        except IsrError as e:
            log.info("background hoard stopped: %s", e)
            return
        self.events("hoarded", {"message": f"the whole parcel is in this site's cache ({len(order)} chunks)",
                                "chunks": len(order)})


@dataclass
class Trickle:
    """Upload dirty chunks that have not changed for ``settle`` seconds, at most ``rate`` bytes/s."""

    disk: ParcelDisk
    session: ParcelSession
    settle: float = 30.0
    rate: float = 8 << 20
    name: str = "trickle"
    _seen: dict[int, object] = field(default_factory=dict)
    _dirty_since: dict[int, float] = field(default_factory=dict)

    def settled(self, now: float) -> list[bytes]:
        """Tags of dirty chunks unchanged for ``settle`` seconds that the server does not have yet."""
        dirty = self.disk.dirty
        for i, r in list(dirty.items()):
            if self._seen.get(i) is not r:
                self._seen[i] = r
                self._dirty_since[i] = now
        tags = [dirty[i].tag for i, t in self._dirty_since.items()
                if now - t >= self.settle and i in dirty and not dirty[i].is_zero]
        return [t for t in dict.fromkeys(tags) if t not in self.session.staged_tags]

    async def run(self) -> None:
        period = min(5.0, self.settle)
        per_round = max(1, int(self.rate * period // CHUNK_SIZE))
        try:
            while True:
                await asyncio.sleep(period)
                todo = self.settled(time.monotonic())
                if todo:
                    await self.session.upload_settled(todo[:per_round])
        except IsrError as e:
            log.info("trickle paused: %s", e)


def background_for(policy: Policy, *, online: bool, disk: ParcelDisk, session: ParcelSession, events: Events,
                   trickle_settle: float = 30.0, trickle_rate: float = 8 << 20) -> list[BackgroundWork]:
    """What runs while the guest runs, under ``policy``."""
    work: list[BackgroundWork] = []
    if policy.prefetches:
        work.append(TraceHoard(disk, session.base, events))
    if online:  # offline, there is nowhere to trickle to; the next sync commits it all
        work.append(Trickle(disk, session, trickle_settle, trickle_rate))
    return work


class Tasks:
    """The background tasks of one run: started together, cancelled together."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task] = []

    def start(self, *coros: Any) -> None:
        self._tasks += [asyncio.create_task(c) for c in coros]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
