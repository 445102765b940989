"""The keyring: per disk chunk, its tag, key and flags (docs/manifest.md, docs/chunk.md).

A keyring is kept in one flat bytearray of 65-byte entries. A large disk's
keyring is big (8.5 MB for 16 GiB), so a manifest may hold it as **segments**:
runs of :data:`SEGMENT_ENTRIES` entries, each encoded as an ordinary chunk
(fetched from any source, verified by its tag, cached like any chunk) and named
in the manifest by its own 65-byte entry. A resume then needs only the segments
of the chunks the guest touches: :class:`LazyKeyring` holds the entries that have
arrived, and refuses to answer for one that has not (the site fetches it first).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .chunk import (
    CHUNK_SIZE,
    FLAG_ZERO,
    FLAG_ZSTD,
    KEY_SIZE,
    TAG_SIZE,
    ZERO_ENCODED,
    ChunkRef,
    Encoded,
    chunk_count,
    decode,
    encode,
)
from .errors import FormatError

ENTRY_SIZE = TAG_SIZE + KEY_SIZE + 1
ZERO_ENTRY = bytes(TAG_SIZE + KEY_SIZE) + bytes((FLAG_ZERO,))
# As many whole entries as fit in one chunk: 2016 entries, 252 MiB of disk.
SEGMENT_ENTRIES = CHUNK_SIZE // ENTRY_SIZE
_SEGMENT_PERSON = b"isrsync-keyseg"


class Keyring:
    """Per chunk index: tag, key and flags, in one flat bytearray (65 bytes each).

    A 16 GiB disk has 131072 entries, about 8.5 MB: compact enough to copy,
    serialize and diff without per-entry Python objects.
    """

    __slots__ = ("size", "_buf")

    def __init__(self, size: int, buf: bytearray | None = None) -> None:
        n = chunk_count(size)
        if buf is None:
            buf = bytearray(ZERO_ENTRY * n)  # a fresh disk reads as zeros
        elif len(buf) != ENTRY_SIZE * n:
            raise FormatError("keyring length does not match its size")
        self.size = size
        self._buf = buf

    def __len__(self) -> int:
        return len(self._buf) // ENTRY_SIZE

    def __getitem__(self, i: int) -> ChunkRef:
        if not 0 <= i < len(self):
            raise IndexError(i)
        o = i * ENTRY_SIZE
        b = self._buf
        return ChunkRef(bytes(b[o : o + 32]), bytes(b[o + 32 : o + 64]), b[o + 64])

    def __setitem__(self, i: int, ref: ChunkRef) -> None:
        if not 0 <= i < len(self):
            raise IndexError(i)
        o = i * ENTRY_SIZE
        self._buf[o : o + ENTRY_SIZE] = entry_bytes(ref)

    def __iter__(self) -> Iterator[ChunkRef]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and self.size == other.size and self._buf == other._buf

    def tag_at(self, i: int) -> bytes:
        o = i * ENTRY_SIZE
        return bytes(self._buf[o : o + 32])

    def tags(self) -> set[bytes]:
        """Distinct tags of stored (non-ZERO) chunks."""
        b = self._buf
        return {
            bytes(b[o : o + 32]) for o in range(0, len(b), ENTRY_SIZE) if not b[o + 64] & FLAG_ZERO
        }

    def data_indexes(self) -> list[int]:
        """Indices of the entries that are not ZERO, in order, read off the flags bytes
        (a resume lists a memory image's 2048 entries on the loop that starts the guest)."""
        flags = self._buf[ENTRY_SIZE - 1 :: ENTRY_SIZE]
        return [i for i, f in enumerate(flags) if not f & FLAG_ZERO]

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
            del self._buf[new * ENTRY_SIZE :]
        else:
            self._buf.extend(ZERO_ENTRY * (new - old))
        self.size = size

    def to_bytes(self) -> bytes:
        return bytes(self._buf)

    @classmethod
    def from_bytes(cls, size: int, raw: bytes) -> "Keyring":
        ring = cls(size, bytearray(raw))
        check_entries(raw)
        return ring

    @classmethod
    def from_refs(cls, size: int, refs: Sequence[ChunkRef]) -> "Keyring":
        if len(refs) != chunk_count(size):
            raise ValueError("ref count does not match size")
        return cls(size, bytearray(b"".join(entry_bytes(r) for r in refs)))


def entry_bytes(ref: ChunkRef) -> bytes:
    # Refuse here what a reader would refuse, so no version is sealed unreadable.
    if len(ref.tag) != TAG_SIZE or len(ref.key) != KEY_SIZE:
        raise ValueError("bad chunk ref")
    if ref.flags & FLAG_ZERO:
        if ref.flags != FLAG_ZERO or any(ref.tag) or any(ref.key):
            raise ValueError("malformed ZERO chunk ref")
    elif ref.flags & ~FLAG_ZSTD:
        raise ValueError(f"unknown chunk flags {ref.flags:#x}")
    return ref.tag + ref.key + bytes((ref.flags,))


_FLAGS_KNOWN = bytes((0, FLAG_ZSTD, FLAG_ZERO))
_ZERO_FLAG = bytes((FLAG_ZERO,))
_ZERO_BODY = bytes(TAG_SIZE + KEY_SIZE)


def check_entries(raw: bytes | memoryview, stride: int = ENTRY_SIZE, skip: int = 0) -> None:
    """Refuse entries a reader would misread: unknown flags, or a ZERO entry with a tag or key.

    Strided slices and C compares, with Python work only per run of ZERO entries: a
    resume decodes one keyring per manifest of its chain (up to
    DEFAULT_FULL_EVERY), each with an entry per RAM chunk. A loop per entry cost
    2.5 ms per manifest there, the most of the resume's manifest step.
    """
    data = raw if isinstance(raw, bytes) else bytes(raw)
    at = TAG_SIZE + KEY_SIZE
    flags = data[skip + at :: stride]
    if len(flags) != len(range(skip, len(data), stride)):
        raise FormatError("keyring ends inside an entry")
    odd = flags.translate(None, _FLAGS_KNOWN)
    if odd:
        if odd[0] & FLAG_ZERO:
            raise FormatError("keyring holds a malformed ZERO entry")
        raise FormatError(f"keyring holds unknown chunk flags {odd[0]:#x}")
    k = flags.find(_ZERO_FLAG)
    while k >= 0:
        # ZERO entries come in runs (free RAM is contiguous): one compare per run.
        m = len(flags) - k - len(flags[k:].lstrip(_ZERO_FLAG))
        o = skip + k * stride
        if stride == ENTRY_SIZE:
            if data[o : o + m * stride] != ZERO_ENTRY * m:
                raise FormatError("keyring holds a malformed ZERO entry")
        elif any(data[p : p + at] != _ZERO_BODY for p in range(o, o + m * stride, stride)):
            raise FormatError("keyring holds a malformed ZERO entry")
        k = flags.find(_ZERO_FLAG, k + m)


def refs_from_bytes(raw: bytes | memoryview) -> list[ChunkRef]:
    """65-byte entries as refs (checked)."""
    if len(raw) % ENTRY_SIZE:
        raise FormatError("keyring entries are truncated")
    check_entries(raw)
    return [ChunkRef(bytes(raw[o : o + 32]), bytes(raw[o + 32 : o + 64]), raw[o + 64])
            for o in range(0, len(raw), ENTRY_SIZE)]


# -- segments ---------------------------------------------------------------------------


def segment_count(entries: int) -> int:
    return -(-entries // SEGMENT_ENTRIES)


def segment_span(entries: int, j: int) -> range:
    """The keyring indices segment ``j`` of a keyring of ``entries`` entries holds."""
    lo = j * SEGMENT_ENTRIES
    return range(lo, min(lo + SEGMENT_ENTRIES, entries))


def segment_secret(master_key: bytes) -> bytes:
    """The convergence secret of a parcel's keyring segments.

    Derived from the parcel's master key, not the user's convergence secret: a
    segment holds chunk keys, so nobody outside the parcel (not even a user of
    the same dedup domain) may confirm a guess of its contents by its tag.
    """
    return hashlib.blake2b(b"", digest_size=32, key=master_key, person=_SEGMENT_PERSON).digest()


def encode_segments(ring: Keyring, master_key: bytes) -> list[Encoded]:
    """Encode ``ring`` as segments. A run of ZERO entries only (a never-written stretch of
    disk) is a ZERO segment: no bytes, nothing to fetch."""
    secret = segment_secret(master_key)
    raw = memoryview(ring.to_bytes())
    out = []
    n = len(ring)
    for j in range(segment_count(n)):
        span = segment_span(n, j)
        plain = raw[span.start * ENTRY_SIZE : span.stop * ENTRY_SIZE]
        out.append(ZERO_ENCODED if plain == ZERO_ENTRY * len(span) else encode(plain, secret))
    return out


def decode_segment(ref: ChunkRef, data: bytes | None, entries: int, j: int) -> bytes:
    """Verify and decode segment ``j`` of a keyring of ``entries`` entries to its raw entries."""
    n = len(segment_span(entries, j))
    if ref.is_zero:
        return ZERO_ENTRY * n
    plain = decode(ref, data, n * ENTRY_SIZE)
    check_entries(plain)
    return plain


class LazyKeyring(Keyring):
    """A keyring built from segments that arrive one by one, plus the deltas of later versions.

    Entries a delta set, and entries past a shrink of the disk, are known at
    once; the others when their segment has been :meth:`fill`-ed. Reading an
    entry that is not known yet is a bug of the caller (it must fetch the
    segment first) and raises. Once every segment is in, it is a plain keyring.
    ``loader`` is the site's fetcher of its segments (opaque here).
    """

    __slots__ = ("_segs", "_have", "_base_n", "_from_segs", "_set", "loader")

    def __init__(self, size: int, segments: Sequence[ChunkRef]) -> None:
        super().__init__(size)
        n = len(self)
        if len(segments) != segment_count(n):
            raise FormatError("keyring segment count does not match the disk size")
        self._segs = list(segments)
        self._have = bytearray(1 if r.is_zero else 0 for r in self._segs)
        self._base_n = n
        self._from_segs = n  # entries below this come from segments, unless set
        self._set: dict[int, set[int]] = {}  # by segment: entries set since (a delta, a hot entry)
        self.loader: Any = None

    @property
    def segments(self) -> list[ChunkRef]:
        return list(self._segs)

    @property
    def base_entries(self) -> int:
        """Entries the segments cover (the keyring base's disk size)."""
        return self._base_n

    @property
    def complete(self) -> bool:
        return all(self._have)

    def known(self, i: int) -> bool:
        j = i // SEGMENT_ENTRIES
        return i >= self._from_segs or bool(self._have[j]) or i in self._set.get(j, ())

    def wanted(self, idxs: Iterable[int]) -> list[int]:
        """The segments still missing for entries ``idxs``."""
        return sorted({i // SEGMENT_ENTRIES for i in idxs if 0 <= i < len(self) and not self.known(i)})

    def missing(self) -> list[int]:
        return [j for j, h in enumerate(self._have) if not h]

    def segment_ref(self, j: int) -> ChunkRef:
        return self._segs[j]

    def fill(self, j: int, plain: bytes) -> None:
        """Install segment ``j``'s decoded entries (from :func:`decode_segment`)."""
        if self._have[j]:
            return
        span = segment_span(self._base_n, j)
        if len(plain) != len(span) * ENTRY_SIZE:
            raise FormatError(f"keyring segment {j} has the wrong length")
        lo, hi = span.start, min(span.stop, self._from_segs, len(self))
        if hi > lo:
            b = self._buf
            kept = {i: bytes(b[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE]) for i in self._set.get(j, ()) if i < hi}
            b[lo * ENTRY_SIZE : hi * ENTRY_SIZE] = plain[: (hi - lo) * ENTRY_SIZE]
            for i, e in kept.items():
                b[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE] = e
        self._have[j] = 1

    def _need(self, i: int) -> None:
        if 0 <= i < len(self) and not self.known(i):
            raise RuntimeError(f"keyring entry {i} read before its segment {i // SEGMENT_ENTRIES} arrived")

    def _need_all(self) -> None:
        if not self.complete:
            raise RuntimeError(f"keyring read whole with {len(self.missing())} segment(s) still missing")

    def __getitem__(self, i: int) -> ChunkRef:
        self._need(i)
        return super().__getitem__(i)

    def __setitem__(self, i: int, ref: ChunkRef) -> None:
        super().__setitem__(i, ref)
        self._set.setdefault(i // SEGMENT_ENTRIES, set()).add(i)

    def tag_at(self, i: int) -> bytes:
        self._need(i)
        return super().tag_at(i)

    def __iter__(self) -> Iterator[ChunkRef]:
        self._need_all()
        return super().__iter__()

    def __eq__(self, other: object) -> bool:
        self._need_all()
        return super().__eq__(other)

    def tags(self) -> set[bytes]:
        self._need_all()
        return super().tags()

    def data_indexes(self) -> list[int]:
        self._need_all()
        return super().data_indexes()

    def copy(self) -> Keyring:
        self._need_all()
        return Keyring(self.size, bytearray(self._buf))

    def resize(self, size: int) -> None:
        super().resize(size)
        n = len(self)
        if n < self._from_segs:
            self._from_segs = n
            self._set = {j: {i for i in s if i < n} for j, s in self._set.items()}

    def to_bytes(self) -> bytes:
        self._need_all()
        return super().to_bytes()
