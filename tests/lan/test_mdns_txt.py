"""The mDNS TXT record (isrsync.swarm.announce): round trip, salted parcel hashes, and
rejection of every malformed or hostile record with FormatError, never another exception."""

from __future__ import annotations

import random
import uuid

import pytest

from isrsync.errors import FormatError, UnsupportedVersion
from isrsync.swarm import announce
from isrsync.swarm.announce import Announcement

SITE = uuid.UUID("00112233-4455-4677-8899-aabbccddeeff")


def _ann(**kw: object) -> Announcement:
    args: dict = dict(site_id=SITE, name="lab-1", port=6881, cached_bytes=10**9, parcels=[uuid.uuid4()])
    args.update(kw)
    return announce.make(**args)


def test_round_trip() -> None:
    parcels = [uuid.uuid4() for _ in range(5)]
    a = _ann(parcels=parcels)
    props = announce.encode(a)
    assert announce.decode(props) == a
    # zeroconf hands properties back with str or bytes keys depending on the path
    assert announce.decode({k.decode(): v for k, v in props.items()}) == a
    assert all(a.has_parcel(p) for p in parcels)
    assert not a.has_parcel(uuid.uuid4())
    assert a.in_common([*parcels[:2], uuid.uuid4()]) == 2


def test_every_txt_string_fits_in_255_bytes_at_the_limits() -> None:
    a = _ann(name="é" * 100, parcels=[uuid.uuid4() for _ in range(100)], cached_bytes=2**80)
    assert len(a.parcel_hashes) == announce.MAX_PARCELS
    assert a.cached_bytes == announce.MAX_CACHED
    assert len(a.name.encode()) <= announce.MAX_NAME_SIZE
    for k, v in announce.encode(a).items():
        assert len(k) + 1 + len(v) <= 255
    assert announce.decode(announce.encode(a)) == a


def test_salt_unlinks_announcements_of_the_same_parcels() -> None:
    p = uuid.uuid4()
    a, b = _ann(parcels=[p]), _ann(parcels=[p])
    assert a.salt != b.salt and a.parcel_hashes != b.parcel_hashes
    assert a.has_parcel(p) and b.has_parcel(p)


def test_the_record_holds_no_parcel_id() -> None:
    p = uuid.uuid4()
    raw = b"".join(k + b"=" + v for k, v in announce.encode(_ann(parcels=[p])).items())
    for needle in (p.bytes, p.hex.encode(), str(p).encode()):
        assert needle not in raw


def test_names_are_made_printable_and_short() -> None:
    assert _ann(name="a\x00b\nc").name == "abc"
    assert _ann(name="\x07").name == "site"


def _good() -> dict[bytes, bytes]:
    return announce.encode(_ann())


BAD: list[tuple[str, dict]] = [
    ("no version", {b"v": None}),
    ("version text", {b"v": b"one"}),
    ("bad id", {b"id": b"zz" * 16}),
    ("id with dashes", {b"id": str(SITE).encode()}),
    ("upper-case id", {b"id": SITE.hex.upper().encode()}),
    ("empty name", {b"n": b""}),
    ("name not utf-8", {b"n": b"\xff"}),
    ("name with control", {b"n": b"a\x1bb"}),
    ("long name", {b"n": b"x" * 64}),
    ("port zero", {b"bt": b"0"}),
    ("port too big", {b"bt": b"65536"}),
    ("port signed", {b"bt": b"+6881"}),
    ("port padded", {b"bt": b"06881"}),
    ("port spaced", {b"bt": b" 6881"}),
    ("cached negative", {b"c": b"-1"}),
    ("cached huge", {b"c": b"9" * 300}),
    ("cached float", {b"c": b"1e9"}),
    ("short salt", {b"s": b"x" * 15}),
    ("partial hash", {b"p": b"x" * 9}),
    ("repeated hash", {b"p": b"x" * 16}),
    ("too many hashes", {b"p": b"".join(i.to_bytes(8, "little") for i in range(31))}),
    ("direct port zero", {b"d": b"0"}),
    ("direct port too big", {b"d": b"65536"}),
    ("direct port padded", {b"d": b"0443"}),
    ("direct port text", {b"d": b"http"}),
]


@pytest.mark.parametrize(("why", "change"), BAD, ids=[b[0] for b in BAD])
def test_malformed_records_are_refused(why: str, change: dict) -> None:
    props = {**_good(), **change}
    props = {k: v for k, v in props.items() if not (v is None and k != b"v")}
    with pytest.raises(FormatError):
        announce.decode(props)


@pytest.mark.parametrize("key", [b"v", b"id", b"n", b"bt", b"c", b"s", b"p"])
def test_a_missing_key_is_refused(key: bytes) -> None:
    props = _good()
    del props[key]
    with pytest.raises(FormatError):
        announce.decode(props)


def test_other_versions_are_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        announce.decode({**_good(), b"v": b"2"})


def test_too_many_keys_is_refused() -> None:
    with pytest.raises(FormatError):
        announce.decode({**_good(), **{f"x{i}".encode(): b"" for i in range(40)}})


def test_the_direct_port_is_optional_within_version_1() -> None:
    with_direct = _ann(direct_port=7000)
    assert announce.encode(with_direct)[b"d"] == b"7000"
    assert announce.decode(announce.encode(with_direct)) == with_direct
    # A site that runs no direct path (or predates it) leaves the key out: still version 1.
    without = _ann()
    assert b"d" not in announce.encode(without)
    assert announce.decode(announce.encode(without)).direct_port is None


def test_unknown_keys_are_ignored() -> None:
    assert announce.decode({**_good(), b"future": b"1"}).site_id == SITE


def test_random_garbage_never_raises_anything_but_format_error() -> None:
    rng = random.Random(12)
    good = _good()
    for _ in range(3000):
        props: dict = dict(good)
        for _ in range(rng.randint(1, 3)):
            k = rng.choice([*good, b"junk"])
            props[k] = None if rng.random() < 0.1 else bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        try:
            announce.decode(props)
        except FormatError:
            pass
    for junk in (None, 5, "text", [b"v=1"], {1: 2}, {b"v": 1}):
        with pytest.raises(FormatError):
            announce.decode(junk)  # type: ignore[arg-type]


def test_instance_names_are_unique_and_valid_labels() -> None:
    a = announce.instance_name("My Host.example.org", SITE)
    b = announce.instance_name("My Host.example.org", uuid.uuid4())
    assert a != b and a.endswith("." + announce.SERVICE_TYPE)
    label = a[: -len(announce.SERVICE_TYPE) - 1]
    assert len(label.encode()) <= 63 and " " not in label
