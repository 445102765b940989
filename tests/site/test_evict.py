"""Issue 12, part 4: the cache size limit evicts least-recently-used chunks and never a
parcel's own state (dirty chunks, staged chunks of a commit in flight)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from isrsync.chunk import ChunkRef, tag_of
from isrsync.site.cache import SiteCache
from isrsync.site.evict import evict_lru, parse_size, protected_tags
from isrsync.site.state import ParcelState

KEY = b"k" * 32


def _chunks(n: int, size: int = 4096) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(n):
        data = os.urandom(size)
        out.append((tag_of(data), data))
    return out


def test_limit_evicts_oldest_first_and_spares_a_running_parcels_dirty_state(tmp_path: Path) -> None:
    cache = SiteCache(tmp_path / "cache")
    old = _chunks(8)
    cache.put_many(old[:4])  # the oldest two of these are the guest's writes, not committed
    time.sleep(0.05)
    cache.put_many(old[4:])
    time.sleep(0.05)
    new = _chunks(4)
    cache.put_many(new)
    parcel = uuid.uuid4()
    st = ParcelState(cache, parcel, KEY)
    dirty = {0: ChunkRef(old[0][0], b"x" * 32, 0), 1: ChunkRef(old[1][0], b"y" * 32, 0)}
    st.set_dirty(dirty, durable=True)
    st.stage([], [old[2][0]])  # a commit in flight
    st.close()

    keep = protected_tags(lambda p: ParcelState(cache, p, KEY), [parcel])
    assert keep == {old[0][0], old[1][0], old[2][0]}
    res = evict_lru(cache, 7 * 4096, keep)
    # 12 chunks, a limit of 7: the 5 oldest that are not the parcel's own state go.
    assert res.chunks == 5 and res.bytes == 5 * 4096 and res.cached_bytes == 7 * 4096
    left = set(cache.tags())
    assert {t for t, _ in old[:3]} <= left, "dirty and staged chunks survive"
    assert left == {t for t, _ in old[:3]} | {t for t, _ in new}, "the newest stay, the older go"
    assert all(cache.get(t) is not None for t, _ in old[:3])
    # Under the limit: nothing more goes.
    assert evict_lru(cache, 7 * 4096, keep).chunks == 0
    cache.close()


def test_a_limit_below_the_protected_state_keeps_all_of_it(tmp_path: Path) -> None:
    cache = SiteCache(tmp_path / "cache")
    items = _chunks(4)
    cache.put_many(items)
    keep = {t for t, _ in items[:3]}
    res = evict_lru(cache, 0, keep)
    assert res.chunks == 1 and set(cache.tags()) == keep and res.protected_bytes == 3 * 4096
    cache.close()


@pytest.mark.parametrize("text,want", [("1000", 1000), ("4K", 4096), ("512M", 512 << 20), ("20G", 20 << 30),
                                       ("2TiB", 2 << 40), ("1.5g", 3 << 29)])
def test_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "G", "-1G", "ten", "nan"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
