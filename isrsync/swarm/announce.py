"""The mDNS announcement of a site: the TXT record of ``_isrsync._tcp.local.`` (docs/mdns.md).

A format module: bytes and dicts in, typed values out, no I/O. Anyone on the LAN
can read and forge these records, so :func:`decode` trusts nothing: every key is
checked for presence, type, length and range, and any failure rejects the whole
record (:class:`~isrsync.errors.FormatError`); the browser ignores rejected records.

Privacy: a record never carries a parcel name, a parcel id or a user name. The
parcels a site can help with are listed as keyed BLAKE2b hashes of their ids under a
random per-announcement salt, so a listener can only test parcels it already knows
(``has_parcel``) and two announcements of one site cannot be linked by their hashes.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import FormatError, UnsupportedVersion

#: DNS-SD service type every site announces and browses for.
SERVICE_TYPE = "_isrsync._tcp.local."
#: The record's format version (TXT key ``v``); a reader refuses any other.
VERSION = 1
#: Bytes of the random salt (TXT key ``s``).
SALT_SIZE = 16
#: Bytes of one salted parcel hash (TXT key ``p`` holds them concatenated).
PARCEL_HASH_SIZE = 8
#: A TXT string is at most 255 bytes, ``p=`` included: 30 hashes fit in one.
MAX_PARCELS = 30
#: Longest site name, in UTF-8 bytes (``n=`` included it stays under 255).
MAX_NAME_SIZE = 63
#: Largest cached byte count a reader accepts (2**53: exact in JSON and floats).
MAX_CACHED = 2**53
#: Largest number of TXT keys a reader looks at; a record with more is hostile.
MAX_KEYS = 32

# Digits only, no sign, no leading zeros beyond "0": one spelling per number.
_NUMBER = re.compile(rb"0|[1-9][0-9]{0,15}")


@dataclass(frozen=True)
class Announcement:
    """What a site tells the LAN about itself."""

    site_id: uuid.UUID
    name: str
    port: int  # the BitTorrent listen port (TCP), also the liveness probe's target
    cached_bytes: int
    salt: bytes
    parcel_hashes: frozenset[bytes]
    version: int = VERSION
    # The direct path's TCP port (direct.py; TXT key "d"), None when the site runs none.
    # An optional key within version 1: readers that predate it ignore it (docs/mdns.md).
    direct_port: int | None = None

    def has_parcel(self, parcel: uuid.UUID) -> bool:
        """Whether this site says it can help with ``parcel`` (a hash match, so rarely a false yes)."""
        return parcel_hash(self.salt, parcel) in self.parcel_hashes

    def in_common(self, parcels: Iterable[uuid.UUID]) -> int:
        return sum(1 for p in set(parcels) if self.has_parcel(p))


def new_salt() -> bytes:
    return os.urandom(SALT_SIZE)


def parcel_hash(salt: bytes, parcel: uuid.UUID) -> bytes:
    """Keyed BLAKE2b of the parcel id under the salt, cut to PARCEL_HASH_SIZE bytes."""
    return hashlib.blake2b(parcel.bytes, key=salt, digest_size=PARCEL_HASH_SIZE, person=b"isrsync-mdns").digest()


def make(site_id: uuid.UUID, name: str, port: int, cached_bytes: int, parcels: Iterable[uuid.UUID],
         salt: bytes | None = None, direct_port: int | None = None) -> Announcement:
    """An announcement with a fresh salt; at most MAX_PARCELS parcels (the first ones given) are listed."""
    salt = new_salt() if salt is None else salt
    name = _clip_name(name)
    hashes = frozenset(parcel_hash(salt, p) for p in list(dict.fromkeys(parcels))[:MAX_PARCELS])
    ann = Announcement(site_id, name, port, min(max(cached_bytes, 0), MAX_CACHED), salt, hashes,
                       direct_port=direct_port)
    _check(ann)
    return ann


def _clip_name(name: str) -> str:
    # Host names can be long or odd; the record keeps a printable prefix rather than failing.
    clean = "".join(c for c in name if c.isprintable()) or "site"
    while len(clean.encode()) > MAX_NAME_SIZE:
        clean = clean[:-1]
    return clean


def _check(a: Announcement) -> None:
    if a.version != VERSION:
        raise UnsupportedVersion(f"mDNS announcement version {a.version}, this isrsync reads {VERSION}")
    if not 1 <= a.port <= 65535:
        raise FormatError(f"mDNS announcement: port {a.port} is out of range")
    if a.direct_port is not None and not 1 <= a.direct_port <= 65535:
        raise FormatError(f"mDNS announcement: direct port {a.direct_port} is out of range")
    if not 0 <= a.cached_bytes <= MAX_CACHED:
        raise FormatError("mDNS announcement: cached bytes out of range")
    if len(a.salt) != SALT_SIZE:
        raise FormatError("mDNS announcement: the salt is not 16 bytes")
    if len(a.parcel_hashes) > MAX_PARCELS or any(len(h) != PARCEL_HASH_SIZE for h in a.parcel_hashes):
        raise FormatError("mDNS announcement: bad parcel hashes")
    raw = a.name.encode()
    if not raw or len(raw) > MAX_NAME_SIZE or not a.name.isprintable():
        raise FormatError("mDNS announcement: the site name is empty, too long or not printable")


def encode(a: Announcement) -> dict[bytes, bytes]:
    """The TXT properties (key -> value) zeroconf puts in the record."""
    _check(a)
    extra = {b"d": str(a.direct_port).encode()} if a.direct_port is not None else {}
    return {
        **extra,
        b"v": str(a.version).encode(),
        b"id": a.site_id.hex.encode(),
        b"n": a.name.encode(),
        b"bt": str(a.port).encode(),
        b"c": str(a.cached_bytes).encode(),
        b"s": a.salt,
        b"p": b"".join(sorted(a.parcel_hashes)),
    }


def decode(props: Mapping[bytes | str, bytes | str | None]) -> Announcement:
    """Parse TXT properties; raise FormatError (or UnsupportedVersion) on anything unexpected."""
    if not isinstance(props, Mapping) or len(props) > MAX_KEYS:
        raise FormatError("mDNS announcement: not a TXT record of a sane size")
    kv: dict[bytes, bytes] = {}
    for k, v in props.items():
        kb = k.encode() if isinstance(k, str) else k
        vb = v.encode() if isinstance(v, str) else v
        if not isinstance(kb, bytes) or not isinstance(vb, (bytes, type(None))):
            raise FormatError("mDNS announcement: a TXT key or value is not bytes")
        if vb is not None:  # a bare key (no "=") is a flag: none of ours are, later versions may add some
            kv[kb.lower()] = vb
    version = _number(kv, b"v", 255)
    if version != VERSION:
        raise UnsupportedVersion(f"mDNS announcement version {version}, this isrsync reads {VERSION}")
    try:
        sid = _get(kv, b"id").decode("ascii")
        if not re.fullmatch(r"[0-9a-f]{32}", sid):
            raise ValueError(sid)
        site_id = uuid.UUID(hex=sid)
        name = _get(kv, b"n").decode("utf-8")
    except (UnicodeDecodeError, ValueError):
        raise FormatError("mDNS announcement: bad site id or name") from None
    salt = _get(kv, b"s")
    raw = _get(kv, b"p")
    if len(raw) % PARCEL_HASH_SIZE:
        raise FormatError("mDNS announcement: the parcel hashes are not whole")
    hashes = frozenset(raw[i : i + PARCEL_HASH_SIZE] for i in range(0, len(raw), PARCEL_HASH_SIZE))
    if len(hashes) * PARCEL_HASH_SIZE != len(raw):
        raise FormatError("mDNS announcement: a parcel hash is repeated")
    direct = _number(kv, b"d", 65535) if b"d" in kv else None
    ann = Announcement(site_id, name, _number(kv, b"bt", 65535), _number(kv, b"c", MAX_CACHED), salt, hashes, version,
                       direct)
    _check(ann)
    return ann


def _get(kv: dict[bytes, bytes], key: bytes) -> bytes:
    try:
        return kv[key]
    except KeyError:
        raise FormatError(f"mDNS announcement: no {key.decode()!r} key") from None


def _number(kv: dict[bytes, bytes], key: bytes, limit: int) -> int:
    raw = _get(kv, key)
    if not _NUMBER.fullmatch(raw) or int(raw) > limit:
        raise FormatError(f"mDNS announcement: {key.decode()!r} is not a number up to {limit}")
    return int(raw)


def instance_name(host: str, site_id: uuid.UUID) -> str:
    """A unique DNS-SD instance name: host + site id (two sites on one host never clash)."""
    label = re.sub(r"[^A-Za-z0-9-]", "-", host.split(".")[0])[:30] or "site"
    return f"{label}-{site_id.hex}.{SERVICE_TYPE}"
