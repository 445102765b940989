"""Piece size of pack torrents (issue 12, part 1): torrent size, hashing time and
bytes fetched per demand miss for candidate piece sizes.

A pack of real encoded chunks (half incompressible, half compressible, so lengths
vary) is written; for each piece size the torrent is made with libtorrent
(isrsync.swarm.torrent), and every chunk of the pack is a "miss": the bytes a miss
fetches are the pieces covering (offset, length), exact from the pack's index.
A few real misses are then timed through two SwarmSessions on loopback.

    PYTHONPATH=. python benchmarks/torrent_pieces.py [--mib 64] [--misses 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from isrsync.chunk import CHUNK_SIZE, encode
from isrsync.pack import PackWriter
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent_sync

SIZES = [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20]


def write_pack(where: Path, mib: int):
    secret = os.urandom(32)
    tmp = where / "pack.tmp"
    with open(tmp, "wb") as f:
        w = PackWriter(f)
        i = 0
        while w.size < mib << 20:
            raw = os.urandom(CHUNK_SIZE) if i % 2 else os.urandom(CHUNK_SIZE // 3) + bytes(CHUNK_SIZE - CHUNK_SIZE // 3)
            e = encode(raw, secret)
            w.add(e.tag, e.data)
            i += 1
        info = w.finish()
    path = where / info.pack_id.hex()
    os.replace(tmp, path)
    return info, path


async def timed_misses(torrent, info, path: Path, n: int) -> list[float]:
    st = SwarmSettings(interface="127.0.0.1")
    with tempfile.TemporaryDirectory() as a_dir, tempfile.TemporaryDirectory() as b_dir:
        a = await SwarmSession(a_dir, st).start()
        b = await SwarmSession(b_dir, st).start()
        try:
            Path(a.file_of(info.pack_id)).write_bytes(path.read_bytes())
            await a.add(torrent, seed=True)
            await b.add(torrent)
            await b.connect(info.pack_id, "127.0.0.1", a.port)
            first = info.entries[0]
            await b.read(info.pack_id, first.offset, first.length, timeout=5)  # connection set up
            out = []
            step = max(1, len(info.entries) // n)
            for e in info.entries[1::step][:n]:
                t0 = time.perf_counter()
                await b.read(info.pack_id, e.offset, e.length, timeout=5)
                out.append((time.perf_counter() - t0) * 1000)
            return out
        finally:
            await a.close()
            await b.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--misses", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        info, path = write_pack(Path(d), args.mib)
        chunk = statistics.mean(e.length for e in info.entries)
        print(f"pack {info.size / 2**20:.1f} MiB, {len(info.entries)} chunks, mean chunk {chunk / 1024:.1f} KiB")
        print(f"{'piece':>8} {'torrent':>10} {'hash s':>7} {'fetched/miss':>13} {'x chunk':>8} {'miss ms (median, max)':>22}")
        for ps in SIZES:
            t0 = time.perf_counter()
            t = make_torrent_sync(path, info.pack_id, ps)
            hashing = time.perf_counter() - t0
            fetched = statistics.mean(len(t.pieces_of(e.offset, e.length)) * ps for e in info.entries)
            lat = asyncio.run(timed_misses(t, info, path, args.misses))
            print(f"{ps // 1024:>6}Ki {len(t.data) / 1024:>8.1f}Ki {hashing:>7.3f} {fetched / 1024:>11.1f}Ki "
                  f"{fetched / chunk:>8.2f} {statistics.median(lat):>12.1f} {max(lat):>8.1f}")


if __name__ == "__main__":
    main()
