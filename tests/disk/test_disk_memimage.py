"""Memory images without QEMU: save_stream encodes a stream into the cache, and the
Feeder decodes it back in order, only a bounded way ahead of its reader."""

from __future__ import annotations

import asyncio
import os
import threading

from diskkit import CH, kit

from isrsync.keys import new_convergence_secret
from isrsync.manifest import MemoryImage
from isrsync.site.memimage import AHEAD, WINDOW, Feeder, save_stream


async def test_save_then_feed_round_trips_and_decodes_only_a_bounded_way_ahead(make_parcel, make_site) -> None:
    parcel = await make_parcel(size=200 * CH + 1000)
    site = await make_site(parcel)
    image = kit.mixed_image(150 * CH + 4321, seed=7)

    # Save: a pipe fed by a thread, as QEMU's migration would.
    r, w = os.pipe()

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(image)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        saved = await asyncio.to_thread(save_stream, r, new_convergence_secret(), site.cache)
    finally:
        writer.join()
        os.close(r)
    mem = saved.memory
    assert isinstance(mem, MemoryImage) and mem.length == len(image)
    assert saved.stored_bytes > 0 and saved.pack_ids
    assert all(site.cache.has(ref.tag) for ref in mem.refs if not ref.is_zero)

    # Feed with nobody reading: it stops once its queue is full.
    feeder = Feeder(mem, site.cache, site.chain)
    feeder.start()
    last = -1
    while feeder.fetched != last:
        last = feeder.fetched
        await asyncio.sleep(0.2)
    assert feeder.task is not None and not feeder.task.done()
    bound = Feeder.MAX_QUEUED // CH + (AHEAD + 1) * WINDOW
    assert 0 < feeder.fetched <= bound < len(mem.refs)

    # Then read it all: the same bytes, in order.
    r, w = os.pipe()
    got = bytearray()

    def read() -> None:
        with os.fdopen(r, "rb") as f:
            while data := f.read(1 << 16):
                got.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        await asyncio.to_thread(feeder.produce, w)
    finally:
        os.close(w)
        reader.join()
    await feeder.task
    assert bytes(got) == image
    assert feeder.written == len(image) and feeder.fetched == len(mem.refs)
