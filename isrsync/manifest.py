"""Manifest format: one per version (DESIGN.md, "Manifest").

Layout (integers little-endian)::

    header  "ISRMANI\\0" | u16 format | u16 flags | u32 reserved | parcel uuid[16] |
            u64 version | u64 keyring base | parent manifest hash[32] | u64 body length
    body    nonce[24] | XChaCha20-Poly1305(master key, AAD = header, zstd(inner))
    inner   "ISRBODY\\0" | u32 meta length | meta JSON | sections
    section u8 kind | u64 length | bytes

The header is server-visible and authenticated as associated data, so a flipped
bit anywhere fails the AEAD. ``flags`` bit 0 says the body holds a full keyring;
otherwise it holds a delta against the parent, and ``keyring base`` names the
nearest version with a full keyring, so a reader knows which manifests to fetch
to rebuild the keyring. A commit writes a delta of the dirty chunks, so its cost
grows with what changed, not with the disk; every ``full_every`` versions (or
when the delta would not be smaller) it writes the full keyring.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import nacl.utils
import zstandard
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from .chunk import (
    CHUNK_SIZE,
    CODEC_VERSION,
    FLAG_ZERO,
    FLAG_ZSTD,
    KEY_SIZE,
    TAG_SIZE,
    ChunkRef,
    chunk_count,
)
from .errors import FormatError, IntegrityError, UnsupportedVersion
from .vmspec import VmSpec

MAGIC = b"ISRMANI\x00"
BODY_MAGIC = b"ISRBODY\x00"
FORMAT = 1
FLAG_FULL_KEYRING = 0x0001
_HEADER = struct.Struct("<8sHHI16sQQ32sQ")
HEADER_SIZE = _HEADER.size
_SECTION = struct.Struct("<BQ")
_NONCE = 24
_REC = TAG_SIZE + KEY_SIZE + 1
_DELTA_REC = 4 + _REC
_ZERO_REC = bytes(TAG_SIZE + KEY_SIZE) + bytes((FLAG_ZERO,))
# A 2 TiB disk has a 1 GiB keyring; anything larger is damage or hostility.
MAX_INNER = 2 << 30
DEFAULT_FULL_EVERY = 32

S_KEYRING_FULL = 1
S_KEYRING_DELTA = 2
S_MEMORY = 3
S_TRACE = 4
S_RAM = 5
S_RAM_TRACE = 6

NO_PARENT = bytes(32)


def manifest_hash(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=32).digest()


class Keyring:
    """Per chunk index: tag, key and flags, in one flat bytearray (65 bytes each).

    A 16 GiB disk has 131072 entries, about 8.5 MB: compact enough to copy,
    serialize and diff without per-entry Python objects.
    """

    __slots__ = ("size", "_buf")

    def __init__(self, size: int, buf: bytearray | None = None) -> None:
        n = chunk_count(size)
        if buf is None:
            buf = bytearray(_ZERO_REC * n)  # a fresh disk reads as zeros
        elif len(buf) != _REC * n:
            raise FormatError("keyring length does not match its size")
        self.size = size
        self._buf = buf

    def __len__(self) -> int:
        return len(self._buf) // _REC

    def __getitem__(self, i: int) -> ChunkRef:
        if not 0 <= i < len(self):
            raise IndexError(i)
        o = i * _REC
        b = self._buf
        return ChunkRef(bytes(b[o : o + 32]), bytes(b[o + 32 : o + 64]), b[o + 64])

    def __setitem__(self, i: int, ref: ChunkRef) -> None:
        if not 0 <= i < len(self):
            raise IndexError(i)
        o = i * _REC
        self._buf[o : o + _REC] = _record(ref)

    def __iter__(self) -> Iterator[ChunkRef]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and self.size == other.size and self._buf == other._buf

    def tag_at(self, i: int) -> bytes:
        o = i * _REC
        return bytes(self._buf[o : o + 32])

    def tags(self) -> set[bytes]:
        """Distinct tags of stored (non-ZERO) chunks."""
        b = self._buf
        return {
            bytes(b[o : o + 32]) for o in range(0, len(b), _REC) if not b[o + 64] & FLAG_ZERO
        }

    def copy(self) -> "Keyring":
        return Keyring(self.size, bytearray(self._buf))

    def overlay(self, changes: Mapping[int, ChunkRef]) -> "Keyring":
        """A copy with ``changes`` (index -> ref) applied; indices past the end are ignored."""
        ring = self.copy()
        n = len(ring)
        for i, r in changes.items():
            if i < n:
                ring[i] = r
        return ring

    def resize(self, size: int) -> None:
        old = len(self)
        new = chunk_count(size)
        if new < old:
            del self._buf[new * _REC :]
        else:
            self._buf.extend(_ZERO_REC * (new - old))
        self.size = size

    def to_bytes(self) -> bytes:
        return bytes(self._buf)

    @classmethod
    def from_bytes(cls, size: int, raw: bytes) -> "Keyring":
        ring = cls(size, bytearray(raw))
        _check_records(raw)
        return ring

    @classmethod
    def from_refs(cls, size: int, refs: Sequence[ChunkRef]) -> "Keyring":
        if len(refs) != chunk_count(size):
            raise ValueError("ref count does not match size")
        return cls(size, bytearray(b"".join(_record(r) for r in refs)))


def _record(ref: ChunkRef) -> bytes:
    # Refuse here what a reader would refuse, so no version is sealed unreadable.
    if len(ref.tag) != TAG_SIZE or len(ref.key) != KEY_SIZE:
        raise ValueError("bad chunk ref")
    if ref.flags & FLAG_ZERO:
        if ref.flags != FLAG_ZERO or any(ref.tag) or any(ref.key):
            raise ValueError("malformed ZERO chunk ref")
    elif ref.flags & ~FLAG_ZSTD:
        raise ValueError(f"unknown chunk flags {ref.flags:#x}")
    return ref.tag + ref.key + bytes((ref.flags,))


def _check_records(raw: bytes | memoryview, stride: int = _REC, skip: int = 0) -> None:
    for o in range(skip, len(raw), stride):
        flags = raw[o + 64]
        if flags & FLAG_ZERO:
            if flags != FLAG_ZERO or any(raw[o : o + 64]):
                raise FormatError("keyring holds a malformed ZERO entry")
        elif flags & ~FLAG_ZSTD:
            raise FormatError(f"keyring holds unknown chunk flags {flags:#x}")


@dataclass
class MemoryImage:
    """A suspended VM's memory.

    ``refs`` chunk QEMU's migration stream of ``length`` bytes. With ``ram``,
    guest RAM is kept apart as an address space (chunk i holds RAM bytes
    i*128 KiB onwards, untouched ranges are ZERO) and the stream holds only
    device state; without it (images from before, boot files) the stream
    holds everything. RAM kept by address dedups against the previous
    version chunk by chunk and restores by writing it in place.
    """

    length: int
    refs: Keyring  # indexed like a disk of ``length`` bytes
    ram: Keyring | None = None
    # RAM chunks the guest touched first after its last resume, in that order:
    # a lazy restore puts them in place before the guest starts. A hint only.
    hot: Sequence[int] = ()

    @classmethod
    def from_refs(cls, length: int, refs: Sequence[ChunkRef], ram: Keyring | None = None,
                  hot: Sequence[int] = ()) -> "MemoryImage":
        return cls(length, Keyring.from_refs(length, refs), ram, hot)

    def tags(self) -> set[bytes]:
        return self.refs.tags() | (self.ram.tags() if self.ram is not None else set())


@dataclass(frozen=True)
class Header:
    format: int
    flags: int
    parcel: uuidlib.UUID
    version: int
    keyring_base: int
    parent: bytes
    body_length: int

    @property
    def full_keyring(self) -> bool:
        return bool(self.flags & FLAG_FULL_KEYRING)

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC, self.format, self.flags, 0, self.parcel.bytes, self.version,
            self.keyring_base, self.parent, self.body_length,
        )


def parse_header(raw: bytes) -> Header:
    """Parse and check the server-visible header (no key needed)."""
    if len(raw) < HEADER_SIZE:
        raise FormatError("manifest is truncated: no header")
    magic, fmt, flags, _, parcel, version, base, parent, body_len = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError("not an isrsync manifest (bad magic)")
    if fmt != FORMAT:
        raise UnsupportedVersion(f"manifest format {fmt} is not supported")
    if flags & ~FLAG_FULL_KEYRING:
        raise FormatError(f"manifest has unknown flags {flags:#x}")
    if len(raw) != HEADER_SIZE + body_length_check(body_len):
        raise FormatError("manifest length does not match its header (truncated?)")
    if version < 1 or not (1 <= base <= version):
        raise FormatError("manifest version numbers are inconsistent")
    if (version == 1) != (parent == NO_PARENT):
        raise FormatError("manifest parent does not match its version")
    if bool(flags & FLAG_FULL_KEYRING) != (base == version):
        raise FormatError("manifest keyring base does not match its flags")
    return Header(fmt, flags, uuidlib.UUID(bytes=parcel), version, base, parent, body_len)


def body_length_check(n: int) -> int:
    if n < _NONCE + 16 or n > MAX_INNER:
        raise FormatError("manifest body length is out of range")
    return n


@dataclass
class Manifest:
    """A decrypted version. ``keyring`` is complete once the chain is resolved."""

    header: Header
    hash: bytes
    vm: VmSpec
    disk_size: int
    memory: MemoryImage | None
    trace: array  # array('I') of chunk indices in first-access order
    site: str
    time: float
    codec: int
    keyring: Keyring | None = None  # set when the body held a full keyring
    delta: dict[int, ChunkRef] | None = None  # set when it held a delta
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def parcel(self) -> uuidlib.UUID:
        return self.header.parcel


def encode(
    *,
    parcel: uuidlib.UUID,
    version: int,
    master_key: bytes,
    vm: VmSpec,
    keyring: Keyring,
    parent: Manifest | None = None,
    dirty: Iterable[int] | None = None,
    memory: MemoryImage | None = None,
    trace: Sequence[int] = (),
    site: str = "",
    time: float = 0.0,
    full_every: int = DEFAULT_FULL_EVERY,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Seal a version. With ``parent`` and ``dirty`` (indices changed since the
    parent, plus any past a shrink), writes a delta unless a full keyring is due.
    """
    if version < 1 or (parent is None) != (version == 1):
        raise ValueError("version 1 has no parent; every later version has one")
    if parent is not None and (parent.version != version - 1 or parent.parcel != parcel):
        raise ValueError("parent is not the previous version of this parcel")
    if any(not 0 <= i < len(keyring) for i in trace):
        raise ValueError("trace names a chunk past the disk")
    sections: list[tuple[int, bytes]] = []
    full = parent is None or dirty is None or version - parent.header.keyring_base >= full_every
    if not full:
        assert dirty is not None and parent is not None
        idx = sorted(i for i in set(dirty) if i < len(keyring))
        if len(idx) * _DELTA_REC * 2 >= len(keyring) * _REC:
            full = True  # a delta this large saves nothing
    if full:
        raw_ring = keyring.to_bytes()
        _check_records(raw_ring)  # a keyring built from raw bytes skipped _record
        sections.append((S_KEYRING_FULL, raw_ring))
        base = version
    else:
        buf = bytearray(struct.pack("<Q", keyring.size))
        for i in idx:
            buf += struct.pack("<I", i) + _record(keyring[i])
        sections.append((S_KEYRING_DELTA, bytes(buf)))
        base = parent.header.keyring_base
    if memory is not None:
        sections.append((S_MEMORY, memory.refs.to_bytes()))
        if memory.ram is not None:
            raw_ram = memory.ram.to_bytes()
            _check_records(raw_ram)
            sections.append((S_RAM, raw_ram))
            if any(not 0 <= i < len(memory.ram) for i in memory.hot):
                raise ValueError("the RAM trace names a chunk past guest RAM")
            if memory.hot:
                sections.append((S_RAM_TRACE, array("I", memory.hot).tobytes()))
        elif memory.hot:
            raise ValueError("a RAM trace needs RAM kept apart")
    if trace:
        sections.append((S_TRACE, array("I", trace).tobytes()))
    meta = {
        "vm": vm.to_json(),
        "disk_size": keyring.size,
        "memory_length": memory.length if memory is not None else None,
        "ram_size": memory.ram.size if memory is not None and memory.ram is not None else None,
        "site": site,
        "time": time,
        "codec": CODEC_VERSION,
        "extra": dict(extra or {}),
    }
    meta_raw = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    inner = bytearray(BODY_MAGIC + struct.pack("<I", len(meta_raw)) + meta_raw)
    for kind, data in sections:
        inner += _SECTION.pack(kind, len(data)) + data
    packed = zstandard.ZstdCompressor(level=3).compress(bytes(inner))
    body_len = _NONCE + len(packed) + 16
    header = Header(
        FORMAT, FLAG_FULL_KEYRING if full else 0, parcel, version, base,
        parent.hash if parent else NO_PARENT,
        body_len,
    ).pack()
    nonce = nacl.utils.random(_NONCE)
    ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(packed, header, nonce, master_key)
    return header + nonce + ct


def decode(raw: bytes, master_key: bytes, parcel: uuidlib.UUID | None = None) -> Manifest:
    """Authenticate and parse a manifest; any damage raises IntegrityError/FormatError."""
    header = parse_header(raw)
    if parcel is not None and header.parcel != parcel:
        raise IntegrityError("manifest belongs to another parcel")
    nonce = raw[HEADER_SIZE : HEADER_SIZE + _NONCE]
    try:
        packed = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            raw[HEADER_SIZE + _NONCE :], raw[:HEADER_SIZE], nonce, master_key
        )
    except CryptoError:
        raise IntegrityError(
            f"manifest of version {header.version} fails authentication",
            hint="it is damaged, or the key is not this parcel's; nothing was changed",
        ) from None
    try:
        inner = zstandard.ZstdDecompressor().decompress(packed, max_output_size=MAX_INNER)
    except zstandard.ZstdError:
        raise FormatError("manifest body does not decompress") from None
    return _parse_inner(header, manifest_hash(raw), inner)


def _parse_inner(header: Header, mhash: bytes, inner: bytes) -> Manifest:
    if inner[:8] != BODY_MAGIC or len(inner) < 12:
        raise FormatError("manifest body has a bad magic")
    (meta_len,) = struct.unpack_from("<I", inner, 8)
    pos = 12 + meta_len
    try:
        meta = json.loads(inner[12:pos])
        disk_size = int(meta["disk_size"])
        mem_len = meta["memory_length"]
        ram_size = meta.get("ram_size")
        if ram_size is not None and (mem_len is None or int(ram_size) < 0):
            raise ValueError
        vm = VmSpec.from_json(meta["vm"])
        site, when, codec = str(meta["site"]), float(meta["time"]), int(meta["codec"])
        extra = meta.get("extra", {})
        if disk_size < 0 or not isinstance(extra, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise FormatError("manifest metadata is malformed") from None
    sections: dict[int, memoryview] = {}
    view = memoryview(inner)
    while pos < len(inner):
        if pos + _SECTION.size > len(inner):
            raise FormatError("manifest section header is truncated")
        kind, n = _SECTION.unpack_from(inner, pos)
        pos += _SECTION.size
        if pos + n > len(inner) or kind in sections:
            raise FormatError("manifest section is truncated or repeated")
        sections[kind] = view[pos : pos + n]
        pos += n
    m = Manifest(header, mhash, vm, disk_size, None, array("I"), site, when, codec, extra=extra)
    if header.full_keyring:
        if S_KEYRING_FULL not in sections or S_KEYRING_DELTA in sections:
            raise FormatError("manifest lacks its full keyring")
        m.keyring = Keyring.from_bytes(disk_size, bytes(sections[S_KEYRING_FULL]))
    else:
        if S_KEYRING_DELTA not in sections or S_KEYRING_FULL in sections:
            raise FormatError("manifest lacks its keyring delta")
        m.delta = _parse_delta(sections[S_KEYRING_DELTA], disk_size)
    if mem_len is not None:
        if S_MEMORY not in sections or int(mem_len) < 0:
            raise FormatError("manifest lacks its memory image")
        m.memory = MemoryImage(int(mem_len), Keyring.from_bytes(int(mem_len), bytes(sections[S_MEMORY])))
        if ram_size is not None:
            if S_RAM not in sections:
                raise FormatError("manifest lacks its RAM image")
            m.memory.ram = Keyring.from_bytes(int(ram_size), bytes(sections[S_RAM]))
            if S_RAM_TRACE in sections:
                m.memory.hot = _indices(sections[S_RAM_TRACE], chunk_count(int(ram_size)), "RAM trace")
        elif S_RAM_TRACE in sections:
            raise FormatError("manifest has a RAM trace without a RAM image")
    elif S_RAM in sections or S_RAM_TRACE in sections:
        raise FormatError("manifest has a RAM image without a memory image")
    if S_TRACE in sections:
        m.trace = _indices(sections[S_TRACE], chunk_count(disk_size), "trace")
    return m


def _indices(raw: memoryview, count: int, what: str) -> array:
    if len(raw) % 4:
        raise FormatError(f"manifest {what} is malformed")
    out = array("I", bytes(raw))
    if any(i >= count for i in out):
        raise FormatError(f"manifest {what} points past its end")
    return out


def _parse_delta(raw: memoryview, disk_size: int) -> dict[int, ChunkRef]:
    if len(raw) < 8 or (len(raw) - 8) % _DELTA_REC:
        raise FormatError("keyring delta is malformed")
    (size,) = struct.unpack_from("<Q", raw)
    if size != disk_size:
        raise FormatError("keyring delta size does not match the disk size")
    _check_records(raw, _DELTA_REC, 8 + 4)
    out: dict[int, ChunkRef] = {}
    last = -1
    n = chunk_count(disk_size)
    for o in range(8, len(raw), _DELTA_REC):
        (i,) = struct.unpack_from("<I", raw, o)
        if i <= last or i >= n:
            raise FormatError("keyring delta indices are out of order or range")
        last = i
        r = o + 4
        out[i] = ChunkRef(bytes(raw[r : r + 32]), bytes(raw[r + 32 : r + 64]), raw[r + 64])
    return out


def chain_ending_at(raws: Mapping[int, bytes], version: int, head_hash: bytes) -> dict[int, bytes] | None:
    """From manifests of unknown origin (a USB key), the chain a resume of ``version`` needs:
    the keyring base to ``version``, or None if any of it is missing or not the one named.

    ``head_hash`` is the server's hash of ``version``'s manifest; each earlier one must hash
    to its successor's parent. So a stale key, a key of another history (a fenced site's
    uncommitted suspend) or a damaged file is never used: only the bytes the server
    itself would have sent. No key is needed: headers are plaintext.
    """
    raw = raws.get(version)
    if raw is None or not head_hash or manifest_hash(raw) != head_hash:
        return None
    out = {version: raw}
    try:
        h = parse_header(raw)
        base = h.keyring_base
        for v in range(version - 1, base - 1, -1):
            prev = raws.get(v)
            if prev is None or manifest_hash(prev) != h.parent:
                return None
            out[v] = prev
            h = parse_header(prev)
    except FormatError:
        return None
    return out


def resolve(chain: Sequence[Manifest]) -> Manifest:
    """Rebuild the full keyring of ``chain[-1]`` from its keyring base onwards.

    ``chain`` runs from the version holding the full keyring to the target, each
    the parent of the next (checked by hash, so a server cannot splice in a
    version of another history). Returns the target with ``keyring`` set.
    """
    if not chain:
        raise ValueError("empty chain")
    target = chain[-1]
    if target.keyring is not None:
        return target
    first = chain[0]
    if first.keyring is None or first.version != target.header.keyring_base:
        raise IntegrityError("manifest chain does not start at the keyring base")
    ring = first.keyring.copy()
    prev = first
    for m in chain[1:]:
        if m.version != prev.version + 1 or m.header.parent != prev.hash or m.parcel != prev.parcel:
            raise IntegrityError(f"version {m.version} is not the child of version {prev.version}")
        if m.keyring is not None:
            ring = m.keyring.copy()
        else:
            assert m.delta is not None
            if m.disk_size != ring.size:
                ring.resize(m.disk_size)
            for i, ref in m.delta.items():
                ring[i] = ref
        prev = m
    target.keyring = ring
    return target


def dirty_since(old: Keyring, new: Keyring) -> list[int]:
    """Indices whose entries differ (O(disk); for tools and tests, not commits)."""
    n = len(new)
    a, b = old.to_bytes(), new.to_bytes()
    return [i for i in range(n) if i >= len(old) or a[i * _REC : (i + 1) * _REC] != b[i * _REC : (i + 1) * _REC]]


__all__ = [
    "CHUNK_SIZE", "Keyring", "Manifest", "MemoryImage", "Header", "encode", "decode",
    "parse_header", "resolve", "manifest_hash", "dirty_since", "NO_PARENT",
]
