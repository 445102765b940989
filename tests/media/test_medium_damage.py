"""A damaged, stale, swapped, foreign or pulled medium, read through a real SourceRegistry
over a real site cache: the registry falls through to the next source, counts what the
medium did wrong (``bad``, ``errors``), and never lets a wrong byte in."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from mediakit import DictSource, flip, make_chunks, read_index, rewrite_index, where

from isrsync.site.serversource import ServerSource
from isrsync.site.registry import SourceRegistry
from isrsync.store.memory import MemoryStore
from sneakernet import format as fmt
from sneakernet.indexer import index_tree
from sneakernet.medium import format_medium, open_medium
from sneakernet.source import MediumSource


def write_medium(root: Path, chunks: dict[bytes, bytes], *, loose: int = 0, pack_limit: int = 1 << 20) -> None:
    """A formatted medium: ``loose`` chunks as one-chunk files, the rest in packs; then indexed."""
    root.mkdir(parents=True, exist_ok=True)
    m = format_medium(root, "damage")
    items = list(chunks.items())
    for i, (_, d) in enumerate(items[:loose]):
        (root / "loose").mkdir(exist_ok=True)
        (root / "loose" / f"{i:03d}").write_bytes(d)
    with m.writer(pack_limit=pack_limit) as w:
        w.add_chunks(items[loose:])
        w.publish()
    index_tree(root)


async def fetch(registry: SourceRegistry, medium: MediumSource, fallback: DictSource,
                tags: list[bytes]) -> dict[bytes, bytes]:
    registry.add(medium)
    registry.add(fallback)
    assert registry.names() == [medium.name, fallback.name]
    return await asyncio.wait_for(registry.fetch_many(tags), 30)


def assert_clean(registry: SourceRegistry, chunks: dict[bytes, bytes]) -> None:
    assert registry.cache.verify() == []
    for t in registry.cache.tags():
        assert registry.cache.get(t) == chunks[t], "a wrong byte reached the cache"


def stats(registry: SourceRegistry, source: MediumSource | DictSource) -> tuple[int, int, int]:
    s = registry.stats()[source.name]
    return s.hits, s.bad, s.errors


async def test_an_intact_medium_serves_everything(tmp_path: Path, registry: SourceRegistry, chunks) -> None:
    write_medium(tmp_path / "key", chunks, loose=8)
    src, fb = MediumSource(tmp_path / "key"), DictSource(chunks)
    assert await fetch(registry, src, fb, list(chunks)) == chunks
    assert stats(registry, src) == (len(chunks), 0, 0) and not fb.asked
    assert await src.holds([*chunks, os.urandom(32), b"short"]) == set(chunks)
    assert src.cost() < ServerSource(MemoryStore("u").client(), os.urandom(16)).cost()  # type: ignore[arg-type]
    assert_clean(registry, chunks)


async def test_bit_flips_are_bad_answers(tmp_path: Path, registry: SourceRegistry, chunks) -> None:
    root = tmp_path / "key"
    write_medium(root, chunks, loose=8)
    tags = list(chunks)
    victims = [tags[0], tags[3], tags[12], tags[20]]  # two loose files, two pack entries
    for t in victims:
        path, off, n = where(root, t)
        flip(path, off + n // 3)
    src, fb = MediumSource(root), DictSource(chunks)
    assert await fetch(registry, src, fb, tags) == chunks
    assert stats(registry, src) == (len(tags) - 4, 4, 0)
    assert sorted(fb.asked) == sorted(victims)
    assert_clean(registry, chunks)


async def test_truncated_files_only_fail_to_help(tmp_path: Path, registry: SourceRegistry, chunks) -> None:
    root = tmp_path / "key"
    write_medium(root, chunks, loose=4, pack_limit=1 << 40)  # one pack holds the other 28
    idx = read_index(root)
    pack = next(f for f in idx.files if f.kind == fmt.FileKind.PACK)
    in_pack = sorted((e for e in idx.entries if idx.file_of(e) == pack), key=lambda e: e.offset)
    cut = in_pack[len(in_pack) // 2]
    os.truncate(root / pack.path, cut.offset + cut.length // 2)
    loose = root / "loose" / "001"
    os.truncate(loose, 5)
    lost = {e.tag for e in in_pack if e.offset + e.length > cut.offset} | {next(t for t, d in chunks.items()
                                                                                if d[:5] == loose.read_bytes())}
    src, fb = MediumSource(root), DictSource(chunks)
    assert await fetch(registry, src, fb, list(chunks)) == chunks
    assert stats(registry, src) == (len(chunks) - len(lost), 0, 0), "a short read is absent, not bad"
    assert set(fb.asked) == lost
    assert_clean(registry, chunks)


async def test_files_swapped_between_tags(tmp_path: Path, registry: SourceRegistry) -> None:
    chunks = make_chunks(12, size=50_000)  # equal sizes: a swapped file reads in full, wrongly
    root = tmp_path / "key"
    write_medium(root, chunks, loose=6, pack_limit=200_000)
    a, b = root / "loose" / "000", root / "loose" / "001"
    tmp = root / "loose" / "swap"
    os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)
    packs = sorted((root / fmt.DIR / fmt.PACKS_DIR).iterdir())
    assert len(packs) >= 2
    os.replace(packs[0], root / "p0"), os.replace(packs[1], packs[0]), os.replace(root / "p0", packs[1])
    src, fb = MediumSource(root), DictSource(chunks)
    assert await fetch(registry, src, fb, list(chunks)) == chunks
    hits, bad, errors = stats(registry, src)
    assert bad >= 2 and errors == 0 and hits + len(fb.asked) == len(chunks)
    assert_clean(registry, chunks)


async def test_a_stale_index_from_an_older_version_helps_with_what_is_unchanged(
    tmp_path: Path, registry: SourceRegistry
) -> None:
    root = tmp_path / "key"
    v1 = make_chunks(10, size=40_000)
    write_medium(root, v1, loose=10)
    old_index = read_index(root)
    # The next version: half the loose files are rewritten with other chunks, and indexed.
    v2 = make_chunks(5, size=40_000)
    for i, d in enumerate(v2.values()):
        (root / "loose" / f"{i:03d}").write_bytes(d)
    index_tree(root)
    # ...and then the old index comes back (a copy of the key made before, a restored backup).
    rewrite_index(root, fmt.Index(old_index.medium_id, old_index.generation + 10, 0, old_index.files,
                                  old_index.entries))
    everything = v1 | v2
    src, fb = MediumSource(root), DictSource(everything)
    assert await fetch(registry, src, fb, list(everything)) == everything
    hits, bad, errors = stats(registry, src)
    assert (hits, bad, errors) == (5, 5, 0), "the unchanged half still helps; the rest is bad, never used"
    assert_clean(registry, everything)


async def test_a_damaged_index_is_an_empty_one(tmp_path: Path, registry: SourceRegistry, chunks) -> None:
    root = tmp_path / "key"
    write_medium(root, chunks)
    flip(root / fmt.DIR / fmt.INDEX_FILE, 100)
    src, fb = MediumSource(root), DictSource(chunks)
    assert await fetch(registry, src, fb, list(chunks)) == chunks
    assert stats(registry, src) == (0, 0, 0) and "checksum" in (src.index_problem or "")
    assert_clean(registry, chunks)


async def test_another_users_medium_only_fails_to_help(tmp_path: Path, registry: SourceRegistry, chunks) -> None:
    root = tmp_path / "key"
    write_medium(root, make_chunks(8))  # same plaintext sizes, another convergence secret
    src, fb = MediumSource(root), DictSource(chunks)
    assert await fetch(registry, src, fb, list(chunks)) == chunks
    assert stats(registry, src) == (0, 0, 0) and len(fb.asked) == len(chunks)


async def test_a_medium_written_while_open_is_followed(tmp_path: Path, registry: SourceRegistry) -> None:
    root = tmp_path / "key"
    first, later = make_chunks(4), make_chunks(4)
    write_medium(root, first)
    src, fb = MediumSource(root), DictSource(first | later)
    assert await fetch(registry, src, fb, list(first)) == first
    with open_medium(root).writer() as w:
        w.add_chunks(later.items())
        w.publish()
    assert await asyncio.wait_for(registry.fetch_many(list(later)), 30) == later
    assert stats(registry, src) == (8, 0, 0) and not fb.asked


async def test_files_deleted_mid_use(tmp_path: Path, registry: SourceRegistry, chunks) -> None:
    root = tmp_path / "key"
    write_medium(root, chunks, loose=16, pack_limit=1 << 40)
    tags = list(chunks)
    src, fb = MediumSource(root), DictSource(chunks)
    assert await fetch(registry, src, fb, tags[:2]) == {t: chunks[t] for t in tags[:2]}
    shutil.rmtree(root / "loose")
    for p in (root / fmt.DIR / fmt.PACKS_DIR).iterdir():
        p.unlink()
    got = await asyncio.wait_for(registry.fetch_many(tags), 30)
    assert got == chunks
    hits, bad, errors = stats(registry, src)
    assert bad == 0 and errors == 0 and hits + len(fb.asked) == len(tags)
    assert_clean(registry, chunks)


@pytest.mark.parametrize("when", ["between reads", "during reads"])
async def test_a_medium_pulled_mid_read(tmp_path: Path, registry: SourceRegistry, mounts, when: str) -> None:
    chunks = make_chunks(200, size=64 * 1024)
    key = mounts.tmpfs(tmp_path / "key", "size=32m")
    write_medium(key, chunks, loose=60, pack_limit=1 << 20)
    tags = list(chunks)
    src, fb = MediumSource(key), DictSource(chunks)
    assert await fetch(registry, src, fb, tags[:10]) == {t: chunks[t] for t in tags[:10]}
    batches = [tags[i : i + 10] for i in range(10, len(tags), 10)]
    if when == "between reads":
        mounts.pull(key)
        results = [await asyncio.wait_for(registry.fetch_many(b), 30) for b in batches]
    else:
        # The key is pulled by the source's own worker as it starts its third
        # read, while the other requests are queued behind it.
        inner, calls = src._read, []

        def read(asked: list[bytes]) -> dict[bytes, bytes]:
            calls.append(len(asked))
            if len(calls) == 3:
                mounts.pull(key)
            return inner(asked)

        src._read = read  # type: ignore[method-assign]
        reads = [asyncio.ensure_future(registry.fetch_many(b)) for b in batches]
        results = await asyncio.wait_for(asyncio.gather(*reads), 60)
        assert len(calls) >= 3
    for b, got in zip(batches, results):
        assert got == {t: chunks[t] for t in b}
    hits, bad, errors = stats(registry, src)
    assert bad == 0, "a pulled medium never answers wrong bytes"
    assert errors >= 1, "the registry counted the pulled medium"
    assert hits + len(fb.asked) == len(tags)
    if when == "between reads":
        # Each request that still asks it finds it gone and says so, until its
        # growing penalty puts it behind the fallback.
        assert hits == 10 and 1 <= errors <= len(batches)
    assert_clean(registry, chunks)
    with pytest.raises(OSError):
        await src.get_many(tags[:1])
