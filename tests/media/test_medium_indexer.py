"""sneakernet.indexer: any tree indexed (packs, loose chunk files, everything else skipped),
only verified entries listed, incremental by size and mtime (counted in hashed bytes), on
the medium or beside a read-only one, and merging with a writer that publishes meanwhile."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mediakit import flip, make_chunks, read_index

from isrsync.chunk import CHUNK_SIZE, tag_of
from isrsync.errors import UsageError
from isrsync.pack import PackWriter
from sneakernet import format as fmt
from sneakernet.format import FileKind
from sneakernet.indexer import RACY_NS, index_tree
from sneakernet.medium import format_medium, open_medium, path_key


def write_pack(path: Path, chunks: dict[bytes, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        w = PackWriter(f)
        for t, d in chunks.items():
            w.add(t, d)
        w.finish()


def age(path: Path, seconds: float = 60.0) -> None:
    """Backdate a file's mtime past the racy window, as if it was written a while ago."""
    t = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(t, t))


def age_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            age(p)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[bytes, bytes]]:
    """A formatted medium with two packs in odd places, loose chunk files, and other files."""
    root = tmp_path / "key"
    root.mkdir()
    format_medium(root, "tree")
    chunks = make_chunks(30)
    items = list(chunks.items())
    write_pack(root / "backup" / "a.pack", dict(items[:10]))
    write_pack(root / "deep" / "er" / "b", dict(items[10:20]))
    for i, (_, d) in enumerate(items[20:]):
        (root / "loose").mkdir(exist_ok=True)
        (root / "loose" / f"{i}.bin").write_bytes(d)
    (root / "notes.txt").write_bytes(b"hi")  # too small to be a chunk
    (root / "big.iso").write_bytes(os.urandom(CHUNK_SIZE + 100))  # too big to be one, not a pack
    age_tree(root)
    return root, chunks


def test_indexes_packs_and_loose_chunks(tree) -> None:
    root, chunks = tree
    r = index_tree(root)
    assert (r.packs, r.chunk_files, r.chunks) == (2, 10, 30)
    assert r.files == 14 and r.rehashed == 14 and r.kept == 0 and r.bad_entries == 0
    assert r.chunk_bytes == sum(map(len, chunks.values()))
    # Every pack entry and every loose chunk was hashed once; the ISO only had its magic read.
    assert r.hashed_bytes == sum(map(len, chunks.values()))
    idx = read_index(root)
    for t, d in chunks.items():
        e = idx.find(t)
        assert e is not None and e.length == len(d)
        with open(root / idx.file_of(e).path, "rb") as f:
            f.seek(e.offset)
            assert f.read(e.length) == d
    kinds = {f.path: f.kind for f in idx.files}
    assert kinds["big.iso"] == FileKind.OTHER and kinds["notes.txt"] == FileKind.OTHER
    assert not [p for p in kinds if p.startswith(".isrsync/") and not p.startswith(".isrsync/packs/")]


def test_reindex_rehashes_only_what_changed(tree) -> None:
    root, _ = tree
    index_tree(root)
    stamp = (root / fmt.DIR / fmt.INDEX_FILE).stat()
    again = index_tree(root)
    assert (again.rehashed, again.kept, again.hashed_bytes, again.chunks) == (0, 14, 0, 30)
    assert not again.published, "nothing changed: the medium is not written to"
    assert (root / fmt.DIR / fmt.INDEX_FILE).stat().st_ino == stamp.st_ino

    # One loose chunk replaced by another of the same size: only that file is read.
    new = make_chunks(1, size=1000)
    (t_new, d_new), = new.items()
    victim = root / "loose" / "3.bin"
    old = victim.read_bytes()
    victim.write_bytes(d_new)
    age(victim, 30)
    (root / "loose" / "4.bin").unlink()
    r = index_tree(root)
    assert (r.rehashed, r.kept) == (1, 12)
    assert r.hashed_bytes == len(d_new)
    idx = read_index(root)
    assert t_new in idx and tag_of(old) not in idx
    assert r.chunks == 29 and r.published and idx.generation == 2


def test_a_file_that_changed_within_the_racy_window_is_read_again(tree) -> None:
    root, _ = tree
    p = root / "loose" / "0.bin"
    t = time.time_ns() - RACY_NS // 3  # just written, as far as mtime can tell
    os.utime(p, ns=(t, t))
    index_tree(root)
    assert {f.path for f in read_index(root).files if f.racy} == {"loose/0.bin"}
    r = index_tree(root)
    assert r.rehashed == 1 and r.hashed_bytes == p.stat().st_size


def test_damaged_and_truncated_packs_keep_their_good_entries(tree) -> None:
    root, _ = tree
    index_tree(root)
    idx = read_index(root)
    in_a = [e for e in idx.entries if idx.file_of(e).path == "backup/a.pack"]
    bad = in_a[3]
    flip(root / "backup" / "a.pack", bad.offset + 5)
    # b loses its trailer and part of its last entry: a forward scan salvages the rest.
    b = root / "deep" / "er" / "b"
    in_b = sorted((e for e in idx.entries if idx.file_of(e).path == "deep/er/b"), key=lambda e: e.offset)
    with open(b, "r+b") as f:
        f.truncate(in_b[-1].offset + 10)
    r = index_tree(root)
    assert r.rehashed == 2 and r.bad_entries == 1
    got = read_index(root)
    assert bad.tag not in got and in_b[-1].tag not in got
    assert r.chunks == 30 - 2
    assert all(e.tag in got for e in in_b[:-1])


def test_the_index_of_a_plain_tree_goes_beside_it(tmp_path: Path) -> None:
    root = tmp_path / "share"
    chunks = make_chunks(6)
    write_pack(root / "p", chunks)
    with pytest.raises(UsageError, match="not an isrsync medium"):
        index_tree(root)
    beside = tmp_path / "cache" / "media" / path_key(root)
    r = index_tree(root, beside)
    assert r.medium_id == fmt.NO_MEDIUM and r.chunks == 6 and r.index_file == beside / fmt.INDEX_FILE
    assert not (root / fmt.DIR).exists(), "nothing is written into a tree nobody formatted"
    assert len(read_index(root, beside).entries) == 6


def test_a_read_only_medium_is_indexed_beside_it(tree, tmp_path: Path, mounts) -> None:
    root, _ = tree
    ro = mounts.bind_readonly(root, tmp_path / "dvd")
    beside = tmp_path / "cache" / "media" / "dvd"
    r = index_tree(ro, beside)
    assert r.chunks == 30 and r.medium_id == open_medium(ro).medium_id
    assert len(read_index(root).entries) == 0, "nothing was written to the read-only medium"
    m = open_medium(ro, beside)
    assert m.index_problem is None and len(m.index.entries) == 30
    assert index_tree(ro, beside).hashed_bytes == 0  # incremental beside it too


def test_an_index_directory_inside_the_tree_is_not_walked(tree) -> None:
    root, _ = tree
    inside = root / "cache" / "media" / "x"
    index_tree(root, inside)
    r = index_tree(root, inside)
    assert r.files == 14 and not [f for f in read_index(root, inside).files if f.path.startswith("cache/")]


def test_a_torn_index_is_rebuilt_from_nothing(tree) -> None:
    root, _ = tree
    index_tree(root)
    p = root / fmt.DIR / fmt.INDEX_FILE
    p.write_bytes(p.read_bytes()[:-7])
    r = index_tree(root)
    assert r.previous_problem and r.kept == 0 and r.rehashed == 14 and r.chunks == 30


def test_another_medium_s_index_is_not_trusted(tree, tmp_path: Path) -> None:
    root, _ = tree
    beside = tmp_path / "beside"
    index_tree(root, beside)
    other = tmp_path / "other"
    other.mkdir()
    format_medium(other)
    r = index_tree(other, beside)
    assert r.previous_problem == "the index belongs to another medium" and r.chunks == 0


def test_a_writer_publishing_meanwhile_is_not_lost(tree) -> None:
    root, chunks = tree
    more = make_chunks(5)
    wrote = False

    def progress(done: int, total: int) -> None:
        nonlocal wrote
        if not wrote:
            wrote = True  # the walk is done; a suspend publishes its packs now
            with open_medium(root).writer() as w:
                w.add_chunks(more.items())
                w.publish()

    r = index_tree(root, progress=progress)
    assert wrote
    idx = read_index(root)
    assert all(t in idx for t in chunks) and all(t in idx for t in more), "the writer's packs are still listed"
    assert r.chunks == 35


def test_symlinks_and_special_files_are_skipped(tree, tmp_path: Path) -> None:
    root, _ = tree
    outside = tmp_path / "outside"
    write_pack(outside / "p", make_chunks(3))
    os.symlink(outside, root / "link-dir")
    os.symlink(outside / "p", root / "link-file")
    os.mkfifo(root / "fifo")
    r = index_tree(root)
    assert r.chunks == 30 and r.files == 14
