"""A LAN peer in its own process, for tests that stop or kill it mid-transfer.

``python seedproc.py DIR``: seeds every pack ``DIR/<id>`` whose torrent is
``DIR/<id>.torrent`` on loopback, prints its port on one line, then waits to be
signalled. With ``--direct`` it also runs the direct path's server over the
packs it seeds and prints "PORT DIRECT_PORT". (A libtorrent upload rate limit would make the transfer easier to cut,
but with one set, even 1.5 MB/s, no piece came at all within a second: not yet
understood, so the test cuts a larger transfer at its first piece instead.) Not a test module: tests/swarm/test_peer_vanish.py runs it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from isrsync.swarm.direct import DirectServer, SiteChunks
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import load_torrent


async def main(where: Path, direct: bool) -> None:
    ses = await SwarmSession(where, SwarmSettings(interface="127.0.0.1")).start()
    for t in sorted(where.glob("*.torrent")):
        pack_id = bytes.fromhex(t.stem)
        await ses.add(load_torrent(pack_id, t.read_bytes()), seed=True)
    if direct:
        server = await DirectServer(SiteChunks(None, ses)).start(["127.0.0.1"])
        print(ses.port, server.port, flush=True)
    else:
        print(ses.port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), "--direct" in sys.argv[2:]))
