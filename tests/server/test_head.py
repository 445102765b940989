"""HEAD on a pack: size and range support without the body (what a web seed asks first)."""

from __future__ import annotations

import io
import os
import uuid

import aiohttp

from isrsync.site.packer import pack_stream
from isrsync.store.http import HttpStore


async def test_head_gives_size_and_ranges_but_no_body(live_server, tmp_path) -> None:
    token = live_server.add_user("alice")
    store = HttpStore(live_server.url, token)
    try:
        pid = uuid.uuid4()
        await store.create_parcel(pid, "h")
        packed = pack_stream(io.BytesIO(os.urandom(1 << 20)), 1 << 20, os.urandom(32), tmp_path)
        info, path = packed.packs[0]
        await store.put_pack(pid, info.pack_id, path)
    finally:
        await store.close()
    url = f"{live_server.url}/v1/parcels/{pid}/packs/{info.pack_id.hex()}"
    async with aiohttp.ClientSession() as s:
        async with s.head(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == info.size == path.stat().st_size
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert await resp.read() == b""
        async with s.head(url) as resp:  # no token: refused like every other route
            assert resp.status == 401
        other = f"{live_server.url}/v1/parcels/{uuid.uuid4()}/packs/{info.pack_id.hex()}"
        async with s.head(other, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 404
