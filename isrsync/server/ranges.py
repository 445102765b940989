"""Serving a pack that is no local file (object storage): whole, or one byte range.

A directory's packs go out through aiohttp's FileResponse (sendfile, ranges);
this does the same for a :class:`~.packstore.PackStore` that only reads ranges,
so demand misses and BEP 19 web seeds work against S3 packs too.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .packstore import PackStore

PACK_PIECE = 4 << 20  # bytes per read: bounded memory per download


async def stream_pack(request: web.Request, packs: PackStore, pack: bytes, size: int) -> web.StreamResponse:
    """A pack from object storage, whole or one byte range (demand misses, web seeds),
    in pieces read on worker threads."""
    unsatisfiable = web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    try:
        rng = request.http_range
    except ValueError:
        raise unsatisfiable from None
    start, stop, status = 0, size, 200
    if rng.start is not None or rng.stop is not None:
        status = 206
        if rng.start is not None and rng.start < 0:  # bytes=-N: the last N
            start = max(0, size + rng.start)
        else:
            start = rng.start or 0
            stop = size if rng.stop is None else min(rng.stop, size)
        if start >= stop:
            raise unsatisfiable
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
               "Content-Length": str(stop - start)}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    loop = asyncio.get_running_loop()
    for off in range(start, stop, PACK_PIECE):
        data = await loop.run_in_executor(None, packs.read, pack, off, min(PACK_PIECE, stop - off))
        await resp.write(data)
    await resp.write_eof()
    return resp
