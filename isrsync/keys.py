"""Keys: parcel master keys, the convergence secret, and the passphrase-sealed bundle.

A user's :class:`KeyBundle` holds their convergence secret and the master key of
every parcel they own. It is sealed under a key derived from the passphrase with
Argon2id and stored (opaque) on the home server, so the user can unlock it at
any site. The server never sees a key.

Sealed bundle layout (integers little-endian)::

    "ISRKEYS\\0" | u16 version | u16 reserved | u32 opslimit | u64 memlimit |
    salt[16] | nonce[24] | ciphertext | BLAKE2b-256(everything before it)

The ciphertext is XChaCha20-Poly1305 with the header as associated data. The
trailing checksum lets a damaged bundle be told apart from a wrong passphrase.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import ClassVar

import nacl.utils
from nacl import bindings as sodium
from nacl import pwhash
from nacl.exceptions import CryptoError

from .chunk import SECRET_SIZE
from .errors import FormatError, IntegrityError, UnsupportedVersion, WrongPassphrase

MASTER_KEY_SIZE = 32
MAGIC = b"ISRKEYS\x00"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQ16s24s")
_SUM = 32

# Interactive-grade defaults: about half a second and 256 MiB on a laptop.
# Bounds guard against a damaged or hostile header asking for absurd work.
DEFAULT_OPSLIMIT = pwhash.argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT = pwhash.argon2id.MEMLIMIT_MODERATE
MIN_OPSLIMIT = pwhash.argon2id.OPSLIMIT_MIN
MIN_MEMLIMIT = pwhash.argon2id.MEMLIMIT_MIN
MAX_OPSLIMIT = 64
MAX_MEMLIMIT = 4 << 30


def new_master_key() -> bytes:
    return nacl.utils.random(MASTER_KEY_SIZE)


def new_convergence_secret() -> bytes:
    return nacl.utils.random(SECRET_SIZE)


@dataclass
class KdfLimits:
    opslimit: int = DEFAULT_OPSLIMIT
    memlimit: int = DEFAULT_MEMLIMIT

    MIN: ClassVar["KdfLimits"]

    def check(self) -> None:
        if not (MIN_OPSLIMIT <= self.opslimit <= MAX_OPSLIMIT):
            raise FormatError(f"key bundle asks for opslimit {self.opslimit}, outside the sane range")
        if not (MIN_MEMLIMIT <= self.memlimit <= MAX_MEMLIMIT):
            raise FormatError(f"key bundle asks for memlimit {self.memlimit}, outside the sane range")


KdfLimits.MIN = KdfLimits(MIN_OPSLIMIT, MIN_MEMLIMIT)


@dataclass
class KeyBundle:
    """Everything secret a user owns: convergence secret and parcel master keys."""

    convergence_secret: bytes
    parcels: dict[str, bytes] = field(default_factory=dict)  # parcel uuid -> master key

    @classmethod
    def new(cls) -> "KeyBundle":
        return cls(new_convergence_secret())

    def master_key(self, parcel: str) -> bytes:
        try:
            return self.parcels[parcel]
        except KeyError:
            raise IntegrityError(
                f"no key for parcel {parcel} in your key bundle",
                hint="the parcel was created by another user or the bundle is out of date",
            ) from None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "convergence_secret": self.convergence_secret.hex(),
                "parcels": {k: v.hex() for k, v in sorted(self.parcels.items())},
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "KeyBundle":
        try:
            obj = json.loads(raw)
            secret = bytes.fromhex(obj["convergence_secret"])
            parcels = {str(k): bytes.fromhex(v) for k, v in obj["parcels"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise FormatError(f"key bundle contents are malformed ({e.__class__.__name__})") from None
        if len(secret) != SECRET_SIZE or any(len(k) != MASTER_KEY_SIZE for k in parcels.values()):
            raise FormatError("key bundle holds keys of the wrong size")
        return cls(secret, parcels)

    def seal(self, passphrase: str, limits: KdfLimits | None = None) -> bytes:
        return self.seal_with(SealKey.derive(passphrase, limits))

    def seal_with(self, sk: "SealKey") -> bytes:
        """Seal under an already derived key (a logged-in session re-sealing
        after adding a parcel needs neither the passphrase nor Argon2id again)."""
        sk.limits.check()
        nonce = nacl.utils.random(24)
        header = _HEADER.pack(MAGIC, VERSION, 0, sk.limits.opslimit, sk.limits.memlimit, sk.salt, nonce)
        body = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(self.to_json(), header, nonce, sk.key)
        out = header + body
        return out + hashlib.blake2b(out, digest_size=_SUM).digest()

    @classmethod
    def unseal(cls, sealed: bytes, passphrase: str) -> "KeyBundle":
        return cls.unseal_keyed(sealed, passphrase)[0]

    @classmethod
    def unseal_with(cls, sealed: bytes, sk: "SealKey") -> "KeyBundle":
        """Open with a session's derived key; WrongPassphrase if the bundle was
        re-sealed under another passphrase (or salt) since."""
        ops, mem, salt, nonce, header = _parse_sealed(sealed)
        if salt != sk.salt:
            raise WrongPassphrase("the key bundle was re-sealed elsewhere", hint="log in again with `isrsync login`")
        return cls._open(sealed, header, nonce, sk.key)

    @classmethod
    def unseal_keyed(cls, sealed: bytes, passphrase: str) -> tuple["KeyBundle", "SealKey"]:
        ops, mem, salt, nonce, header = _parse_sealed(sealed)
        limits = KdfLimits(ops, mem)
        limits.check()
        sk = SealKey(_derive(passphrase, salt, limits), salt, limits)
        return cls._open(sealed, header, nonce, sk.key), sk

    @classmethod
    def _open(cls, sealed: bytes, header: bytes, nonce: bytes, key: bytes) -> "KeyBundle":
        try:
            raw = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed[_HEADER.size : -_SUM], header, nonce, key
            )
        except CryptoError:
            raise WrongPassphrase("the passphrase does not unlock this key bundle") from None
        return cls.from_json(raw)


@dataclass
class SealKey:
    """The Argon2id-derived key of a sealed bundle, with the salt and limits it came from."""

    key: bytes
    salt: bytes
    limits: KdfLimits

    @classmethod
    def derive(cls, passphrase: str, limits: KdfLimits | None = None) -> "SealKey":
        limits = limits or KdfLimits()
        limits.check()
        salt = nacl.utils.random(pwhash.argon2id.SALTBYTES)
        return cls(_derive(passphrase, salt, limits), salt, limits)

    def to_json(self) -> dict:
        return {"key": self.key.hex(), "salt": self.salt.hex(), "ops": self.limits.opslimit, "mem": self.limits.memlimit}

    @classmethod
    def from_json(cls, d: dict) -> "SealKey":
        return cls(bytes.fromhex(d["key"]), bytes.fromhex(d["salt"]), KdfLimits(int(d["ops"]), int(d["mem"])))


def _parse_sealed(sealed: bytes) -> tuple[int, int, bytes, bytes, bytes]:
    if len(sealed) < _HEADER.size + _SUM + 16:
        raise FormatError("key bundle is truncated")
    magic, version, _, ops, mem, salt, nonce = _HEADER.unpack_from(sealed)
    if magic != MAGIC:
        raise FormatError("not an isrsync key bundle (bad magic)")
    if hashlib.blake2b(sealed[:-_SUM], digest_size=_SUM).digest() != sealed[-_SUM:]:
        raise IntegrityError("key bundle is damaged (checksum mismatch)")
    if version != VERSION:
        raise UnsupportedVersion(f"key bundle format version {version} is not supported")
    return ops, mem, salt, nonce, sealed[: _HEADER.size]


def _derive(passphrase: str, salt: bytes, limits: KdfLimits) -> bytes:
    return pwhash.argon2id.kdf(
        32, passphrase.encode("utf-8"), salt, opslimit=limits.opslimit, memlimit=limits.memlimit
    )
