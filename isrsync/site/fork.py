"""`isrsync fork`: this site's uncommitted state of a parcel becomes a parcel of its own.

Fenced changes (the lock was broken or taken elsewhere while this site had
work it had not committed) are kept and never merged into the parcel they
came from. A fork is how they are recovered: a new parcel, with its own id,
key and lock, whose version 1 is exactly what this site held, the disk
changes on top of their base and, when the local state has one, the memory
image saved with them (it always matches the disk it was saved with: a
resume drops it before the guest writes again). The original parcel and its
local state are not touched; `isrsync discard` drops the latter when the
user is done with it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from .. import manifest
from ..chunk import VerifiedChunk
from ..errors import UsageError
from ..keys import new_master_key
from ..store.base import CommitRequest
from .account import add_parcel_key
from .parcel import Site, boot_tags, fetch_missing, load_version, upload_cached
from .state import LocalStatus

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ForkResult:
    parcel: str  # the new parcel's id
    name: str
    version: int
    base: int  # the version of the original the local changes were on
    dirty_chunks: int
    memory_image: bool
    uploaded: int  # bytes of packs sent

    def to_json(self) -> dict:
        return dict(self.__dict__)


async def fork_parcel(site: Site, parcel: uuid.UUID, name: str, *, fetch_progress: Progress | None = None,
                      upload_progress: Progress | None = None) -> ForkResult:
    state = site.state(parcel)
    try:
        here = state.info()
        dirty = state.dirty()
        memory = state.load_memory()
        if here.status is LocalStatus.IDLE or here.base is None or (not dirty and memory is None):
            raise UsageError(f"this site holds no uncommitted changes of parcel {parcel}",
                             hint="`isrsync status` shows what this site keeps")
        base = await load_version(site, parcel, here.base, state)
    finally:
        state.close()
    assert base.keyring is not None
    ring = base.keyring.overlay(dirty)
    disk_and_boot = ring.tags() | boot_tags(base.vm)
    needed = disk_and_boot | (memory.tags() if memory is not None else set())
    # Chunks of the base this site never fetched come from the original's packs
    # on the server (still the user's to read, fenced or not).
    reg = site.registry(parcel)
    try:
        await fetch_missing(site.cache, reg, needed, fetch_progress)
    finally:
        await reg.close()

    new = uuid.uuid4()
    site.bundle = await add_parcel_key(site.store, site.acct, str(new), new_master_key())
    await site.store.create_parcel(new, name, base.vm.hardware_tag)
    # A big disk's keyring goes up as segments of the new parcel (under its own key).
    sealed = await asyncio.to_thread(manifest.seal, parcel=new, version=1, master_key=site.master_key(new),
                                     vm=base.vm, keyring=ring, memory=memory, site=site.host, time=time.time())
    segs = [VerifiedChunk(e.tag, e.data) for e in sealed.segments if e.data]
    if segs:
        await asyncio.to_thread(site.cache.put_verified, segs)
        disk_and_boot |= {c.tag for c in segs}
        needed |= {c.tag for c in segs}
    packs = await upload_cached(site, new, sorted(needed), strict=True, progress=upload_progress)
    lock = await site.store.acquire(new, site.holder())
    v = await site.store.commit(new, CommitRequest(
        epoch=lock.epoch, parent=0, manifest=sealed.raw, packs=[p.pack_id for p in packs],
        added=sorted(disk_and_boot),
        memory=sorted(memory.tags()) if memory is not None else [], release=True, site=site.site_id,
    ))
    return ForkResult(str(new), name, v.version, here.base, len(dirty), memory is not None,
                      sum(p.size for p in packs))
