"""The home server (a real `isrsync serve` on loopback) as a web seed with the user's
credentials: a site with no LAN peer still gets verified pieces through libtorrent,
and the torrent made at upload round-trips through the server."""

from __future__ import annotations

import uuid
from pathlib import Path

from isrsync.store.http import HttpStore
from isrsync.swarm.peer import PeerSource
from isrsync.swarm.session import SwarmSession, SwarmSettings, WebSeed
from isrsync.swarm.torrent import load_torrent, make_torrent
from test_torrent_pack import write_pack

from isrsync.site.upload import upload_packs


async def test_web_seed_with_credentials(live_server, tmp_path: Path) -> None:
    token = live_server.add_user("alice")
    store = HttpStore(live_server.url, token, retries=1, backoff=0.05)
    site = None
    try:
        info, path = write_pack(tmp_path / "made")
        pid = uuid.uuid4()
        await store.create_parcel(pid, "ws")
        await upload_packs(store, pid, [(info, path)])  # the torrent goes up beside the pack
        raw = await store.get_torrent(pid, info.pack_id)
        assert raw == (await make_torrent(path, info.pack_id)).data
        t = load_torrent(info.pack_id, raw, size=info.size)
        site = await SwarmSession(tmp_path / "site", SwarmSettings(interface="127.0.0.1")).start()
        url = WebSeed.packs_url(live_server.url, pid)
        await site.add(t, web_seed=WebSeed(url, token))
        e = info.entries[3]
        got = await site.read(info.pack_id, e.offset, e.length, timeout=10)
        assert got == path.read_bytes()[e.offset:e.offset + e.length]
        assert live_server.pack_bytes_sent() > 0
    finally:
        if site is not None:
            await site.close()
        await store.close()


async def test_a_whole_pack_through_the_web_seed_costs_one_copy(live_server, tmp_path: Path) -> None:
    """A hoard's leader (isrsync/swarm/bulk.py) fetches whole packs with the server as web
    seed: the server must send each byte about once, or the swarm saves nothing."""
    import asyncio

    token = live_server.add_user("alice")
    store = HttpStore(live_server.url, token, retries=1, backoff=0.05)
    site = None
    try:
        info, path = write_pack(tmp_path / "made", n=30)
        pid = uuid.uuid4()
        await store.create_parcel(pid, "ws")
        await upload_packs(store, pid, [(info, path)])
        t = load_torrent(info.pack_id, await store.get_torrent(pid, info.pack_id), size=info.size)
        site = await SwarmSession(tmp_path / "site", SwarmSettings(interface="127.0.0.1")).start()
        before = live_server.pack_bytes_sent()
        await site.add(t, web_seed=WebSeed(WebSeed.packs_url(live_server.url, pid), token))
        site.want_all(info.pack_id, 1)
        for _ in range(600):
            have, size = await site.progress(info.pack_id)
            if have == size:
                break
            await asyncio.sleep(0.05)
        assert have == size
        # Verified pieces may still sit in libtorrent's store buffer: the pack file is whole
        # once the session holds the pack whole (as a hoard does before plain reads).
        await site.hold_whole(info.pack_id)
        assert site.file_of(info.pack_id).read_bytes() == path.read_bytes()
        sent = live_server.pack_bytes_sent() - before
        print(f"pack {info.size} bytes, server sent {sent} ({sent / info.size:.2f}x), "
              f"hash failures {site.stats.hash_failures}")
        assert sent < info.size * 1.1
    finally:
        if site is not None:
            await site.close()
        await store.close()
