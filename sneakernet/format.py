"""The medium format (DESIGN.md, "Sneakernet"; byte-level spec in docs/medium.md).

A medium is any directory tree with ``.isrsync/`` at its root::

    .isrsync/medium                       header: magic, version, medium id, label
    .isrsync/index                        index: file table + tag -> (file, offset, length)
    .isrsync/packs/<pack id>              packs (docs/pack.md), named by the hash of their bytes
    .isrsync/manifests/<parcel>/<version> encrypted manifests, as the server stores them
    .isrsync/keybundle                    the sealed key bundle (opaque here)
    .isrsync/locks/<parcel>               sealed lock tokens (opaque here)

The index is a hint: a checksum over it catches a torn or damaged file (a key
pulled mid-write, a bad sector), and a reader then treats it as empty, but the
truth is the tag check on every chunk read. Its file table (path, size,
mtime) lets a re-index rehash only the files that changed.

Pure: bytes in, bytes out, no I/O. Every decoder raises :class:`FormatError`
(or its :class:`UnsupportedVersion`) on malformed input, and nothing else.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from isrsync.chunk import CHUNK_SIZE, TAG_SIZE
from isrsync.errors import FormatError, UnsupportedVersion

DIR = ".isrsync"
HEADER_FILE = "medium"
INDEX_FILE = "index"
PACKS_DIR = "packs"
MANIFESTS_DIR = "manifests"
KEYBUNDLE_FILE = "keybundle"
LOCKS_DIR = "locks"

MEDIUM_MAGIC = b"ISRMEDM\x00"
INDEX_MAGIC = b"ISRMIDX\x00"
INDEX_END_MAGIC = b"ISRMEND\x00"
VERSION = 1
# An encoded chunk is its plaintext (compression is kept only when it saves)
# plus the 16-byte AEAD tag: an index entry claiming more is damage.
MAX_ENCODED = CHUNK_SIZE + 64
MIN_ENCODED = 17  # one byte of ciphertext and the AEAD tag
MAX_LABEL = 255
MAX_PATH = 4096
FLAG_RACY = 0x01  # file changed too close to the index time to trust size + mtime
CHECKSUM_SIZE = 32
NO_MEDIUM = uuid.UUID(int=0)  # the id in an index kept beside an unformatted tree

_HEADER = struct.Struct("<8sHHI16sqH")
_INDEX_HEADER = struct.Struct("<8sHHI16sQqII")
_FILE = struct.Struct("<QqBBH")
_ENTRY = struct.Struct("<32sIQI")
_TRAILER = struct.Struct("<32s8s")
HEADER_SIZE = _HEADER.size
INDEX_HEADER_SIZE = _INDEX_HEADER.size
FILE_RECORD_SIZE = _FILE.size
ENTRY_SIZE = _ENTRY.size
TRAILER_SIZE = _TRAILER.size


def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=CHECKSUM_SIZE).digest()


# -- header -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediumHeader:
    """Who a medium is: its random id (never reused), label and creation time."""

    medium_id: uuid.UUID
    label: str = ""
    created_ns: int = 0

    @property
    def short_id(self) -> str:
        return self.medium_id.hex[:8]


def new_header(label: str = "", created_ns: int = 0) -> MediumHeader:
    check_label(label)
    return MediumHeader(uuid.uuid4(), label, created_ns)


def check_label(label: str) -> None:
    raw = label.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_LABEL or any(c in label for c in "\x00\n\r/"):
        raise FormatError(
            f"a medium label is at most {MAX_LABEL} bytes of UTF-8 with no slash, newline or NUL",
            hint="pick a shorter, plainer label",
        )


def encode_header(h: MediumHeader) -> bytes:
    check_label(h.label)
    label = h.label.encode("utf-8")
    body = _HEADER.pack(MEDIUM_MAGIC, VERSION, 0, 0, h.medium_id.bytes, h.created_ns, len(label)) + label
    return body + _checksum(body)


def decode_header(raw: bytes) -> MediumHeader:
    if len(raw) < HEADER_SIZE + CHECKSUM_SIZE:
        raise FormatError("medium header is truncated")
    magic, version, _, _, mid, created, nlabel = _HEADER.unpack_from(raw)
    if magic != MEDIUM_MAGIC:
        raise FormatError("not an isrsync medium header (bad magic)")
    if version != VERSION:
        raise UnsupportedVersion(f"medium format version {version} is not supported")
    if len(raw) != HEADER_SIZE + nlabel + CHECKSUM_SIZE:
        raise FormatError("medium header length does not match its label length")
    if _checksum(raw[:-CHECKSUM_SIZE]) != raw[-CHECKSUM_SIZE:]:
        raise FormatError("medium header does not match its checksum (damaged)")
    try:
        label = raw[HEADER_SIZE : HEADER_SIZE + nlabel].decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("medium label is not UTF-8") from None
    check_label(label)
    return MediumHeader(uuid.UUID(bytes=mid), label, created)


# -- index ------------------------------------------------------------------------------


class FileKind(enum.IntEnum):
    """What the indexer found a file to be."""

    OTHER = 0  # neither: kept in the table only so it is not read again
    PACK = 1  # an isrsync pack: its verified entries are indexed
    CHUNK = 2  # a file that is exactly one encoded chunk, indexed under its hash


_KINDS = frozenset(int(k) for k in FileKind)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One file of the tree as the indexer last saw it.

    ``path`` is relative to the medium root with ``/`` separators; bytes that
    are not UTF-8 survive as surrogate escapes (``os.fsdecode`` style).
    """

    path: str
    size: int
    mtime_ns: int
    kind: FileKind
    flags: int = 0

    @property
    def racy(self) -> bool:
        return bool(self.flags & FLAG_RACY)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Where one encoded chunk is claimed to be: ``length`` bytes at ``offset`` of file ``file``."""

    tag: bytes
    file: int  # position in the index's file table
    offset: int
    length: int


def encode_path(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def check_path(raw: bytes) -> str:
    """The relative path a file table row names; anything that could leave the tree is refused."""
    if not raw or len(raw) > MAX_PATH or b"\x00" in raw or raw.startswith(b"/"):
        raise FormatError("index names a file path that is empty, absolute or too long")
    if any(part in (b"", b".", b"..") for part in raw.split(b"/")):
        raise FormatError("index names a file path with an empty, '.' or '..' component")
    return raw.decode("utf-8", "surrogateescape")


class EntryTable(Sequence[IndexEntry]):
    """Index entries sorted by tag, kept as their packed bytes (48 each).

    A medium can list a million chunks: one Python object per entry would cost
    ten times the bytes, so lookups bisect the packed table instead.
    """

    __slots__ = ("_buf", "_n")

    def __init__(self, buf: bytes = b"") -> None:
        self._buf = bytes(buf)
        self._n = len(self._buf) // ENTRY_SIZE

    @classmethod
    def build(cls, entries: Iterable[IndexEntry]) -> EntryTable:
        """Sorted by tag; of entries with one tag the first given is kept."""
        seen: dict[bytes, IndexEntry] = {}
        for e in entries:
            seen.setdefault(e.tag, e)
        return cls(b"".join(_ENTRY.pack(e.tag, e.file, e.offset, e.length) for _, e in sorted(seen.items())))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> IndexEntry:  # type: ignore[override]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return IndexEntry(*_ENTRY.unpack_from(self._buf, (i % self._n) * ENTRY_SIZE))

    def __iter__(self) -> Iterator[IndexEntry]:
        for t in _ENTRY.iter_unpack(self._buf):
            yield IndexEntry(*t)

    def tag_at(self, i: int) -> bytes:
        o = i * ENTRY_SIZE
        return self._buf[o : o + TAG_SIZE]

    def find(self, tag: bytes) -> IndexEntry | None:
        i = bisect.bisect_left(range(self._n), tag, key=self.tag_at)
        return self[i] if i < self._n and self.tag_at(i) == tag else None

    def packed(self) -> bytes:
        return self._buf


@dataclass(frozen=True)
class Index:
    """Everything a reader needs to find chunks on a medium, and a re-index to skip work."""

    medium_id: uuid.UUID
    generation: int = 0
    created_ns: int = 0
    files: tuple[FileRecord, ...] = ()
    entries: EntryTable = EntryTable()

    def find(self, tag: bytes) -> IndexEntry | None:
        return self.entries.find(tag)

    def __contains__(self, tag: bytes) -> bool:
        return self.entries.find(tag) is not None

    def file_of(self, entry: IndexEntry) -> FileRecord:
        return self.files[entry.file]

    @property
    def chunk_bytes(self) -> int:
        """Bytes of the chunks the index lists."""
        return sum(e.length for e in self.entries)

    def by_file(self) -> dict[int, list[IndexEntry]]:
        out: dict[int, list[IndexEntry]] = {}
        for e in self.entries:
            out.setdefault(e.file, []).append(e)
        return out


def empty_index(medium_id: uuid.UUID) -> Index:
    return Index(medium_id)


FileRows = Iterable[tuple[FileRecord, Iterable[tuple[bytes, int, int]]]]  # records and their (tag, offset, length)


def build_index(medium_id: uuid.UUID, files: FileRows, *, generation: int, created_ns: int) -> Index:
    """An index over ``files``, in that order; of entries with one tag the first is kept."""
    records: list[FileRecord] = []
    entries: list[IndexEntry] = []
    for rec, es in files:
        i = len(records)
        records.append(rec)
        entries += [IndexEntry(t, i, o, n) for t, o, n in es]
    return Index(medium_id, generation, created_ns, tuple(records), EntryTable.build(entries))


def merge_index(base: Index, files: FileRows, *, created_ns: int) -> Index:
    """``base`` with ``files`` added, each replacing any record of the same path and its entries.

    For a tag both hold, the new entry wins: a writer that rewrote a chunk
    (its old copy may be damaged) means its own copy.
    """
    rows = list(files)
    replaced = {f.path for f, _ in rows}
    by_file = base.by_file()
    kept = [(f, [(e.tag, e.offset, e.length) for e in by_file.get(i, [])])
            for i, f in enumerate(base.files) if f.path not in replaced]
    return build_index(base.medium_id, rows + kept, generation=base.generation + 1, created_ns=created_ns)


def encode_index(index: Index) -> bytes:
    _check_entries(index.entries, index.files)
    files = []
    seen: set[str] = set()
    for f in index.files:
        raw = encode_path(f.path)
        check_path(raw)
        if f.path in seen:
            raise FormatError(f"index lists {f.path!r} twice")
        seen.add(f.path)
        files.append(_FILE.pack(f.size, f.mtime_ns, int(f.kind), f.flags, len(raw)) + raw)
    body = b"".join((
        _INDEX_HEADER.pack(INDEX_MAGIC, VERSION, 0, 0, index.medium_id.bytes, index.generation, index.created_ns,
                           len(index.files), len(index.entries)),
        *files,
        index.entries.packed(),
    ))
    return body + _TRAILER.pack(_checksum(body), INDEX_END_MAGIC)


def decode_index(raw: bytes) -> Index:
    view = memoryview(raw)
    if len(raw) < INDEX_HEADER_SIZE + TRAILER_SIZE:
        raise FormatError("medium index is truncated")
    magic, version, _, _, mid, generation, created, nfiles, nentries = _INDEX_HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC:
        raise FormatError("not an isrsync medium index (bad magic)")
    if version != VERSION:
        raise UnsupportedVersion(f"medium index version {version} is not supported")
    checksum, end = _TRAILER.unpack_from(raw, len(raw) - TRAILER_SIZE)
    if end != INDEX_END_MAGIC:
        raise FormatError("medium index is truncated or damaged (bad end magic)")
    body = view[: len(raw) - TRAILER_SIZE]
    if _checksum(body) != checksum:
        raise FormatError("medium index does not match its checksum (torn or damaged)")
    pos = INDEX_HEADER_SIZE
    files: list[FileRecord] = []
    names: set[str] = set()
    for _ in range(nfiles):
        if pos + FILE_RECORD_SIZE > len(body):
            raise FormatError("medium index file table is truncated")
        size, mtime, kind, flags, n = _FILE.unpack_from(body, pos)
        pos += FILE_RECORD_SIZE
        if pos + n > len(body):
            raise FormatError("medium index file table is truncated")
        path = check_path(bytes(body[pos : pos + n]))
        pos += n
        if path in names:
            raise FormatError("medium index lists a file twice")
        names.add(path)
        if kind not in _KINDS or flags & ~FLAG_RACY:
            raise FormatError(f"medium index has a file of unknown kind {kind} or flags {flags:#x}")
        files.append(FileRecord(path, size, mtime, FileKind(kind), flags))
    if len(body) - pos != nentries * ENTRY_SIZE:
        raise FormatError("medium index entry count does not match its length")
    entries = EntryTable(bytes(body[pos:]))
    _check_entries(entries, files)
    return Index(uuid.UUID(bytes=mid), generation, created, tuple(files), entries)


def _check_entries(entries: EntryTable, files: Sequence[FileRecord]) -> None:
    prev = b""
    for e in entries:
        if e.tag <= prev:
            raise FormatError("medium index entries are not sorted by tag (or repeat one)")
        prev = e.tag
        if e.file >= len(files):
            raise FormatError("medium index entry names no file")
        f = files[e.file]
        if f.kind == FileKind.OTHER:
            raise FormatError("medium index entry points into a file that holds no chunks")
        if not MIN_ENCODED <= e.length <= MAX_ENCODED or e.offset + e.length > f.size:
            raise FormatError("medium index entry points outside its file or claims an impossible length")


# -- paths inside .isrsync/ ----------------------------------------------------------------


def pack_path(pack_id: bytes) -> str:
    """A pack's path relative to the medium root."""
    if len(pack_id) != TAG_SIZE:
        raise ValueError("pack id must be 32 bytes")
    return f"{DIR}/{PACKS_DIR}/{pack_id.hex()}"


def manifest_path(parcel: uuid.UUID, version: int) -> str:
    if version < 1:
        raise ValueError("versions start at 1")
    return f"{DIR}/{MANIFESTS_DIR}/{parcel}/{version}"


def parse_manifest_name(parcel_dir: str, name: str) -> tuple[uuid.UUID, int]:
    """The (parcel, version) a file under ``manifests/`` stands for; FormatError for anything else."""
    try:
        parcel = uuid.UUID(parcel_dir)
    except ValueError:
        raise FormatError(f"{parcel_dir[:80]!r} is not a parcel id") from None
    if str(parcel) != parcel_dir or not name.isascii() or not name.isdigit() or name.startswith("0"):
        raise FormatError(f"{parcel_dir[:80]}/{name[:40]} is not a manifest name")
    return parcel, int(name)


def lock_path(parcel: uuid.UUID) -> str:
    return f"{DIR}/{LOCKS_DIR}/{parcel}"


def path_key(absolute_path: bytes) -> str:
    """The name of an index kept beside a tree with no header: a hash of its absolute path."""
    return hashlib.blake2b(absolute_path, digest_size=8).hexdigest()
