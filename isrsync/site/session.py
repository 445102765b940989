"""The committed side of a run: which version it builds on, under which lock
epoch, what the trickle staged, and the three ways local state reaches the
server (suspend, sync, an offline suspend committed later).

Every commit goes through :meth:`ParcelSession.commit`, so the post-commit
reset (dirty rows, saved memory image, staged packs, status) exists once, and
a commit the server refuses for a stale epoch marks the local state FENCED
(kept, never merged) in the same place.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..errors import Conflict, UsageError
from ..manifest import Keyring, Manifest, MemoryImage, dirty_since, parse_header
from ..store.base import VersionInfo
from .control import run_is_live
from .disk import ParcelDisk
from .parcel import Site, commit_version, load_version, upload_cached
from .state import LocalStatus, ParcelState


@dataclass
class ParcelSession:
    site: Site
    parcel: uuid.UUID
    state: ParcelState
    base: Manifest
    epoch: int
    head: Manifest | None = None  # set when an older version was resumed: commits go on top of it
    staged: list[bytes] = field(default_factory=list)
    staged_tags: set[bytes] = field(default_factory=set)
    # An older version resumed: the head's number, its manifests loaded only when a commit
    # needs them. Loaded at resume they cost the guest's start a round of manifest fetches
    # over the link (1.1 s at 10 Mb/s, 4 s at 1 Mb/s in benchmarks/paper).
    head_version: int | None = None

    async def _parent(self, ring: Keyring, dirty: list[int]) -> tuple[Manifest, list[int]]:
        if self.head is None and self.head_version is not None:
            self.head = await load_version(self.site, self.parcel, self.head_version, self.state)
        if self.head is None:
            return self.base, dirty
        assert self.head.keyring is not None
        # On top of a later head than the base: what differs from the head is what changed.
        return self.head, dirty_since(self.head.keyring, ring)

    async def commit(self, ring: Keyring, dirty: list[int], memory: MemoryImage | None, trace: list[int], *,
                     release: bool, running: bool = False, done: list[int] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> VersionInfo:
        """Commit ``ring`` as the next version; ``done``: the dirty rows it covers (all if None);
        ``progress(bytes sent, bytes in all)`` follows the upload."""
        if self.state.status is LocalStatus.FENCED:
            await asyncio.to_thread(self.state.start_running, 0, 0, "")  # raises the fenced line
        parent, changed = await self._parent(ring, dirty)
        try:
            v = await commit_version(
                self.site, self.parcel, epoch=self.epoch, parent=parent, keyring=ring, dirty=changed,
                memory=memory, trace=trace, release=release, staged=self.staged, staged_tags=self.staged_tags,
                progress=progress,
            )
        except Conflict:
            # The lock was broken or taken elsewhere: keep everything here, refuse to run it.
            await asyncio.to_thread(self.state.fenced)
            raise
        await asyncio.to_thread(self.state.committed, v.version, released=release, running=running, done=done)
        self.head, self.head_version = None, None
        self.staged, self.staged_tags = [], set()
        return v

    async def chain(self, version: int) -> list[bytes]:
        """The encrypted manifests a reader needs to open ``version``: from its keyring base up."""
        (raw,) = await self.site.store.get_manifests(self.parcel, version, version)
        first = parse_header(raw).keyring_base
        older = await self.site.store.get_manifests(self.parcel, first, version - 1) if first < version else []
        return [*older, raw]

    async def rebase(self, version: int) -> Manifest:
        """After a sync: the committed version is the base the guest runs on now."""
        self.base = await load_version(self.site, self.parcel, version, self.state)
        return self.base

    async def save_locally(self, disk: ParcelDisk, memory: MemoryImage | None) -> None:
        """Everything a commit needs, durable in the local state, before the commit is tried."""
        await disk.flush()

        def save() -> None:
            self.state.save_memory(memory)
            self.state.save_trace(disk.stats.first_access)
            self.state.suspended_locally()

        await asyncio.to_thread(save)

    async def upload_settled(self, tags: list[bytes]) -> None:
        """The trickle: pack and stage chunks ahead of the commit that will name them."""
        for info in await upload_cached(self.site, self.parcel, tags, strict=False):
            self.staged.append(info.pack_id)
            self.staged_tags |= {e.tag for e in info.entries}
        # A durable write (fsync): never on the loop that serves the guest's disk.
        await asyncio.to_thread(self.state.stage, self.staged, self.staged_tags)


async def commit_offline_suspend(site: Site, parcel: uuid.UUID,
                                 progress: Callable[[int, int], None] | None = None) -> int:
    """Commit what this site kept of a parcel that no run holds; returns the version.

    A local suspend (the server was unreachable) commits with its memory
    image. A run that crashed, or was killed, commits its disk changes with
    no memory image: the guest boots on them next time (what it had in RAM
    is gone with the process). Either way only under the epoch the changes
    were made under: a broken lock fences them, kept and never merged.
    """
    state = site.state(parcel)
    try:
        here = state.info()
        crashed = here.status is LocalStatus.RUNNING
        if crashed and run_is_live(site.site_id, parcel):
            raise UsageError(f"parcel {parcel} is running here", hint="`isrsync sync` it once it has started")
        if here.status not in (LocalStatus.SUSPENDED_LOCAL, LocalStatus.RUNNING):
            if here.status is LocalStatus.FENCED:
                state.start_running(0, 0, "")  # raises the fenced line
            raise UsageError(f"parcel {parcel} has nothing to sync at this site")
        assert here.base is not None and here.epoch is not None
        base = await load_version(site, parcel, here.base, state)
        assert base.keyring is not None
        dirty = state.dirty()
        staged, staged_tags = state.staged()
        session = ParcelSession(site, parcel, state, base, here.epoch, staged=staged, staged_tags=staged_tags)
        memory = None if crashed else state.load_memory()
        v = await session.commit(base.keyring.overlay(dirty), list(dirty), memory,
                                 [] if crashed else state.load_trace(), release=True, progress=progress)
        return v.version
    finally:
        state.close()
