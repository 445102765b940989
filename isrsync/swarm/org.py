"""Restricting a site's swarm to its own organisation (issue 12, part 6): SSL torrents.

The sites of one organisation share a *swarm secret* (``isrsync swarm secret
set``, a file in each site cache, mode 0600, never logged or announced). From
it each site derives, deterministically, the same certificate authority: an
Ed25519 key seeded by a keyed hash of the secret and a self-signed certificate
with fixed fields (Ed25519 signatures are deterministic, so every site makes
the same bytes). That CA certificate goes into each pack torrent's info
dictionary as ``ssl-cert``, which makes it a libtorrent *SSL torrent*: peers
talk TLS only, and each side must show a certificate signed by that CA. Each
session signs itself a fresh leaf certificate (CN ``*``: valid for every
torrent) with the derived CA key.

An outsider lacks the CA key, so it cannot make a certificate the others
accept: its TLS handshake fails before one byte of a piece moves. Because
``ssl-cert`` is in the info dictionary, the organisation's torrents also have
their own info-hashes, so an outsider who sniffs a handshake of one
organisation learns nothing that works in another's swarm or in the open one.

Why SSL torrents and not a secret checked in the BitTorrent handshake: libtorrent
checks the certificate natively, before any piece is exchanged; a shared-secret
handshake would need a protocol extension that libtorrent's Python binding
cannot add, and a secret-derived info-hash alone is seen in clear by anyone
who listens on the LAN.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from ..errors import UsageError
from ..fsutil import atomic_write
from .torrent import PackTorrent, load_torrent

SECRET_FILE = "swarm-secret"
MIN_SECRET = 16  # characters: a short secret could be guessed offline from one CA certificate
MAX_SECRET = 1024
_PERSON = b"isrsync-swarm-ca"
# Fixed validity: the CA certificate must be the same bytes at every site and at every time.
_BEGIN = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_END = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def check_secret(text: str) -> str:
    text = text.strip()
    if not MIN_SECRET <= len(text) <= MAX_SECRET:
        raise UsageError(f"a swarm secret has {MIN_SECRET} to {MAX_SECRET} characters",
                         hint="let isrsync make one: `isrsync swarm secret set --generate`")
    return text


def generate_secret() -> str:
    return secrets.token_urlsafe(32)


def read_secret(cache_dir: Path) -> str | None:
    """The site's swarm secret, or None (the swarm is open to every LAN site)."""
    try:
        return check_secret((cache_dir / SECRET_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, UsageError) as e:
        # Falling back to an open swarm would silently share with outsiders: refuse.
        raise UsageError(f"the swarm secret in {cache_dir / SECRET_FILE} is unreadable or invalid ({e})",
                         hint="set it again: `isrsync swarm secret set`, or `isrsync swarm secret clear`") from e


def write_secret(cache_dir: Path, text: str) -> None:
    atomic_write(cache_dir / SECRET_FILE, (check_secret(text) + "\n").encode("utf-8"), mode=0o600)


def clear_secret(cache_dir: Path) -> bool:
    try:
        (cache_dir / SECRET_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class OrgTls:
    """The organisation's CA (derived from the secret) and this session's own certificate."""

    ca_pem: bytes
    cert_pem: str  # this session's leaf, signed by the CA
    key_pem: str

    @property
    def fingerprint(self) -> str:
        """What two sites compare to know they share a secret (a hash of the CA, not the secret)."""
        der = x509.load_pem_x509_certificate(self.ca_pem).public_bytes(serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest()[:32]

    def seal(self, torrent: PackTorrent) -> PackTorrent:
        """The pack's SSL torrent for this organisation (its own info-hash)."""
        tree = lt.bdecode(torrent.data)
        tree[b"info"][b"ssl-cert"] = self.ca_pem
        return load_torrent(torrent.pack_id, lt.bencode(tree), size=torrent.size)


def org_tls(secret: str) -> OrgTls:
    """Derive the CA from ``secret`` and sign a fresh leaf certificate for one session."""
    seed = hashlib.blake2b(secret.encode("utf-8"), digest_size=32, person=_PERSON[:16]).digest()
    ca_key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "isrsync swarm")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(_BEGIN).not_valid_after(_END)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, None))
    key = ed25519.Ed25519PrivateKey.generate()
    # libtorrent accepts a peer certificate for a torrent when a DNS name (or the CN)
    # is the torrent's name or "*": one leaf serves every pack.
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "*")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_BEGIN).not_valid_after(_END)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("*")]), critical=False)
            .sign(ca_key, None))
    pem = serialization.Encoding.PEM
    return OrgTls(
        ca.public_bytes(pem),
        leaf.public_bytes(pem).decode("ascii"),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode("ascii"),
    )


def site_org(cache_dir: Path) -> OrgTls | None:
    secret = read_secret(cache_dir)
    return org_tls(secret) if secret is not None else None
