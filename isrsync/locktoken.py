"""The sealed lock token a medium carries when a suspend hands it the lock (`--carry-lock`).

A format module (no I/O). The token says: parcel P, version V, lock epoch E,
handed to medium M. It is sealed (XChaCha20-Poly1305) under a key derived from
the parcel's master key, so only someone who can open the parcel can read it
or make one; the server never sees it. The epoch it carries is what the server
checks (a compare-and-set); the seal keeps it from strangers, not from the
user's own sites, which could take the lock anyway.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

import nacl.utils
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from .errors import FormatError, IntegrityError

MAGIC = b"ISRLOCK1"
_NONCE = 24


def _key(master_key: bytes) -> bytes:
    return hashlib.blake2b(master_key, digest_size=32, person=b"isrsync-lock-tk").digest()


@dataclass(frozen=True)
class LockToken:
    parcel: uuid.UUID
    version: int
    epoch: int
    medium_id: str

    def seal(self, master_key: bytes) -> bytes:
        body = json.dumps({"parcel": str(self.parcel), "version": self.version, "epoch": self.epoch,
                           "medium": self.medium_id}, sort_keys=True).encode()
        nonce = nacl.utils.random(_NONCE)
        return MAGIC + nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(body, MAGIC, nonce,
                                                                                  _key(master_key))

    @classmethod
    def unseal(cls, raw: bytes, master_key: bytes, parcel: uuid.UUID) -> LockToken:
        if raw[:8] != MAGIC or len(raw) < 8 + _NONCE + 16:
            raise FormatError("the lock token on the medium is not one")
        try:
            body = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(raw[8 + _NONCE:], MAGIC, raw[8:8 + _NONCE],
                                                                     _key(master_key))
        except CryptoError:
            raise IntegrityError("the lock token on the medium does not open with this parcel's key") from None
        try:
            d = json.loads(body)
            tok = cls(uuid.UUID(d["parcel"]), int(d["version"]), int(d["epoch"]), str(d["medium"]))
        except (ValueError, KeyError, TypeError):
            raise FormatError("the lock token on the medium is malformed") from None
        if tok.parcel != parcel:
            raise IntegrityError("the lock token on the medium is another parcel's")
        return tok


KEYS_MAGIC = b"ISRCARY1"


@dataclass(frozen=True)
class CarriedKeys:
    """What a medium carries so a site that never logged in can open it offline: the home
    server and user name (public) and the key bundle sealed under the passphrase (the
    server's own copy, opaque). No token: the next sync needs a login with one."""

    server: str
    user: str
    sealed_bundle: bytes

    def encode(self) -> bytes:
        head = json.dumps({"server": self.server, "user": self.user}, sort_keys=True).encode()
        return KEYS_MAGIC + len(head).to_bytes(4, "little") + head + self.sealed_bundle

    @classmethod
    def decode(cls, raw: bytes) -> CarriedKeys:
        if raw[:8] != KEYS_MAGIC or len(raw) < 12:
            raise FormatError("the key bundle on the medium is not one isrsync wrote")
        n = int.from_bytes(raw[8:12], "little")
        try:
            d = json.loads(raw[12:12 + n])
            keys = cls(str(d["server"]), str(d["user"]), raw[12 + n:])
        except (ValueError, KeyError, TypeError):
            raise FormatError("the key bundle on the medium is malformed") from None
        if not keys.sealed_bundle:
            raise FormatError("the key bundle on the medium is empty")
        return keys
