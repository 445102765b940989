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
when the delta would not be smaller) it writes the full keyring. A full keyring
of a disk over 252 MiB is written as segments, chunks of their own that a
resume fetches as it needs them (:mod:`isrsync.keyring`), with the keyring
entries of the trace in the manifest itself.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import nacl.utils
import zstandard
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from .chunk import CHUNK_SIZE, CODEC_VERSION, ChunkRef, Encoded, chunk_count
from .errors import FormatError, IntegrityError, UnsupportedVersion
from .keyring import (
    ENTRY_SIZE as _REC,
    SEGMENT_ENTRIES,
    Keyring,
    LazyKeyring,
    check_entries as _check_records,
    encode_segments,
    entry_bytes as _record,
    refs_from_bytes,
    segment_count,
)
from .vmspec import VmSpec

MAGIC = b"ISRMANI\x00"
BODY_MAGIC = b"ISRBODY\x00"
FORMAT = 1
FLAG_FULL_KEYRING = 0x0001
_HEADER = struct.Struct("<8sHHI16sQQ32sQ")
HEADER_SIZE = _HEADER.size
_SECTION = struct.Struct("<BQ")
_NONCE = 24
_DELTA_REC = 4 + _REC
# A 2 TiB disk has a 1 GiB keyring; anything larger is damage or hostility.
MAX_INNER = 2 << 30
DEFAULT_FULL_EVERY = 32
# Keyring entries of the trace a manifest carries (section 8) at most: about what a
# boot touches, 69 KB; the rest of a long session's trace costs a segment fetch.
MAX_HOT_ENTRIES = 1024

S_KEYRING_FULL = 1
S_KEYRING_DELTA = 2
S_MEMORY = 3
S_TRACE = 4
S_RAM = 5
S_RAM_TRACE = 6
S_KEYRING_SEGMENTS = 7
S_KEYRING_HOT = 8

NO_PARENT = bytes(32)


def manifest_hash(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=32).digest()


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
    # The keyring base's segments, when it holds its keyring as segments: set on the
    # base as decoded and on a resolved target (whose ``keyring`` is then lazy).
    segments: list[ChunkRef] | None = None
    # This version's keyring entries of the chunks in its trace (set only over segments):
    # what the next resume touches first, named without fetching a segment.
    hot: dict[int, ChunkRef] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def parcel(self) -> uuidlib.UUID:
        return self.header.parcel


@dataclass(frozen=True)
class Sealed:
    """A sealed manifest and the keyring segments it names (to store and upload with it)."""

    raw: bytes
    segments: list[Encoded]


def full_due(version: int, parent: "Manifest | None", dirty: Iterable[int] | None, entries: int,
             full_every: int = DEFAULT_FULL_EVERY) -> bool:
    """Whether version ``version`` gets a full keyring rather than a delta (docs/manifest.md)."""
    if parent is None or dirty is None or version - parent.header.keyring_base >= full_every:
        return True
    n = len({i for i in dirty if i < entries})
    return n * _DELTA_REC * 2 >= entries * _REC  # a delta this large saves nothing


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
    """Seal a version with any full keyring inline, as before segments (see :func:`seal`):
    what a parcel of its own (a fork) or a tool writes when it uploads no segment."""
    return seal(parcel=parcel, version=version, master_key=master_key, vm=vm, keyring=keyring, parent=parent,
                dirty=dirty, memory=memory, trace=trace, site=site, time=time, full_every=full_every,
                extra=extra, segmented=False).raw


def seal(
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
    segmented: bool = True,
) -> Sealed:
    """Seal a version. With ``parent`` and ``dirty`` (indices changed since the
    parent, plus any past a shrink), writes a delta unless a full keyring is due.
    A full keyring of more than one segment is written as segments when
    ``segmented`` (their chunks are returned, to be uploaded before the commit).
    """
    if version < 1 or (parent is None) != (version == 1):
        raise ValueError("version 1 has no parent; every later version has one")
    if parent is not None and (parent.version != version - 1 or parent.parcel != parcel):
        raise ValueError("parent is not the previous version of this parcel")
    if any(not 0 <= i < len(keyring) for i in trace):
        raise ValueError("trace names a chunk past the disk")
    sections: list[tuple[int, bytes]] = []
    segs: list[Encoded] = []
    full = full_due(version, parent, dirty, len(keyring), full_every)
    if full:
        raw_ring = keyring.to_bytes()
        _check_records(raw_ring)  # a keyring built from raw bytes skipped _record
        if segmented and len(keyring) > SEGMENT_ENTRIES:
            segs = encode_segments(keyring, master_key)
            sections.append((S_KEYRING_SEGMENTS, b"".join(_record(e.ref) for e in segs)))
        else:
            sections.append((S_KEYRING_FULL, raw_ring))
        base = version
    else:
        assert dirty is not None and parent is not None
        idx = sorted(i for i in set(dirty) if i < len(keyring))
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
        if segs or (not full and parent is not None and parent.segments is not None):
            buf = bytearray(struct.pack("<Q", keyring.size))
            for i in sorted(set(list(dict.fromkeys(trace))[:MAX_HOT_ENTRIES])):
                buf += struct.pack("<I", i) + _record(keyring[i])
            sections.append((S_KEYRING_HOT, bytes(buf)))
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
    return Sealed(header + nonce + ct, segs)


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
        if (S_KEYRING_FULL in sections) == (S_KEYRING_SEGMENTS in sections) or S_KEYRING_DELTA in sections:
            raise FormatError("manifest lacks its full keyring")
        if S_KEYRING_FULL in sections:
            m.keyring = Keyring.from_bytes(disk_size, bytes(sections[S_KEYRING_FULL]))
        else:
            raw_segs = sections[S_KEYRING_SEGMENTS]
            if len(raw_segs) != _REC * segment_count(chunk_count(disk_size)):
                raise FormatError("manifest keyring segments do not match the disk size")
            m.segments = refs_from_bytes(raw_segs)
    else:
        if S_KEYRING_DELTA not in sections or S_KEYRING_FULL in sections or S_KEYRING_SEGMENTS in sections:
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
    if S_KEYRING_HOT in sections:
        m.hot = _parse_delta(sections[S_KEYRING_HOT], disk_size)
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
    if first.version != target.header.keyring_base or (first.keyring is None and first.segments is None):
        raise IntegrityError("manifest chain does not start at the keyring base")
    # Segments are not fetched here: the entries come as the site asks for them,
    # and the deltas below overrule them.
    ring: Keyring = LazyKeyring(first.disk_size, first.segments) if first.segments is not None else (
        first.keyring.copy() if first.keyring is not None else Keyring(first.disk_size))
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
    if isinstance(ring, LazyKeyring) and target.hot:
        for i, ref in target.hot.items():  # the target's own entries: they spare a segment fetch
            ring[i] = ref
    target.keyring = ring
    target.segments = first.segments
    return target


def dirty_since(old: Keyring, new: Keyring) -> list[int]:
    """Indices whose entries differ (O(disk); for tools and tests, not commits)."""
    n = len(new)
    a, b = old.to_bytes(), new.to_bytes()
    return [i for i in range(n) if i >= len(old) or a[i * _REC : (i + 1) * _REC] != b[i * _REC : (i + 1) * _REC]]


__all__ = [
    "CHUNK_SIZE", "Keyring", "LazyKeyring", "Manifest", "MemoryImage", "Header", "Sealed", "encode", "seal",
    "full_due", "decode",
    "parse_header", "resolve", "manifest_hash", "dirty_since", "NO_PARENT",
]
