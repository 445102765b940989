"""Pack format: an immutable file of encoded chunks (DESIGN.md, "Packs and swarming").

Layout (integers little-endian)::

    header   "ISRPACK\\0" | u16 version | u16 reserved | u32 reserved          16 bytes
    entries  per chunk: tag[32] | u32 length | X[length]
    index    per chunk: tag[32] | u64 offset of X | u32 length              44 bytes each
    footer   u64 index offset | u32 count | u32 reserved |
             BLAKE2b-256(index) | "ISRPEND\\0"                                56 bytes

The pack id is BLAKE2b-256 of the whole file. Each entry repeats its tag and
length so a pack whose trailer was cut off can still be salvaged by a scan. The
index is a hint until the chunk bytes it points to hash to the tag; every read
checks that.

Readers and writers work on binary file objects, so this module stays free of
paths: placing a finished pack atomically is the caller's business.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .chunk import TAG_SIZE, tag_of
from .errors import FormatError, IntegrityError, UnsupportedVersion

MAGIC = b"ISRPACK\x00"
END_MAGIC = b"ISRPEND\x00"
VERSION = 1
_HEADER = struct.Struct("<8sHHI")
_ENTRY = struct.Struct("<32sI")
_INDEX = struct.Struct("<32sQI")
_FOOTER = struct.Struct("<QII32s8s")
HEADER_SIZE = _HEADER.size
ENTRY_HEADER_SIZE = _ENTRY.size
FOOTER_SIZE = _FOOTER.size
# An encoded chunk is at most 128 KiB + zstd frame + AEAD tag; anything larger
# in an index is damage, not data.
MAX_CHUNK_BYTES = 128 * 1024 + 1024


@dataclass(frozen=True, slots=True)
class PackEntry:
    """Where one encoded chunk lives: the pack index row (tag -> pack, offset, length)."""

    tag: bytes
    pack_id: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class PackInfo:
    pack_id: bytes
    size: int
    entries: tuple[PackEntry, ...]


def pack_name(pack_id: bytes) -> str:
    return pack_id.hex()


def parse_pack_name(name: str) -> bytes:
    """The pack id a file or URL name stands for; rejects anything else."""
    if len(name) != 2 * TAG_SIZE or any(c not in "0123456789abcdef" for c in name):
        raise FormatError(f"{name[:80]!r} is not a pack id")
    return bytes.fromhex(name)


class PackWriter:
    """Streams encoded chunks into a pack; memory use is the index only.

    The caller owns ``out`` (usually a temporary file it renames to the id when
    :meth:`finish` returns). Duplicate tags are written once.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.blake2b(digest_size=TAG_SIZE)
        self._index: list[tuple[bytes, int, int]] = []
        self._seen: set[bytes] = set()
        self._size = 0
        self._finished = False
        self._write(_HEADER.pack(MAGIC, VERSION, 0, 0))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self._size += len(data)

    @property
    def size(self) -> int:
        """Bytes written so far (the finished pack adds 44 per chunk + 56)."""
        return self._size

    @property
    def count(self) -> int:
        return len(self._index)

    def __contains__(self, tag: bytes) -> bool:
        return tag in self._seen

    def add(self, tag: bytes, data: bytes) -> bool:
        """Append one encoded chunk; returns False if the tag was already in the pack.

        The tag is trusted here (the encoder just made it); readers re-check it.
        """
        if self._finished:
            raise ValueError("pack already finished")
        if len(tag) != TAG_SIZE or not data or len(data) > MAX_CHUNK_BYTES:
            raise ValueError("bad chunk for pack")
        if tag in self._seen:
            return False
        self._seen.add(tag)
        self._write(_ENTRY.pack(tag, len(data)))
        self._index.append((tag, self._size, len(data)))
        self._write(data)
        return True

    def finish(self) -> PackInfo:
        """Write the index and footer; returns the pack id and its entries."""
        if self._finished:
            raise ValueError("pack already finished")
        self._finished = True
        index_offset = self._size
        index = b"".join(_INDEX.pack(t, o, n) for t, o, n in self._index)
        self._write(index)
        self._write(
            _FOOTER.pack(
                index_offset, len(self._index), 0, hashlib.blake2b(index, digest_size=32).digest(),
                END_MAGIC,
            )
        )
        pack_id = self._hash.digest()
        entries = tuple(PackEntry(t, pack_id, o, n) for t, o, n in self._index)
        return PackInfo(pack_id, self._size, entries)


def _check_header(head: bytes) -> None:
    if len(head) < HEADER_SIZE:
        raise FormatError("pack is truncated: no header")
    magic, version, _, _ = _HEADER.unpack(head[:HEADER_SIZE])
    if magic != MAGIC:
        raise FormatError("not an isrsync pack (bad magic)")
    if version != VERSION:
        raise UnsupportedVersion(f"pack format version {version} is not supported")


def parse_trailer(tail: bytes, size: int, pack_id: bytes = b"") -> list[PackEntry]:
    """Parse a pack's index given its last bytes (index + footer) and total size.

    ``tail`` may hold more than the trailer; only its last bytes are used.
    """
    if size < HEADER_SIZE + FOOTER_SIZE or len(tail) < FOOTER_SIZE:
        raise FormatError("pack is truncated: no footer")
    index_offset, count, _, index_hash, end = _FOOTER.unpack(tail[-FOOTER_SIZE:])
    if end != END_MAGIC:
        raise FormatError("pack is truncated or damaged: bad footer")
    index_len = count * _INDEX.size
    if index_offset < HEADER_SIZE or index_offset + index_len + FOOTER_SIZE != size:
        raise FormatError("pack footer does not match the pack size")
    if len(tail) < index_len + FOOTER_SIZE:
        raise ValueError("tail too short for the index")  # caller must read more
    index = tail[len(tail) - FOOTER_SIZE - index_len : len(tail) - FOOTER_SIZE]
    if hashlib.blake2b(index, digest_size=32).digest() != index_hash:
        raise IntegrityError("pack index does not match its hash")
    entries = []
    for tag, off, n in _INDEX.iter_unpack(index):
        if n == 0 or n > MAX_CHUNK_BYTES or off < HEADER_SIZE + ENTRY_HEADER_SIZE or (
            off + n > index_offset
        ):
            raise FormatError("pack index points outside the pack")
        entries.append(PackEntry(tag, pack_id, off, n))
    return entries


class PackReader:
    """Random access to a pack's chunks; every read is verified by tag."""

    def __init__(self, f: BinaryIO, size: int, pack_id: bytes = b"") -> None:
        self._f = f
        self.size = size
        self.pack_id = pack_id
        f.seek(0)
        _check_header(f.read(HEADER_SIZE))
        f.seek(max(0, size - FOOTER_SIZE))
        footer = f.read(FOOTER_SIZE)
        if len(footer) < FOOTER_SIZE:
            raise FormatError("pack is truncated: no footer")
        _, count, _, _, _ = _FOOTER.unpack(footer)
        need = count * _INDEX.size + FOOTER_SIZE
        if need > size:
            raise FormatError("pack footer does not match the pack size")
        f.seek(size - need)
        self.entries = parse_trailer(f.read(need), size, pack_id)
        self._by_tag = {e.tag: e for e in self.entries}

    def __contains__(self, tag: bytes) -> bool:
        return tag in self._by_tag

    def get(self, tag: bytes) -> bytes:
        """The verified ciphertext for ``tag``; IntegrityError if damaged."""
        entry = self._by_tag.get(tag)
        if entry is None:
            raise KeyError(tag)
        self._f.seek(entry.offset)
        data = self._f.read(entry.length)
        if len(data) != entry.length or tag_of(data) != tag:
            raise IntegrityError(f"chunk {tag.hex()[:16]} in pack is damaged")
        return data

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for entry in self.entries:
            yield entry.tag, self.get(entry.tag)


def verify_stream(f: BinaryIO, expected_id: bytes | None = None) -> PackInfo:
    """Check a whole pack in one sequential pass: structure, every tag, and its id.

    Reads the file once (the id hash and the chunk tags are computed together),
    so it suits multi-GiB packs and uploads being accepted by a server.
    """
    whole = hashlib.blake2b(digest_size=TAG_SIZE)
    f.seek(0)
    head = f.read(HEADER_SIZE)
    _check_header(head)
    whole.update(head)
    pos = HEADER_SIZE
    seen: list[tuple[bytes, int, int]] = []
    # Walk entries until the bytes stop looking like an entry; then what remains
    # must be exactly the index and footer that describe what we walked.
    rest = b""
    while True:
        eh = f.read(ENTRY_HEADER_SIZE)
        whole.update(eh)
        if len(eh) < ENTRY_HEADER_SIZE:
            rest = eh
            break
        tag, n = _ENTRY.unpack(eh)
        if n == 0 or n > MAX_CHUNK_BYTES:
            rest = eh
            break
        data = f.read(n)
        whole.update(data)
        if len(data) != n or tag_of(data) != tag:
            # Either damage or we have walked into the index: decide below.
            rest = eh + data
            break
        seen.append((tag, pos + ENTRY_HEADER_SIZE, n))
        pos += ENTRY_HEADER_SIZE + n
    # The trailer of what we walked has exactly this size; read no more than one
    # byte past it, so a damaged multi-GiB upload never lands in memory.
    expected = len(seen) * _INDEX.size + FOOTER_SIZE
    if len(rest) > expected:
        raise IntegrityError("pack chunk is damaged (it does not match its tag)")
    more = f.read(expected - len(rest) + 1)
    whole.update(more)
    tail = rest + more
    if len(tail) != expected:
        raise FormatError("pack is truncated or has bytes after its trailer")
    size = pos + len(tail)
    try:
        entries = parse_trailer(tail, size)
    except ValueError:
        raise FormatError("pack footer is inconsistent with its chunks") from None
    if [(e.tag, e.offset, e.length) for e in entries] != seen:
        raise IntegrityError("pack chunks do not match its index (damaged chunk)")
    pack_id = whole.digest()
    if expected_id is not None and pack_id != expected_id:
        raise IntegrityError("pack bytes do not match the pack id")
    return PackInfo(pack_id, size, tuple(PackEntry(t, pack_id, o, n) for t, o, n in seen))


def salvage(f: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    """Yield the verified chunks of a pack that may be truncated or damaged.

    Stops at the first entry that does not verify; never yields a bad chunk.
    """
    f.seek(0)
    _check_header(f.read(HEADER_SIZE))
    while True:
        eh = f.read(ENTRY_HEADER_SIZE)
        if len(eh) < ENTRY_HEADER_SIZE:
            return
        tag, n = _ENTRY.unpack(eh)
        if n == 0 or n > MAX_CHUNK_BYTES:
            return
        data = f.read(n)
        if len(data) != n or tag_of(data) != tag:
            return
        yield tag, data
