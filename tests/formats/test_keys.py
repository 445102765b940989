"""Tests of isrsync.keys: the passphrase-sealed key bundle."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time

import pytest

from isrsync import keys
from isrsync.errors import FormatError, IntegrityError, UnsupportedVersion, WrongPassphrase
from isrsync.keys import KdfLimits, KeyBundle

PASS = "correct horse battery staple ✓"
MIN = KdfLimits.MIN
HEADER = struct.Struct("<8sHHIQ16s24s")
SUM = 32
P1 = "12345678-1234-5678-1234-567812345678"
P2 = "87654321-4321-8765-4321-876543218765"


def flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def resum(body: bytes) -> bytes:
    """Re-seal the (unkeyed) checksum, as an attacker or a bad copy tool could."""
    return body + hashlib.blake2b(body, digest_size=SUM).digest()


def with_header(sealed: bytes, **changes) -> bytes:
    fields = dict(zip(("magic", "version", "reserved", "ops", "mem", "salt", "nonce"),
                      HEADER.unpack_from(sealed)))
    fields.update(changes)
    head = HEADER.pack(*fields.values())
    return resum(head + sealed[HEADER.size : -SUM])


@pytest.fixture(scope="module")
def bundle() -> KeyBundle:
    return KeyBundle(
        bytes(range(32)),
        {P1: hashlib.sha256(b"p1").digest(), P2: hashlib.sha256(b"p2").digest()},
    )


@pytest.fixture(scope="module")
def sealed(bundle: KeyBundle) -> bytes:
    return bundle.seal(PASS, MIN)


def test_seal_unseal_round_trip(bundle: KeyBundle, sealed: bytes) -> None:
    out = KeyBundle.unseal(sealed, PASS)
    assert out == bundle
    assert out.convergence_secret == bytes(range(32))
    assert out.master_key(P1) == hashlib.sha256(b"p1").digest()
    assert out.master_key(P2) == hashlib.sha256(b"p2").digest()


def test_sealed_layout_and_secrecy(bundle: KeyBundle, sealed: bytes) -> None:
    magic, version, _, ops, mem, salt, nonce = HEADER.unpack_from(sealed)
    assert magic == b"ISRKEYS\x00" and version == keys.VERSION
    assert (ops, mem) == (MIN.opslimit, MIN.memlimit)
    assert sealed[-SUM:] == hashlib.blake2b(sealed[:-SUM], digest_size=SUM).digest()
    # ciphertext = JSON + 16-byte AEAD tag
    assert len(sealed) == HEADER.size + len(bundle.to_json()) + 16 + SUM
    for secret in [bundle.convergence_secret, *bundle.parcels.values()]:
        assert secret not in sealed and secret.hex().encode() not in sealed
    assert P1.encode() not in sealed
    # random salt and nonce: two seals differ, both open
    again = bundle.seal(PASS, MIN)
    assert again != sealed
    assert HEADER.unpack_from(again)[5] != salt and HEADER.unpack_from(again)[6] != nonce
    assert KeyBundle.unseal(again, PASS) == bundle


def test_new_bundle_and_keys() -> None:
    a, b = KeyBundle.new(), KeyBundle.new()
    assert len(a.convergence_secret) == 32 and a.convergence_secret != b.convergence_secret
    assert a.parcels == {}
    k1, k2 = keys.new_master_key(), keys.new_master_key()
    assert len(k1) == keys.MASTER_KEY_SIZE == 32 and k1 != k2
    a.parcels[P1] = k1
    assert KeyBundle.unseal(a.seal("", MIN), "") == a  # empty passphrase still works


def test_passphrase_unicode_and_exactness(bundle: KeyBundle, sealed: bytes) -> None:
    for wrong in ("", "correct horse battery staple", PASS + " ", PASS.upper(), PASS[:-1] + "v"):
        with pytest.raises(WrongPassphrase):
            KeyBundle.unseal(sealed, wrong)


def test_wrong_passphrase_message(sealed: bytes) -> None:
    with pytest.raises(WrongPassphrase) as ei:
        KeyBundle.unseal(sealed, "hunter2")
    err = ei.value
    assert not isinstance(err, IntegrityError)  # told apart from damage
    assert "passphrase" in err.message
    assert "passphrase" in str(err) and "try again" in str(err)
    assert err.exit_code == 4


def test_every_header_bit_flip_is_damage(bundle: KeyBundle, sealed: bytes) -> None:
    for pos in range(HEADER.size):
        for bit in range(8):
            bad = flip(sealed, pos, bit)
            with pytest.raises(IntegrityError) as ei:
                KeyBundle.unseal(bad, PASS)
            if pos < 8:
                assert isinstance(ei.value, FormatError)


def test_body_and_checksum_bit_flips_are_damage(sealed: bytes) -> None:
    rng = random.Random(1)
    n = len(sealed)
    positions = set(range(n - SUM - 16, n)) | {rng.randrange(HEADER.size, n) for _ in range(300)}
    for pos in positions:
        for bit in (0, rng.randrange(8)):
            with pytest.raises(IntegrityError) as ei:
                KeyBundle.unseal(flip(sealed, pos, bit), PASS)
            assert "damaged" in str(ei.value)


def test_flips_with_recomputed_checksum_never_yield_a_wrong_bundle(bundle: KeyBundle, sealed: bytes) -> None:
    """An attacker can recompute the unkeyed checksum; the AEAD must still hold."""
    rng = random.Random(2)
    body = sealed[:-SUM]
    # skip opslimit/memlimit (bounds-checked, tested below) to keep the KDF cheap
    positions = [p for p in range(len(body)) if not 12 <= p < 24]
    sample = sorted(set(rng.sample(positions, 60)) | set(range(0, 12)))
    for pos in sample:
        bad = resum(flip(body, pos, rng.randrange(8)))
        try:
            out = KeyBundle.unseal(bad, PASS)
        except (IntegrityError, WrongPassphrase):
            continue
        pytest.fail(f"tampered bundle (byte {pos}) opened as {out!r}")


def test_truncated(sealed: bytes) -> None:
    for cut in range(0, HEADER.size + SUM + 16):
        with pytest.raises(FormatError):
            KeyBundle.unseal(sealed[:cut], PASS)
    for cut in range(HEADER.size + SUM + 16, len(sealed)):
        with pytest.raises(IntegrityError):  # the checksum no longer matches
            KeyBundle.unseal(sealed[:cut], PASS)
    with pytest.raises(IntegrityError):
        KeyBundle.unseal(sealed + b"\x00", PASS)


def test_not_a_bundle() -> None:
    with pytest.raises(FormatError):
        KeyBundle.unseal(b"x" * 500, PASS)
    with pytest.raises(FormatError):
        KeyBundle.unseal(b"", PASS)


def test_unsupported_version(sealed: bytes) -> None:
    with pytest.raises(UnsupportedVersion):
        KeyBundle.unseal(with_header(sealed, version=2), PASS)


@pytest.mark.parametrize(
    "ops,mem",
    [
        (2**32 - 1, keys.MIN_MEMLIMIT),  # absurd opslimit
        (keys.MIN_OPSLIMIT, 2**63),  # absurd memlimit
        (keys.MIN_OPSLIMIT, 1 << 40),
        (2**32 - 1, 2**64 - 1),
        (0, keys.MIN_MEMLIMIT),  # below the minimum
        (keys.MIN_OPSLIMIT, 0),
        (keys.MAX_OPSLIMIT + 1, keys.MIN_MEMLIMIT),
        (keys.MIN_OPSLIMIT, keys.MAX_MEMLIMIT + 1),
    ],
)
def test_absurd_kdf_limits_refused_without_running_the_kdf(sealed: bytes, ops: int, mem: int, monkeypatch) -> None:
    bad = with_header(sealed, ops=ops, mem=mem)
    calls = []

    def no_kdf(*a):  # running the real KDF here could take hours or all the memory
        calls.append(a)
        raise AssertionError("the KDF ran with hostile limits")

    monkeypatch.setattr(keys, "_derive", no_kdf)
    start = time.perf_counter()
    with pytest.raises(FormatError) as ei:
        KeyBundle.unseal(bad, PASS)
    assert time.perf_counter() - start < 0.5
    assert calls == []
    assert "opslimit" in str(ei.value) or "memlimit" in str(ei.value)


def test_seal_refuses_absurd_limits(bundle: KeyBundle) -> None:
    for limits in (KdfLimits(0, keys.MIN_MEMLIMIT), KdfLimits(keys.MIN_OPSLIMIT, 1 << 40),
                   KdfLimits(1000, keys.MIN_MEMLIMIT)):
        with pytest.raises(FormatError):
            bundle.seal(PASS, limits)


def test_limits_recorded_are_used(bundle: KeyBundle) -> None:
    lim = KdfLimits(keys.MIN_OPSLIMIT + 1, keys.MIN_MEMLIMIT * 2)
    s = bundle.seal(PASS, lim)
    assert HEADER.unpack_from(s)[3:5] == (lim.opslimit, lim.memlimit)
    assert KeyBundle.unseal(s, PASS) == bundle
    # the same bytes under other limits give another key: the AEAD refuses
    with pytest.raises(WrongPassphrase):
        KeyBundle.unseal(with_header(s, ops=keys.MIN_OPSLIMIT), PASS)


def test_master_key_unknown_parcel(bundle: KeyBundle) -> None:
    with pytest.raises(IntegrityError) as ei:
        bundle.master_key("00000000-0000-0000-0000-000000000000")
    assert "00000000-0000-0000-0000-000000000000" in str(ei.value)
    assert not isinstance(ei.value, FormatError)


def test_json_round_trip(bundle: KeyBundle) -> None:
    raw = bundle.to_json()
    assert KeyBundle.from_json(raw) == bundle
    obj = json.loads(raw)
    assert obj["convergence_secret"] == bytes(range(32)).hex()
    assert list(obj["parcels"]) == sorted(obj["parcels"])


GOOD_SECRET = "00" * 32
GOOD_KEY = "11" * 32


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"null",
        b"[]",
        b"42",
        b'"string"',
        b"{}",
        json.dumps({"convergence_secret": GOOD_SECRET}).encode(),
        json.dumps({"parcels": {}}).encode(),
        json.dumps({"convergence_secret": "zz" * 32, "parcels": {}}).encode(),
        json.dumps({"convergence_secret": "00" * 31, "parcels": {}}).encode(),
        json.dumps({"convergence_secret": "00" * 33, "parcels": {}}).encode(),
        json.dumps({"convergence_secret": "0", "parcels": {}}).encode(),
        json.dumps({"convergence_secret": 5, "parcels": {}}).encode(),
        json.dumps({"convergence_secret": None, "parcels": {}}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": []}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": None}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": "x"}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": {P1: "11" * 31}}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": {P1: 7}}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": {P1: None}}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": {P1: "xy" * 32}}).encode(),
        json.dumps({"convergence_secret": GOOD_SECRET, "parcels": {P1: GOOD_KEY, P2: ""}}).encode(),
    ],
)
def test_from_json_malformed(raw: bytes) -> None:
    with pytest.raises(FormatError):
        KeyBundle.from_json(raw)


def test_from_json_deeply_nested_is_a_format_error() -> None:
    """json.loads raises RecursionError on deep nesting; that must not leak."""
    with pytest.raises(FormatError):
        KeyBundle.from_json(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FormatError):
        KeyBundle.from_json(b'{"convergence_secret":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_from_json_minimal_valid() -> None:
    b = KeyBundle.from_json(json.dumps({"convergence_secret": GOOD_SECRET, "parcels": {P1: GOOD_KEY}}).encode())
    assert b.convergence_secret == bytes(32) and b.parcels == {P1: b"\x11" * 32}
