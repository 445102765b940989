"""The plaintext seed index (byte-level spec in docs/medium.md, "Plaintext seeds").

A seed is a local image file in the clear (a raw disk, an ISO, a qcow2) that
the user already has: the organisation's base image on a DVD, last year's
copy of the parcel's disk. ``sneakernet seed FILE`` cuts the image's guest
view into 128 KiB chunks, encodes each with the user's convergence secret and
records which tag each chunk would have. A resume then asks the seed for a
tag, the seed reads that chunk's plaintext and encodes it again: wherever the
parcel's disk still equals the image, the tags match and the chunk never
crosses the network.

The index is kept in the site cache (``<cache>/seeds/<key>/seed.idx``), never
on the image, and holds no plaintext: an extent map of the image's guest view
(guest offset -> file offset, or a hole) and a table of (tag, chunk number)
sorted by tag. A fingerprint of the convergence secret says whose tags these
are, so an index made under another user's secret is refused, not misused.

Pure: bytes in, bytes out. Decoders raise :class:`FormatError` (or
:class:`UnsupportedVersion`) on malformed input, and nothing else.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from isrsync.chunk import CHUNK_SIZE, TAG_SIZE
from isrsync.errors import FormatError, UnsupportedVersion

MAGIC = b"ISRSEED\x00"
END_MAGIC = b"ISRSEND\x00"
VERSION = 1
HOLE = (1 << 64) - 1  # an extent's file offset when the image reads as zeros there
# An extent's file offset when its data is not in the file as plain bytes (a
# qcow2's compressed cluster, or one its backing file holds): a chunk touching
# it is never indexed and never served.
ABSENT = (1 << 64) - 2
MAX_PATH = 4096
CHECKSUM_SIZE = 32
FINGERPRINT_SIZE = 32

_HEADER = struct.Struct("<8sHHIQqQQII32sH")
_EXTENT = struct.Struct("<QQQ")
_ROW = struct.Struct("<32sQ")
_TRAILER = struct.Struct("<32s8s")
HEADER_SIZE = _HEADER.size
EXTENT_SIZE = _EXTENT.size
ROW_SIZE = _ROW.size
TRAILER_SIZE = _TRAILER.size

_FINGERPRINT_CONTEXT = b"isrsync plaintext seed index v1"


class ImageKind(enum.IntEnum):
    RAW = 1
    ISO = 2  # a raw image with an ISO 9660 volume descriptor (read as raw)
    QCOW2 = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def fingerprint(secret: bytes) -> bytes:
    """Names a convergence secret without revealing it (keyed hash of a constant)."""
    return hashlib.blake2b(_FINGERPRINT_CONTEXT, digest_size=FINGERPRINT_SIZE, key=secret).digest()


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes of the guest view from ``start`` are at ``offset`` in the file (HOLE: zeros)."""

    start: int
    length: int
    offset: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def is_hole(self) -> bool:
        return self.offset == HOLE

    @property
    def in_file(self) -> bool:
        return self.offset < ABSENT


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of one chunk's plaintext: read ``length`` bytes at file ``offset``, or zeros for a hole."""

    offset: int
    length: int

    @property
    def is_hole(self) -> bool:
        return self.offset == HOLE

    @property
    def is_absent(self) -> bool:
        return self.offset == ABSENT


@dataclass(frozen=True)
class SeedIndex:
    """What ``sneakernet seed`` learnt about one image file."""

    kind: ImageKind
    file_size: int
    mtime_ns: int
    virtual_size: int
    secret_fingerprint: bytes
    path: str  # absolute, as seeded
    extents: tuple[Extent, ...]  # sorted, contiguous from 0 to virtual_size
    tags: bytes  # n * 32, sorted
    chunk_nos: tuple[int, ...]  # chunk number of each tag, same order
    created_ns: int = 0

    def __len__(self) -> int:
        return len(self.chunk_nos)

    def tag_at(self, i: int) -> bytes:
        return self.tags[i * TAG_SIZE:(i + 1) * TAG_SIZE]

    def chunk_of(self, tag: bytes) -> int | None:
        """The chunk number whose plaintext encodes to ``tag``, or None."""
        lo, hi = 0, len(self.chunk_nos)
        while lo < hi:  # binary search over the packed, sorted tag table
            mid = (lo + hi) // 2
            t = self.tag_at(mid)
            if t < tag:
                lo = mid + 1
            elif t > tag:
                hi = mid
            else:
                return self.chunk_nos[mid]
        return None

    def __contains__(self, tag: bytes) -> bool:
        return self.chunk_of(tag) is not None

    def chunk_length(self, chunk_no: int) -> int:
        return max(0, min(CHUNK_SIZE, self.virtual_size - chunk_no * CHUNK_SIZE))

    def pieces(self, chunk_no: int) -> list[Piece]:
        """Where one chunk's plaintext lies in the file, in order."""
        return pieces_of(self.extents, chunk_no * CHUNK_SIZE, self.chunk_length(chunk_no))

    @property
    def data_bytes(self) -> int:
        """Plaintext bytes the indexed chunks cover."""
        return sum(self.chunk_length(n) for n in self.chunk_nos)


def pieces_of(extents: Sequence[Extent], start: int, length: int) -> list[Piece]:
    """The file pieces of guest bytes [start, start + length); raises FormatError past the map."""
    out: list[Piece] = []
    i = bisect.bisect_right([e.start for e in extents], start) - 1
    pos, end = start, start + length
    while pos < end:
        if i < 0 or i >= len(extents) or not extents[i].start <= pos < extents[i].end:
            raise FormatError(f"seed extent map does not cover guest offset {pos}")
        e = extents[i]
        n = min(end, e.end) - pos
        out.append(Piece(e.offset if not e.in_file else e.offset + (pos - e.start), n))
        pos += n
        i += 1
    return out


def build(kind: ImageKind, *, file_size: int, mtime_ns: int, virtual_size: int, secret_fingerprint: bytes,
          path: str, extents: Iterable[Extent], rows: Iterable[tuple[bytes, int]], created_ns: int = 0) -> SeedIndex:
    """An index from (tag, chunk number) rows in any order (a tag seen twice keeps its first chunk)."""
    seen: dict[bytes, int] = {}
    for tag, no in rows:
        seen.setdefault(tag, no)
    order = sorted(seen)
    return SeedIndex(kind, file_size, mtime_ns, virtual_size, secret_fingerprint, path, tuple(extents),
                     b"".join(order), tuple(seen[t] for t in order), created_ns)


def _check(ix: SeedIndex) -> None:
    if len(ix.secret_fingerprint) != FINGERPRINT_SIZE:
        raise FormatError("seed index fingerprint has the wrong size")
    pos = 0
    for e in ix.extents:
        if e.start != pos or e.length <= 0:
            raise FormatError("seed extent map has a gap, an overlap or an empty extent")
        if e.in_file and e.offset + e.length > ix.file_size:
            raise FormatError("seed extent points past the end of the file")
        pos = e.end
    if pos != ix.virtual_size:
        raise FormatError("seed extent map does not end at the image's size")
    if len(ix.tags) != TAG_SIZE * len(ix.chunk_nos):
        raise FormatError("seed tag table and chunk table differ in length")
    last = b""
    limit = -(-ix.virtual_size // CHUNK_SIZE)
    for i, no in enumerate(ix.chunk_nos):
        t = ix.tag_at(i)
        if t <= last:
            raise FormatError("seed tag table is not sorted or lists a tag twice")
        if not 0 <= no < limit:
            raise FormatError(f"seed index names chunk {no} of an image of {limit} chunks")
        last = t


def encode(ix: SeedIndex) -> bytes:
    _check(ix)
    raw_path = ix.path.encode("utf-8", "surrogateescape")
    if not 0 < len(raw_path) <= MAX_PATH:
        raise FormatError("seed path is empty or too long")
    body = b"".join((
        _HEADER.pack(MAGIC, VERSION, int(ix.kind), 0, ix.file_size, ix.mtime_ns, ix.virtual_size, ix.created_ns,
                     len(ix.extents), len(ix.chunk_nos), ix.secret_fingerprint, len(raw_path)),
        raw_path,
        b"".join(_EXTENT.pack(e.start, e.length, e.offset) for e in ix.extents),
        b"".join(_ROW.pack(ix.tag_at(i), no) for i, no in enumerate(ix.chunk_nos)),
    ))
    return body + _TRAILER.pack(hashlib.blake2b(body, digest_size=CHECKSUM_SIZE).digest(), END_MAGIC)


def decode(raw: bytes) -> SeedIndex:
    if len(raw) < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError("seed index is truncated")
    (magic, version, kind, _, file_size, mtime_ns, vsize, created, nextents, nrows, fp,
     plen) = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError("not an isrsync seed index (bad magic)")
    if version != VERSION:
        raise UnsupportedVersion(f"seed index version {version} is not supported")
    checksum, end = _TRAILER.unpack_from(raw, len(raw) - TRAILER_SIZE)
    body = memoryview(raw)[: len(raw) - TRAILER_SIZE]
    if end != END_MAGIC or hashlib.blake2b(body, digest_size=CHECKSUM_SIZE).digest() != checksum:
        raise FormatError("seed index is torn or damaged (checksum)")
    try:
        image = ImageKind(kind)
    except ValueError:
        raise FormatError(f"seed index names an unknown image kind {kind}") from None
    pos = HEADER_SIZE
    if len(body) != pos + plen + nextents * EXTENT_SIZE + nrows * ROW_SIZE or not 0 < plen <= MAX_PATH:
        raise FormatError("seed index tables do not match their counts")
    path = bytes(body[pos:pos + plen]).decode("utf-8", "surrogateescape")
    pos += plen
    extents = tuple(Extent(*_EXTENT.unpack_from(body, pos + i * EXTENT_SIZE)) for i in range(nextents))
    pos += nextents * EXTENT_SIZE
    rows = [_ROW.unpack_from(body, pos + i * ROW_SIZE) for i in range(nrows)]
    ix = SeedIndex(image, file_size, mtime_ns, vsize, fp, path, extents, b"".join(t for t, _ in rows),
                   tuple(n for _, n in rows), created)
    _check(ix)
    return ix


def chunk_numbers(virtual_size: int) -> Iterator[int]:
    return iter(range(-(-virtual_size // CHUNK_SIZE)))
