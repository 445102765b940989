"""The sealed lock token and the carried keys a medium holds (isrsync.locktoken)."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from isrsync.errors import FormatError, IntegrityError
from isrsync.locktoken import CarriedKeys, LockToken

KEY = hashlib.sha256(b"parcel key").digest()
PARCEL = uuid.uuid4()


def test_a_token_round_trips_only_under_its_parcel_key() -> None:
    tok = LockToken(PARCEL, 7, 12, "3f2a")
    raw = tok.seal(KEY)
    assert LockToken.unseal(raw, KEY, PARCEL) == tok
    assert b"3f2a" not in raw  # the medium id is not in the clear
    with pytest.raises(IntegrityError):
        LockToken.unseal(raw, hashlib.sha256(b"another").digest(), PARCEL)
    with pytest.raises(IntegrityError):
        LockToken.unseal(LockToken(uuid.uuid4(), 1, 1, "x").seal(KEY), KEY, PARCEL)


@pytest.mark.parametrize("cut", [0, 7, 8, 20, 40])
def test_a_truncated_or_flipped_token_is_refused(cut: int) -> None:
    raw = LockToken(PARCEL, 1, 2, "m").seal(KEY)
    with pytest.raises((FormatError, IntegrityError)):
        LockToken.unseal(raw[:cut], KEY, PARCEL)
    flipped = bytearray(raw)
    flipped[-1 - cut] ^= 1
    with pytest.raises((FormatError, IntegrityError)):
        LockToken.unseal(bytes(flipped), KEY, PARCEL)


def test_carried_keys_round_trip_and_refuse_damage() -> None:
    keys = CarriedKeys("https://home.example", "alice", b"\x01sealed")
    assert CarriedKeys.decode(keys.encode()) == keys
    for bad in (b"", b"ISRCARY1", keys.encode()[:14], b"XXXXXXXX" + keys.encode()[8:],
                CarriedKeys("s", "u", b"x").encode()[:-1]):
        with pytest.raises(FormatError):
            CarriedKeys.decode(bad)
