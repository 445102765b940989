"""Keyrings held as segments (docs/manifest.md, "Keyring segments"): sealed, decoded,
resolved lazily through deltas, filled segment by segment, and old inline parcels still read."""

from __future__ import annotations

import os
import random
import uuid

import pytest

from isrsync import manifest
from isrsync.chunk import CHUNK_SIZE, ZERO_REF, ChunkRef, encode
from isrsync.errors import FormatError, IntegrityError
from isrsync.keyring import SEGMENT_ENTRIES, LazyKeyring, decode_segment, segment_count
from isrsync.manifest import Keyring
from isrsync.vmspec import VmSpec

MK = bytes(range(32))
PARCEL = uuid.UUID(int=7)
N = 3 * SEGMENT_ENTRIES + 100  # four segments, the last one short


def _ref(rng: random.Random) -> ChunkRef:
    return ChunkRef(rng.randbytes(32), rng.randbytes(32), rng.choice((0, 2)))


def _ring(n: int = N, seed: int = 1, zero_segment: int | None = 1) -> Keyring:
    rng = random.Random(seed)
    ring = Keyring(n * CHUNK_SIZE)
    for i in range(n):
        if zero_segment is not None and i // SEGMENT_ENTRIES == zero_segment:
            continue  # a never-written stretch: a ZERO segment
        if rng.random() < 0.7:
            ring[i] = _ref(rng)
    return ring


def _fill(ring: LazyKeyring, segs: dict[bytes, bytes], only: list[int] | None = None) -> None:
    for j in (ring.missing() if only is None else only):
        ref = ring.segment_ref(j)
        ring.fill(j, decode_segment(ref, segs.get(ref.tag), ring.base_entries, j))


def _seal(ring: Keyring, version: int = 1, parent=None, dirty=None, trace=(), **kw) -> manifest.Sealed:
    return manifest.seal(parcel=PARCEL, version=version, master_key=MK, vm=VmSpec(), keyring=ring,
                         parent=parent, dirty=dirty, trace=trace, **kw)


def test_a_big_full_keyring_is_sealed_as_segments_and_rebuilt_exactly() -> None:
    ring = _ring()
    sealed = _seal(ring)
    assert len(sealed.segments) == segment_count(N) == 4
    assert sealed.segments[1].ref == ZERO_REF and not sealed.segments[1].data  # nothing to store or fetch
    # The keyring is not in the manifest any more: it is about the size of the segment refs.
    assert len(sealed.raw) < 2000 < len(manifest.encode(parcel=PARCEL, version=1, master_key=MK, vm=VmSpec(),
                                                        keyring=ring))
    m = manifest.decode(sealed.raw, MK, PARCEL)
    assert m.keyring is None and [r for r in m.segments] == [e.ref for e in sealed.segments]
    lazy = manifest.resolve([m]).keyring
    assert isinstance(lazy, LazyKeyring) and lazy.missing() == [0, 2, 3]
    _fill(lazy, {e.tag: e.data for e in sealed.segments})
    assert lazy.complete and lazy.copy() == ring


def test_an_entry_is_readable_only_once_its_segment_is_in() -> None:
    ring = _ring()
    sealed = _seal(ring)
    lazy = manifest.resolve([manifest.decode(sealed.raw, MK, PARCEL)]).keyring
    assert isinstance(lazy, LazyKeyring)
    i = 2 * SEGMENT_ENTRIES + 5
    with pytest.raises(RuntimeError):
        lazy[i]
    with pytest.raises(RuntimeError):
        lazy.tags()  # a whole-keyring read before all segments are in
    assert lazy[SEGMENT_ENTRIES + 3] == ZERO_REF  # a ZERO segment needs no fetch
    assert lazy.wanted([i, i + 1, 3]) == [0, 2]
    _fill(lazy, {e.tag: e.data for e in sealed.segments}, only=[2])
    assert lazy[i] == ring[i] and lazy.wanted([i, 3]) == [0]


def test_deltas_and_the_hot_entries_overrule_the_base_segments() -> None:
    rng = random.Random(5)
    v1 = _ring()
    s1 = _seal(v1)
    m1 = manifest.decode(s1.raw, MK, PARCEL)
    manifest.resolve([m1])
    v2 = v1.copy()
    changed = [3, SEGMENT_ENTRIES + 7, N - 1]
    for i in changed:
        v2[i] = _ref(rng)
    trace = [N - 1, 10, 2 * SEGMENT_ENTRIES + 1]  # what v2's session touched first
    s2 = _seal(v2, 2, m1, changed, trace=trace)
    m2 = manifest.decode(s2.raw, MK, PARCEL)
    assert m2.keyring is None and m2.delta is not None and not s2.segments  # a delta: no new segments
    assert set(m2.hot or {}) == set(trace)
    lazy = manifest.resolve([m1, m2]).keyring
    assert isinstance(lazy, LazyKeyring)
    # Named at once: the delta's entries and the trace's, with no segment fetched.
    for i in [*changed, *trace]:
        assert lazy[i] == v2[i]
    _fill(lazy, {e.tag: e.data for e in s1.segments})
    assert lazy.copy() == v2  # a segment arriving late never overwrites a newer entry


def test_a_shrink_then_a_grow_reads_zero_past_the_shrink() -> None:
    v1 = _ring()
    s1 = _seal(v1)
    m1 = manifest.decode(s1.raw, MK, PARCEL)
    small = v1.copy()
    small.resize((2 * SEGMENT_ENTRIES) * CHUNK_SIZE)
    m2 = manifest.decode(_seal(small, 2, m1, []).raw, MK, PARCEL)
    big = small.copy()
    big.resize(N * CHUNK_SIZE)
    m3 = manifest.decode(_seal(big, 3, m2, range(2 * SEGMENT_ENTRIES, N)).raw, MK, PARCEL)
    lazy = manifest.resolve([m1, m2, m3]).keyring
    assert isinstance(lazy, LazyKeyring)
    gone = max(i for i in range(2 * SEGMENT_ENTRIES, N) if not v1[i].is_zero)
    assert lazy[gone] == ZERO_REF != v1[gone]  # past the shrink: known at once, and ZERO
    _fill(lazy, {e.tag: e.data for e in s1.segments})
    assert lazy.copy() == big


def test_a_damaged_or_foreign_segment_is_refused() -> None:
    sealed = _seal(_ring())
    ref, data = sealed.segments[0].ref, sealed.segments[0].data
    flipped = bytearray(data)
    flipped[100] ^= 1
    with pytest.raises(IntegrityError):
        decode_segment(ref, bytes(flipped), N, 0)
    other = sealed.segments[2]
    with pytest.raises(IntegrityError):
        decode_segment(ref, other.data, N, 0)
    # A segment of valid ciphertext whose entries are malformed: refused too.
    bad = encode(b"\x00" * 64 + b"\x05" + bytes(65 * (SEGMENT_ENTRIES - 1)), os.urandom(32))
    with pytest.raises(FormatError):
        decode_segment(bad.ref, bad.data, N, 0)


def test_segments_are_convergent_and_keyed_by_the_parcel() -> None:
    ring = _ring()
    a, b = _seal(ring), _seal(ring)
    assert [e.tag for e in a.segments] == [e.tag for e in b.segments]  # unchanged segments are not sent again
    other = manifest.seal(parcel=PARCEL, version=1, master_key=bytes(32), vm=VmSpec(), keyring=ring)
    assert {e.tag for e in a.segments if e.data}.isdisjoint(e.tag for e in other.segments)


def test_small_keyrings_and_old_manifests_stay_inline_and_read() -> None:
    small = _ring(SEGMENT_ENTRIES, zero_segment=None)
    sealed = _seal(small)
    assert not sealed.segments
    m = manifest.decode(sealed.raw, MK, PARCEL)
    assert m.segments is None and m.keyring == small
    # A manifest written before segments (inline full keyring of a big disk) reads as before.
    big = _ring()
    old = manifest.decode(manifest.encode(parcel=PARCEL, version=1, master_key=MK, vm=VmSpec(), keyring=big),
                          MK, PARCEL)
    assert old.segments is None and manifest.resolve([old]).keyring == big


def test_a_segment_of_the_wrong_length_is_refused() -> None:
    sealed = _seal(_ring())
    lazy = manifest.resolve([manifest.decode(sealed.raw, MK, PARCEL)]).keyring
    assert isinstance(lazy, LazyKeyring)
    with pytest.raises(FormatError):
        lazy.fill(0, b"short")
    assert lazy.missing() == [0, 2, 3]


def test_the_hot_entries_are_the_first_of_a_long_trace_only() -> None:
    ring = _ring()
    trace = random.Random(3).sample(range(N), 3000)
    m = manifest.decode(_seal(ring, trace=trace).raw, MK, PARCEL)
    assert m.hot is not None and set(m.hot) == set(trace[: manifest.MAX_HOT_ENTRIES])
    assert all(m.hot[i] == ring[i] for i in m.hot)
    assert list(m.trace) == trace  # the trace itself is whole: the prefetch order


def test_the_entries_with_data_are_listed_from_the_flags_and_only_once_all_are_in() -> None:
    ring = _ring()
    assert ring.data_indexes() == [i for i, r in enumerate(ring) if not r.is_zero]
    assert 0 < len(ring.data_indexes()) < len(ring)
    sealed = _seal(ring)
    lazy = manifest.resolve([manifest.decode(sealed.raw, MK, PARCEL)]).keyring
    assert isinstance(lazy, LazyKeyring)
    with pytest.raises(RuntimeError):
        lazy.data_indexes()
    _fill(lazy, {e.tag: e.data for e in sealed.segments})
    assert lazy.data_indexes() == ring.data_indexes()
