"""A LAN peer that sends bad data is banned for the session (issue 12, part 6).

The bad peer is a real libtorrent session whose copy of a pack rotted after its
check, so it serves pieces that fail the torrent's merkle hashes. libtorrent
refuses those pieces and bans the peer in that torrent; the site's session then
bans it everywhere: no pack connects to it again and PeerSource stops asking it,
and the ban is counted.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from test_peer_vanish import PackHome
from test_torrent_pack import write_pack

from isrsync.pack import PackInfo
from isrsync.swarm.peer import PeerSource
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent

LOOP = SwarmSettings(interface="127.0.0.1")


def rot(at: Path, good: Path, info: PackInfo) -> None:
    data = good.read_bytes()
    with open(at, "r+b") as f:
        for e in info.entries:
            f.seek(e.offset + 10)
            f.write(bytes(b ^ 0xFF for b in data[e.offset + 10:e.offset + 20]))


async def test_a_peer_sending_bad_data_is_banned_for_the_session(tmp_path: Path) -> None:
    made = [write_pack(tmp_path / f"made-{k}") for k in range(2)]
    torrents = {info.pack_id: await make_torrent(path, info.pack_id) for info, path in made}
    bad_peer = await SwarmSession(tmp_path / "bad", LOOP).start()
    site = await SwarmSession(tmp_path / "site", LOOP).start()
    home = PackHome([i for i, _ in made], {p: t.data for p, t in torrents.items()})
    source = PeerSource(site, home, uuid.uuid4(), read_timeout=2.0)  # type: ignore[arg-type]
    try:
        (first, first_path), (second, _) = made
        for info, path in made:
            bad_peer.file_of(info.pack_id).write_bytes(path.read_bytes())
            await bad_peer.add(torrents[info.pack_id])  # a full check (seed mode would recheck lazily)
        for info, _ in made:
            for _ in range(100):
                if await bad_peer.is_seed(info.pack_id):
                    break
                await asyncio.sleep(0.05)
        # Every chunk of the first pack then rots at the peer: it serves pieces that fail.
        await asyncio.to_thread(rot, bad_peer.file_of(first.pack_id), first_path, first)
        source.add_peer("127.0.0.1", bad_peer.port)

        got = await source.get_many([e.tag for e in first.entries])
        assert got == {}, "bytes that failed libtorrent's check came out"
        for _ in range(100):
            if site.stats.banned:
                break
            await asyncio.sleep(0.05)
        assert site.stats.hash_failures >= 1
        assert site.stats.banned == 1 and site.banned == {("127.0.0.1", bad_peer.port)}
        assert source.peers == []

        # The second pack is intact at the peer, but the site no longer talks to it.
        assert await source.get_many([e.tag for e in second.entries]) == {}
        assert not site.has(second.pack_id) or await site.peers(second.pack_id) == 0
    finally:
        await source.close()
        await site.close()
        await bad_peer.close()
