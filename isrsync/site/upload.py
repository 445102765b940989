"""Uploading packs to the home server, each with its torrent.

Used by init (every pack of a new parcel) and by commit (the packs of what the
server lacks). The torrent lets LAN sites swap the pack (the swarm); it is a help,
never a need, so a failure to make or store one is logged and the upload goes on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Callable

from ..errors import IsrError, NotFound, UsageError
from ..pack import PackInfo
from ..store.base import Store
from ..swarm.torrent import make_torrent

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


async def upload_packs(store: Store, parcel: uuid.UUID, packs: list[tuple[PackInfo, Path]], *, parallel: int = 3,
                       progress: Progress | None = None) -> None:
    sem = asyncio.Semaphore(parallel)

    async def one(info: PackInfo, path: Path) -> None:
        async with sem:
            # The torrent is hashed (worker thread) while the pack uploads.
            made = asyncio.ensure_future(_torrent_of(info, path))
            try:
                await store.put_pack(parcel, info.pack_id, path)
            except BaseException:
                made.cancel()
                raise
            torrent = await made
            if torrent is not None:
                await _put_torrent(store, parcel, info.pack_id, torrent)
            if progress:
                progress(info.size)

    await asyncio.gather(*(one(i, p) for i, p in packs))


async def _torrent_of(info: PackInfo, path: Path) -> bytes | None:
    """The pack's torrent, or None if it cannot be made (the swarm is a help, never a need)."""
    try:
        return (await make_torrent(path, info.pack_id)).data
    except (IsrError, OSError) as e:
        log.info("no torrent for pack %s: %s", info.pack_id.hex()[:16], e)
        return None


async def _put_torrent(store: Store, parcel: uuid.UUID, pack_id: bytes, data: bytes) -> None:
    try:
        await store.put_torrent(parcel, pack_id, data)
    except (NotFound, UsageError) as e:
        # A server older than torrents answers 404/405: the pack is stored, which is what counts.
        log.info("the server kept no torrent for pack %s: %s", pack_id.hex()[:16], e)
