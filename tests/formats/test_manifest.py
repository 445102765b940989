"""Tests of isrsync.manifest: sealed versions, keyring deltas and chain resolution."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import struct
import uuid
from array import array

import pytest

from isrsync import manifest as mf
from isrsync.chunk import CHUNK_SIZE, CODEC_VERSION, FLAG_ZERO, FLAG_ZSTD, ZERO_REF, ChunkRef, chunk_count
from isrsync.errors import FormatError, IntegrityError, UnsupportedVersion
from isrsync.manifest import (
    HEADER_SIZE,
    NO_PARENT,
    Keyring,
    MemoryImage,
    decode,
    encode,
    manifest_hash,
    parse_header,
    resolve,
)
from isrsync.vmspec import VmSpec

PARCEL = uuid.UUID("12345678-1234-5678-1234-567812345678")
OTHER_PARCEL = uuid.UUID("87654321-4321-8765-4321-876543218765")
KEY = hashlib.sha256(b"master key").digest()
OTHER_KEY = hashlib.sha256(b"other master key").digest()
GiB = 1 << 30

VM = VmSpec.from_json({
    "machine": "pc-q35-7.2",
    "memory_mib": 2048,
    "cpus": 2,
    "devices": [{"kind": "virtio-net", "mac": "52:54:00:12:34:56"}, {"kind": "usb-tablet"}],
    "hardware": "x86_64-v2",
    "nested": {"a": [1, 2.5, None, True], "unicode": "résumé ✓"},
})


def rref(rng: random.Random, flags: int | None = None) -> ChunkRef:
    if flags is None:
        flags = rng.choice([0, FLAG_ZSTD])
    return ChunkRef(rng.randbytes(32), rng.randbytes(32), flags)


def random_keyring(size: int, rng: random.Random, zero_fraction: float = 0.2) -> Keyring:
    refs = [ZERO_REF if rng.random() < zero_fraction else rref(rng) for _ in range(chunk_count(size))]
    return Keyring.from_refs(size, refs)


def flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def v1(keyring: Keyring, **kw) -> bytes:
    return encode(parcel=PARCEL, version=1, master_key=KEY, vm=VM, keyring=keyring, **kw)


# -- keyring ----------------------------------------------------------------------------


def test_keyring_basics() -> None:
    rng = random.Random(1)
    size = 10 * CHUNK_SIZE + 5
    ring = Keyring(size)
    assert len(ring) == 11 and ring.size == size
    assert all(r == ZERO_REF for r in ring)
    assert ring.tags() == set()
    refs = [rref(rng) for _ in range(11)]
    for i, r in enumerate(refs):
        ring[i] = r
    assert list(ring) == refs
    assert ring.tag_at(3) == refs[3].tag
    assert ring.tags() == {r.tag for r in refs}
    assert Keyring.from_refs(size, refs) == ring
    assert Keyring.from_bytes(size, ring.to_bytes()) == ring
    c = ring.copy()
    c[0] = ZERO_REF
    assert c != ring and ring[0] == refs[0]
    with pytest.raises(IndexError):
        ring[11]
    with pytest.raises(IndexError):
        ring[-1] = ZERO_REF
    with pytest.raises(FormatError):
        Keyring.from_bytes(size, ring.to_bytes()[:-1])
    bad = bytearray(ring.to_bytes())
    bad[64] = 0x80
    with pytest.raises(FormatError):
        Keyring.from_bytes(size, bytes(bad))
    bad = bytearray(ring.to_bytes())
    bad[64] = FLAG_ZERO  # ZERO with a nonzero tag
    with pytest.raises(FormatError):
        Keyring.from_bytes(size, bytes(bad))


def test_keyring_resize_and_dirty_since() -> None:
    rng = random.Random(2)
    ring = random_keyring(20 * CHUNK_SIZE, rng)
    old = ring.copy()
    ring.resize(25 * CHUNK_SIZE - 1)
    assert len(ring) == 25 and all(ring[i] == ZERO_REF for i in range(20, 25))
    assert [ring[i] for i in range(20)] == [old[i] for i in range(20)]
    assert mf.dirty_since(old, ring) == [20, 21, 22, 23, 24]
    ring.resize(7 * CHUNK_SIZE)
    assert len(ring) == 7 and [ring[i] for i in range(7)] == [old[i] for i in range(7)]
    ring[3] = rref(rng)
    assert mf.dirty_since(old, ring) == ([3] if ring[3] != old[3] else [])


# -- round trip -------------------------------------------------------------------------


def test_round_trip_all_fields() -> None:
    rng = random.Random(3)
    disk = 64 * CHUNK_SIZE + 12345
    ring = random_keyring(disk, rng)
    mem_len = 9 * CHUNK_SIZE + 77
    mem = MemoryImage.from_refs(mem_len, [rref(rng) for _ in range(chunk_count(mem_len))])
    trace = [5, 0, 64, 3, 3, 17]
    raw = v1(
        ring, memory=mem, trace=trace, site="site-a.example", time=1712345678.25,
        extra={"note": "hello", "n": [1, 2, 3]},
    )
    m = decode(raw, KEY, PARCEL)
    assert m.version == 1 and m.parcel == PARCEL
    h = m.header
    assert h.format == mf.FORMAT and h.full_keyring and h.keyring_base == 1
    assert h.parent == NO_PARENT and h.body_length == len(raw) - HEADER_SIZE
    assert m.hash == manifest_hash(raw) == hashlib.blake2b(raw, digest_size=32).digest()
    assert m.vm == VM
    assert m.disk_size == disk
    assert m.keyring == ring and m.delta is None
    assert m.memory is not None and m.memory.length == mem_len and m.memory.refs == mem.refs
    assert list(m.memory.refs) == list(mem.refs)
    assert isinstance(m.trace, array) and list(m.trace) == trace
    assert m.site == "site-a.example"
    assert m.time == 1712345678.25
    assert m.codec == CODEC_VERSION
    assert m.extra == {"note": "hello", "n": [1, 2, 3]}
    assert parse_header(raw) == h
    assert resolve([m]) is m


def test_round_trip_memory_with_ram_apart() -> None:
    rng = random.Random(4)
    ram = random_keyring(16 * CHUNK_SIZE, rng, zero_fraction=0.5)
    mem = MemoryImage.from_refs(2 * CHUNK_SIZE + 9, [rref(rng) for _ in range(3)], ram)
    m = decode(v1(random_keyring(CHUNK_SIZE, rng), memory=mem), KEY, PARCEL)
    assert m.memory is not None and m.memory.refs == mem.refs and m.memory.length == mem.length
    assert m.memory.ram == ram and m.memory.ram is not None and m.memory.ram.size == ram.size
    assert m.memory.tags() == mem.refs.tags() | ram.tags()
    # Without RAM apart (boot files, images from before): no RAM comes back.
    plain = decode(v1(Keyring(CHUNK_SIZE), memory=MemoryImage.from_refs(CHUNK_SIZE, [rref(rng)])), KEY)
    assert plain.memory is not None and plain.memory.ram is None


def test_ram_section_and_metadata_must_agree() -> None:
    rng = random.Random(6)
    ram = random_keyring(4 * CHUNK_SIZE, rng)
    m = decode(v1(Keyring(CHUNK_SIZE), memory=MemoryImage.from_refs(CHUNK_SIZE, [rref(rng)], ram)), KEY)

    def inner(meta_extra: dict, sections: list[tuple[int, bytes]]) -> bytes:
        meta = {"vm": {}, "disk_size": CHUNK_SIZE, "memory_length": None, "site": "", "time": 0.0,
                "codec": CODEC_VERSION, **meta_extra}
        raw = json.dumps(meta).encode()
        out = mf.BODY_MAGIC + struct.pack("<I", len(raw)) + raw
        for kind, data in [(mf.S_KEYRING_FULL, Keyring(CHUNK_SIZE).to_bytes()), *sections]:
            out += struct.pack("<BQ", kind, len(data)) + data
        return out

    mem = (mf.S_MEMORY, m.memory.refs.to_bytes())
    with pytest.raises(FormatError, match="lacks its RAM image"):
        mf._parse_inner(m.header, m.hash, inner({"memory_length": CHUNK_SIZE, "ram_size": ram.size}, [mem]))
    with pytest.raises(FormatError, match="RAM image without a memory image"):
        mf._parse_inner(m.header, m.hash, inner({}, [(mf.S_RAM, ram.to_bytes())]))
    with pytest.raises(FormatError, match="metadata is malformed"):
        mf._parse_inner(m.header, m.hash, inner({"ram_size": ram.size}, [(mf.S_RAM, ram.to_bytes())]))
    with pytest.raises(FormatError):  # a RAM keyring of the wrong length for its size
        mf._parse_inner(m.header, m.hash, inner({"memory_length": CHUNK_SIZE, "ram_size": 9 * CHUNK_SIZE},
                                                [mem, (mf.S_RAM, ram.to_bytes())]))


def test_the_ram_trace_round_trips_and_is_checked() -> None:
    rng = random.Random(8)
    ram = random_keyring(16 * CHUNK_SIZE, rng, zero_fraction=0.5)
    mem = MemoryImage.from_refs(CHUNK_SIZE, [rref(rng)], ram, hot=[9, 3, 15, 0])
    m = decode(v1(Keyring(CHUNK_SIZE), memory=mem), KEY)
    assert m.memory is not None and list(m.memory.hot) == [9, 3, 15, 0]
    # None recorded: nothing comes back, and the section is not written.
    bare = decode(v1(Keyring(CHUNK_SIZE), memory=MemoryImage.from_refs(CHUNK_SIZE, [rref(rng)], ram)), KEY)
    assert bare.memory is not None and list(bare.memory.hot) == []
    with pytest.raises(ValueError, match="past guest RAM"):
        v1(Keyring(CHUNK_SIZE), memory=MemoryImage.from_refs(CHUNK_SIZE, [rref(rng)], ram, hot=[16]))
    with pytest.raises(ValueError, match="needs RAM kept apart"):
        v1(Keyring(CHUNK_SIZE), memory=MemoryImage.from_refs(CHUNK_SIZE, [rref(rng)], hot=[0]))

    def inner(meta_extra: dict, sections: list[tuple[int, bytes]]) -> bytes:
        meta = {"vm": {}, "disk_size": CHUNK_SIZE, "memory_length": CHUNK_SIZE, "site": "", "time": 0.0,
                "codec": CODEC_VERSION, **meta_extra}
        raw = json.dumps(meta).encode()
        out = mf.BODY_MAGIC + struct.pack("<I", len(raw)) + raw
        for kind, data in [(mf.S_KEYRING_FULL, Keyring(CHUNK_SIZE).to_bytes()),
                           (mf.S_MEMORY, mem.refs.to_bytes()), *sections]:
            out += struct.pack("<BQ", kind, len(data)) + data
        return out

    ram_sec = (mf.S_RAM, ram.to_bytes())
    with pytest.raises(FormatError, match="RAM trace points past"):
        mf._parse_inner(m.header, m.hash, inner({"ram_size": ram.size},
                                                [ram_sec, (mf.S_RAM_TRACE, struct.pack("<I", 16))]))
    with pytest.raises(FormatError, match="RAM trace is malformed"):
        mf._parse_inner(m.header, m.hash, inner({"ram_size": ram.size}, [ram_sec, (mf.S_RAM_TRACE, b"\x01\x02")]))
    with pytest.raises(FormatError, match="RAM trace without a RAM image"):
        mf._parse_inner(m.header, m.hash, inner({}, [(mf.S_RAM_TRACE, struct.pack("<I", 1))]))


def test_round_trip_minimal() -> None:
    raw = encode(parcel=PARCEL, version=1, master_key=KEY, vm=VmSpec(), keyring=Keyring(0))
    m = decode(raw, KEY)
    assert m.vm == VmSpec() and m.disk_size == 0 and len(m.keyring) == 0
    assert m.memory is None and list(m.trace) == [] and m.site == "" and m.time == 0.0
    assert m.extra == {}


def test_memory_image_of_zero_length() -> None:
    raw = v1(Keyring(CHUNK_SIZE), memory=MemoryImage.from_refs(0, []))
    m = decode(raw, KEY)
    assert m.memory is not None and m.memory.length == 0 and len(m.memory.refs) == 0


def test_body_is_encrypted_and_randomized() -> None:
    rng = random.Random(4)
    ring = random_keyring(8 * CHUNK_SIZE, rng, zero_fraction=0)
    raw1 = v1(ring, site="secret-site-name")
    raw2 = v1(ring, site="secret-site-name")
    assert raw1[:HEADER_SIZE] == raw2[:HEADER_SIZE]
    assert raw1 != raw2  # random nonce
    for r in ring:
        assert r.key not in raw1 and r.tag not in raw1
    assert b"secret-site-name" not in raw1 and b"pc-q35" not in raw1
    assert decode(raw1, KEY).keyring == decode(raw2, KEY).keyring == ring


def test_encode_rejects_inconsistent_versions() -> None:
    ring = Keyring(4 * CHUNK_SIZE)
    m1 = decode(v1(ring), KEY)
    with pytest.raises(ValueError):
        encode(parcel=PARCEL, version=2, master_key=KEY, vm=VM, keyring=ring)
    with pytest.raises(ValueError):
        encode(parcel=PARCEL, version=1, master_key=KEY, vm=VM, keyring=ring, parent=m1)
    with pytest.raises(ValueError):
        encode(parcel=PARCEL, version=3, master_key=KEY, vm=VM, keyring=ring, parent=m1, dirty=[])
    with pytest.raises(ValueError):
        encode(parcel=OTHER_PARCEL, version=2, master_key=KEY, vm=VM, keyring=ring, parent=m1, dirty=[])
    with pytest.raises(ValueError):
        encode(parcel=PARCEL, version=0, master_key=KEY, vm=VM, keyring=ring)


# -- chains -----------------------------------------------------------------------------


class Writer:
    """Plays the committing site: keeps the live keyring and the last manifest."""

    def __init__(self, size: int, rng: random.Random, full_every: int) -> None:
        self.rng = rng
        self.full_every = full_every
        self.ring = random_keyring(size, rng)
        self.raws = [v1(self.ring, full_every=full_every)]
        self.snapshots = [self.ring.copy()]
        self.last = decode(self.raws[0], KEY)

    def commit(self, dirty: set[int], **kw) -> mf.Manifest:
        raw = encode(
            parcel=PARCEL, version=self.last.version + 1, master_key=KEY, vm=VM, keyring=self.ring,
            parent=self.last, dirty=dirty, full_every=self.full_every, **kw,
        )
        self.raws.append(raw)
        self.snapshots.append(self.ring.copy())
        self.last = decode(raw, KEY, PARCEL)
        return self.last

    def chain_for(self, version: int) -> list[mf.Manifest]:
        """What a reader fetches: the target's header names its keyring base."""
        base = parse_header(self.raws[version - 1]).keyring_base
        return [decode(r, KEY, PARCEL) for r in self.raws[base - 1 : version]]


def test_chain_of_40_versions_resolves_exactly() -> None:
    rng = random.Random(5)
    full_every = 8
    w = Writer(300 * CHUNK_SIZE + 999, rng, full_every)
    for _ in range(39):
        dirty: set[int] = set()
        for _ in range(rng.randrange(0, 25)):
            i = rng.randrange(len(w.ring))
            w.ring[i] = ZERO_REF if rng.random() < 0.15 else rref(rng)
            dirty.add(i)
        # a dirty index whose entry did not really change is harmless
        dirty.add(rng.randrange(len(w.ring)))
        w.commit(dirty)
    assert len(w.raws) == 40

    expected_full = {v for v in range(1, 41) if (v - 1) % full_every == 0}
    assert expected_full == {1, 9, 17, 25, 33}
    for v, raw in enumerate(w.raws, start=1):
        h = parse_header(raw)
        assert h.version == v
        assert h.full_keyring == (v in expected_full), v
        assert h.keyring_base == max(b for b in expected_full if b <= v)
        m = decode(raw, KEY, PARCEL)
        assert (m.keyring is not None) == h.full_keyring
        assert (m.delta is not None) != h.full_keyring
        if v > 1:
            assert h.parent == manifest_hash(w.raws[v - 2])

    for v in range(1, 41):
        chain = w.chain_for(v)
        assert chain[0].header.full_keyring and len(chain) == (v - 1) % full_every + 1
        target = resolve(chain)
        assert target is chain[-1]
        assert target.keyring == w.snapshots[v - 1], f"version {v} keyring differs"
        # resolving again gives the same keyring
        assert resolve(chain).keyring == w.snapshots[v - 1]


def test_delta_holds_only_dirty_entries() -> None:
    rng = random.Random(6)
    w = Writer(100 * CHUNK_SIZE, rng, 32)
    changed = {3, 50, 99}
    for i in changed:
        w.ring[i] = rref(rng)
    m = w.commit(changed | {1000, 5000})  # indices past the disk are ignored
    assert not m.header.full_keyring and m.header.keyring_base == 1
    assert set(m.delta) == changed
    assert all(m.delta[i] == w.ring[i] for i in changed)


def test_empty_delta() -> None:
    rng = random.Random(7)
    w = Writer(50 * CHUNK_SIZE, rng, 32)
    m = w.commit(set(), site="b", time=2.0)
    assert not m.header.full_keyring and m.delta == {}
    assert resolve(w.chain_for(2)).keyring == w.snapshots[0]


def test_dirty_none_writes_a_full_keyring() -> None:
    rng = random.Random(8)
    w = Writer(50 * CHUNK_SIZE, rng, 32)
    raw = encode(
        parcel=PARCEL, version=2, master_key=KEY, vm=VM, keyring=w.ring, parent=w.last, dirty=None,
    )
    h = parse_header(raw)
    assert h.full_keyring and h.keyring_base == 2
    assert decode(raw, KEY).keyring == w.ring


def test_disk_grow_and_shrink_through_deltas() -> None:
    rng = random.Random(9)
    w = Writer(100 * CHUNK_SIZE, rng, 32)

    # grow by 60 chunks and a bit; write a few of the new chunks
    w.ring.resize(160 * CHUNK_SIZE + 4096)
    grown = {100, 130, 160}
    for i in grown:
        w.ring[i] = rref(rng)
    m2 = w.commit(grown | {5})
    assert not m2.header.full_keyring
    assert m2.disk_size == 160 * CHUNK_SIZE + 4096

    # shrink below the original size
    w.ring.resize(70 * CHUNK_SIZE - 1)
    w.ring[10] = rref(rng)
    m3 = w.commit({10})
    assert not m3.header.full_keyring and m3.disk_size == 70 * CHUNK_SIZE - 1

    # grow again: the regrown tail must read as zeros, not as the old entries
    w.ring.resize(90 * CHUNK_SIZE)
    m4 = w.commit(set())
    assert not m4.header.full_keyring

    # shrink and regrow within one version: the caller names the indices past the shrink
    w.ring.resize(70 * CHUNK_SIZE)
    w.ring.resize(80 * CHUNK_SIZE)
    m5 = w.commit(set(range(70, 90)))
    assert not m5.header.full_keyring

    for v in range(1, 6):
        target = resolve(w.chain_for(v))
        assert target.keyring == w.snapshots[v - 1], v
        assert target.keyring.size == w.snapshots[v - 1].size
    assert all(r == ZERO_REF for r in list(resolve(w.chain_for(4)).keyring)[70:])


def test_large_delta_becomes_full() -> None:
    rng = random.Random(10)
    n = 1000
    w = Writer(n * CHUNK_SIZE, rng, 32)
    # A delta record is 69 bytes, a keyring record 65: the delta is refused as soon
    # as it is at least half the keyring.
    threshold = -(-n * 65 // (2 * 69))
    for count, full in [(100, False), (threshold - 1, False), (threshold, True), (600, True), (n, True)]:
        dirty = set(rng.sample(range(n), count))
        for i in dirty:
            w.ring[i] = rref(rng)
        m = w.commit(dirty)
        assert m.header.full_keyring == full, count
        if full:
            assert m.header.keyring_base == m.version
        assert resolve(w.chain_for(m.version)).keyring == w.ring
    # exactly half: a delta that is not smaller is not worth writing
    n = 138  # 65 * 138 == 2 * 69 * 65
    for count, full in [(64, False), (65, True)]:
        w2 = Writer(n * CHUNK_SIZE, rng, 32)
        dirty = set(range(count))
        for i in dirty:
            w2.ring[i] = rref(rng)
        assert w2.commit(dirty).header.full_keyring == full, count
        assert resolve(w2.chain_for(2)).keyring == w2.ring
    # after a forced full keyring, the next full one is full_every versions later
    base = w.last.version
    for k in range(1, 32):
        assert not w.commit({k}).header.full_keyring
    assert w.commit({1}).header.full_keyring
    assert w.last.version == base + 32


def test_full_every_one_means_always_full() -> None:
    rng = random.Random(11)
    w = Writer(20 * CHUNK_SIZE, rng, 1)
    for _ in range(3):
        w.ring[0] = rref(rng)
        assert w.commit({0}).header.full_keyring


# -- commit cost ------------------------------------------------------------------------


def _fast_keyring(size: int) -> Keyring:
    """A keyring of random non-ZERO entries, built without per-entry Python work."""
    n = chunk_count(size)
    buf = bytearray(os.urandom(n * 65))
    buf[64::65] = bytes(n)  # flags 0
    return Keyring(size, buf)


def _delta_size(disk: int, dirty_count: int = 100) -> tuple[int, int]:
    rng = random.Random(disk)
    ring = _fast_keyring(disk)
    full_raw = v1(ring)
    parent = decode(full_raw, KEY)
    dirty = set(rng.sample(range(len(ring)), dirty_count))
    for i in dirty:
        ring[i] = rref(rng)
    raw = encode(
        parcel=PARCEL, version=2, master_key=KEY, vm=VM, keyring=ring, parent=parent, dirty=dirty,
    )
    m = decode(raw, KEY)
    assert not m.header.full_keyring and set(m.delta) == dirty
    assert resolve([parent, m]).keyring == ring
    return len(raw), len(full_raw)


def test_commit_cost_grows_with_dirty_not_disk() -> None:
    big_delta, big_full = _delta_size(16 * GiB)
    small_delta, small_full = _delta_size(1 * GiB)
    assert big_full > 8 << 20  # the full keyring of 16 GiB really is big
    assert big_delta < 64 << 10
    assert small_delta < 64 << 10
    assert abs(big_delta - small_delta) < 1024, (big_delta, small_delta)
    # 100 records of 69 bytes, random hence incompressible, plus metadata
    assert big_delta >= 100 * 69


# -- tampering --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, bytes]:
    """A small v1 and a v2 delta manifest."""
    rng = random.Random(12)
    w = Writer(16 * CHUNK_SIZE, rng, 32)
    w.ring[2] = rref(rng)
    w.commit({2}, trace=[1, 2], memory=MemoryImage.from_refs(CHUNK_SIZE, [rref(rng)]), site="x")
    return w.raws[0], w.raws[1]


def test_every_header_bit_flip_rejected(sample) -> None:
    for raw in sample:
        for pos in range(HEADER_SIZE):
            for bit in range(8):
                with pytest.raises(IntegrityError):
                    decode(flip(raw, pos, bit), KEY)


def test_every_body_bit_flip_rejected(sample) -> None:
    for raw in sample:
        assert len(raw) < 4000
        for pos in range(HEADER_SIZE, len(raw)):
            for bit in (0, 3, 7):
                with pytest.raises(IntegrityError):
                    decode(flip(raw, pos, bit), KEY)


def test_bit_flips_of_a_large_manifest_rejected() -> None:
    rng = random.Random(13)
    raw = v1(random_keyring(2000 * CHUNK_SIZE, rng))
    assert len(raw) > 100_000
    for pos in {rng.randrange(len(raw)) for _ in range(200)} | {len(raw) - 1, len(raw) - 16}:
        with pytest.raises(IntegrityError):
            decode(flip(raw, pos, rng.randrange(8)), KEY)


def test_truncation_and_extension_rejected(sample) -> None:
    for raw in sample:
        for cut in list(range(0, HEADER_SIZE + 60)) + list(range(HEADER_SIZE + 60, len(raw), 7)):
            with pytest.raises(FormatError):
                decode(raw[:cut], KEY)
            if cut >= HEADER_SIZE:
                with pytest.raises(FormatError):
                    parse_header(raw[:cut])
        for tail in (b"\x00", b"garbage" * 10):
            with pytest.raises(FormatError):
                decode(raw + tail, KEY)


def test_wrong_master_key_rejected(sample) -> None:
    for raw in sample:
        for key in (OTHER_KEY, bytes(32), flip(KEY, 0, 0)):
            with pytest.raises(IntegrityError) as ei:
                decode(raw, key)
            assert "authentication" in str(ei.value)


def test_wrong_expected_parcel_rejected(sample) -> None:
    for raw in sample:
        with pytest.raises(IntegrityError):
            decode(raw, KEY, OTHER_PARCEL)
        assert decode(raw, KEY, PARCEL).parcel == PARCEL


def test_header_parcel_swap_is_not_accepted(sample) -> None:
    """A server rewriting the parcel uuid in the clear header breaks the AEAD."""
    raw = sample[0]
    swapped = raw[:16] + OTHER_PARCEL.bytes + raw[32:]
    assert parse_header(swapped).parcel == OTHER_PARCEL
    with pytest.raises(IntegrityError):
        decode(swapped, KEY, OTHER_PARCEL)


# -- parse_header -----------------------------------------------------------------------


def _header(
    *, magic=mf.MAGIC, fmt=mf.FORMAT, flags=mf.FLAG_FULL_KEYRING, version=1, base=1,
    parent=NO_PARENT, body_len=100, parcel=PARCEL,
) -> bytes:
    head = struct.pack(
        "<8sHHI16sQQ32sQ", magic, fmt, flags, 0, parcel.bytes, version, base, parent, body_len
    )
    return head + bytes(body_len)


def test_parse_header_without_key(sample) -> None:
    h1, h2 = parse_header(sample[0]), parse_header(sample[1])
    assert h1.parcel == h2.parcel == PARCEL
    assert (h1.version, h1.keyring_base, h1.full_keyring, h1.parent) == (1, 1, True, NO_PARENT)
    assert (h2.version, h2.keyring_base, h2.full_keyring) == (2, 1, False)
    assert h2.parent == manifest_hash(sample[0])
    assert h2.body_length == len(sample[1]) - HEADER_SIZE
    assert h1.pack() == sample[0][:HEADER_SIZE]
    assert h2.pack() == sample[1][:HEADER_SIZE]
    # a well-formed header alone parses
    h = parse_header(_header())
    assert h.version == 1 and h.parcel == PARCEL


def test_parse_header_rejects_bad_fields() -> None:
    p = b"\x11" * 32
    with pytest.raises(FormatError):
        parse_header(_header(magic=b"ISRMANX\x00"))
    with pytest.raises(FormatError):
        parse_header(_header(magic=b"ISRPACK\x00"))
    for fmt in (0, 2, 0xFFFF):
        with pytest.raises(UnsupportedVersion):
            parse_header(_header(fmt=fmt))
    for flags in (0x0002, 0x8000, 0x0003, 0xFFFF):
        with pytest.raises(FormatError):
            parse_header(_header(flags=flags))
    bad = [
        dict(version=0, base=0),
        dict(version=1, base=0),
        dict(version=2, base=3, flags=0, parent=p),
        dict(version=1, base=1, parent=p),  # version 1 with a parent
        dict(version=2, base=2, parent=NO_PARENT),  # later version without one
        dict(version=3, base=3, flags=0, parent=p),  # base == version but not full
        dict(version=3, base=1, flags=mf.FLAG_FULL_KEYRING, parent=p),  # full but base != version
        dict(body_len=10),  # too short for nonce and tag
        dict(body_len=(2 << 30) + 1),  # absurd
    ]
    for kw in bad:
        raw = _header(**{k: v for k, v in kw.items() if k != "body_len"}) if "body_len" not in kw else (
            _header(body_len=40)[:HEADER_SIZE - 8] + struct.pack("<Q", kw["body_len"]) + bytes(40)
        )
        with pytest.raises(FormatError):
            parse_header(raw)
    with pytest.raises(FormatError):
        parse_header(_header()[: HEADER_SIZE - 1])
    with pytest.raises(FormatError):
        parse_header(_header() + b"x")
    assert parse_header(_header(version=5, base=2, flags=0, parent=p)).keyring_base == 2


def test_forged_header_with_valid_shape_fails_authentication() -> None:
    with pytest.raises(IntegrityError):
        decode(_header(), KEY)


# -- resolve ----------------------------------------------------------------------------


def _small_chain(rng: random.Random, n: int = 5) -> Writer:
    w = Writer(30 * CHUNK_SIZE, rng, 32)
    for _ in range(n - 1):
        i = rng.randrange(30)
        w.ring[i] = rref(rng)
        w.commit({i})
    return w


def test_resolve_rejects_a_spliced_fork() -> None:
    rng = random.Random(14)
    w = _small_chain(rng)
    # a fork: another v3 made from the same v2
    fork_ring = w.snapshots[1].copy()
    fork_ring[7] = rref(rng)
    v2 = decode(w.raws[1], KEY)
    fork3 = decode(
        encode(parcel=PARCEL, version=3, master_key=KEY, vm=VM, keyring=fork_ring, parent=v2, dirty={7}),
        KEY,
    )
    assert resolve([decode(r, KEY) for r in w.raws[:2]] + [fork3]).keyring == fork_ring
    chain = [decode(r, KEY) for r in w.raws[:2]] + [fork3] + [decode(w.raws[3], KEY)]
    with pytest.raises(IntegrityError):
        resolve(chain)
    chain = [decode(r, KEY) for r in w.raws]
    chain[2] = fork3
    with pytest.raises(IntegrityError):
        resolve(chain)


def test_resolve_rejects_a_manifest_of_another_parcel() -> None:
    rng = random.Random(15)
    w = _small_chain(rng)
    ring = random_keyring(30 * CHUNK_SIZE, rng)
    o1 = decode(
        encode(parcel=OTHER_PARCEL, version=1, master_key=OTHER_KEY, vm=VM, keyring=ring), OTHER_KEY
    )
    ring[0] = rref(rng)
    o2 = decode(
        encode(parcel=OTHER_PARCEL, version=2, master_key=OTHER_KEY, vm=VM, keyring=ring, parent=o1,
               dirty={0}),
        OTHER_KEY,
    )
    o3 = decode(
        encode(parcel=OTHER_PARCEL, version=3, master_key=OTHER_KEY, vm=VM, keyring=ring, parent=o2,
               dirty={0}),
        OTHER_KEY,
    )
    mine = [decode(r, KEY) for r in w.raws]
    with pytest.raises(IntegrityError):
        resolve([mine[0], o2])
    # even one that names our version 1 as its parent (made by a holder of both keys)
    fake_parent = dataclasses.replace(mine[0], header=dataclasses.replace(mine[0].header, parcel=OTHER_PARCEL))
    assert fake_parent.hash == mine[0].hash
    ring[1] = rref(rng)
    impostor = decode(
        encode(parcel=OTHER_PARCEL, version=2, master_key=OTHER_KEY, vm=VM, keyring=ring,
               parent=fake_parent, dirty={1}),
        OTHER_KEY,
    )
    assert impostor.header.parent == mine[0].hash and impostor.header.keyring_base == 1
    with pytest.raises(IntegrityError):
        resolve([mine[0], impostor])
    with pytest.raises(IntegrityError):
        resolve([mine[0], mine[1], o3])
    with pytest.raises(IntegrityError):
        resolve([o1, mine[1]])
    with pytest.raises(IntegrityError):
        resolve([mine[0], o2, mine[2]])


def test_resolve_rejects_gaps_reorders_and_duplicates() -> None:
    rng = random.Random(16)
    w = _small_chain(rng)
    m = [decode(r, KEY) for r in w.raws]
    for chain in ([m[0], m[2]], [m[0], m[1], m[3]], [m[0], m[2], m[1]], [m[0], m[1], m[1], m[2]]):
        with pytest.raises(IntegrityError):
            resolve([decode(w.raws[x.version - 1], KEY) for x in chain])


def test_resolve_rejects_chain_not_starting_at_keyring_base() -> None:
    rng = random.Random(17)
    w = Writer(30 * CHUNK_SIZE, rng, 4)
    for k in range(8):
        w.ring[k] = rref(rng)
        w.commit({k})
    # fulls at 1, 5, 9; version 7's base is 5
    assert parse_header(w.raws[6]).keyring_base == 5

    def ms(a: int, b: int) -> list[mf.Manifest]:
        return [decode(r, KEY) for r in w.raws[a - 1 : b]]

    assert resolve(ms(5, 7)).keyring == w.snapshots[6]
    with pytest.raises(IntegrityError):
        resolve(ms(6, 7))  # starts at a delta
    with pytest.raises(IntegrityError):
        resolve(ms(1, 7))  # starts at an older full keyring, not the base
    with pytest.raises(IntegrityError):
        resolve(ms(7, 7))  # a lone delta
    with pytest.raises(ValueError):
        resolve([])


# -- the writer never seals what a reader refuses ---------------------------------------


def _sealed_or_refused(build) -> None:
    """Building the input and sealing it must either be refused, or produce a
    manifest decode() accepts: a sealed version no site can open is a lost version."""
    try:
        raw = encode(parcel=PARCEL, master_key=KEY, vm=VM, **build())
    except (ValueError, TypeError, OverflowError, FormatError):
        return
    decode(raw, KEY, PARCEL)


def test_trace_past_the_disk_is_refused_or_readable() -> None:
    # e.g. a trace recorded before the disk was shrunk
    _sealed_or_refused(lambda: dict(version=1, keyring=Keyring(4 * CHUNK_SIZE), trace=[0, 1, 4, 100]))


@pytest.mark.parametrize(
    "ref",
    [
        ChunkRef(b"\x01" * 32, b"\x02" * 32, 0x04),
        ChunkRef(b"\x01" * 32, b"\x02" * 32, FLAG_ZERO),
        ChunkRef(bytes(32), bytes(32), FLAG_ZERO | FLAG_ZSTD),
    ],
    ids=["unknown-flag", "zero-with-tag", "zero-and-zstd"],
)
def test_malformed_keyring_entry_is_refused_or_readable(ref: ChunkRef) -> None:
    def disk():
        ring = Keyring(4 * CHUNK_SIZE)
        ring[2] = ref
        return dict(version=1, keyring=ring)

    def memory():
        mem = MemoryImage.from_refs(2 * CHUNK_SIZE, [ZERO_REF, ref])
        return dict(version=1, keyring=Keyring(CHUNK_SIZE), memory=mem)

    def delta():
        ring = Keyring(4 * CHUNK_SIZE)
        parent = decode(encode(parcel=PARCEL, version=1, master_key=KEY, vm=VM, keyring=ring), KEY)
        ring[1] = ref
        return dict(version=2, keyring=ring, parent=parent, dirty={1})

    for build in (disk, memory, delta):
        _sealed_or_refused(build)


def test_chain_ending_at_takes_only_the_chain_the_server_names() -> None:
    rng = random.Random(11)
    w = Writer(40 * CHUNK_SIZE, rng, full_every=4)
    for _ in range(5):
        i = rng.randrange(len(w.ring))
        w.ring[i] = rref(rng)
        w.commit({i})
    raws = {v: r for v, r in enumerate(w.raws, start=1)}  # versions 1..6; 5 is a full keyring
    head = manifest_hash(raws[6])
    assert mf.chain_ending_at(raws, 6, head) == {5: raws[5], 6: raws[6]}
    assert mf.chain_ending_at(raws, 4, manifest_hash(raws[4])) == {v: raws[v] for v in (1, 2, 3, 4)}
    # The server names another head: a stale key, or one of another history.
    assert mf.chain_ending_at(raws, 6, manifest_hash(raws[5])) is None
    assert mf.chain_ending_at(raws, 6, b"") is None
    # A link missing, or swapped for a manifest the head does not name as its parent.
    assert mf.chain_ending_at({6: raws[6]}, 6, head) is None
    other = Writer(40 * CHUNK_SIZE, random.Random(12), full_every=4)
    for _ in range(4):
        other.commit(set())
    forged = dict(raws)
    forged[3] = other.raws[2]
    assert mf.chain_ending_at(forged, 4, manifest_hash(raws[4])) is None
    # Damaged bytes.
    bad = dict(raws)
    bad[6] = raws[6][:-1] + bytes([raws[6][-1] ^ 1])
    assert mf.chain_ending_at(bad, 6, head) is None
