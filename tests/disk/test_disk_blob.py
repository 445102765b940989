"""write_blob: a small object (a kernel, an initrd) decoded straight into a file
descriptor, fetching what the cache lacks and refetching what it holds damaged."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskkit import CH

from isrsync.chunk import chunk_length
from isrsync.errors import ChunkUnavailable
from isrsync.manifest import MemoryImage
from isrsync.site.parcel import write_blob


@pytest.fixture
def memfds() -> Iterator:
    fds: list[int] = []

    def make() -> int:
        fd = os.memfd_create("blob-test", 0)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def contents(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def damage_in_cache(cache_dir: Path, ciphertext: bytes) -> None:
    """Flip one byte of a chunk where the cache stores it on disk."""
    for seg in (cache_dir / "segments").iterdir():
        raw = seg.read_bytes()
        at = raw.find(ciphertext)
        if at >= 0:
            with open(seg, "r+b") as f:
                f.seek(at + len(ciphertext) // 2)
                f.write(bytes([raw[at + len(ciphertext) // 2] ^ 0x5A]))
            return
    raise AssertionError("the chunk is not in any cache segment")


async def test_fetches_decodes_in_place_and_leaves_zero_chunks_as_holes(make_parcel, make_site, memfds) -> None:
    parcel = await make_parcel()
    site = await make_site(parcel)
    blob = MemoryImage(parcel.size, parcel.keyring)
    fd = memfds()
    await write_blob(blob, fd, site.cache, site.chain)
    assert contents(fd) == parcel.image
    nonzero = {parcel.keyring[i].tag for i in parcel.nonzero()}
    assert set(site.server.asked) == nonzero and len(site.server.asked) == len(nonzero)
    # Zero chunks were never written: a hole (tmpfs reports them), not 128 KiB of zeros.
    z = parcel.zero()[0]
    assert z in range(len(parcel.keyring) - 1) and z + 1 not in parcel.zero()
    assert os.lseek(fd, z * CH, os.SEEK_DATA) == (z + 1) * CH

    # The first time all came from the server: the cache row counts none of it.
    assert site.chain.stats()["cache"].hits == 0

    # From the cache alone, a second time: nothing asked of the server, every
    # chunk and byte counted as the cache's (the last chunk is short).
    asked = len(site.server.asked)
    again = memfds()
    await write_blob(blob, again, site.cache, site.chain)
    assert contents(again) == parcel.image and len(site.server.asked) == asked
    served = parcel.nonzero()
    c = site.chain.stats()["cache"]
    assert (c.hits, c.bytes, c.bad) == (len(served), sum(chunk_length(blob.length, i) for i in served), 0)


async def cached_then_damaged(make_parcel, make_site, memfds, cache_dir: Path, k: int):
    """A site whose cache holds the whole blob, then chunk number ``k`` damaged there."""
    parcel = await make_parcel()
    site = await make_site(parcel, name=cache_dir.name)
    blob = MemoryImage(parcel.size, parcel.keyring)
    await write_blob(blob, memfds(), site.cache, site.chain)
    victim = parcel.keyring[parcel.nonzero()[k]]
    damage_in_cache(cache_dir, parcel.blobs[victim.tag])
    return parcel, site, blob, victim


async def test_a_chunk_damaged_in_the_cache_is_fetched_again(make_parcel, make_site, memfds, tmp_path) -> None:
    parcel, site, blob, victim = await cached_then_damaged(make_parcel, make_site, memfds, tmp_path / "dmg", 3)
    asked = len(site.server.asked)

    fd = memfds()
    await write_blob(blob, fd, site.cache, site.chain)
    assert contents(fd) == parcel.image  # no damaged byte got through
    assert site.server.asked[asked:] == [victim.tag]
    assert site.cache.get(victim.tag) == parcel.blobs[victim.tag]  # healed
    c = site.chain.stats()["cache"]
    # One damaged copy, however many offsets share its tag; those offsets are the server's.
    shared = [i for i in parcel.nonzero() if parcel.keyring[i].tag == victim.tag]
    assert c.bad == 1 and c.hits == len(parcel.nonzero()) - len(shared), (c, shared)


async def test_damaged_in_the_cache_and_no_source_left_fails_clearly(make_parcel, make_site, memfds, tmp_path) -> None:
    _, site, blob, _ = await cached_then_damaged(make_parcel, make_site, memfds, tmp_path / "lost", 0)
    site.chain.remove("server")
    with pytest.raises(ChunkUnavailable):
        await write_blob(blob, memfds(), site.cache, site.chain)
