"""Sites hoarding one parcel at once share one copy from the server (isrsync/swarm/bulk.py).

Real libtorrent sessions on loopback and the real in-memory Store; only discovery is
replaced (each site is told of the other, as its mDNS browser would). Two sites
prefetch the same two packs at once: every pack byte is read from the store once in
all, both sites end holding both packs whole, verified, and readable with no peer.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from test_torrent_pack import write_pack

from isrsync.store.memory import MemoryStore
from isrsync.swarm.bulk import leader, prefetch
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.pack_bytes = 0

    async def get_pack(self, parcel, pack_id, offset=0, length=None):  # type: ignore[no-untyped-def]
        data = await super().get_pack(parcel, pack_id, offset, length)
        self.pack_bytes += len(data)
        return data


@dataclass
class _Peer:
    site_id: uuid.UUID
    address: str
    port: int


@dataclass
class Site:
    """What prefetch uses of a LanSwarm: its id, session, store, and discovery's peers."""

    site_id: uuid.UUID
    session: SwarmSession
    store: MemoryStore
    others: list[_Peer] = field(default_factory=list)

    def peers_of(self, parcel: uuid.UUID) -> list[_Peer]:
        return self.others


def test_every_site_picks_the_same_leader_and_packs_spread() -> None:
    sites = [uuid.uuid4() for _ in range(4)]
    packs = [bytes([i]) * 32 for i in range(64)]
    picks = [leader(p, sites) for p in packs]
    assert picks == [leader(p, list(reversed(sites))) for p in packs]
    assert len(set(picks)) == 4  # 64 packs over 4 sites: each leads some


async def test_two_sites_prefetching_at_once_read_each_byte_once(tmp_path: Path) -> None:
    made = [write_pack(tmp_path / f"made-{k}", n=20) for k in range(2)]
    store = CountingStore()
    parcel = uuid.uuid4()
    await store.create_parcel(parcel, "vm")
    for info, path in made:
        await store.put_pack(parcel, info.pack_id, path)
        await store.put_torrent(parcel, info.pack_id, (await make_torrent(path, info.pack_id)).data)
    loop = SwarmSettings(interface="127.0.0.1")
    a = Site(uuid.uuid4(), await SwarmSession(tmp_path / "a", loop).start(), store)
    b = Site(uuid.uuid4(), await SwarmSession(tmp_path / "b", loop).start(), store)
    a.others = [_Peer(b.site_id, "127.0.0.1", b.session.port)]
    b.others = [_Peer(a.site_id, "127.0.0.1", a.session.port)]
    try:
        entries = [e for info, _ in made for e in info.entries]
        ra, rb = await asyncio.gather(prefetch(a, parcel, entries, linger=2.0),  # type: ignore[arg-type]
                                      prefetch(b, parcel, entries, linger=2.0))  # type: ignore[arg-type]
        assert ra.complete and rb.complete and ra.packs == rb.packs == 2
        assert ra.led + rb.led == 2
        total = sum(info.size for info, _ in made)
        assert store.pack_bytes == total, f"the store sent {store.pack_bytes / total:.2f} copies"
        for site in (a, b):
            for info, path in made:
                assert site.session.holds_whole(info.pack_id)
                e = info.entries[5]
                got = await site.session.read(info.pack_id, e.offset, e.length, timeout=2)
                assert got == path.read_bytes()[e.offset : e.offset + e.length]
    finally:
        await a.session.close()
        await b.session.close()
