"""Tests of isrsync.chunk: the chunk encoding everything else trusts.

Fixed vectors live in vectors.json next to this file. If the encoding changes on
purpose (and CODEC_VERSION is bumped), regenerate them with::

    ISRSYNC_REGEN_VECTORS=1 python -m pytest tests/formats/test_chunk.py -k vectors
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium

from isrsync import chunk
from isrsync.chunk import (
    CHUNK_SIZE,
    FLAG_ZERO,
    FLAG_ZSTD,
    MIN_SAVING,
    ZERO_KEY,
    ZERO_REF,
    ZERO_TAG,
    ChunkRef,
    decode,
    decode_many,
    encode,
    encode_many,
    verify,
)
from isrsync.errors import IntegrityError

VECTORS_PATH = Path(__file__).with_name("vectors.json")
VECTOR_SECRET = bytes(range(32))
SECRET = hashlib.sha256(b"isrsync test secret").digest()
OTHER_SECRET = hashlib.sha256(b"isrsync other secret").digest()
NONCE = bytes(24)


# -- helpers ---------------------------------------------------------------------------


def stream(label: bytes, n: int) -> bytes:
    """Deterministic incompressible bytes."""
    return hashlib.shake_256(label).digest(n)


def text(n: int) -> bytes:
    line = b"Internet Suspend/Resume: the whole VM moves, the site keeps nothing. "
    return (line * (n // len(line) + 1))[:n]


def blake_key(secret: bytes, plain: bytes) -> bytes:
    return hashlib.blake2b(plain, digest_size=32, key=secret).digest()


def blake_tag(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def zstd_compress(plain: bytes) -> bytes:
    """zstd with the parameters DESIGN.md pins (level, no checksum)."""
    return zstandard.ZstdCompressor(
        level=chunk.ZSTD_LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
    ).compress(plain)


def open_independently(key: bytes, data: bytes) -> bytes:
    """Decrypt with libsodium directly, bypassing isrsync.chunk.decode."""
    return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(data, None, NONCE, key)


def flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def check_encoding(plain: bytes, secret: bytes, enc: chunk.Encoded) -> None:
    """Check an encoding against DESIGN.md independently of the module."""
    if not any(plain):
        assert enc.ref == ZERO_REF and enc.data == b""
        return
    assert enc.ref.key == blake_key(secret, plain)
    assert enc.ref.tag == blake_tag(enc.data) == enc.tag
    body = open_independently(enc.ref.key, enc.data)
    packed = zstd_compress(plain) if len(plain) > 0 else b""
    if len(plain) - len(packed) >= MIN_SAVING:
        assert enc.ref.flags == FLAG_ZSTD
        assert zstandard.ZstdDecompressor().decompress(body) == plain
        assert len(body) <= len(plain) - MIN_SAVING
    else:
        assert enc.ref.flags == 0
        assert body == plain


# -- round trips -----------------------------------------------------------------------


CASES = {
    "incompressible": stream(b"inc", CHUNK_SIZE),
    "compressible": text(CHUNK_SIZE),
    "short-incompressible": stream(b"short", 1000),
    "short-compressible": text(20_000),
    "one-byte": b"\x01",
    "tiny-zeros-then-one": bytes(4095) + b"\x01",
    "mostly-zero": bytes(CHUNK_SIZE - 1) + b"\xff",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name: str) -> None:
    plain = CASES[name]
    enc = encode(plain, SECRET)
    check_encoding(plain, SECRET, enc)
    assert decode(enc.ref, enc.data, len(plain)) == plain
    assert verify(enc.ref, enc.data)


def test_flags_of_cases() -> None:
    assert encode(CASES["incompressible"], SECRET).ref.flags == 0
    assert encode(CASES["compressible"], SECRET).ref.flags == FLAG_ZSTD
    assert encode(CASES["short-incompressible"], SECRET).ref.flags == 0
    assert encode(CASES["short-compressible"], SECRET).ref.flags == FLAG_ZSTD
    assert encode(CASES["mostly-zero"], SECRET).ref.flags == FLAG_ZSTD
    # A plaintext of at most 4 KiB can never save 4 KiB.
    assert encode(text(4096), SECRET).ref.flags == 0
    assert encode(CASES["tiny-zeros-then-one"], SECRET).ref.flags == 0


def test_incompressible_ciphertext_is_plain_plus_aead_tag() -> None:
    plain = CASES["incompressible"]
    enc = encode(plain, SECRET)
    assert len(enc.data) == CHUNK_SIZE + 16
    assert plain not in enc.data and plain[:64] not in enc.data


def test_accepts_bytearray_and_memoryview() -> None:
    plain = CASES["short-compressible"]
    a = encode(plain, SECRET)
    assert encode(bytearray(plain), SECRET) == a
    assert encode(memoryview(plain), SECRET) == a
    big = memoryview(bytes(10) + CASES["incompressible"])
    assert encode(big[10:], SECRET) == encode(CASES["incompressible"], SECRET)


@pytest.mark.parametrize("n", [0, 1, 1000, 4096, CHUNK_SIZE - 1, CHUNK_SIZE])
def test_zero_chunks(n: int) -> None:
    enc = encode(bytes(n), SECRET)
    assert enc.ref is ZERO_REF or enc.ref == ZERO_REF
    assert enc.ref.flags == FLAG_ZERO and enc.ref.is_zero
    assert enc.ref.tag == ZERO_TAG == bytes(32)
    assert enc.ref.key == ZERO_KEY == bytes(32)
    assert enc.data == b""
    # never encrypted: the same under any secret
    assert encode(bytes(n), OTHER_SECRET) == enc
    assert decode(enc.ref, None, n) == bytes(n)
    assert decode(enc.ref, b"", n) == bytes(n)
    assert not verify(enc.ref, b"")


def test_zero_chunk_accepts_views() -> None:
    assert encode(bytearray(CHUNK_SIZE), SECRET).ref == ZERO_REF
    assert encode(memoryview(bytes(CHUNK_SIZE + 7))[7:], SECRET).ref == ZERO_REF


def test_zero_ref_decodes_to_requested_length() -> None:
    assert decode(ZERO_REF, None) == bytes(CHUNK_SIZE)
    assert decode(ZERO_REF, None, 123) == bytes(123)


def test_oversize_chunk_is_refused() -> None:
    with pytest.raises(ValueError):
        encode(bytes(CHUNK_SIZE + 1), SECRET)
    with pytest.raises(ValueError):
        encode(stream(b"big", CHUNK_SIZE + 1), SECRET)


# -- the 4 KiB compression threshold ----------------------------------------------------


def _plain_with_saving(target: int) -> bytes:
    """A CHUNK_SIZE plaintext whose pinned-level zstd saves exactly ``target`` bytes.

    Leading zeros followed by incompressible bytes: each extra zero saves one more
    byte, so a short scan finds every saving near 4 KiB.
    """
    rnd = stream(b"threshold", CHUNK_SIZE)
    for zeros in range(target - 200, target + 400):
        p = bytes(zeros) + rnd[zeros:]
        if len(p) - len(zstd_compress(p)) == target:
            return p
    raise AssertionError(f"no plaintext saving exactly {target} bytes found")


@pytest.mark.parametrize(
    "saving,compressed",
    [
        (MIN_SAVING - 40, False),
        (MIN_SAVING - 1, False),
        (MIN_SAVING, True),
        (MIN_SAVING + 1, True),
        (MIN_SAVING + 40, True),
    ],
)
def test_compression_kept_only_if_it_saves_4k(saving: int, compressed: bool) -> None:
    plain = _plain_with_saving(saving)
    assert len(plain) == CHUNK_SIZE
    enc = encode(plain, SECRET)
    body = open_independently(enc.ref.key, enc.data)
    if compressed:
        assert enc.ref.flags == FLAG_ZSTD
        assert len(enc.data) == CHUNK_SIZE - saving + 16
        assert body == zstd_compress(plain)
    else:
        assert enc.ref.flags == 0
        assert len(enc.data) == CHUNK_SIZE + 16
        assert body == plain
    assert decode(enc.ref, enc.data) == plain


# -- convergence and key/tag derivation -------------------------------------------------


def test_convergent_same_plaintext_same_secret() -> None:
    for plain in CASES.values():
        a = encode(plain, SECRET)
        b = encode(bytes(plain), bytes(SECRET))
        assert a.ref == b.ref and a.data == b.data


def test_different_secret_changes_tag_and_key() -> None:
    for name, plain in CASES.items():
        a = encode(plain, SECRET)
        b = encode(plain, OTHER_SECRET)
        assert a.tag != b.tag, name
        assert a.ref.key != b.ref.key, name
        assert b.ref.key == blake_key(OTHER_SECRET, plain)
        assert decode(b.ref, b.data, len(plain)) == plain
        # the other domain's key does not open this domain's ciphertext
        with pytest.raises(IntegrityError):
            decode(ChunkRef(a.tag, b.ref.key, a.ref.flags), a.data, len(plain))


def test_different_plaintext_changes_tag_and_key() -> None:
    a = encode(CASES["incompressible"], SECRET)
    b = encode(flip(CASES["incompressible"], 77, 3), SECRET)
    assert a.tag != b.tag and a.ref.key != b.ref.key


def test_key_is_keyed_blake2b_and_tag_is_blake2b_of_data() -> None:
    for plain in CASES.values():
        enc = encode(plain, SECRET)
        assert enc.ref.key == hashlib.blake2b(plain, digest_size=32, key=SECRET).digest()
        assert enc.ref.tag == hashlib.blake2b(enc.data, digest_size=32).digest()
        assert chunk.tag_of(enc.data) == enc.ref.tag
        # keyed, not plain, BLAKE2b
        assert enc.ref.key != hashlib.blake2b(plain, digest_size=32).digest()


# -- fixed test vectors -----------------------------------------------------------------


def _vector_plaintexts() -> dict[str, bytes]:
    return {
        "incompressible": hashlib.shake_256(b"isrsync vector: incompressible").digest(CHUNK_SIZE),
        "compressible": text(CHUNK_SIZE),
        "short": hashlib.shake_256(b"isrsync vector: short last chunk").digest(1000),
        "zero": bytes(CHUNK_SIZE),
    }


# chunks whose whole ciphertext is recorded (the others record tag, key, flags, length)
_FULL_CIPHERTEXT = ("short", "compressible")


def _generate_vectors() -> dict:
    chunks = {}
    for name, plain in _vector_plaintexts().items():
        enc = encode(plain, VECTOR_SECRET)
        row = {
            "length": len(plain),
            "plaintext_blake2b": hashlib.blake2b(plain, digest_size=32).hexdigest(),
            "tag": enc.ref.tag.hex(),
            "key": enc.ref.key.hex(),
            "flags": enc.ref.flags,
            "ciphertext_length": len(enc.data),
        }
        if name in _FULL_CIPHERTEXT:
            row["ciphertext"] = enc.data.hex()
        chunks[name] = row
    return {
        "comment": "isrsync chunk encoding vectors; regenerate only with a CODEC_VERSION bump "
        "(ISRSYNC_REGEN_VECTORS=1)",
        "codec_version": chunk.CODEC_VERSION,
        "zstd_level": chunk.ZSTD_LEVEL,
        "secret": VECTOR_SECRET.hex(),
        "chunks": chunks,
    }


@pytest.fixture(scope="module")
def vectors() -> dict:
    if os.environ.get("ISRSYNC_REGEN_VECTORS") == "1":
        VECTORS_PATH.write_text(json.dumps(_generate_vectors(), indent=2, sort_keys=True) + "\n")
    return json.loads(VECTORS_PATH.read_text())


def test_vectors_file_is_complete(vectors: dict) -> None:
    assert vectors["codec_version"] == chunk.CODEC_VERSION, "codec changed: regenerate vectors"
    assert vectors["zstd_level"] == chunk.ZSTD_LEVEL
    assert bytes.fromhex(vectors["secret"]) == VECTOR_SECRET
    assert set(vectors["chunks"]) == {"incompressible", "compressible", "short", "zero"}
    for name in _FULL_CIPHERTEXT:
        assert "ciphertext" in vectors["chunks"][name]
    # the vectors cover every flag combination we produce
    flags = {row["flags"] for row in vectors["chunks"].values()}
    assert flags == {0, FLAG_ZSTD, FLAG_ZERO}


def test_vectors_plaintext_generators_are_stable(vectors: dict) -> None:
    for name, plain in _vector_plaintexts().items():
        row = vectors["chunks"][name]
        assert len(plain) == row["length"]
        assert hashlib.blake2b(plain, digest_size=32).hexdigest() == row["plaintext_blake2b"]


def test_vectors_reencode_identically(vectors: dict) -> None:
    assert _generate_vectors()["chunks"] == vectors["chunks"]
    for name, plain in _vector_plaintexts().items():
        row = vectors["chunks"][name]
        enc = encode(plain, VECTOR_SECRET)
        assert enc.ref.tag.hex() == row["tag"], name
        assert enc.ref.key.hex() == row["key"], name
        assert enc.ref.flags == row["flags"], name
        assert len(enc.data) == row["ciphertext_length"], name
        if "ciphertext" in row:
            assert enc.data.hex() == row["ciphertext"], name


def test_vectors_expected_shape(vectors: dict) -> None:
    c = vectors["chunks"]
    assert c["zero"]["flags"] == FLAG_ZERO
    assert c["zero"]["tag"] == "00" * 32 and c["zero"]["key"] == "00" * 32
    assert c["zero"]["ciphertext_length"] == 0
    assert c["incompressible"]["flags"] == 0
    assert c["incompressible"]["ciphertext_length"] == CHUNK_SIZE + 16
    assert c["compressible"]["flags"] == FLAG_ZSTD
    assert c["short"]["flags"] == 0 and c["short"]["ciphertext_length"] == 1016


def test_vectors_decode_stored_ciphertext(vectors: dict) -> None:
    plains = _vector_plaintexts()
    for name in _FULL_CIPHERTEXT:
        row = vectors["chunks"][name]
        ref = ChunkRef(bytes.fromhex(row["tag"]), bytes.fromhex(row["key"]), row["flags"])
        data = bytes.fromhex(row["ciphertext"])
        assert verify(ref, data)
        out = decode(ref, data, row["length"])
        assert out == plains[name]
        assert hashlib.blake2b(out, digest_size=32).hexdigest() == row["plaintext_blake2b"]
    row = vectors["chunks"]["zero"]
    ref = ChunkRef(bytes.fromhex(row["tag"]), bytes.fromhex(row["key"]), row["flags"])
    assert decode(ref, None, row["length"]) == bytes(CHUNK_SIZE)


# -- tampering --------------------------------------------------------------------------


def test_every_bit_flip_of_a_short_chunk_is_rejected() -> None:
    plain = stream(b"tamper-short", 1000)
    enc = encode(plain, SECRET)
    for pos in range(len(enc.data)):
        for bit in range(8):
            bad = flip(enc.data, pos, bit)
            assert not verify(enc.ref, bad)
            with pytest.raises(IntegrityError):
                decode(enc.ref, bad, len(plain))


@pytest.mark.parametrize("name", ["incompressible", "compressible"])
def test_bit_flips_of_a_full_chunk_are_rejected(name: str) -> None:
    plain = CASES[name]
    enc = encode(plain, SECRET)
    rng = random.Random(1234)
    n = len(enc.data)
    positions = {0, 1, n // 2, n - 17, n - 16, n - 1} | {rng.randrange(n) for _ in range(250)}
    for pos in positions:
        bad = flip(enc.data, pos, rng.randrange(8))
        assert not verify(enc.ref, bad)
        with pytest.raises(IntegrityError):
            decode(enc.ref, bad)


def test_ciphertext_with_tag_of_its_own_still_needs_the_key() -> None:
    """An attacker who fixes the tag to match tampered bytes is stopped by the AEAD."""
    plain = CASES["short-incompressible"]
    enc = encode(plain, SECRET)
    for pos in (0, 500, len(enc.data) - 1):
        bad = flip(enc.data, pos, 0)
        forged = ChunkRef(blake_tag(bad), enc.ref.key, enc.ref.flags)
        assert verify(forged, bad)
        with pytest.raises(IntegrityError):
            decode(forged, bad, len(plain))


def test_tag_is_checked_even_when_data_decrypts() -> None:
    """Genuine ciphertext under a ref naming another tag is not what was asked for."""
    for plain in (CASES["short-incompressible"], CASES["compressible"]):
        enc = encode(plain, SECRET)
        for wrong_tag in (flip(enc.tag, 0, 0), flip(enc.tag, 31, 7), bytes(32)):
            ref = ChunkRef(wrong_tag, enc.ref.key, enc.ref.flags)
            assert not verify(ref, enc.data)
            with pytest.raises(IntegrityError):
                decode(ref, enc.data, len(plain))


def test_without_the_tag_check_the_aead_still_rejects_every_change() -> None:
    """check_tag=False (bytes read back from this site's cache): a flipped bit, a cut,
    or another chunk filed under this ref all fail, because K is secret."""
    for name in ("short-incompressible", "compressible"):
        plain = CASES[name]
        enc = encode(plain, SECRET)
        assert decode(enc.ref, enc.data, len(plain), check_tag=False) == plain
        rng = random.Random(name)
        for pos in {0, len(enc.data) // 2, len(enc.data) - 1} | {rng.randrange(len(enc.data)) for _ in range(60)}:
            with pytest.raises(IntegrityError):
                decode(enc.ref, flip(enc.data, pos, rng.randrange(8)), len(plain), check_tag=False)
        with pytest.raises(IntegrityError):
            decode(enc.ref, enc.data[:-1], len(plain), check_tag=False)
        other = encode(stream(b"another chunk", len(plain)), SECRET)
        with pytest.raises(IntegrityError):
            decode(enc.ref, other.data, len(plain), check_tag=False)


def test_background_pool_threads_are_niced_and_work() -> None:
    pool = chunk.background_pool()
    assert pool is chunk.background_pool()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    nices = set(pool.map(lambda _: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), range(8)))
    assert nices == {min(19, base + chunk.BACKGROUND_NICE)}
    enc = encode(CASES["compressible"], SECRET)
    assert decode_many([(enc.ref, enc.data, CHUNK_SIZE)] * 4, pool=pool) == [CASES["compressible"]] * 4
    # The default pool is untouched: the caller's own priority.
    assert set(chunk.default_pool().map(
        lambda _: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), range(4))) == {base}


def test_truncated_or_extended_ciphertext_rejected() -> None:
    enc = encode(CASES["short-compressible"], SECRET)
    for bad in (enc.data[:-1], enc.data[1:], enc.data + b"\x00", b"", enc.data[:16]):
        assert not verify(enc.ref, bad)
        with pytest.raises(IntegrityError):
            decode(enc.ref, bad, 20_000)
    with pytest.raises(IntegrityError):
        decode(enc.ref, None, 20_000)


def test_wrong_key_rejected() -> None:
    for name, plain in CASES.items():
        enc = encode(plain, SECRET)
        for key in (bytes(32), blake_key(OTHER_SECRET, plain), flip(enc.ref.key, 31, 7)):
            with pytest.raises(IntegrityError):
                decode(ChunkRef(enc.tag, key, enc.ref.flags), enc.data, len(plain))


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrong_length_rejected(name: str) -> None:
    plain = CASES[name]
    enc = encode(plain, SECRET)
    for length in {len(plain) - 1, len(plain) + 1, 0, CHUNK_SIZE + 1} - {len(plain)}:
        with pytest.raises(IntegrityError):
            decode(enc.ref, enc.data, length)


@pytest.mark.parametrize("flags", [0x04, 0x08, 0x80, FLAG_ZSTD | 0x10, FLAG_ZERO | 0x40, 0xFF])
def test_unknown_flags_rejected(flags: int) -> None:
    enc = encode(CASES["compressible"], SECRET)
    with pytest.raises(IntegrityError):
        decode(ChunkRef(enc.tag, enc.ref.key, flags), enc.data)
    with pytest.raises(IntegrityError):
        decode(ChunkRef(ZERO_TAG, ZERO_KEY, flags), None)


def test_flipped_compression_flag_rejected() -> None:
    comp = encode(CASES["compressible"], SECRET)
    raw = encode(CASES["incompressible"], SECRET)
    with pytest.raises(IntegrityError):  # compressed body read as raw: wrong length
        decode(ChunkRef(comp.tag, comp.ref.key, 0), comp.data)
    with pytest.raises(IntegrityError):  # raw body read as zstd: does not decompress
        decode(ChunkRef(raw.tag, raw.ref.key, FLAG_ZSTD), raw.data)


def test_zero_flag_never_verifies_data() -> None:
    enc = encode(CASES["short-incompressible"], SECRET)
    assert not verify(ChunkRef(enc.tag, enc.ref.key, FLAG_ZERO), enc.data)
    assert verify(enc.ref, enc.data)
    assert not verify(enc.ref, enc.data[:15])


# -- batches ----------------------------------------------------------------------------


def _mixed_plaintexts(n: int) -> list[bytes]:
    rng = random.Random(42)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(bytes(CHUNK_SIZE if i % 2 else rng.randrange(1, CHUNK_SIZE)))
        elif kind == 1:
            out.append(stream(b"mix%d" % i, CHUNK_SIZE))
        elif kind == 2:
            out.append(text(CHUNK_SIZE)[: CHUNK_SIZE - i] + b"%d" % i)
        elif kind == 3:
            out.append(stream(b"mix%d" % i, rng.randrange(1, CHUNK_SIZE)))
        else:
            out.append(CASES["incompressible"])  # duplicates stay in place
    return out


@pytest.fixture(scope="module")
def mixed() -> list[bytes]:
    return _mixed_plaintexts(200)


def test_encode_many_matches_sequential_in_order(mixed: list[bytes]) -> None:
    expected = [encode(p, SECRET) for p in mixed]
    got = list(encode_many(mixed, SECRET))
    assert len(got) == len(expected) == 200
    assert got == expected
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(encode_many(iter(mixed), SECRET, pool)) == expected
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert list(encode_many(mixed, SECRET, pool)) == expected


def test_decode_many_round_trip_in_order(mixed: list[bytes]) -> None:
    encs = list(encode_many(mixed, SECRET))
    items = [(e.ref, e.data or None, len(p)) for e, p in zip(encs, mixed)]
    assert decode_many(items) == mixed
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert decode_many(items, pool) == mixed
    assert decode_many([]) == []


def test_decode_many_raises_on_any_bad_chunk(mixed: list[bytes]) -> None:
    encs = [encode(p, SECRET) for p in mixed[:20]]
    items = [(e.ref, e.data, len(p)) for e, p in zip(encs, mixed[:20])]
    victim = next(i for i, e in enumerate(encs) if not e.ref.is_zero and i > 10)
    ref, data, n = items[victim]
    items[victim] = (ref, flip(data, 3, 1), n)
    with pytest.raises(IntegrityError):
        decode_many(items)


def test_encode_many_checks_secret() -> None:
    with pytest.raises(ValueError):
        list(encode_many([b"x"], b"short secret"))


def test_encode_many_streams_from_a_generator() -> None:
    total = 5000
    consumed = 0
    lock = threading.Lock()

    def gen():
        nonlocal consumed
        for i in range(total):
            with lock:
                consumed += 1
            yield b"chunk %d " % i * 8

    with ThreadPoolExecutor(max_workers=2) as pool:
        it = encode_many(gen(), SECRET, pool)
        first = next(it)
        assert first == encode(b"chunk 0 " * 8, SECRET)
        at_first = consumed
        # a bounded window (a few per worker), not the whole input
        assert 1 <= at_first <= 32, at_first
        second = next(it)
        assert second == encode(b"chunk 1 " * 8, SECRET)
        assert consumed <= at_first + 1
        for _ in range(100):
            next(it)
        assert consumed <= 102 + 32
        rest = list(it)
    assert len(rest) == total - 102
    assert rest[-1] == encode(b"chunk %d " % (total - 1) * 8, SECRET)
    assert consumed == total


def test_encode_many_with_default_pool_is_lazy() -> None:
    consumed = 0

    def gen():
        nonlocal consumed
        for i in range(10_000):
            consumed += 1
            yield b"%d" % i

    it = encode_many(gen(), SECRET)
    assert next(it).ref.key == blake_key(SECRET, b"0")
    assert consumed < 10_000
    # a bounded window of batches is read ahead, never the whole input
    assert consumed <= (2 * (os.cpu_count() or 1) + 1) * chunk.BATCH


def test_split_and_counts() -> None:
    buf = stream(b"split", 3 * CHUNK_SIZE + 5)
    parts = list(chunk.split(buf))
    assert [len(p) for p in parts] == [CHUNK_SIZE] * 3 + [5]
    assert b"".join(bytes(p) for p in parts) == buf
    assert chunk.chunk_count(0) == 0
    assert chunk.chunk_count(1) == 1
    assert chunk.chunk_count(CHUNK_SIZE) == 1
    assert chunk.chunk_count(CHUNK_SIZE + 1) == 2
    assert chunk.chunk_length(3 * CHUNK_SIZE + 5, 3) == 5
    assert chunk.chunk_length(3 * CHUNK_SIZE + 5, 2) == CHUNK_SIZE


# -- property ---------------------------------------------------------------------------


@st.composite
def plaintexts(draw: st.DrawFn) -> bytes:
    """Plaintexts up to 128 KiB of mixed compressibility, built cheaply."""
    n = draw(st.integers(min_value=0, max_value=CHUNK_SIZE))
    kind = draw(st.sampled_from(["random", "text", "zero", "zeros-and-noise", "raw"]))
    seed = draw(st.binary(min_size=0, max_size=8))
    if kind == "random":
        return stream(seed, n)
    if kind == "text":
        return ((seed + b" some words ") * (n // (len(seed) + 12) + 1))[:n]
    if kind == "zero":
        return bytes(n)
    if kind == "zeros-and-noise":
        k = draw(st.integers(min_value=0, max_value=n))
        return bytes(k) + stream(seed, n - k)
    return draw(st.binary(max_size=2048))


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain=plaintexts())
def test_property_round_trip(plain: bytes) -> None:
    plain = plain[:CHUNK_SIZE]
    enc = encode(plain, SECRET)
    check_encoding(plain, SECRET, enc)
    assert decode(enc.ref, enc.data or None, len(plain)) == plain
    assert enc.ref.is_zero == (not any(plain))
    if not enc.ref.is_zero:
        assert verify(enc.ref, enc.data)
        assert len(enc.data) <= len(plain) + 16


@settings(max_examples=60, deadline=None, database=None)
@given(plain=st.binary(min_size=1, max_size=4096), pos=st.integers(min_value=0), bit=st.integers(0, 7))
def test_property_any_flip_rejected(plain: bytes, pos: int, bit: int) -> None:
    enc = encode(plain, SECRET)
    if enc.ref.is_zero:
        assert not any(plain)
        return
    bad = flip(enc.data, pos % len(enc.data), bit)
    with pytest.raises(IntegrityError):
        decode(enc.ref, bad, len(plain))
