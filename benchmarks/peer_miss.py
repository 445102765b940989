"""Latency of a demand miss served by a LAN peer against the home server on the same LAN
(issue 12, part 5), as far as built.

Two SwarmSessions on loopback: a peer seeding one pack, and a site that reads one
chunk at a time. Measured, each over ``--misses`` distinct chunks:

- ``deadline``: a miss on pieces the site lacks (piece deadlines, libtorrent fetches
  from the peer, verifies, hands back in a read_piece alert);
- ``held``: the same chunks again, now verified in the site's own storage and read
  straight from the pack file (no deadline, no alert).

- ``direct``: the same chunks over the direct path (isrsync/swarm/direct.py): the
  peer's DirectServer answers them by tag from the pieces its session verified, over
  one kept-open TCP connection; the client checks each tag (what PeerSource does);
- ``direct-tls``: the same within an organisation (TLS 1.3, certificates from the
  CA derived from a swarm secret);

- ``server``: the same chunks from a real ``isrsync serve`` on the same loopback "LAN",
  the way the server source answers a miss (``HttpStore.get_pack`` of the chunk's range);
  pass ``--no-server`` to skip it.

PeerSource asks the direct path first for demand misses (the faster one here) and
keeps the torrent path for bulk work (swarm/bulk.py).

    PYTHONPATH=. python benchmarks/peer_miss.py [--mib 64] [--misses 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from torrent_pieces import write_pack

from isrsync.swarm.direct import DirectClient, DirectServer, SiteChunks
from isrsync.swarm.directfmt import Want
from isrsync.swarm.org import org_tls
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent_sync


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


async def _server_misses(info, path: Path, chosen) -> list[float]:
    import json
    import os
    import signal
    import subprocess
    import sys
    import uuid

    from isrsync.server.repo import Repository
    from isrsync.site.upload import upload_packs
    from isrsync.store.http import HttpStore

    with tempfile.TemporaryDirectory() as data:
        repo = Repository(Path(data), create=True)
        try:
            token = repo.add_user("bench")
        finally:
            repo.close()
        proc = subprocess.Popen([sys.executable, "-m", "isrsync.cli.main", "serve", "--data", data, "--listen",
                                 "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            url = json.loads(proc.stdout.readline())["listening"]
            store = HttpStore(url, token)
            try:
                parcel = uuid.uuid4()
                await store.create_parcel(parcel, "bench")
                await upload_packs(store, parcel, [(info, path)])
                first = info.entries[0]
                await store.get_pack(parcel, info.pack_id, first.offset, first.length)  # connection up
                times = []
                for e in chosen:
                    t0 = time.perf_counter()
                    await store.get_pack(parcel, info.pack_id, e.offset, e.length)
                    times.append((time.perf_counter() - t0) * 1000)
                return times
            finally:
                await store.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()


async def _direct_misses(peer: SwarmSession, chosen, org) -> list[float]:
    srv = await DirectServer(SiteChunks(None, peer), org=org).start(["127.0.0.1"])
    client = DirectClient(org=org)
    try:
        first = chosen[0]
        await client.fetch("127.0.0.1", srv.port, [Want(first.tag, first.pack_id, first.offset, first.length)])
        times = []
        for e in chosen:
            t0 = time.perf_counter()
            got = await client.fetch("127.0.0.1", srv.port, [Want(e.tag, e.pack_id, e.offset, e.length)])
            times.append((time.perf_counter() - t0) * 1000)
            assert e.tag in got.good, "the direct path did not answer a chunk the peer holds"
        return times
    finally:
        await client.close()
        await srv.close()


async def measure(info, path: Path, n: int, server: bool = True) -> dict[str, list[float]]:
    torrent = make_torrent_sync(path, info.pack_id)
    st = SwarmSettings(interface="127.0.0.1")
    with tempfile.TemporaryDirectory() as a_dir, tempfile.TemporaryDirectory() as b_dir:
        peer = await SwarmSession(a_dir, st).start()
        site = await SwarmSession(b_dir, st).start()
        try:
            Path(peer.file_of(info.pack_id)).write_bytes(path.read_bytes())
            await peer.add(torrent, seed=True)
            await site.add(torrent)
            await site.connect(info.pack_id, "127.0.0.1", peer.port)
            first = info.entries[0]
            await site.read(info.pack_id, first.offset, first.length, timeout=5)  # connection up
            # Every other chunk, so no two measured chunks share a piece.
            chosen = info.entries[2::2][:n]
            out: dict[str, list[float]] = {"deadline": [], "held": []}
            for times in out.values():
                for e in chosen:
                    t0 = time.perf_counter()
                    await site.read(info.pack_id, e.offset, e.length, timeout=5)
                    times.append((time.perf_counter() - t0) * 1000)
            for kind, org in (("direct", None), ("direct-tls", org_tls("benchmark swarm secret, not a real one"))):
                out[kind] = await _direct_misses(peer, chosen, org)
            if server:
                out["server"] = await _server_misses(info, path, chosen)
            return out
        finally:
            await peer.close()
            await site.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--misses", type=int, default=100)
    ap.add_argument("--no-server", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        info, path = write_pack(Path(d), args.mib)
        got = asyncio.run(measure(info, path, args.misses, not args.no_server))
    base = statistics.median(got["deadline"])
    server = statistics.median(got["server"]) if "server" in got else None
    print(f"{'path':>10} {'n':>5} {'median ms':>10} {'p99 ms':>8} {'× deadline':>11} {'× server':>9}")
    for kind, xs in got.items():
        med = statistics.median(xs)
        vs = f"{med / server:>9.2f}" if server else f"{'-':>9}"
        print(f"{kind:>10} {len(xs):>5} {med:>10.2f} {p99(xs):>8.2f} {med / base:>11.3f} {vs}")
    faster = min(("deadline", "direct"), key=lambda k: statistics.median(got[k]))
    print(f"faster path for demand misses: {faster} (PeerSource asks the direct path first)")


if __name__ == "__main__":
    main()
