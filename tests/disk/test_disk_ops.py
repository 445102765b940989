"""Reads, writes, write-zeroes, discards and flushes through NBD onto a ParcelDisk,
checked against a model; the dirty map, its sealed copy, and recovery after a restart."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diskkit import (
    CH,
    RecordingServerSource,
    SlowSource,
    check_dirty_chunks,
    kit,
    open_site,
)

from isrsync.site.cache import SiteCache
from isrsync.site.state import ParcelState

SEED = 77


async def test_random_ops_match_a_model_and_survive_a_restart(make_parcel, make_site, tmp_path: Path) -> None:
    parcel = await make_parcel(seed=SEED)
    site = await make_site(parcel, "site")
    ops = kit.gen_ops(SEED, parcel.size, 320)
    model = kit.Model(parcel.image)
    st = await kit.apply_ops(site.uri, ops, model, tmp_path / "ops")
    assert st.reads >= 60 and st.straddling >= 100, st
    assert all(st.kinds.get(k, 0) >= 15 for k in ("read", "write", "pattern", "zero", "discard", "flush")), st.kinds
    want = bytes(model.buf)
    got = await kit.export_bytes(site.uri, tmp_path / "after.img", "nbdcopy")
    assert got == want, kit.first_difference(got, want)

    # the dirty map is exactly the chunks written, each one in the cache and right
    assert set(site.disk.dirty) == model.written
    check_dirty_chunks(site, want)
    assert site.cache.verify() == []
    # ... and it is in the state database, sealed, identical
    assert site.state.dirty() == site.disk.dirty
    (await kit.qemu_io(site.uri, "flush")).check()
    dirty = dict(site.disk.dirty)
    await site.close()

    cache = SiteCache(tmp_path / "site")
    try:
        state = ParcelState(cache, parcel.id, parcel.master_key)
        try:
            assert state.dirty() == dirty
        finally:
            state.close()
    finally:
        cache.close()

    # A fresh disk over the same cache and state, with no source at all: the local
    # changes and the chunks already fetched are all it needs.
    again = await open_site(parcel, tmp_path / "site", server=False)
    try:
        assert again.disk.dirty == dirty
        got = await kit.export_bytes(again.uri, tmp_path / "again.img", "qemu-img")
        assert got == want, kit.first_difference(got, want)
        assert again.disk.stats.misses == 0
    finally:
        await again.close()


async def test_flushed_writes_are_recovered_by_a_new_disk(make_parcel, make_site, tmp_path: Path) -> None:
    """After FLUSH the cache and state alone (no source) give back every written byte."""
    parcel = await make_parcel(seed=SEED + 1)
    site = await make_site(parcel, "site")
    model = bytearray(parcel.image)
    rng = random.Random(3)
    cmds = []
    for n, (off, length) in enumerate([(CH - 10, 20), (5 * CH + 7, 2 * CH), (parcel.size - 3, 3), (0, CH)]):
        data = rng.randbytes(length)
        f = tmp_path / f"w{n}.bin"
        f.write_bytes(data)
        model[off : off + length] = data
        cmds.append(f"write -q -s {f} {off} {length}")
    (await kit.qemu_io(site.uri, *cmds, "flush")).check()
    await site.close()
    again = await open_site(parcel, tmp_path / "site", server=False)
    try:
        for off, length in [(CH - 10, 20), (5 * CH + 7, 2 * CH), (parcel.size - 3, 3), (0, CH)]:
            assert await again.disk.read(off, length) == bytes(model[off : off + length])
    finally:
        await again.close()


async def test_concurrent_writes_to_one_chunk_all_land(make_parcel, make_site, tmp_path: Path) -> None:
    parcel = await make_parcel(seed=SEED + 2)
    site = await make_site(parcel, server=False)
    # a slow source widens the read-modify-write window: every writer of an
    # uncached chunk must first fetch it
    site.chain.add(SlowSource(RecordingServerSource(parcel.store, parcel.id), 0.2, name="slow"))
    model = bytearray(parcel.image)

    # through NBD: many aio_writes to disjoint parts of chunk 2, one straddling into 3
    # (every one of them touches chunk 2, so they all contend for its lock)
    cmds = []
    for k in range(12):
        off, n = 2 * CH + 1000 + k * 9000, 3000 + k
        cmds.append(f"aio_write -q -P {0x20 + k:#x} {off} {n}")
        model[off : off + n] = bytes([0x20 + k]) * n
    cmds.append(f"aio_write -q -P 0x7e {3 * CH - 700} 1400")
    model[3 * CH - 700 : 3 * CH + 700] = b"\x7e" * 1400
    cmds.append(f"aio_write -q -z {2 * CH + 110000} 6000")
    model[2 * CH + 110000 : 2 * CH + 116000] = bytes(6000)
    (await kit.qemu_io(site.uri, *cmds, "aio_flush", "flush")).check()
    assert await site.disk.read(2 * CH, 2 * CH) == bytes(model[2 * CH : 4 * CH])

    # straight on the disk: 24 asyncio writers into one uncached chunk at once
    c = 7
    assert not site.parcel.keyring[c].is_zero and site.cache.get(site.parcel.keyring[c].tag) is None
    rng = random.Random(5)
    jobs = []
    for k in range(24):
        off = c * CH + k * 5000 + rng.randrange(100)
        data = rng.randbytes(1000 + k)
        model[off : off + len(data)] = data
        jobs.append(site.disk.write(off, data))
    await asyncio.gather(*jobs)
    assert await site.disk.read(c * CH, CH) == bytes(model[c * CH : (c + 1) * CH])
    assert set(site.disk.dirty) == {2, 3, c}
    check_dirty_chunks(site, bytes(model))
    got = await kit.export_bytes(site.uri, tmp_path / "all.img", "nbdcopy")
    assert got == bytes(model), kit.first_difference(got, bytes(model))


async def test_concurrent_writes_to_different_chunks_all_land(make_parcel, make_site, tmp_path: Path) -> None:
    """Writers of different chunks share no chunk lock, so their dirty-map updates
    (and FLUSH's sync) reach the one state database from several worker threads
    at once. The codec pool is sized to the cores: 8 workers, as on a desktop."""
    parcel = await make_parcel(seed=SEED + 3)
    pool = ThreadPoolExecutor(8, thread_name_prefix="test-codec")
    try:
        site = await make_site(parcel, pool=pool)
        model = bytearray(parcel.image)
        n = len(parcel.keyring)
        rng = random.Random(9)
        for rnd in range(12):
            jobs = []
            for c in range(n):
                length = min(CH, parcel.size - c * CH)
                if (c + rnd) % 3 == 0:  # whole-chunk zeroes: only the dirty map changes
                    model[c * CH : c * CH + length] = bytes(length)
                    jobs.append(site.disk.write_zeroes(c * CH, length))
                else:
                    data = rng.randbytes(length)
                    model[c * CH : c * CH + length] = data
                    jobs.append(site.disk.write(c * CH, data))
                if c % 8 == 0:
                    jobs.append(site.disk.flush())
            results = await asyncio.gather(*jobs, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, f"round {rnd}: {len(errors)} of {len(jobs)} writes/flushes failed: {errors[0]!r}"
        await site.disk.flush()
        assert set(site.disk.dirty) == set(range(n))
        # every acknowledged write is in the state database, as acknowledged
        assert site.state.dirty() == site.disk.dirty
        # and through NBD: one aio_write per chunk, all in flight together
        cmds = []
        for c in range(n):
            p = 0x30 + c % 200
            cmds.append(f"aio_write -q -P {p:#x} {c * CH + 100} 5000")
            model[c * CH + 100 : c * CH + 5100] = bytes([p]) * 5000
        (await kit.qemu_io(site.uri, *cmds, "aio_flush", "flush")).check()
        got = await kit.export_bytes(site.uri, tmp_path / "all.img", "nbdcopy")
        assert got == bytes(model), kit.first_difference(got, bytes(model))
        assert site.state.dirty() == site.disk.dirty
        await site.close()
    finally:
        pool.shutdown(wait=True)
