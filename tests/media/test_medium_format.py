"""sneakernet.format: the medium header and index round-trip, and their decoders refuse
anything malformed with FormatError, and only FormatError (truncations, every bit flip,
random bytes, well-checksummed lies)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isrsync.errors import FormatError, UnsupportedVersion
from sneakernet import format as fmt
from sneakernet.format import EntryTable, FileKind, FileRecord, Index, IndexEntry


def sample_index(n_entries: int = 6) -> Index:
    files = (
        FileRecord(".isrsync/packs/" + "ab" * 32, 400_000, 1_700_000_000_123_456_789, FileKind.PACK),
        FileRecord("loose/chunk-\udcff", 4096, -5, FileKind.CHUNK, fmt.FLAG_RACY),  # a non-UTF-8 name survives
        FileRecord("iso/debian.iso", 700 << 20, 0, FileKind.OTHER),
    )
    rng = random.Random(1)
    entries = [IndexEntry(rng.randbytes(32), 0, 52 + i * 2000, 1000 + i) for i in range(n_entries - 1)]
    entries.append(IndexEntry(rng.randbytes(32), 1, 0, 4096))
    return Index(uuid.UUID(int=rng.getrandbits(128)), 7, 123, files, EntryTable.build(entries))


def reseal(body: bytes) -> bytes:
    """``body`` (an index without its trailer) with a correct checksum: a lie, not damage."""
    return body + hashlib.blake2b(body, digest_size=32).digest() + fmt.INDEX_END_MAGIC


# -- round trips -----------------------------------------------------------------------------


def test_header_round_trip() -> None:
    h = fmt.new_header("Bob's key ✓", 42)
    raw = fmt.encode_header(h)
    assert len(raw) == fmt.HEADER_SIZE + len(h.label.encode()) + fmt.CHECKSUM_SIZE
    assert raw.startswith(fmt.MEDIUM_MAGIC)
    assert fmt.decode_header(raw) == h
    assert fmt.decode_header(fmt.encode_header(fmt.new_header())).label == ""


@pytest.mark.parametrize("label", ["x" * 256, "a/b", "line\nbreak", "nul\x00"])
def test_bad_labels_are_refused(label: str) -> None:
    with pytest.raises(FormatError):
        fmt.new_header(label)


def test_index_round_trip() -> None:
    idx = sample_index()
    raw = fmt.encode_index(idx)
    back = fmt.decode_index(raw)
    assert back == idx or (back.files, list(back.entries), back.medium_id, back.generation, back.created_ns) == (
        idx.files, list(idx.entries), idx.medium_id, idx.generation, idx.created_ns)
    assert fmt.encode_index(back) == raw
    for e in idx.entries:
        assert back.find(e.tag) == e
        assert e.tag in back
    assert back.find(os.urandom(32)) is None
    assert back.files[1].path == "loose/chunk-\udcff" and back.files[1].racy
    assert back.chunk_bytes == sum(e.length for e in idx.entries)
    assert sorted(back.by_file()) == [0, 1]


def test_empty_index_round_trip() -> None:
    idx = fmt.empty_index(uuid.uuid4())
    raw = fmt.encode_index(idx)
    assert len(raw) == fmt.INDEX_HEADER_SIZE + fmt.TRAILER_SIZE
    assert fmt.decode_index(raw).medium_id == idx.medium_id and len(fmt.decode_index(raw).entries) == 0


def test_entry_table_sorts_and_keeps_the_first_of_a_tag() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    t = EntryTable.build([IndexEntry(b, 0, 100, 20), IndexEntry(a, 0, 50, 20), IndexEntry(b, 1, 0, 30)])
    assert [e.tag for e in t] == [a, b]
    assert t.find(b) == IndexEntry(b, 0, 100, 20)
    assert t[-1] == t[1] and len(t) == 2
    with pytest.raises(IndexError):
        t[2]


def test_a_big_table_bisects() -> None:
    entries = [IndexEntry(os.urandom(32), 0, 52, 100) for _ in range(20_000)]
    t = EntryTable.build(entries)
    for e in random.sample(entries, 200):
        assert t.find(e.tag) == e


@pytest.mark.parametrize("path", ["", "/etc/passwd", "a//b", "a/./b", "../up", "a/../../b", "x\x00y", "a/" * 2049])
def test_paths_that_could_leave_the_tree_are_refused(path: str) -> None:
    idx = Index(uuid.uuid4(), 1, 0, (FileRecord(path, 10, 0, FileKind.OTHER),))
    with pytest.raises(FormatError):
        fmt.encode_index(idx)


def test_paths_inside_media() -> None:
    pid = uuid.UUID("12345678-abcd-5678-1234-567812345678")
    assert fmt.pack_path(b"\xab" * 32) == ".isrsync/packs/" + "ab" * 32
    assert fmt.manifest_path(pid, 3) == f".isrsync/manifests/{pid}/3"
    assert fmt.lock_path(pid) == f".isrsync/locks/{pid}"
    assert fmt.parse_manifest_name(str(pid), "3") == (pid, 3)
    for d, n in [(str(pid), "03"), (str(pid), "x"), (str(pid).upper(), "3"), ("nope", "1"), (str(pid), "٣")]:
        with pytest.raises(FormatError):
            fmt.parse_manifest_name(d, n)


# -- what the decoders refuse --------------------------------------------------------------------


def test_unsupported_versions() -> None:
    raw = bytearray(fmt.encode_header(fmt.new_header("k")))
    raw[8] = 2
    with pytest.raises(UnsupportedVersion):
        fmt.decode_header(bytes(raw))
    raw = bytearray(fmt.encode_index(sample_index()))
    raw[8] = 2
    with pytest.raises(UnsupportedVersion):
        fmt.decode_index(bytes(raw))


def _body(idx: Index) -> bytes:
    return fmt.encode_index(idx)[: -fmt.TRAILER_SIZE]


def _entries_body(idx: Index, rows: list[tuple[bytes, int, int, int]]) -> bytes:
    """The index's header and file table with ``rows`` as its entries, unsorted if so given."""
    head = bytearray(_body(Index(idx.medium_id, idx.generation, idx.created_ns, idx.files)))
    struct.pack_into("<I", head, fmt.INDEX_HEADER_SIZE - 4, len(rows))
    return bytes(head) + b"".join(struct.pack("<32sIQI", *r) for r in rows)


@pytest.mark.parametrize("what", [
    "unsorted", "duplicate", "no such file", "into an OTHER file", "past the file", "too long", "too short",
    "count too high", "count too low", "duplicate path", "unknown kind", "unknown flags", "bad path",
])
def test_well_checksummed_lies_are_refused(what: str) -> None:
    idx = sample_index()
    a, b = sorted([os.urandom(32), os.urandom(32)])
    good = (a, 0, 52, 1000)
    rows = {
        "unsorted": [(b, 0, 52, 1000), good],
        "duplicate": [good, good],
        "no such file": [(a, 3, 52, 1000)],
        "into an OTHER file": [(a, 2, 0, 1000)],
        "past the file": [(a, 1, 4000, 1000)],
        "too long": [(a, 0, 52, fmt.MAX_ENCODED + 1)],
        "too short": [(a, 0, 52, fmt.MIN_ENCODED - 1)],
    }
    if what in rows:
        body = _entries_body(idx, rows[what])
    elif what.startswith("count"):
        body = bytearray(_body(idx))
        struct.pack_into("<I", body, fmt.INDEX_HEADER_SIZE - 4, len(idx.entries) + (1 if "high" in what else -1))
        body = bytes(body)
    else:
        f = idx.files[0]
        other = {
            "duplicate path": FileRecord(f.path, 1, 0, FileKind.OTHER),
            "unknown kind": FileRecord("k", 1, 0, FileKind.OTHER),
            "unknown flags": FileRecord("k", 1, 0, FileKind.OTHER),
            "bad path": FileRecord("k", 1, 0, FileKind.OTHER),
        }[what]
        rec = struct.pack("<QqBBH", other.size, other.mtime_ns, 7 if what == "unknown kind" else 0,
                          0x80 if what == "unknown flags" else 0, len(other.path)) + (
            b".." if what == "bad path" else other.path.encode())
        if what == "bad path":
            rec = rec[:-3] + struct.pack("<H", 2) + b".."
        plain = Index(idx.medium_id, 1, 0, idx.files)
        body = bytearray(_body(plain))
        struct.pack_into("<I", body, fmt.INDEX_HEADER_SIZE - 8, len(idx.files) + 1)
        body = bytes(body) + rec
    with pytest.raises(FormatError):
        fmt.decode_index(reseal(body))


def test_every_truncation_is_refused() -> None:
    raw = fmt.encode_index(sample_index(3))
    for n in range(len(raw)):
        with pytest.raises(FormatError):
            fmt.decode_index(raw[:n])
    h = fmt.encode_header(fmt.new_header("label"))
    for n in range(len(h)):
        with pytest.raises(FormatError):
            fmt.decode_header(h[:n])


def test_every_bit_flip_is_refused() -> None:
    raw = fmt.encode_index(sample_index(3))
    for bit in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            fmt.decode_index(bytes(bad))
    h = fmt.encode_header(fmt.new_header("label"))
    for bit in range(len(h) * 8):
        bad = bytearray(h)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            fmt.decode_header(bytes(bad))


def test_appended_bytes_are_refused() -> None:
    raw = fmt.encode_index(sample_index(3))
    with pytest.raises(FormatError):
        fmt.decode_index(raw + b"\x00")
    with pytest.raises(FormatError):
        fmt.decode_header(fmt.encode_header(fmt.new_header("x")) + b"\x00")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_format_error(data: bytes) -> None:
    for decode in (fmt.decode_index, fmt.decode_header):
        for raw in (data, fmt.INDEX_MAGIC + data, fmt.MEDIUM_MAGIC + data):
            try:
                decode(raw)
            except FormatError:
                pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_resealed_mutations_only_ever_raise_format_error(data: st.DataObject) -> None:
    """Mutate the body and fix the checksum: the structural checks alone must hold the line."""
    body = bytearray(fmt.encode_index(sample_index(4))[: -fmt.TRAILER_SIZE])
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, 40))
    raw = reseal(bytes(body[: len(body) - cut]))
    try:
        idx = fmt.decode_index(raw)
    except FormatError:
        return
    # Whatever passes is self-consistent: it re-encodes to the same bytes (but
    # for the reserved fields at 10..16, which readers ignore and writers zero).
    again = fmt.encode_index(idx)
    assert again[:10] == raw[:10] and again[16 : -fmt.TRAILER_SIZE] == raw[16 : -fmt.TRAILER_SIZE]
