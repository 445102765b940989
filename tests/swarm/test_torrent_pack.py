"""Pack torrents: v2, the chosen piece size, deterministic, verified against the pack by
libtorrent, and fetched from a seeding session; corrupted pieces never come out."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from isrsync.chunk import encode
from isrsync.errors import FormatError, IntegrityError
from isrsync.pack import PackWriter
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import PIECE_SIZE, load_torrent, make_torrent

LOOP = SwarmSettings(interface="127.0.0.1")


def write_pack(where: Path, n: int = 12):
    where.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(32)
    tmp = where / "p.tmp"
    with open(tmp, "wb") as f:
        w = PackWriter(f)
        for i in range(n):
            e = encode(os.urandom(100_000 + i * 1000), secret)
            w.add(e.tag, e.data)
        info = w.finish()
    path = where / info.pack_id.hex()
    os.replace(tmp, path)
    return info, path


async def test_torrent_is_v2_deterministic_and_names_the_pack(tmp_path: Path) -> None:
    info, path = write_pack(tmp_path)
    a, b = await make_torrent(path, info.pack_id), await make_torrent(path, info.pack_id)
    assert a.data == b.data and a.info_hash == b.info_hash and len(a.info_hash) == 32
    assert a.piece_size == PIECE_SIZE and a.size == info.size
    assert b"creation date" not in a.data
    assert load_torrent(info.pack_id, a.data, size=info.size) == a
    with pytest.raises(IntegrityError):
        load_torrent(os.urandom(32), a.data)
    with pytest.raises(FormatError):
        load_torrent(info.pack_id, b"d1:xi1ee")


async def test_peer_fetch_and_corruption_never_accepted(tmp_path: Path) -> None:
    info, path = write_pack(tmp_path / "made")
    t = await make_torrent(path, info.pack_id)
    seeder = await SwarmSession(tmp_path / "seeder", LOOP).start()
    site = await SwarmSession(tmp_path / "site", LOOP).start()
    try:
        seeder.file_of(info.pack_id).write_bytes(path.read_bytes())
        await seeder.add(t)  # a full check: it then serves whatever is on disk
        for _ in range(100):
            if await seeder.is_seed(info.pack_id):
                break
            await asyncio.sleep(0.05)
        await site.add(t)
        await site.connect(info.pack_id, "127.0.0.1", seeder.port)
        data = path.read_bytes()
        good, bad = info.entries[0], info.entries[-1]
        assert await site.read(info.pack_id, good.offset, good.length, timeout=5) == \
            data[good.offset:good.offset + good.length]
        # The seeder's copy of the last chunk rots after its check: those pieces fail
        # libtorrent's merkle check at the site and never come out of read().
        with open(seeder.file_of(info.pack_id), "r+b") as f:
            f.seek(bad.offset + 10)
            f.write(bytes(b ^ 0xFF for b in data[bad.offset + 10:bad.offset + 20]))
        with pytest.raises(TimeoutError):
            await site.read(info.pack_id, bad.offset, bad.length, timeout=2)
        assert site.stats.hash_failures >= 1
    finally:
        await site.close()
        await seeder.close()
