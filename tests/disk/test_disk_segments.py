"""The disk over a lazy keyring (issue 15, part 3): a read fetches the keyring segment
of its chunk and no other, once however many readers wait for it; the whole
keyring comes when a commit needs it; a lying source never gets a segment in."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from diskkit import DictSource, LyingSource

from isrsync import manifest
from isrsync.chunk import CHUNK_SIZE, encode
from isrsync.errors import ChunkUnavailable, Unreachable
from isrsync.keyring import SEGMENT_ENTRIES, Keyring, LazyKeyring
from isrsync.site.cache import SiteCache
from isrsync.site.disk import ParcelDisk
from isrsync.site.segments import SegmentLoader
from isrsync.site.registry import SourceRegistry
from isrsync.site.state import ParcelState
from isrsync.vmspec import VmSpec

N = 3 * SEGMENT_ENTRIES + 10  # about 757 MiB of virtual disk, four segments
DATA_AT = (5, SEGMENT_ENTRIES + 1, 2 * SEGMENT_ENTRIES + 7, 3 * SEGMENT_ENTRIES + 2)
SECRET = bytes(range(32))
MK = os.urandom(32)
PID = uuid.UUID(int=42)


@pytest.fixture
def parcel():
    """A keyring with a chunk of data in each segment, sealed as segments; every ciphertext."""
    ring = Keyring(N * CHUNK_SIZE)
    blobs: dict[bytes, bytes] = {}
    plains = {}
    for i in DATA_AT:
        p = os.urandom(CHUNK_SIZE)
        e = encode(p, SECRET)
        ring[i] = e.ref
        blobs[e.tag] = e.data
        plains[i] = p
    sealed = manifest.seal(parcel=PID, version=1, master_key=MK, vm=VmSpec(), keyring=ring)
    seg_tags = [e.tag for e in sealed.segments]
    for e in sealed.segments:
        blobs[e.tag] = e.data
    lazy = manifest.resolve([manifest.decode(sealed.raw, MK, PID)]).keyring
    assert isinstance(lazy, LazyKeyring)
    return ring, lazy, blobs, plains, seg_tags


@pytest.fixture
def make_disk(tmp_path: Path):
    opened = []

    def make(lazy: LazyKeyring, *sources) -> tuple[ParcelDisk, SegmentLoader]:
        cache = SiteCache(tmp_path / f"cache{len(opened)}")
        chain = SourceRegistry(cache)
        for s in sources:
            chain.add(s)
        state = ParcelState(cache, PID, MK)
        opened.append((state, cache))
        loader = SegmentLoader(lazy, chain)
        return ParcelDisk(lazy, SECRET, cache, chain, state, fetch_timeout=2.0), loader

    yield make
    for state, cache in opened:
        state.close()
        cache.close()


async def test_a_read_fetches_its_own_segment_only(parcel, make_disk) -> None:
    ring, lazy, blobs, plains, segs = parcel
    src = DictSource("peer", blobs)
    disk, loader = make_disk(lazy, src)
    i = DATA_AT[2]
    assert await disk.read(i * CHUNK_SIZE, CHUNK_SIZE) == plains[i]
    assert segs[2] in src.asked and not {segs[0], segs[1], segs[3]} & set(src.asked)
    assert lazy.missing() == [0, 1, 3] and loader.fetched == 1


async def test_concurrent_readers_of_one_segment_fetch_it_once(parcel, make_disk) -> None:
    ring, lazy, blobs, plains, segs = parcel
    src = DictSource("peer", blobs)
    disk, loader = make_disk(lazy, src)
    base = SEGMENT_ENTRIES  # segment 1: one chunk of data, the others ZERO
    reads = [disk.read((base + k) * CHUNK_SIZE, 4096) for k in range(0, 40, 2)]
    got = await asyncio.gather(*reads)
    assert got[0] == bytes(4096) and src.asked.count(segs[1]) == 1
    assert await disk.read(DATA_AT[1] * CHUNK_SIZE, CHUNK_SIZE) == plains[DATA_AT[1]]


async def test_a_partial_write_reads_its_ref_first_and_the_commit_gets_the_whole_keyring(parcel, make_disk) -> None:
    ring, lazy, blobs, plains, segs = parcel
    src = DictSource("peer", blobs)
    disk, _ = make_disk(lazy, src)
    i = DATA_AT[3]
    await disk.write(i * CHUNK_SIZE + 100, b"hello")  # read-modify-write: needs the old chunk's ref
    want = bytearray(plains[i])
    want[100:105] = b"hello"
    assert await disk.read(i * CHUNK_SIZE, CHUNK_SIZE) == bytes(want)
    assert not lazy.complete
    current = await disk.current_keyring()
    assert lazy.complete and current == ring.overlay(disk.dirty)


async def test_a_lying_source_never_gets_a_segment_in(parcel, make_disk) -> None:
    ring, lazy, blobs, plains, segs = parcel
    liar = LyingSource("liar", blobs, cost=0.0)
    disk, _ = make_disk(lazy, liar)
    with pytest.raises(Exception):
        await disk.read(DATA_AT[0] * CHUNK_SIZE, CHUNK_SIZE)
    assert lazy.missing() == [0, 1, 2, 3]
    # An honest source joins (a medium plugged in): the same disk reads right.
    disk.chain.add(DictSource("usb", blobs, cost=1.0))
    assert await disk.read(DATA_AT[0] * CHUNK_SIZE, CHUNK_SIZE) == plains[DATA_AT[0]]


async def test_a_keyring_that_cannot_be_had_says_so(parcel, make_disk) -> None:
    ring, lazy, blobs, plains, segs = parcel
    disk, _ = make_disk(lazy, DictSource("peer", {t: d for t, d in blobs.items() if t != segs[3]}))
    with pytest.raises(ChunkUnavailable, match=r"[1-4] segment\(s\) of the disk's keyring could not be fetched"):
        await disk.current_keyring()
    assert isinstance(ChunkUnavailable("x"), Unreachable)  # so a suspend keeps it local, as offline
