"""Memory images without QEMU: save_stream encodes a stream into the cache, and the
Feeder decodes it back in order, only a bounded way ahead of its reader; save_ram
encodes guest RAM from a memfd by address, keeping what did not change."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading

from diskkit import CH, kit

from isrsync.chunk import FLAG_ZSTD, ZERO_REF, ChunkRef
from isrsync.keys import new_convergence_secret
from isrsync.manifest import Keyring, MemoryImage
from isrsync.site.memimage import AHEAD, WINDOW, Feeder, data_chunks, save_ram, save_stream
from isrsync.site.parcel import write_blob


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


# -- guest RAM kept by address ------------------------------------------------------------


def _ram(size: int, writes: dict[int, bytes]) -> int:
    """A memfd like QEMU's guest RAM: holes except where ``writes`` (offset -> bytes) land."""
    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, size)
    for off, data in writes.items():
        os.pwrite(fd, data, off)
    return fd


def _same(a: int, b: int, size: int) -> bool:
    return all(os.pread(a, CH, o) == os.pread(b, CH, o) for o in range(0, size, CH))


async def test_ram_saved_by_address_restores_exactly_and_keeps_what_did_not_change(make_parcel, make_site) -> None:
    site = await make_site(await make_parcel())
    secret = new_convergence_secret()
    size = 64 * CH
    page = os.urandom(4096)
    blob = os.urandom(CH)
    fd = _ram(size, {3 * CH: blob, 4 * CH: bytes(CH), 10 * CH + 8192: page, 20 * CH: blob})
    fds = [fd]
    try:
        # Only chunks holding data are read: never-touched RAM is holes.
        assert data_chunks(fd, size) == [3, 4, 10, 20]
        first = await asyncio.to_thread(save_ram, fd, size, secret, site.cache, None)
        ring = first.ram
        assert ring.size == size
        assert [i for i, r in enumerate(ring) if not r.is_zero] == [3, 10, 20]
        assert ring[3] == ring[20]  # the same bytes at two addresses: one chunk, stored once
        assert first.new_chunks == 2 and first.kept_chunks == 0 and first.pack_ids
        assert all(site.cache.has(r.tag) for r in ring if not r.is_zero)

        back = _ram(size, {})
        fds.append(back)
        await write_blob(MemoryImage(size, ring), back, site.cache, site.chain)
        assert _same(fd, back, size)

        # The guest changes one page: only that chunk is encoded again.
        os.pwrite(fd, os.urandom(4096), 10 * CH + 8192)
        os.pwrite(fd, os.urandom(100), 40 * CH)
        second = await asyncio.to_thread(save_ram, fd, size, secret, site.cache, ring)
        assert second.kept_chunks == 2 and second.new_chunks == 2
        assert second.ram[3] == ring[3] and second.ram[20] == ring[20]
        assert second.ram[10] != ring[10] and not second.ram[40].is_zero
        again = _ram(size, {})
        fds.append(again)
        await write_blob(MemoryImage(size, second.ram), again, site.cache, site.chain)
        assert _same(fd, again, size)

        # A previous image of another RAM size lines nothing up: everything is hashed anew.
        other = await asyncio.to_thread(save_ram, fd, size, secret, site.cache, Keyring(2 * size))
        assert other.kept_chunks == 0 and other.new_chunks == 0  # all already in the cache
        assert list(other.ram) == list(second.ram)
    finally:
        for f in fds:
            os.close(f)


async def test_saved_memory_with_ram_survives_the_local_state(make_parcel, make_site) -> None:
    site = await make_site(await make_parcel())
    rng = random.Random(5)

    def ref() -> ChunkRef:
        return ChunkRef(rng.randbytes(32), rng.randbytes(32), FLAG_ZSTD)

    ram = Keyring.from_refs(4 * CH, [ref(), ZERO_REF, ref(), ZERO_REF])
    mem = MemoryImage.from_refs(2 * CH + 5, [ref(), ref(), ref()], ram)
    site.state.save_memory(mem)
    got = site.state.load_memory()
    assert got is not None and got.length == mem.length and got.refs == mem.refs
    assert got.ram is not None and got.ram == ram and got.tags() == mem.tags()
    site.state.save_memory(MemoryImage.from_refs(CH, [ref()]))
    got = site.state.load_memory()
    assert got is not None and got.ram is None
    # The hot chunks of a lazy restore come back with the image; a stale hint is cut to the RAM.
    site.state.save_memory(MemoryImage.from_refs(CH, [ref()], ram, hot=[2, 0]))
    got = site.state.load_memory()
    assert got is not None and list(got.hot) == [2, 0]
    site.state._put_blob("memory_hot", struct.pack("<3I", 3, 9, 1))
    got = site.state.load_memory()
    assert got is not None and list(got.hot) == [3, 1]
    site.state.save_memory(MemoryImage.from_refs(CH, [ref()], ram))
    got = site.state.load_memory()
    assert got is not None and list(got.hot) == []
