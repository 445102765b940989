"""A LAN peer that vanishes mid-transfer does not stall the guest (issue 12, part 5).

The peer is a seeding session in its own process (seedproc.py), stopped at the
first piece of a 12 MB transfer, so the transfer is still going: SIGSTOP (the peer freezes, no
FIN, its connection stays open and silent) or SIGKILL (the kernel closes its
sockets). Either way the batch that was reading ends within the read timeout
with what arrived (right bytes only), and through the registry the next source
answers the rest.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
from test_torrent_pack import write_pack

from isrsync.pack import PackEntry, PackInfo
from isrsync.site.cache import SiteCache
from isrsync.site.sources import SourceKind
from isrsync.site.registry import SourceRegistry
from isrsync.swarm.peer import PeerSource
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent

LOOP = SwarmSettings(interface="127.0.0.1")
READ_TIMEOUT = 1.0
SLACK = 2.0  # a loaded 2-core machine: scheduling, the registry's own bookkeeping


class PackHome:
    """The two things PeerSource asks the home for: where a tag lives, and a pack's torrent."""

    def __init__(self, infos: list[PackInfo], torrents: dict[bytes, bytes]) -> None:
        self.where = {e.tag: e for i in infos for e in i.entries}
        self.torrents = torrents

    async def locate(self, parcel: uuid.UUID, tags: Iterable[bytes]) -> dict[bytes, PackEntry]:
        return {t: self.where[t] for t in tags if t in self.where}

    async def get_torrent(self, parcel: uuid.UUID, pack_id: bytes) -> bytes | None:
        return self.torrents.get(pack_id)


class Fallback:
    """The next source: an honest one holding every chunk."""

    kind = SourceKind.OTHER
    name = "fallback"

    def __init__(self, chunks: dict[bytes, bytes]) -> None:
        self.chunks = chunks
        self.asked: list[bytes] = []

    def cost(self) -> float:
        return 1000.0

    async def get_many(self, tags: list[bytes]) -> dict[bytes, bytes]:
        self.asked += tags
        return {t: self.chunks[t] for t in tags if t in self.chunks}

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["sigstop", "sigkill"])
async def test_peer_vanishing_mid_transfer_falls_through_in_bounded_time(tmp_path: Path, sig: signal.Signals) -> None:
    seed_dir = tmp_path / "peer"
    seed_dir.mkdir()
    infos, torrents, chunks = [], {}, {}
    for k in range(4):
        info, path = write_pack(tmp_path / f"made-{k}", n=30)
        t = await make_torrent(path, info.pack_id)
        shutil.copyfile(path, seed_dir / path.name)
        (seed_dir / f"{path.name}.torrent").write_bytes(t.data)
        infos.append(info)
        torrents[info.pack_id] = t.data
        blob = path.read_bytes()
        chunks.update((e.tag, blob[e.offset:e.offset + e.length]) for e in info.entries)
    tags = list(chunks)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    peer = await asyncio.create_subprocess_exec(sys.executable, str(Path(__file__).with_name("seedproc.py")),
                                                str(seed_dir), stdout=asyncio.subprocess.PIPE, env=env)
    site = await SwarmSession(tmp_path / "site", LOOP).start()
    source = PeerSource(site, PackHome(infos, torrents), uuid.uuid4(), owns_swarm=True,  # type: ignore[arg-type]
                        read_timeout=READ_TIMEOUT)
    cache = SiteCache(tmp_path / "cache")
    try:
        assert peer.stdout is not None
        line = await asyncio.wait_for(peer.stdout.readline(), 30)
        source.add_peer("127.0.0.1", int(line))

        reading = asyncio.ensure_future(source.get_many(tags))
        deadline = time.monotonic() + 20
        while site.stats.pieces_read < 1:  # mid-transfer: some pieces in, most not
            assert time.monotonic() < deadline and not reading.done(), "the transfer never started"
            await asyncio.sleep(0.01)
        os.kill(peer.pid, sig)
        stopped = time.monotonic()
        got = await asyncio.wait_for(reading, READ_TIMEOUT + SLACK + 5)
        took = time.monotonic() - stopped
        assert took < READ_TIMEOUT + SLACK, f"the read hung on in {took:.1f} s after the peer went"
        assert len(got) < len(tags), "the peer sent everything before it went: cut it earlier"
        assert all(chunks[t] == data for t, data in got.items())

        # Through the registry: the peer answers what this site holds, the next source the rest.
        registry = SourceRegistry(cache)
        fallback = Fallback(chunks)
        registry.add(source)
        registry.add(fallback)
        t0 = time.monotonic()
        assert await asyncio.wait_for(registry.fetch_many(tags), 30) == chunks
        assert time.monotonic() - t0 < READ_TIMEOUT + SLACK
        lan, nxt = registry.stats()[source.name], registry.stats()[fallback.name]
        assert lan.bad == 0 and lan.hits >= len(got) and lan.hits + nxt.hits == len(tags)
        assert set(fallback.asked) <= set(tags) - set(got)
    finally:
        if peer.returncode is None:
            peer.send_signal(signal.SIGCONT)
            peer.kill()
        await peer.wait()
        await source.close()
        cache.close()
