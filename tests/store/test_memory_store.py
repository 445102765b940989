"""What is particular to MemoryStore (the conformance suite covers the contract).

Its state lives in one :class:`MemoryHome` per ``MemoryStore()``; clients made
with ``client()`` share it; it keeps no files (a pack is read once, on upload).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest

from isrsync import chunk, manifest
from isrsync.errors import LockHeld, NotFound
from isrsync.manifest import Keyring
from isrsync.pack import PackWriter
from isrsync.store.base import CommitRequest, Holder, Store
from isrsync.store.memory import MemoryStore
from isrsync.vmspec import VmSpec

SITE = Holder("site-a", "host-a")


def write_pack(path: Path, plain: bytes, secret: bytes) -> tuple[bytes, Keyring]:
    """Encode ``plain`` chunk by chunk into one pack at ``path``; its id and keyring."""
    refs = []
    with open(path, "wb") as f:
        w = PackWriter(f)
        for i in range(0, len(plain), chunk.CHUNK_SIZE):
            enc = chunk.encode(plain[i : i + chunk.CHUNK_SIZE], secret)
            refs.append(enc.ref)
            if not enc.ref.is_zero:
                w.add(enc.tag, enc.data)
        info = w.finish()
    return info.pack_id, Keyring.from_refs(len(plain), refs)


def test_is_a_store() -> None:
    assert isinstance(MemoryStore(), Store)


async def test_two_stores_share_nothing(tmp_path: Path) -> None:
    a, b = MemoryStore("alice"), MemoryStore("alice")
    pid = uuid.uuid4()
    await a.create_parcel(pid, "vm")
    await a.put_key_bundle(b"sealed", None)
    pack_id, _ = write_pack(tmp_path / "p", os.urandom(3 * chunk.CHUNK_SIZE), os.urandom(32))
    await a.put_pack(pid, pack_id, tmp_path / "p")
    assert await b.list_parcels() == []
    assert await b.get_key_bundle() is None
    with pytest.raises(NotFound):
        await b.parcel(pid)
    # The same parcel id is free in the other home, and its packs are not there.
    await b.create_parcel(pid, "vm")
    assert await b.have_packs(pid, [pack_id]) == set()
    assert await a.have_packs(pid, [pack_id]) == {pack_id}


async def test_clients_share_their_home() -> None:
    site1 = MemoryStore("alice")
    site2, bob = site1.client(), site1.client("bob")
    pid = uuid.uuid4()
    await site1.create_parcel(pid, "vm")
    assert [p.parcel for p in await site2.list_parcels()] == [pid]
    await site1.acquire(pid, SITE)
    with pytest.raises(LockHeld):
        await site2.acquire(pid, Holder("site-b", "host-b"))
    assert await bob.list_parcels() == []
    with pytest.raises(NotFound):
        await bob.lock_status(pid)


async def test_end_to_end_without_files(tmp_path: Path) -> None:
    store, pid = MemoryStore(), uuid.uuid4()
    secret, key = os.urandom(32), os.urandom(32)
    plain = os.urandom(5 * chunk.CHUNK_SIZE) + bytes(chunk.CHUNK_SIZE) + os.urandom(1000)
    path = tmp_path / "pack"
    pack_id, ring = write_pack(path, plain, secret)
    raw = path.read_bytes()

    await store.create_parcel(pid, "e2e")
    await store.put_pack(pid, pack_id, path)
    path.unlink()  # the store keeps its own copy; nothing on disk is needed again
    lock = await store.acquire(pid, SITE)
    m = manifest.encode(parcel=pid, version=1, master_key=key, vm=VmSpec(machine="q35"), keyring=ring,
                        site="site-a", time=time.time())
    tags = sorted(ring.tags())
    vi = await store.commit(pid, CommitRequest(lock.epoch, 0, m, packs=[pack_id], added=tags))
    assert (vi.version, vi.new_pack_bytes, vi.site) == (1, len(raw), "site-a")
    assert (await store.lock_status(pid)).holder is None

    found = await store.locate(pid, [*tags, os.urandom(32)])
    assert set(found) == set(tags) and len(tags) == 6  # the zero chunk is never stored
    for i, ref in enumerate(ring):
        if ref.is_zero:
            continue
        e = found[ref.tag]
        data = await store.get_pack(pid, e.pack_id, e.offset, e.length)
        assert data == raw[e.offset : e.offset + e.length]
        want = plain[i * chunk.CHUNK_SIZE : (i + 1) * chunk.CHUNK_SIZE]
        assert chunk.decode(ref, data, len(want)) == want
    assert await store.get_pack(pid, pack_id) == raw
    got = manifest.decode((await store.get_manifests(pid, 1, 1))[0], key, pid)
    assert got.keyring == ring


async def test_upload_verification_does_not_stall_the_loop(tmp_path: Path) -> None:
    store, pid = MemoryStore(), uuid.uuid4()
    await store.create_parcel(pid, "big")
    path = tmp_path / "big"
    pack_id, _ = write_pack(path, os.urandom(160 * chunk.CHUNK_SIZE), os.urandom(32))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    try:
        await store.put_pack(pid, pack_id, path)
    finally:
        ticker.cancel()
    assert ticks > 10  # the loop kept running while the pack was read and hashed
