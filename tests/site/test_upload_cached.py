"""upload_cached: the trickle's and the commit's way of packing cached chunks and uploading them.

It runs on the loop that serves a running guest's disk, so the pack building
(cache reads, hashing, writes, fsync) happens on a worker thread; what it
uploads and what it leaves behind must be as before.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from isrsync.errors import IntegrityError
from isrsync.site import packer
from isrsync.site.parcel import Site, upload_cached
from isrsync.store.memory import MemoryStore


@pytest.fixture
async def site(open_cache, tmp_path):
    store = MemoryStore("alice")
    # upload_cached needs only the cache and the store of a Site.
    return Site(open_cache(tmp_path / "c"), store, None, None, "host")  # type: ignore[arg-type]


def leftovers(site: Site) -> list[str]:
    return [p.name for p in (site.cache.path / "packs").iterdir()]


async def test_packs_what_the_cache_holds_off_the_loop(site: Site, make_chunks, monkeypatch) -> None:
    pid = uuid.uuid4()
    await site.store.create_parcel(pid, "vm")
    chunks = make_chunks(5, 9000)
    site.cache.put_many([(e.tag, e.data) for e in chunks])
    adders: list[int] = []
    real_add = packer.PackSink.add

    def add(self: packer.PackSink, tag: bytes, data: bytes) -> bool:
        adders.append(threading.get_ident())
        return real_add(self, tag, data)

    monkeypatch.setattr(packer.PackSink, "add", add)
    gone = os.urandom(32)
    (info,) = await upload_cached(site, pid, [e.tag for e in chunks] + [gone], strict=False)
    assert [e.tag for e in info.entries] == [e.tag for e in chunks]
    assert await site.store.have_packs(pid, [info.pack_id]) == {info.pack_id}
    for e in info.entries:
        assert await site.store.get_pack(pid, info.pack_id, e.offset, e.length) == site.cache.get(e.tag)
    assert len(adders) == 5 and threading.get_ident() not in adders
    assert leftovers(site) == []


async def test_strict_refuses_a_chunk_the_cache_lacks_and_leaves_nothing(site: Site, make_chunks) -> None:
    pid = uuid.uuid4()
    await site.store.create_parcel(pid, "vm")
    (e,) = make_chunks(1, 9000)
    site.cache.put(e.tag, e.data)
    with pytest.raises(IntegrityError):
        await upload_cached(site, pid, [e.tag, os.urandom(32)], strict=True)
    assert leftovers(site) == []
    assert await upload_cached(site, pid, [], strict=True) == []
