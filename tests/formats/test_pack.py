"""Tests of isrsync.pack: writing, reading, verifying and salvaging packs."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from isrsync import pack
from isrsync.chunk import CHUNK_SIZE, encode, tag_of
from isrsync.errors import FormatError, IntegrityError, UnsupportedVersion
from isrsync.pack import (
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_CHUNK_BYTES,
    PackEntry,
    PackReader,
    PackWriter,
    pack_name,
    parse_pack_name,
    salvage,
    verify_stream,
)

SECRET = hashlib.sha256(b"pack tests").digest()


def stream(label: bytes, n: int) -> bytes:
    return hashlib.shake_256(label).digest(n)


def b2(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def encoded_chunks(n: int, size: int = CHUNK_SIZE, label: bytes = b"c") -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        e = encode(stream(label + b"%d" % i, size), SECRET)
        out.append((e.tag, e.data))
    return out


def write_pack(chunks, out=None):
    out = out if out is not None else io.BytesIO()
    w = PackWriter(out)
    for tag, data in chunks:
        w.add(tag, data)
    info = w.finish()
    return out, info


def reader_of(raw: bytes, pack_id: bytes = b"") -> PackReader:
    return PackReader(io.BytesIO(raw), len(raw), pack_id)


def flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


@pytest.fixture(scope="module")
def small() -> tuple[bytes, pack.PackInfo, list[tuple[bytes, bytes]]]:
    """A small pack of 3 short chunks (every byte of it is tampered with below)."""
    chunks = encoded_chunks(3, size=60, label=b"small")
    out, info = write_pack(chunks)
    return out.getvalue(), info, chunks


@pytest.fixture(scope="module")
def medium() -> tuple[bytes, pack.PackInfo, list[tuple[bytes, bytes]]]:
    chunks = encoded_chunks(12, label=b"medium")
    # mix in compressed and short chunks
    chunks += [
        (e.tag, e.data)
        for e in (encode(b"abc" * 20000, SECRET), encode(stream(b"last", 777), SECRET))
    ]
    out, info = write_pack(chunks)
    return out.getvalue(), info, chunks


# -- writing and reading ----------------------------------------------------------------


def check_pack(raw: bytes, info: pack.PackInfo, chunks: list[tuple[bytes, bytes]]) -> None:
    assert info.size == len(raw)
    assert info.pack_id == b2(raw)
    assert [e.tag for e in info.entries] == [t for t, _ in chunks]
    expected_end = HEADER_SIZE
    for e, (tag, data) in zip(info.entries, chunks):
        assert isinstance(e, PackEntry)
        assert e.pack_id == info.pack_id
        assert e.length == len(data)
        # entry header (tag, u32 length) right before the bytes
        assert e.offset == expected_end + pack.ENTRY_HEADER_SIZE
        assert raw[e.offset - 36 : e.offset] == tag + struct.pack("<I", len(data))
        assert raw[e.offset : e.offset + e.length] == data
        expected_end = e.offset + e.length
    assert len(raw) == expected_end + 44 * len(chunks) + FOOTER_SIZE
    assert raw[:8] == b"ISRPACK\x00" and raw[-8:] == b"ISRPEND\x00"

    r = PackReader(io.BytesIO(raw), len(raw), info.pack_id)
    assert r.entries == list(info.entries)
    for tag, data in chunks:
        assert tag in r
        assert r.get(tag) == data
    assert list(r) == chunks

    v = verify_stream(io.BytesIO(raw))
    assert v == info
    assert verify_stream(io.BytesIO(raw), info.pack_id) == info

    assert list(salvage(io.BytesIO(raw))) == chunks


def test_write_and_read_bytesio(medium) -> None:
    raw, info, chunks = medium
    check_pack(raw, info, chunks)
    assert pack_name(info.pack_id) == info.pack_id.hex()
    assert parse_pack_name(pack_name(info.pack_id)) == info.pack_id


def test_write_and_read_real_file(tmp_path: Path) -> None:
    chunks = encoded_chunks(9, label=b"file")
    path = tmp_path / "pack.tmp"
    with open(path, "wb") as f:
        _, info = write_pack(chunks, f)
    raw = path.read_bytes()
    check_pack(raw, info, chunks)
    final = tmp_path / pack_name(info.pack_id)
    path.rename(final)
    with open(final, "rb") as f:
        r = PackReader(f, os.path.getsize(final), parse_pack_name(final.name))
        assert [r.get(t) for t, _ in chunks] == [d for _, d in chunks]
        # random access order
        for t, d in reversed(chunks):
            assert r.get(t) == d
    with open(final, "rb") as f:
        assert verify_stream(f, parse_pack_name(final.name)) == info
    with open(final, "rb") as f:
        assert list(salvage(f)) == chunks


def test_duplicates_written_once() -> None:
    chunks = encoded_chunks(4, size=5000, label=b"dup")
    buf = io.BytesIO()
    w = PackWriter(buf)
    results = [w.add(t, d) for t, d in chunks + chunks[1:3] + [chunks[0]]]
    assert results == [True] * 4 + [False] * 3
    assert w.count == 4
    assert all(t in w for t, _ in chunks)
    assert b"\x00" * 32 not in w
    info = w.finish()
    raw = buf.getvalue()
    assert len(info.entries) == 4
    for t, d in chunks:
        assert raw.count(d) == 1
    check_pack(raw, info, chunks)


def test_writer_size_and_count() -> None:
    chunks = encoded_chunks(3, size=1000, label=b"sz")
    buf = io.BytesIO()
    w = PackWriter(buf)
    assert w.size == HEADER_SIZE and w.count == 0
    for t, d in chunks:
        w.add(t, d)
    body = w.size
    assert body == HEADER_SIZE + sum(36 + len(d) for _, d in chunks)
    info = w.finish()
    assert info.size == body + 44 * 3 + FOOTER_SIZE == len(buf.getvalue())


def test_writer_rejects_misuse() -> None:
    w = PackWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.add(b"short tag", b"data")
    with pytest.raises(ValueError):
        w.add(bytes(32), b"")
    with pytest.raises(ValueError):
        w.add(bytes(32), bytes(MAX_CHUNK_BYTES + 1))
    tag, data = encoded_chunks(1, size=10)[0]
    w.add(tag, data)
    w.finish()
    with pytest.raises(ValueError):
        w.add(*encoded_chunks(1, size=11, label=b"late")[0])
    with pytest.raises(ValueError):
        w.finish()


def test_empty_pack() -> None:
    out, info = write_pack([])
    raw = out.getvalue()
    assert info.entries == () and info.size == HEADER_SIZE + FOOTER_SIZE == len(raw)
    assert info.pack_id == b2(raw)
    assert reader_of(raw).entries == []
    assert verify_stream(io.BytesIO(raw), info.pack_id) == info
    assert list(salvage(io.BytesIO(raw))) == []


def test_reader_unknown_tag_is_keyerror(small) -> None:
    raw, info, chunks = small
    r = reader_of(raw)
    with pytest.raises(KeyError):
        r.get(bytes(32))
    assert bytes(32) not in r


def test_parse_trailer_from_tail(medium) -> None:
    raw, info, _ = medium
    entries = pack.parse_trailer(raw[-5000:], len(raw), info.pack_id)
    assert tuple(entries) == info.entries


# -- pack names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "../" + "a" * 61,
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "g" * 64,
        "0x" + "a" * 62,
        " " + "a" * 63,
        "a" * 63 + "\n",
        "/" + "a" * 63,
        "a" * 32 + "/" + "a" * 31,
        "..\\" + "a" * 61,
        "a" * 62 + "\u0660\u0661",  # unicode digits
        "a" * 128,
    ],
)
def test_parse_pack_name_rejects(name: str) -> None:
    with pytest.raises(FormatError):
        parse_pack_name(name)


def test_parse_pack_name_accepts_lower_hex() -> None:
    pid = bytes(range(32))
    assert parse_pack_name(pid.hex()) == pid
    assert pack_name(pid) == pid.hex()


# -- tampering --------------------------------------------------------------------------


def _assert_no_wrong_data(raw_bad: bytes, orig: dict[bytes, bytes]) -> bool:
    """Read a damaged pack every way there is; returns True if something raised.

    Whatever is returned must be exactly the original bytes for that tag.
    """
    raised = False
    try:
        r = reader_of(raw_bad)
    except IntegrityError:
        raised = True
    else:
        for e in r.entries:
            assert e.tag in orig, "reader lists a tag the pack never held"
        for tag, data in orig.items():
            if tag not in r:
                continue
            try:
                got = r.get(tag)
            except IntegrityError:
                raised = True
            else:
                assert got == data
    try:
        for tag, data in salvage(io.BytesIO(raw_bad)):
            assert orig.get(tag) == data
    except FormatError:  # a damaged header: nothing to salvage
        raised = True
    return raised


def test_every_bit_flip_of_small_pack(small) -> None:
    raw, info, chunks = small
    orig = dict(chunks)
    n = len(raw)
    data_ranges = [range(e.offset, e.offset + e.length) for e in info.entries]
    caught_by_reader = 0
    for pos in range(n):
        for bit in range(8):
            bad = flip(raw, pos, bit)
            # verify_stream with the known id refuses every flip
            with pytest.raises(IntegrityError):
                verify_stream(io.BytesIO(bad), info.pack_id)
            # without the id it may accept (e.g. a reserved field) but then the id differs
            try:
                v = verify_stream(io.BytesIO(bad))
            except IntegrityError:
                pass
            else:
                assert v.pack_id != info.pack_id
                assert v.pack_id == b2(bad)
                assert all(orig.get(e.tag) == bad[e.offset : e.offset + e.length] for e in v.entries)
            raised = _assert_no_wrong_data(bad, orig)
            if any(pos in rg for rg in data_ranges):
                assert raised, f"flip in chunk bytes at {pos} not detected by reader"
            caught_by_reader += raised
    # most flips (all of data, index and footer structure) are caught by the reader
    assert caught_by_reader > n * 8 // 2


def test_bit_flips_across_medium_pack(medium) -> None:
    raw, info, chunks = medium
    orig = dict(chunks)
    rng = random.Random(7)
    n = len(raw)
    index_start = n - FOOTER_SIZE - 44 * len(chunks)
    # the whole header and footer, a stride through the index, every entry's
    # edges, and a random sample of chunk bytes (the small pack does every byte)
    positions = set(range(HEADER_SIZE)) | set(range(n - FOOTER_SIZE, n))
    positions |= set(range(index_start, n - FOOTER_SIZE, 5))
    for e in info.entries:
        positions |= {e.offset - 36, e.offset - 5, e.offset - 1, e.offset, e.offset + e.length - 1}
    positions |= {rng.randrange(n) for _ in range(100)}
    for pos in sorted(positions):
        bad = flip(raw, pos, rng.randrange(8))
        with pytest.raises(IntegrityError):
            verify_stream(io.BytesIO(bad), info.pack_id)
        _assert_no_wrong_data(bad, orig)


def test_header_damage_rejected(small) -> None:
    raw, info, _ = small
    with pytest.raises(FormatError):
        reader_of(b"XSRPACK\x00" + raw[8:])
    with pytest.raises(FormatError):
        verify_stream(io.BytesIO(b"XSRPACK\x00" + raw[8:]))
    newer = raw[:8] + struct.pack("<H", 2) + raw[10:]
    for fn in (lambda: reader_of(newer), lambda: verify_stream(io.BytesIO(newer))):
        with pytest.raises(UnsupportedVersion):
            fn()
    with pytest.raises(FormatError):
        list(salvage(io.BytesIO(newer)))


def test_damaged_chunk_is_detected_and_salvage_stops_before_it(medium) -> None:
    raw, info, chunks = medium
    victim = info.entries[5]
    bad = flip(raw, victim.offset + 10, 2)
    r = reader_of(bad)
    with pytest.raises(IntegrityError):
        r.get(victim.tag)
    for t, d in chunks[:5] + chunks[6:]:
        assert r.get(t) == d
    with pytest.raises(IntegrityError):
        list(r)
    with pytest.raises(IntegrityError):
        verify_stream(io.BytesIO(bad))
    assert list(salvage(io.BytesIO(bad))) == chunks[:5]


def test_truncation_at_every_length(small) -> None:
    raw, info, chunks = small
    for cut in range(len(raw)):
        bad = raw[:cut]
        with pytest.raises(IntegrityError):
            reader_of(bad)
        with pytest.raises(IntegrityError):
            verify_stream(io.BytesIO(bad))
        # a pack too short for its header is not a pack
        if cut < HEADER_SIZE:
            with pytest.raises(FormatError):
                list(salvage(io.BytesIO(bad)))
            continue
        expected = [
            (e.tag, raw[e.offset : e.offset + e.length])
            for e in info.entries
            if e.offset + e.length <= cut
        ]
        assert list(salvage(io.BytesIO(bad))) == expected


def test_truncation_of_medium_pack(medium) -> None:
    raw, info, chunks = medium
    rng = random.Random(3)
    cuts = {0, 1, 15, 16, 17, 51, 52, len(raw) - 1, len(raw) - 56, len(raw) - 57}
    cuts |= {e.offset for e in info.entries} | {e.offset + e.length for e in info.entries}
    cuts |= {rng.randrange(len(raw)) for _ in range(100)}
    for cut in sorted(cuts):
        bad = raw[:cut]
        with pytest.raises(IntegrityError):
            reader_of(bad)
        with pytest.raises(IntegrityError):
            verify_stream(io.BytesIO(bad))
        if cut >= HEADER_SIZE:
            got = list(salvage(io.BytesIO(bad)))
            assert got == chunks[: len(got)]
            assert len(got) == sum(e.offset + e.length <= cut for e in info.entries)


def test_reader_given_wrong_size(small) -> None:
    raw, _, _ = small
    for size in (len(raw) + 1, len(raw) + 1000, len(raw) - 1, HEADER_SIZE, 0):
        with pytest.raises(IntegrityError):
            PackReader(io.BytesIO(raw), size)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00", b"x" * 7, bytes(56), b"ISRPEND\x00", b"\xff" * 1000],
)
def test_appended_garbage(small, garbage: bytes) -> None:
    raw, info, _ = small
    bad = raw + garbage
    with pytest.raises(IntegrityError):
        reader_of(bad)
    with pytest.raises(IntegrityError):
        verify_stream(io.BytesIO(bad))


def test_appended_copy_of_trailer_or_pack(small) -> None:
    raw, info, chunks = small
    for bad in (raw + raw[-FOOTER_SIZE:], raw + raw[-FOOTER_SIZE - 44 :], raw + raw):
        with pytest.raises(IntegrityError):
            reader_of(bad)
        with pytest.raises(IntegrityError):
            verify_stream(io.BytesIO(bad))
        # salvage never yields anything but the real chunks
        assert list(salvage(io.BytesIO(bad))) == chunks


def test_wrong_expected_id(small) -> None:
    raw, info, _ = small
    for wrong in (bytes(32), flip(info.pack_id, 0, 0), b2(raw + b"x")):
        with pytest.raises(IntegrityError):
            verify_stream(io.BytesIO(raw), wrong)


def _craft_footer(raw: bytes, index_offset: int, count: int, index_hash: bytes | None = None) -> bytes:
    body = raw[:-FOOTER_SIZE]
    if index_hash is None:
        index_hash = b2(body[len(body) - count * 44 :]) if count * 44 <= len(body) else bytes(32)
    return body + struct.pack("<QII32s8s", index_offset, count, 0, index_hash, b"ISRPEND\x00")


def test_footer_pointing_before_walked_entries_is_a_format_error() -> None:
    """A hostile footer whose index would start inside the chunk area.

    The pack has one 96-byte chunk; its footer claims 4 index rows starting right
    after the header, which makes ``index_offset + 4*44 + 56`` equal the file size.
    verify_stream (what a server runs on uploads) must say FormatError, not leak
    the ValueError parse_trailer uses to ask its caller for more bytes.
    """
    tag, data = encoded_chunks(1, size=80, label=b"hostile")[0]
    assert len(data) == 96
    out, info = write_pack([(tag, data)])
    raw = out.getvalue()
    assert len(raw) == 16 + 36 + 96 + 44 + 56
    bad = _craft_footer(raw, HEADER_SIZE, 4)
    assert HEADER_SIZE + 4 * 44 + FOOTER_SIZE == len(bad)
    with pytest.raises(IntegrityError):
        reader_of(bad)
    with pytest.raises(IntegrityError):
        verify_stream(io.BytesIO(bad))


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 1000, 2**32 - 1])
@pytest.mark.parametrize("index_offset", [0, 15, 16, 52, 200, 2**63])
def test_crafted_footers_never_leak_other_errors(small, count: int, index_offset: int) -> None:
    raw, info, chunks = small
    bad = _craft_footer(raw, index_offset, count)
    if bad == raw:
        return  # the genuine footer
    try:
        r = reader_of(bad)
    except IntegrityError:
        pass
    else:
        for t, d in chunks:
            if t in r:
                try:
                    assert r.get(t) == d
                except IntegrityError:
                    pass
    try:
        v = verify_stream(io.BytesIO(bad))
    except IntegrityError:
        pass
    else:  # only a footer equal in meaning to the real one could pass
        assert [(e.tag, e.offset, e.length) for e in v.entries] == [
            (e.tag, e.offset, e.length) for e in info.entries
        ]


def test_index_rows_pointing_outside_rejected(small) -> None:
    raw, info, chunks = small
    n = len(raw)
    index_start = n - FOOTER_SIZE - 44 * 3
    for off, length in [(0, 10), (16, 10), (index_start - 5, 10), (52, 0), (52, MAX_CHUNK_BYTES + 1)]:
        index = bytearray(raw[index_start : n - FOOTER_SIZE])
        tag = index[:32]
        struct.pack_into("<32sQI", index, 0, bytes(tag), off, length)
        body = raw[:index_start] + bytes(index)
        bad = _craft_footer(body + raw[-FOOTER_SIZE:], index_start, 3, b2(bytes(index)))
        with pytest.raises(FormatError):
            reader_of(bad)
        with pytest.raises(IntegrityError):
            verify_stream(io.BytesIO(bad))


def test_index_lying_about_order_is_caught_by_verify_stream(small) -> None:
    """Index rows swapped (with a recomputed index hash): reads still verify by
    tag, but verify_stream must refuse a pack whose index disagrees with its chunks."""
    raw, info, chunks = small
    n = len(raw)
    index_start = n - FOOTER_SIZE - 44 * 3
    rows = [raw[index_start + 44 * i : index_start + 44 * (i + 1)] for i in range(3)]
    index = rows[1] + rows[0] + rows[2]
    bad = _craft_footer(raw[:index_start] + index + raw[-FOOTER_SIZE:], index_start, 3, b2(index))
    r = reader_of(bad)
    for t, d in chunks:
        assert r.get(t) == d
    with pytest.raises(IntegrityError):
        verify_stream(io.BytesIO(bad))


# -- streaming memory -------------------------------------------------------------------

STREAM_CHUNKS = 320  # 40 MiB
MEM_LIMIT = 8 << 20


@pytest.fixture(scope="module")
def big_pack(tmp_path_factory) -> Iterator[tuple[Path, pack.PackInfo, int]]:
    """A 40 MiB pack, shared by the module and removed after it."""
    d = tmp_path_factory.mktemp("bigpack")
    path = d / "pack"
    tracemalloc.start()
    try:
        with open(path, "wb") as f:
            w = PackWriter(f)
            for i in range(STREAM_CHUNKS):
                data = os.urandom(CHUNK_SIZE + 16)
                w.add(tag_of(data), data)
            info = w.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        yield path, info, peak
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_streaming_write_memory(big_pack) -> None:
    path, info, peak = big_pack
    size = os.path.getsize(path)
    assert size == info.size > 40 << 20
    assert len(info.entries) == STREAM_CHUNKS
    assert peak < MEM_LIMIT, f"writing a {size >> 20} MiB pack peaked at {peak >> 20} MiB"


def test_streaming_verify_read_salvage_memory(big_pack) -> None:
    path, info, _ = big_pack

    def verify():
        with open(path, "rb") as f:
            assert verify_stream(f, info.pack_id) == info

    def read_all():
        with open(path, "rb") as f:
            r = PackReader(f, info.size, info.pack_id)
            n = 0
            for tag, data in r:
                assert tag_of(data) == tag
                n += 1
            assert n == STREAM_CHUNKS

    def salvage_all():
        with open(path, "rb") as f:
            assert sum(1 for _ in salvage(f)) == STREAM_CHUNKS

    for fn in (verify, read_all, salvage_all):
        peak = _peak(fn)
        assert peak < MEM_LIMIT, f"{fn.__name__} peaked at {peak / 2**20:.1f} MiB"


def test_verify_stream_of_damaged_upload_is_bounded_in_memory(big_pack, tmp_path: Path) -> None:
    """A big pack whose first entry header is damaged (or hostile) must be refused
    without buffering the rest of the upload in memory."""
    path, info, _ = big_pack
    bad = tmp_path / "bad"
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as f:
        f.seek(HEADER_SIZE + 32)
        f.write(struct.pack("<I", 0xFFFFFFFF))

    def run():
        with open(bad, "rb") as f:
            with pytest.raises(IntegrityError):
                verify_stream(f)

    peak = _peak(run)
    assert peak < MEM_LIMIT, f"verify_stream of a damaged 40 MiB pack peaked at {peak / 2**20:.1f} MiB"
