"""A suspend's copy to a medium (isrsync.site.tomedium.MediumCopy) through the real media
plugin: chunks from a real site cache onto a real medium, read back verified; a full
medium drops the copy and keeps what the medium held."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from mediakit import make_chunks, make_manifest

from isrsync.chunk import CHUNK_SIZE
from isrsync.site import media
from isrsync.site.cache import SiteCache
from isrsync.site.registry import SourceRegistry
from isrsync.site.tomedium import MediumCopy
from sneakernet.medium import format_medium, open_medium
from sneakernet.plugin import Sink
from sneakernet.source import MediumSource


def _cache(tmp_path: Path, chunks: dict[bytes, bytes]) -> SiteCache:
    cache = SiteCache(tmp_path / "cache")
    cache.put_many(chunks.items())
    return cache


async def test_a_copy_lands_verified_with_its_manifests_and_reports_progress(tmp_path: Path) -> None:
    chunks = make_chunks(40)
    cache = _cache(tmp_path, chunks)
    root = tmp_path / "key"
    root.mkdir()
    format_medium(root, "travel")
    steps: list[tuple[str, int, int | None]] = []
    copy = MediumCopy(Sink(root), cache, lambda *a: steps.append(a))
    tags = list(chunks)
    absent = os.urandom(32)  # a chunk the cache does not have: skipped, counted
    parcel = uuid.uuid4()
    await copy.chunks([*tags[:30], absent, *tags[:5]])
    res = await copy.finish([make_manifest(parcel, 1), make_manifest(parcel, 2)], keybundle=b"sealed bundle")
    assert res.published and res.problem is None and res.chunks == 30 and res.missing == 1, res
    assert res.bytes == sum(len(chunks[t]) for t in tags[:30])
    assert steps and steps[-1] == ("medium", res.bytes, res.bytes)
    assert all(b[1] >= a[1] for a, b in zip(steps, steps[1:]))  # never backwards

    m = open_medium(root)
    assert [(p.parcel, p.versions) for p in m.parcels()] == [(parcel, (1, 2))]
    assert m.keybundle() == b"sealed bundle"
    reg = SourceRegistry(SiteCache(tmp_path / "reader"))
    src = MediumSource(root)
    reg.add(src)
    try:
        got = await reg.fetch_many(tags[:30])
        assert got == {t: chunks[t] for t in tags[:30]}
        assert {i.name: i for i in reg.infos()}[src.name].bad == 0
    finally:
        await reg.close()
    cache.close()


async def test_a_full_medium_drops_the_copy_and_keeps_what_it_held(tmp_path: Path, mounts) -> None:
    root = mounts.tmpfs(tmp_path / "small", "size=1m")
    format_medium(root, "tiny")
    first = make_chunks(3)
    cache = _cache(tmp_path, {**first})
    copy = MediumCopy(Sink(root), cache)
    await copy.chunks(list(first))
    assert (await copy.finish([])).published
    # Full-size chunks: with random lengths twenty could fit in 1 MiB (one run drew 675 KB).
    big = make_chunks(20, size=CHUNK_SIZE)  # 2.5 MiB of incompressible chunks: more than the medium holds
    cache.put_many(big.items())
    copy = MediumCopy(Sink(root), cache)
    await copy.chunks(list(big))
    res = await copy.finish([])
    assert not res.published and "full" in (res.problem or ""), res
    src = MediumSource(root)
    try:
        assert await src.get_many(list(first)) == first  # the earlier copy is still there, whole
        assert await src.get_many(list(big)[:3]) == {}
    finally:
        await src.close()
    leftovers = [p for p in (root / ".isrsync").rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers, leftovers
    cache.close()


def test_isrsync_finds_the_media_plugin_through_its_entry_point(tmp_path: Path) -> None:
    assert media.available()
    plug = media.plugin()
    root = tmp_path / "key"
    root.mkdir()
    assert not plug.is_medium(root)
    format_medium(root, "k")
    assert plug.is_medium(root)
    assert media.pick_medium(str(root)) == root.resolve()
    src = media.open_lookaside(root, tmp_path / "cache")
    assert src.kind.value == "medium"
    asyncio.run(src.close())
