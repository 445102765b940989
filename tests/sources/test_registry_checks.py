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
from isrsync.site.sources import SourceRegistry


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
