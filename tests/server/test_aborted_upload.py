"""Issue 13, part 5: an upload cut off by its client (a killed `isrsync suspend`) is
a 4xx in the server's access log, never a 500 or a traceback; its partial file
lets the same client resume for a while, and goes within minutes, not a day.

A real `isrsync serve` with its idle bound for partial uploads shrunk to 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import pytest
from srvkit import API, access_log, fast_pack, server_exceptions

from isrsync.store.http import HttpStore

IDLE = 2.0


async def cut_upload(port: int, token: str, parcel: uuid.UUID, pack: str, data: bytes, declared: int,
                     how: str = "reset") -> None:
    """Send the head and ``data`` of an upload of ``declared`` bytes, then drop the
    connection: a reset (a process killed with unread data) or a plain close (FIN)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"PUT {API}/parcels/{parcel}/packs/{pack} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + data)
    await writer.drain()
    await asyncio.sleep(0.3)
    if how == "reset":
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def _puts(log: Path) -> list[dict]:
    return [r for r in access_log(log) if r.get("method") == "PUT" and "/packs/" in r.get("path", "")]


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_a_cut_upload_is_a_4xx_and_its_partial_goes_after_the_idle_bound(server_factory, tmp_path: Path,
                                                                                how: str) -> None:
    srv = server_factory(extra=["--partial-idle", str(IDLE)])
    alice = srv.add_user("alice")
    st = HttpStore(srv.url, alice, retries=3, backoff=0.05)
    try:
        parcel = uuid.uuid4()
        await st.create_parcel(parcel, "vm")
        pack_id, size = fast_pack(tmp_path / "a.pack", 3 << 20)
        body = (tmp_path / "a.pack").read_bytes()

        # 1. Cut halfway: a 4xx, no traceback, the bytes that came kept for a resume.
        await cut_upload(srv.port, alice, parcel, pack_id.hex(), body[: size // 2], size, how)
        await asyncio.sleep(0.5)
        puts = _puts(srv.log)
        assert puts and all(400 <= r["status"] < 500 for r in puts), puts
        assert server_exceptions(srv.log) == {}, server_exceptions(srv.log)
        part = srv.data / "uploads" / "alice" / f"{pack_id.hex()}.part"
        assert part.exists() and 0 < part.stat().st_size <= size // 2

        # 2. The client comes back within the bound: the upload completes from where it was.
        await st.put_pack(parcel, pack_id, tmp_path / "a.pack")
        assert await st.have_packs(parcel, [pack_id]) == {pack_id}
        assert not part.exists()

        # 3. A cut upload nobody resumes goes within the idle bound (plus one sweep).
        other, osize = fast_pack(tmp_path / "b.pack", 2 << 20, seed=1)
        await cut_upload(srv.port, alice, parcel, other.hex(), (tmp_path / "b.pack").read_bytes()[:osize // 3], osize)
        opart = srv.data / "uploads" / "alice" / f"{other.hex()}.part"
        assert opart.exists()
        t0 = time.monotonic()
        while opart.exists() and time.monotonic() - t0 < 4 * IDLE + 5:
            await asyncio.sleep(0.2)
        assert not opart.exists(), f"the partial upload was still there after {time.monotonic() - t0:.1f} s"
        assert time.monotonic() - t0 >= IDLE * 0.5  # not dropped at once: it was resumable
        assert srv.proc.poll() is None and server_exceptions(srv.log) == {}
        assert not [r for r in access_log(srv.log) if r["status"] >= 500]
    finally:
        await st.close()
