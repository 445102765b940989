"""Issue 14, defect 5: a client that sends requests without reading the replies
must not grow the NBD server without bound, and a flood of failing requests
must not flood the log.

Before: every request started a task at once, so 193,000 unread 4 KiB reads took
the server from 21 MB to 1 GB, and 40 unread 32 MiB reads to 2 GB; each failure
wrote one warning.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
from pathlib import Path

from nbdtestkit import RawClient, Served

from isrsync.vm import nbd

MiB = 1 << 20
SIZE = 64 * MiB


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def connect(served: Served, export_size: int = SIZE) -> RawClient:
    c, _ = await RawClient.connect(served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    c.option(nbd.OPT_EXPORT_NAME, b"disk")
    size, _ = struct.unpack(">QH", await c.read_exactly(10))
    assert size == export_size
    return c


async def settle(server: nbd.NbdServer) -> int:
    """Wait until the server stops reading requests; returns how many it read."""
    last = -1
    while server.requests != last:
        last = server.requests
        await asyncio.sleep(0.3)
    return last


async def test_unread_replies_stop_the_server_reading_and_memory_stays_bounded(tmp_path: Path) -> None:
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)  # sparse: reads are zeros and cost no page cache
    backend = nbd.RawFileBackend(img, read_only=True)
    served = await Served(backend).start()
    c = None
    try:
        c = await connect(served)
        before = rss()
        big, small = 12, 20_000
        handles = [c.request(nbd.CMD_READ, (i % 2) * 32 * MiB, 32 * MiB) for i in range(big)]
        handles += [c.request(nbd.CMD_READ, (i * 4096) % SIZE, 4096) for i in range(small)]
        read = await settle(served.server)
        grown = rss() - before
        # Unbounded, the server would hold 12 x 32 MiB + 20,000 x 4 KiB (and a task each).
        assert read <= nbd.MAX_INFLIGHT + 2, f"the server read {read} requests with no reply taken"
        assert grown < 160 * MiB, f"the server grew by {grown // MiB} MiB for unread replies"
        # Everything is still answered, in full, once the client reads.
        seen = set()
        for _ in range(big + small):
            magic, err, handle = struct.unpack(">IIQ", await c.read_exactly(16))
            assert magic == nbd.SIMPLE_REPLY_MAGIC and err == 0
            n = 32 * MiB if handle <= big else 4096
            assert await asyncio.wait_for(c.r.readexactly(n), 30) == bytes(n)
            seen.add(handle)
        assert seen == set(handles)
    finally:
        if c is not None:
            await c.close()
        await served.close()
        backend.close()


class FailingBackend(nbd.RawFileBackend):
    async def read(self, offset: int, length: int) -> bytes:
        raise nbd.NbdError(errno.EIO, "the chunk is not here")


async def test_a_flood_of_failing_requests_is_a_few_log_lines(tmp_path: Path, caplog) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 * MiB))
    backend = FailingBackend(img, read_only=True)
    served = await Served(backend).start()
    c = None
    try:
        c = await connect(served, 1 * MiB)
        caplog.set_level(logging.INFO, logger="isrsync.nbd")
        n = 5000
        for i in range(n):
            c.request(nbd.CMD_READ, (i * 4096) % MiB, 4096)
        for _ in range(n):
            magic, err, _ = struct.unpack(">IIQ", await c.read_exactly(16))
            assert magic == nbd.SIMPLE_REPLY_MAGIC and err == errno.EIO
        await c.close()
        c = None
        await asyncio.sleep(0.2)  # the connection's last word: how many were not logged
        lines = [r.getMessage() for r in caplog.records if r.name == "isrsync.nbd" and r.levelno >= logging.WARNING]
        assert 1 <= len(lines) <= 5, lines[:10]
        assert "the chunk is not here" in lines[0]
        assert any("not logged" in ln for ln in lines), lines
    finally:
        if c is not None:
            await c.close()
        await served.close()
        backend.close()
