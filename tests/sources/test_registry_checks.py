"""The registry's tag check, beside the per-backend conformance suite.

The check hashes every fetched chunk: it runs on a worker thread, not on the
loop that serves the guest's disk, and the cache stores what it passed without
hashing it again. Neither may let a lying answer through.
"""

from __future__ import annotations

import os
import threading

import pytest
from sourcekit import DictSource, make_chunks

from isrsync import chunk as chunk_mod
from isrsync.site.registry import SourceRegistry


async def test_lying_answers_are_bad_and_the_next_source_answers(registry: SourceRegistry) -> None:
    chunks = make_chunks(6)
    tags = list(chunks)
    flipped, wrong_type, swapped = tags[0], tags[1], tags[2]
    lies = dict(chunks)
    lies[flipped] = bytes([chunks[flipped][0] ^ 1]) + chunks[flipped][1:]
    lies[wrong_type] = chunks[wrong_type].hex()  # not bytes at all
    lies[swapped] = chunks[tags[3]]  # another chunk's good bytes
    liar = DictSource(lies, name="liar", cost=0.0)
    registry.add(liar)
    registry.add(DictSource(chunks))

    assert await registry.fetch_many(tags) == chunks
    s = registry.stats()
    assert (s["liar"].hits, s["liar"].bad) == (3, 3)
    assert s["fallback"].hits == 3
    assert registry.cache.verify() == []
    assert {t: registry.cache.get(t) for t in tags} == chunks


async def test_each_fetched_chunk_is_hashed_once_and_off_the_loop(
    registry: SourceRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = make_chunks(8)
    registry.add(DictSource(chunks))
    loop_thread = threading.get_ident()
    where: list[int] = []
    real = chunk_mod.tag_of

    def spy(data: bytes) -> bytes:
        where.append(threading.get_ident())
        return real(data)

    monkeypatch.setattr(chunk_mod, "tag_of", spy)
    assert await registry.fetch_many([*chunks, os.urandom(32)], required=False) == chunks
    assert len(where) == len(chunks), "each chunk hashed once: checked, then cached as checked"
    assert loop_thread not in where


def _flip_stored(cache, tag: bytes) -> None:
    """Flip one byte of a chunk where the site cache keeps it (as a failing disk would)."""
    kind, name, off, n = cache._db.execute(
        "SELECT f.kind, f.name, c.offset, c.length FROM chunks c JOIN files f ON f.id=c.file WHERE c.tag=?",
        (tag,)).fetchone()
    path = cache.path / ("segments" if kind == "segment" else "packs") / name
    with open(path, "r+b") as f:
        f.seek(off + n // 2)
        b = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([b[0] ^ 0x5A]))


async def test_damaged_cache_copies_are_counted_said_once_and_fetched_again(registry: SourceRegistry) -> None:
    chunks = make_chunks(8)
    tags = list(chunks)
    for t in tags:
        assert registry.cache.put(t, chunks[t])
    for t in tags[:3]:
        _flip_stored(registry.cache, t)
    said: list[str] = []
    registry.warn = said.append
    registry.add(DictSource(chunks))

    assert await registry.fetch_many(tags) == chunks  # never a wrong byte
    assert await registry.fetch_many(tags) == chunks  # the second time, all from the cache, all good
    s = registry.stats()
    assert s["cache"].bad == 3 and s["fallback"].hits == 3
    assert len(said) == 1 and "\n" not in said[0] and "cache verify" in said[0], said
    # The rows `isrsync sources` and `status` print, and their --json, are this one value.
    (row,) = [i for i in registry.infos() if i.name == "cache"]
    assert (row.hits, row.bytes, row.bad) == (s["cache"].hits, s["cache"].bytes, s["cache"].bad)
    # Dropped, then stored again good: nothing is left for `cache verify`.
    assert registry.cache.verify() == []
    assert {t: registry.cache.get(t) for t in tags} == chunks
