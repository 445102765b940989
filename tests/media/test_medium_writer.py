"""sneakernet.medium: formatting, opening, and writing to a medium (packs, manifests,
key bundle, lock tokens), two writers at once, a read-only medium and a full one."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
from mediakit import flip, make_chunks, make_manifest, read_index

from isrsync.chunk import tag_of
from isrsync.errors import FormatError, IntegrityError, StorageFull, UsageError
from isrsync.pack import PackWriter
from sneakernet import format as fmt
from sneakernet.medium import format_medium, list_parcels, open_medium, writable


def _readback(root: Path) -> dict[bytes, bytes]:
    """Every chunk the medium's index lists, read the way a reader would, and verified."""
    m = open_medium(root)
    assert m.index_problem is None, m.index_problem
    out = {}
    for e in m.index.entries:
        with open(root / m.index.file_of(e).path, "rb") as f:
            f.seek(e.offset)
            data = f.read(e.length)
        assert tag_of(data) == e.tag, f"{e.tag.hex()[:16]} does not read back"
        out[e.tag] = data
    return out


def test_format_then_open(tmp_path: Path) -> None:
    m = format_medium(tmp_path, "bob")
    for d in (fmt.PACKS_DIR, fmt.MANIFESTS_DIR, fmt.LOCKS_DIR):
        assert (tmp_path / fmt.DIR / d).is_dir()
    again = open_medium(tmp_path)
    assert again.header == m.header and again.label == "bob"
    assert again.index_problem is None and len(again.index.entries) == 0
    assert again.parcels() == [] and again.keybundle() is None and again.lock_token(uuid.uuid4()) is None
    assert again.usage().capacity > 0 and writable(tmp_path)


def test_format_refuses_a_medium_and_a_non_directory(tmp_path: Path) -> None:
    m = format_medium(tmp_path)
    with pytest.raises(UsageError, match="already an isrsync medium"):
        format_medium(tmp_path)
    assert open_medium(tmp_path).medium_id == m.medium_id  # nothing changed
    (tmp_path / "file").write_bytes(b"x")
    for p in (tmp_path / "file", tmp_path / "nowhere"):
        with pytest.raises(UsageError, match="not a directory"):
            format_medium(p)


def test_open_refuses_what_is_not_a_medium(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an isrsync medium") as e:
        open_medium(tmp_path)
    assert "sneakernet format" in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_header_is_a_format_error_naming_it(tmp_path: Path) -> None:
    format_medium(tmp_path, "k")
    flip(tmp_path / fmt.DIR / fmt.HEADER_FILE, 20)
    with pytest.raises(FormatError, match=r"medium header at .*/\.isrsync/medium is damaged"):
        open_medium(tmp_path)


def test_a_damaged_index_opens_as_empty(tmp_path: Path) -> None:
    m = format_medium(tmp_path)
    chunks = make_chunks(4)
    with m.writer() as w:
        w.add_chunks(chunks.items())
        w.publish()
    flip(tmp_path / fmt.DIR / fmt.INDEX_FILE, 70)
    again = open_medium(tmp_path)
    assert len(again.index.entries) == 0 and "checksum" in (again.index_problem or "")


def test_chunks_become_packs_listed_by_publish(tmp_path: Path) -> None:
    m = format_medium(tmp_path)
    chunks = make_chunks(40)
    with m.writer(pack_limit=1 << 20) as w:
        infos = w.add_chunks(chunks.items())
        assert len(infos) > 1, "a small pack limit rolls over to several packs"
        assert len(open_medium(tmp_path).index.entries) == 0, "nothing is listed before publish"
        idx = w.publish()
    assert len(idx.entries) == 40 and idx.generation == 1
    assert _readback(tmp_path) == chunks
    names = sorted(p.name for p in (tmp_path / fmt.DIR / fmt.PACKS_DIR).iterdir())
    assert names == sorted(i.pack_id.hex() for i in infos), "packs are named by their id; no temporaries left"


def test_known_chunks_are_not_written_again(tmp_path: Path) -> None:
    m = format_medium(tmp_path)
    chunks = make_chunks(6)
    with m.writer() as w:
        w.add_chunks(chunks.items())
        w.publish()
    m = open_medium(tmp_path)
    more = make_chunks(2)
    with m.writer() as w:
        infos = w.add_chunks([*chunks.items(), *more.items(), *more.items()])
        assert [len(i.entries) for i in infos] == [2]
        assert w.publish().generation == 2
    assert _readback(tmp_path) == chunks | more
    # A medium whose copies may be damaged gets them again, and the index then means the new ones.
    first = read_index(tmp_path)
    for t in chunks:
        e = first.find(t)
        assert e is not None
        flip(tmp_path / first.file_of(e).path, e.offset + 1)
    with open_medium(tmp_path).writer() as w:
        (info,) = w.add_chunks(chunks.items(), skip_known=False)
        assert len(info.entries) == 6
        w.publish()
    assert _readback(tmp_path) == chunks | more


def test_a_pack_file_is_copied_and_verified(tmp_path: Path) -> None:
    chunks = make_chunks(5)
    src = tmp_path / "local.pack"
    with open(src, "wb") as f:
        pw = PackWriter(f)
        for t, d in chunks.items():
            pw.add(t, d)
        info = pw.finish()
    medium = tmp_path / "key"
    medium.mkdir()
    m = format_medium(medium)
    with m.writer() as w:
        assert w.add_pack_file(src, info.pack_id).pack_id == info.pack_id
        w.publish()
    assert (medium / fmt.pack_path(info.pack_id)).read_bytes() == src.read_bytes()
    assert _readback(medium) == chunks

    flip(src, 100)
    with m.writer() as w:
        with pytest.raises(IntegrityError):
            w.add_pack_file(src)
    assert [p.name for p in (medium / fmt.DIR / fmt.PACKS_DIR).iterdir()] == [info.pack_id.hex()], \
        "a pack that fails verification leaves nothing behind"


def test_manifests_key_bundle_and_lock_tokens(tmp_path: Path) -> None:
    m = format_medium(tmp_path)
    p1, p2 = uuid.uuid4(), uuid.uuid4()
    raws = {(p1, 1): make_manifest(p1, 1), (p1, 2): make_manifest(p1, 2), (p2, 1): make_manifest(p2, 1)}
    with m.writer() as w:
        for raw in raws.values():
            w.add_manifest(raw)
        w.set_keybundle(b"sealed bundle")
        w.set_lock_token(p1, b"sealed token")
        assert not (tmp_path / fmt.manifest_path(p1, 1)).exists(), "manifests wait for publish"
        w.publish()
    m = open_medium(tmp_path)
    for (p, v), raw in raws.items():
        assert m.read_manifest(p, v) == raw
    assert m.read_manifest(p2, 9) is None
    assert {(pv.parcel, pv.versions) for pv in m.parcels()} == {(p1, (1, 2)), (p2, (1,))}
    assert m.keybundle() == b"sealed bundle" and m.lock_token(p1) == b"sealed token" and m.lock_token(p2) is None

    # A manifest filed under another name, or damaged, is left out of the listing.
    os.replace(tmp_path / fmt.manifest_path(p2, 1), tmp_path / fmt.manifest_path(p2, 3))
    flip(tmp_path / fmt.manifest_path(p1, 2), 3)
    assert [(pv.parcel, pv.versions) for pv in list_parcels(tmp_path)] == [(p1, (1,))]
    with pytest.raises(FormatError):
        m.read_manifest(p2, 3)


def test_a_manifest_must_be_one(tmp_path: Path) -> None:
    m = format_medium(tmp_path)
    with m.writer() as w, pytest.raises(FormatError):
        w.add_manifest(b"not a manifest at all")


def test_two_writers_merge_their_packs(tmp_path: Path) -> None:
    format_medium(tmp_path)
    sets = [make_chunks(8) for _ in range(4)]
    barrier = threading.Barrier(len(sets))
    errors: list[BaseException] = []

    def write(chunks: dict[bytes, bytes]) -> None:
        try:
            m = open_medium(tmp_path)  # each opened the same (empty) index
            with m.writer() as w:
                w.add_chunks(chunks.items())
                barrier.wait()
                w.publish()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _readback(tmp_path) == {t: d for s in sets for t, d in s.items()}
    assert read_index(tmp_path).generation == len(sets)


def test_leaving_without_publishing_removes_temporaries(tmp_path: Path) -> None:
    m = format_medium(tmp_path)

    def boom():
        yield from make_chunks(3).items()
        raise RuntimeError("the suspend failed")

    with pytest.raises(RuntimeError), m.writer() as w:
        w.add_chunks(boom())
    assert list((tmp_path / fmt.DIR / fmt.PACKS_DIR).iterdir()) == []
    assert len(open_medium(tmp_path).index.entries) == 0


def test_a_read_only_medium_says_so(tmp_path: Path, mounts) -> None:
    src = tmp_path / "src"
    src.mkdir()
    format_medium(src)
    ro = mounts.bind_readonly(src, tmp_path / "ro")
    m = open_medium(ro)
    assert not writable(ro)
    with pytest.raises(UsageError, match="cannot write to the medium") as e:
        with m.writer() as w:
            w.add_chunks(make_chunks(2).items())
    assert "--index-dir" in str(e.value)


@pytest.mark.parametrize("how", ["chunks", "pack file", "index"])
def test_a_full_medium_is_one_line_and_keeps_its_index(tmp_path: Path, mounts, how: str) -> None:
    key = mounts.tmpfs(tmp_path / "key", "size=2m")
    m = format_medium(key, "small")
    first = make_chunks(4, size=100_000)
    with m.writer() as w:
        w.add_chunks(first.items())
        w.publish()
    before = (key / fmt.DIR / fmt.INDEX_FILE).read_bytes()
    big = make_chunks(24, size=128 * 1024)
    m = open_medium(key)
    with pytest.raises(StorageFull) as e:
        with m.writer(pack_limit=1 << 30) as w:
            if how == "chunks":
                w.add_chunks(big.items())
            elif how == "pack file":
                src = tmp_path / "big.pack"
                with open(src, "wb") as f:
                    pw = PackWriter(f)
                    for t, d in big.items():
                        pw.add(t, d)
                    pw.finish()
                w.add_pack_file(src)
            else:
                # Fill the medium with a file of its own, leaving room for data but not the index.
                w.add_chunks(dict(list(big.items())[:4]).items())
                free = os.statvfs(key).f_bavail * os.statvfs(key).f_frsize
                (key / "filler").write_bytes(b"\0" * max(0, free - 1024))
                w.publish()
    msg = str(e.value)
    assert msg.startswith(f"the medium at {key} is full: ") and "MiB free" in msg and "MiB needed" in msg
    assert "\n" not in msg
    assert ("for its index" in msg) == (how == "index"), msg
    assert (key / fmt.DIR / fmt.INDEX_FILE).read_bytes() == before, "the previous index is intact"
    assert not [p for p in (key / fmt.DIR / fmt.PACKS_DIR).iterdir() if p.name.endswith(".tmp")]
    assert not [p for p in (key / fmt.DIR).iterdir() if p.name.endswith(".tmp")]
    assert _readback(key) == first
