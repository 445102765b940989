"""The ``peer`` and ``peer-direct`` backends of the Source conformance suite: a PeerSource over
real libtorrent sessions, the second also with the seeder's direct path (direct.py).

A seeder session (another site's cache) seeds the packs of the chunks; the
source under test runs its own session, learns where each tag lives from a
:class:`MemoryStore` home (the pack index and the torrents beside the packs, as
`init` leaves them) and fetches pieces from the seeder over loopback TCP.

tests/ is rootless, so this module is imported by its unique name.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from sourcekit import Held, commit_chunks

from isrsync.pack import PackEntry, PackInfo
from isrsync.store.memory import MemoryStore
from isrsync.swarm.direct import DirectClient, DirectServer, SiteChunks
from isrsync.swarm.directfmt import Want
from isrsync.swarm.peer import PeerSource
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent

LOOPBACK = SwarmSettings(interface="127.0.0.1")


async def seed_packs(store: MemoryStore, parcel: uuid.UUID, packs: list[tuple[PackInfo, Path]],
                     seeder: SwarmSession) -> None:
    """Make each pack's torrent, keep it on the home, and seed the pack from ``seeder``'s storage."""
    for info, path in packs:
        t = await make_torrent(path, info.pack_id)
        await store.put_torrent(parcel, info.pack_id, t.data)
        await asyncio.to_thread(shutil.copyfile, path, seeder.file_of(info.pack_id))
        await seeder.add(t, seed=True)


class PeerHeld(Held):
    DIRECT = False  # whether the seeder also runs the direct path (PeerDirectHeld)

    def __init__(self, store: MemoryStore, parcel: uuid.UUID, packs: list[PackInfo], chunks: dict[bytes, bytes],
                 seeder: SwarmSession, source: PeerSource) -> None:
        self.store, self.parcel, self.packs, self.chunks = store, parcel, packs, chunks
        self.seeder, self.source = seeder, source

    @classmethod
    async def make(cls, chunks: dict[bytes, bytes], work: Path) -> PeerHeld:
        store = MemoryStore("alice")
        pid, infos = await commit_chunks(store, chunks, work)
        where = work / f"packs-{pid.hex[:8]}"
        seeder = await SwarmSession(work / "seeder", LOOPBACK).start()
        leecher = None
        try:
            await seed_packs(store, pid, [(i, where / i.pack_id.hex()) for i in infos], seeder)
            leecher = await SwarmSession(work / "leecher", LOOPBACK).start()
            source = PeerSource(leecher, store.client(), pid, name="lan", owns_swarm=True,
                                direct=DirectClient() if cls.DIRECT else None)
            source.add_peer("127.0.0.1", seeder.port)
        except BaseException:
            await seeder.close()
            if leecher is not None:
                await leecher.close()
            raise
        return cls(store, pid, infos, chunks, seeder, source)

    async def truncate(self, tag: bytes) -> None:
        # The home's pack index (only a hint) claims half the chunk.
        e = next(e for i in self.packs for e in i.entries if e.tag == tag)
        with self.store.home.lock:
            self.store.home.parcels[(self.store.user, self.parcel)].index[tag] = PackEntry(tag, e.pack_id, e.offset, e.length // 2)

    async def vanish(self) -> None:
        # The peer site goes away: its session closes its connections and stops listening.
        await self.seeder.close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self.seeder.close()


class Hangable:
    """A seeder's chunk lookup that, once hung, blocks its worker until released
    (a peer whose disk stopped answering; the peer's event loop, and the test's, run on)."""

    def __init__(self, inner: SiteChunks) -> None:
        self.inner = inner
        self.hung = False
        self.release = threading.Event()

    def lookup(self, wants: Sequence[Want]) -> list[bytes | None]:
        if self.hung:
            self.release.wait()
        return self.inner.lookup(wants)


class PeerDirectHeld(PeerHeld):
    """The peer backend with the seeder's direct path: demand misses are answered over it."""

    DIRECT = True
    direct: DirectServer
    lookup: Hangable

    @classmethod
    async def make(cls, chunks: dict[bytes, bytes], work: Path) -> PeerDirectHeld:
        held = await super().make(chunks, work)
        assert isinstance(held, PeerDirectHeld)
        try:
            held.lookup = Hangable(SiteChunks(None, held.seeder))
            held.direct = await DirectServer(held.lookup).start(["127.0.0.1"])
            held.source.add_peer("127.0.0.1", held.seeder.port, held.direct.port)
        except BaseException:
            await held.cleanup()
            raise
        return held

    async def vanish(self) -> None:
        await self.direct.close()
        await self.seeder.close()

    async def hang(self) -> None:
        self.lookup.hung = True

    async def cleanup(self) -> None:
        if hasattr(self, "lookup"):
            self.lookup.release.set()
        await super().cleanup()
        if hasattr(self, "direct"):
            await self.direct.close()
