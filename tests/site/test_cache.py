"""Functional tests of the site cache (isrsync.site.cache.SiteCache)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import platformdirs
import pytest

from isrsync import chunk as chunk_mod
from isrsync.chunk import CHUNK_SIZE, encode, tag_of
from isrsync.errors import CacheError, IntegrityError, IsrError, StorageFull
from isrsync.pack import PackWriter
from isrsync.site.cache import ENV_CACHE, SiteCache, default_cache_dir
from isrsync.site.cache import open_cache as api_open_cache

# -- helpers ----------------------------------------------------------------------------


def segment_files(cache_dir: Path) -> list[Path]:
    """The segment logs (named by number; anything else in the directory is not one)."""
    return sorted(p for p in (cache_dir / "segments").iterdir() if p.name.isdigit())


def snapshot_files(cache_dir: Path) -> dict[str, bytes]:
    """Every file under the cache dir except SQLite's own (which may change on reads)."""
    return {
        str(p.relative_to(cache_dir)): p.read_bytes()
        for p in sorted(cache_dir.rglob("*"))
        if p.is_file() and not p.name.startswith("index.db")
    }


def locate(cache_dir: Path, chunk) -> tuple[Path, int]:
    """(segment, offset) of an encoded chunk's bytes, found by searching for them."""
    hits = []
    for seg in segment_files(cache_dir):
        data = seg.read_bytes()
        i = data.find(chunk.data)
        while i >= 0:
            hits.append((seg, i))
            i = data.find(chunk.data, i + 1)
    assert len(hits) == 1, (
        f"chunk {chunk.tag.hex()[:16]} found {len(hits)} times in the segments"
    )
    return hits[0]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def record_overhead(open_cache, tmp_path: Path, secret: bytes) -> int:
    """Bytes a segment spends per record besides the chunk itself (measured, not assumed)."""
    c = open_cache(tmp_path / "overhead-probe")
    e = encode(os.urandom(1000), secret)
    assert c.put(e.tag, e.data)
    (seg,) = segment_files(c.path)
    overhead = seg.stat().st_size - len(e.data)
    assert 0 < overhead <= 128
    c.close()
    return overhead


# -- basics -----------------------------------------------------------------------------


def test_put_get_round_trip(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(3, 5000) + make_chunks(2)
    for e in chunks:
        assert c.put(e.tag, e.data) is True
    for e in chunks:
        assert c.has(e.tag)
        got = c.get(e.tag)
        assert got == e.data
        assert tag_of(got) == e.tag
    assert sorted(c.tags()) == sorted(e.tag for e in chunks)
    st = c.stats()
    assert st.chunks == 5
    assert st.chunk_bytes == sum(len(e.data) for e in chunks)
    assert st.segments == 1 and st.packs == 0


def test_a_reader_never_waits_for_a_writers_fsync(open_cache, tmp_path, make_chunks, monkeypatch):
    """A guest's fault looks the cache up while a hoard stores: on a slow disk the store's
    fsyncs take long, and the lookup must not wait for them (it did, up to 130 ms at 100 Mb/s)."""
    import threading

    c = open_cache(tmp_path / "c")
    old, new = make_chunks(2), make_chunks(4)
    c.put_many([(e.tag, e.data) for e in old])
    real_fsync = os.fsync
    in_fsync = threading.Event()

    def slow_fsync(fd: int) -> None:  # a disk that takes its time
        in_fsync.set()
        time.sleep(0.6)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    writer = threading.Thread(target=c.put_many, args=([(e.tag, e.data) for e in new],))
    writer.start()
    try:
        assert in_fsync.wait(5), "the store never reached its fsync"
        t0 = time.monotonic()
        assert c.get(old[0].tag) == old[0].data and c.has(old[1].tag)
        assert c.missing([new[0].tag, old[0].tag]) == [new[0].tag]  # not committed yet
        assert time.monotonic() - t0 < 0.3
        assert writer.is_alive()  # the store was still in its fsync all along
    finally:
        writer.join()
    assert all(c.get(e.tag) == e.data for e in new)


def test_put_many_counts_new_and_stores_duplicates_once(
    open_cache, tmp_path, make_chunks
):
    c = open_cache(tmp_path / "c")
    a = make_chunks(4, 3000)
    b = make_chunks(3, 3000)
    assert c.put_many([(e.tag, e.data) for e in a]) == 4
    seg_size = sum(p.stat().st_size for p in segment_files(c.path))
    # All already present: nothing new, nothing appended.
    assert c.put_many([(e.tag, e.data) for e in a]) == 0
    assert c.put(a[0].tag, a[0].data) is False
    assert sum(p.stat().st_size for p in segment_files(c.path)) == seg_size
    # Mixed old/new, with duplicates inside the batch itself.
    batch = [(e.tag, e.data) for e in (a[1], b[0], b[0], b[1], a[2], b[1], b[2])]
    assert c.put_many(batch) == 3
    assert c.put_many(iter([])) == 0
    assert c.stats().chunks == 7
    # Every chunk's bytes appear exactly once across the segments.
    blob = b"".join(p.read_bytes() for p in segment_files(c.path))
    for e in a + b:
        assert blob.count(e.data) == 1
        assert c.get(e.tag) == e.data


def test_missing_keeps_order(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    (e,) = make_chunks(1, 2000)
    c.put(e.tag, e.data)
    x, y = os.urandom(32), os.urandom(32)
    assert c.missing([x, e.tag, y]) == [x, y]
    assert c.missing([e.tag]) == []


def test_get_unknown_tag_is_none(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    assert c.get(os.urandom(32)) is None
    (e,) = make_chunks(1, 2000)
    c.put(e.tag, e.data)
    assert c.get(os.urandom(32)) is None
    assert c.get(bytes(32)) is None
    assert not c.has(os.urandom(32))


@pytest.mark.parametrize(
    "case", ["flipped-byte", "wrong-tag", "short-tag", "bad-in-batch"]
)
def test_put_mismatched_chunk_raises_and_writes_nothing(
    open_cache, tmp_path, make_chunks, case
):
    c = open_cache(tmp_path / "c")
    good = make_chunks(3, 4000)
    c.put_many([(e.tag, e.data) for e in good[:2]])
    before_files = snapshot_files(c.path)
    before_tags = sorted(c.tags())
    e = good[2]
    if case == "flipped-byte":
        data = bytearray(e.data)
        data[17] ^= 1
        items = [(e.tag, bytes(data))]
    elif case == "wrong-tag":
        items = [(os.urandom(32), e.data)]
    elif case == "short-tag":
        items = [(e.tag[:16], e.data)]
    else:  # a good new chunk followed by a bad one: the whole batch is refused
        other = make_chunks(1, 4000)[0]
        items = [(other.tag, other.data), (e.tag, e.data[:-1])]
    with pytest.raises(IntegrityError):
        c.put_many(items)
    if case != "bad-in-batch":
        with pytest.raises(IntegrityError):
            c.put(*items[0])
    assert snapshot_files(c.path) == before_files
    assert sorted(c.tags()) == before_tags
    c.close()
    c2 = open_cache(tmp_path / "c")
    assert sorted(c2.tags()) == before_tags
    assert c2.verify() == []


def test_put_verified_stores_without_hashing_and_takes_only_verified_chunks(
    open_cache, tmp_path, make_chunks, monkeypatch
):
    """put_verified is put_many for chunks already checked: it hashes nothing
    again, and a plain (tag, bytes) pair is a TypeError, not a silent skip of the check."""
    c = open_cache(tmp_path / "c")
    a, b = make_chunks(2, 5000)
    with pytest.raises(TypeError):
        c.put_verified([(a.tag, a.data)])  # type: ignore[list-item]
    assert c.tags() == []
    hashed = []
    monkeypatch.setattr(chunk_mod, "tag_of", lambda d: hashed.append(d) or tag_of(d))
    checked = [chunk_mod.verified(e.tag, e.data) for e in (a, b)]
    assert len(hashed) == 2 and all(isinstance(v, chunk_mod.VerifiedChunk) for v in checked)
    assert c.put_verified([*checked, checked[0]]) == 2
    assert len(hashed) == 2
    assert c.get(a.tag) == a.data and c.get(b.tag) == b.data
    assert chunk_mod.verified(a.tag, b.data) is None


# -- encrypted at rest -------------------------------------------------------------------

MARKER = b"PLAINTEXT-MARKER-"


def _plaintexts() -> list[bytes]:
    rnd = random.Random(1234)
    words = [b"guest", b"kernel", b"passwd", b"secret", b"memory", b"page"]
    prose = b" ".join(rnd.choice(words) for _ in range(4000))[:20000]
    mixed = bytearray()
    while len(mixed) < CHUNK_SIZE:
        mixed += MARKER + rnd.randbytes(rnd.randrange(1, 200))
    return [
        (MARKER * (CHUNK_SIZE // len(MARKER) + 1))[
            :CHUNK_SIZE
        ],  # compressible: zstd path
        bytes(mixed[:CHUNK_SIZE]),  # barely compressible, marker throughout
        (MARKER * 200)[:3000],  # too small to compress: stored encrypted only
        MARKER + prose,  # text
        (MARKER * 400)[:4097],  # just above the compression threshold
    ]


def _leaks(blob: bytes, plains: list[bytes]) -> list[str]:
    """Which plaintext pieces occur in blob.

    Any 64-byte window of a plaintext contains a whole 32-byte block aligned to a
    multiple of 32, so looking for every aligned 32-byte block finds every
    64-byte window (and more).
    """
    found = []
    if MARKER in blob:
        found.append("marker")
    blocks = {p[i : i + 32] for p in plains for i in range(0, len(p) - 31, 32)}
    for i in range(len(blob) - 31):
        if blob[i : i + 32] in blocks:
            found.append(f"32-byte plaintext block at offset {i}")
            break
    return found


def test_encrypted_at_rest(open_cache, tmp_path, secret):
    root = tmp_path / "c"
    c = open_cache(root)
    plains = _plaintexts()
    encs = [encode(p, secret) for p in plains]
    assert c.put_many([(e.tag, e.data) for e in encs[:3]]) == 3
    for e in encs[3:]:
        c.put(e.tag, e.data)
    # A pack, too, goes in as ciphertext.
    more = [
        encode(MARKER * 7 + os.urandom(64) + bytes([i]) * 900, secret) for i in range(3)
    ]
    src = root / "incoming.pack"
    with open(src, "wb") as f:
        w = PackWriter(f)
        for e in more:
            w.add(e.tag, e.data)
        info = w.finish()
    c.add_pack(src, info.pack_id)
    plains += [MARKER * 7]
    # While open: index.db, its -wal and -shm are all there and must be clean too.
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"index.db", "site.json"} <= names
    assert "index.db-wal" in names and "index.db-shm" in names
    for p in files:
        assert _leaks(p.read_bytes(), plains) == [], f"plaintext found in {p}"
    for e, p in zip(encs, plains):
        assert c.get(e.tag) == e.data
        assert p[:64] not in e.data
    c.close()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) >= 4
    for p in files:
        assert _leaks(p.read_bytes(), plains) == [], (
            f"plaintext found in {p} after close"
        )


def test_leak_detector_detects_plaintext():
    """The at-rest check above would notice a plaintext window anywhere in a file."""
    plains = _plaintexts()
    p = plains[3]
    window = p[1000 + 7 : 1000 + 7 + 64]
    assert _leaks(os.urandom(500) + window + os.urandom(500), [p]) != []
    assert _leaks(os.urandom(5000), [b"x" * 64]) == []


# -- site id ------------------------------------------------------------------------------


def test_site_id_persists_across_reopen(open_cache, tmp_path):
    c = open_cache(tmp_path / "c")
    sid = c.site_id
    assert str(uuid.UUID(sid)) == sid
    c.close()
    assert open_cache(tmp_path / "c").site_id == sid
    assert json.loads((tmp_path / "c" / "site.json").read_text())["site_id"] == sid
    assert open_cache(tmp_path / "other").site_id != sid
    assert not list((tmp_path / "c").glob(".*.tmp"))


_OPENER = textwrap.dedent(
    """
    import os, sys, time
    from isrsync.site.cache import SiteCache
    path, go = sys.argv[1], sys.argv[2]
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no go")
        time.sleep(0.001)
    try:
        c = SiteCache(path)
    except Exception as e:
        print("ERROR", type(e).__module__, type(e).__name__, e, flush=True)
        sys.exit(1)
    print(c.site_id, flush=True)
    c.close()
    """
)


def test_concurrent_first_open_agrees_on_site_id(tmp_path):
    """Several processes open one fresh cache at the same instant: all succeed, one id."""
    script = tmp_path / "opener.py"
    script.write_text(_OPENER)
    failures = []
    for rnd in range(8):
        go = tmp_path / f"go{rnd}"
        path = tmp_path / f"cache{rnd}"
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(path), str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(4)
        ]
        try:
            # Let them all import and spin, then release them together.
            time.sleep(0.6)
            go.touch()
            outs = [p.communicate(timeout=60)[0].strip() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        ids = set(outs)
        if len(ids) != 1 or any(o.startswith("ERROR") for o in outs):
            failures.append((rnd, [o[:150] for o in outs]))
            continue
        (sid,) = ids
        assert str(uuid.UUID(sid)) == sid
        with SiteCache(path) as c:
            assert c.site_id == sid
    assert failures == [], "concurrent openers disagreed or failed:\n" + "\n".join(
        f"round {r}: {o}" for r, o in failures
    )


_WRITER = textwrap.dedent(
    """
    import os, sys
    from isrsync.chunk import encode
    from isrsync.site.cache import SiteCache
    path, secret, n = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
    c = SiteCache(path)
    for i in range(n):
        items = [encode(os.urandom(1 + (j * 7919 + i * 31) % 6000), secret) for j in range(3)]
        c.put_many([(e.tag, e.data) for e in items])
        for e in items:
            print(e.tag.hex())
    c.close()
    """
)


def test_two_processes_write_concurrently(open_cache, tmp_path, secret):
    """Writers in two processes serialize on the index: no overlapping records."""
    path = tmp_path / "c"
    open_cache(path).close()  # created up front: concurrent creation is tested above
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), secret.hex(), "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    tags = {bytes.fromhex(t) for out, _ in results for t in out.split()}
    assert len(tags) == 2 * 60 * 3
    c = open_cache(path)
    assert set(c.tags()) == tags
    assert c.verify() == []
    for t in tags:
        assert tag_of(c.get(t)) == t


# -- self-healing ---------------------------------------------------------------------------


def test_corrupt_chunk_is_dropped_on_get(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(5, 6000)
    c.put_many([(e.tag, e.data) for e in chunks])
    victim = chunks[2]
    seg, off = locate(c.path, victim)
    flip_byte(seg, off + 100)
    assert c.has(victim.tag)  # the index does not know yet
    assert c.get(victim.tag) is None
    assert not c.has(victim.tag)
    assert victim.tag not in c.tags()
    assert c.missing([victim.tag]) == [victim.tag]
    for e in chunks[:2] + chunks[3:]:
        assert c.get(e.tag) == e.data
    # Dropped means refetchable: putting it again stores it anew.
    assert c.put(victim.tag, victim.data) is True
    assert c.get(victim.tag) == victim.data
    assert c.verify() == []


def test_verify_returns_exactly_the_damaged_tags(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(12, 3000) + make_chunks(2)
    c.put_many([(e.tag, e.data) for e in chunks])
    damaged = [chunks[0], chunks[5], chunks[12]]
    for i, e in enumerate(damaged):
        seg, off = locate(c.path, e)
        # first byte, a middle byte, the last byte
        flip_byte(seg, off + [0, len(e.data) // 2, len(e.data) - 1][i])
    c.close()
    c = open_cache(tmp_path / "c")
    bad = c.verify()
    assert len(bad) == len(set(bad)) == 3
    assert set(bad) == {e.tag for e in damaged}
    assert c.verify() == []
    assert set(c.tags()) == {e.tag for e in chunks} - set(bad)
    assert c.stats().chunks == len(chunks) - 3


def test_truncated_segment(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(10, 5000)
    for e in chunks:
        c.put(e.tag, e.data)
    seg, off7 = locate(c.path, chunks[7])
    os.truncate(seg, off7 + 1000)  # cuts chunk 7 in the middle; 8 and 9 are gone
    for e in chunks[7:]:
        assert c.get(e.tag) is None
        assert not c.has(e.tag)
    for e in chunks[:7]:
        assert c.get(e.tag) == e.data
    assert c.verify() == []
    c.close()
    c = open_cache(tmp_path / "c")
    assert sorted(c.tags()) == sorted(e.tag for e in chunks[:7])
    # The cache keeps working after the damage: new chunks land and read back.
    fresh = make_chunks(3, 5000)
    assert c.put_many([(e.tag, e.data) for e in fresh + chunks[8:]]) == 5
    for e in fresh + chunks[:7] + chunks[8:]:
        assert c.get(e.tag) == e.data
    assert c.verify() == []


def test_missing_segment_file(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(3, 2000)
    c.put_many([(e.tag, e.data) for e in chunks])
    c.close()
    for seg in segment_files(tmp_path / "c"):
        seg.unlink()
    c = open_cache(tmp_path / "c")
    assert sorted(c.verify()) == sorted(e.tag for e in chunks)
    assert c.tags() == []
    assert c.put_many([(e.tag, e.data) for e in chunks]) == 3
    assert all(c.get(e.tag) == e.data for e in chunks)


# -- packs ----------------------------------------------------------------------------------


def _write_pack(path: Path, chunks) -> bytes:
    with open(path, "wb") as f:
        w = PackWriter(f)
        for e in chunks:
            w.add(e.tag, e.data)
        info = w.finish()
    return info.pack_id


def test_add_pack(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(6, 7000)
    already = chunks[0]
    c.put(already.tag, already.data)
    src = c.path / "incoming.pack"
    pack_id = _write_pack(src, chunks)
    info = c.add_pack(src, pack_id)
    assert info.pack_id == pack_id
    assert {e.tag for e in info.entries} == {e.tag for e in chunks}
    assert not src.exists()
    assert (c.path / "packs" / pack_id.hex()).is_file()
    for e in chunks:
        assert c.get(e.tag) == e.data
    st = c.stats()
    assert st.packs == 1 and st.chunks == 6
    c.close()
    c = open_cache(tmp_path / "c")
    for e in chunks:
        assert c.get(e.tag) == e.data
    assert c.verify() == []


@pytest.mark.parametrize("damage", ["wrong-id", "flipped-byte", "truncated"])
def test_add_pack_refuses_bad_pack(open_cache, tmp_path, make_chunks, damage):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(4, 7000)
    src = c.path / "incoming.pack"
    pack_id = _write_pack(src, chunks)
    if damage == "wrong-id":
        pack_id = os.urandom(32)
    elif damage == "flipped-byte":
        flip_byte(src, 16 + 36 + 10)
    else:
        os.truncate(src, src.stat().st_size - 20)
    content = src.read_bytes()
    with pytest.raises(IntegrityError):
        c.add_pack(src, pack_id)
    assert src.read_bytes() == content  # left where it was, untouched
    assert list((c.path / "packs").iterdir()) == []
    assert c.tags() == []
    assert all(c.get(e.tag) is None for e in chunks)
    assert c.stats().packs == 0


def test_damaged_pack_chunk_is_dropped(open_cache, tmp_path, make_chunks):
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(4, 7000)
    src = c.path / "incoming.pack"
    pack_id = _write_pack(src, chunks)
    info = c.add_pack(src, pack_id)
    entry = info.entries[1]
    flip_byte(c.path / "packs" / pack_id.hex(), entry.offset + 5)
    assert c.damaged_reads == 0
    assert c.verify() == [entry.tag]
    assert c.damaged_reads == 1  # counted once: dropped, the next read is a plain miss
    assert c.get(entry.tag) is None
    assert sum(c.get(e.tag) is not None for e in chunks) == 3
    assert c.damaged_reads == 1


def test_a_damaged_copy_read_by_two_readers_is_counted_once(open_cache, tmp_path, make_chunks):
    # Two codec threads decode one tag (it sits at two disk offsets) before either
    # drops it: both fail the check, both drop it, the cache counts one damaged copy.
    c = open_cache(tmp_path / "c")
    chunks = make_chunks(4, 7000)
    src = c.path / "incoming.pack"
    pack_id = _write_pack(src, chunks)
    entry = c.add_pack(src, pack_id).entries[2]
    flip_byte(c.path / "packs" / pack_id.hex(), entry.offset + 5)
    seen = [c.get(entry.tag, verify=False) for _ in range(2)]
    assert all(s is not None and tag_of(s) != entry.tag for s in seen)
    c.forget(entry.tag, damaged=True)
    c.forget(entry.tag, damaged=True)
    assert c.damaged_reads == 1
    c.forget(chunks[0].tag)  # lost, not damaged: dropped, not counted
    assert c.damaged_reads == 1 and c.get(chunks[0].tag) is None


# -- where the cache lives -----------------------------------------------------------------


def test_cache_dir_flag_beats_env_beats_default(monkeypatch, tmp_path):
    flag, env, xdg = tmp_path / "flag", tmp_path / "env", tmp_path / "xdg"
    monkeypatch.delenv(ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    default = Path(platformdirs.user_cache_dir("isrsync"))
    assert default == xdg / "isrsync"
    assert default_cache_dir() == default
    assert default_cache_dir(None) == default
    assert default_cache_dir(flag) == flag
    assert default_cache_dir(str(flag)) == flag
    monkeypatch.setenv(ENV_CACHE, str(env))
    assert default_cache_dir() == env
    assert default_cache_dir(flag) == flag
    monkeypatch.setenv(ENV_CACHE, "")  # empty means unset
    assert default_cache_dir() == default


def test_open_cache_uses_env_and_flag(monkeypatch, tmp_path):
    env, flag = tmp_path / "env", tmp_path / "flag"
    monkeypatch.setenv(ENV_CACHE, str(env))
    with api_open_cache() as c:
        assert c.path == env
    with api_open_cache(flag) as c:
        assert c.path == flag
    assert (env / "site.json").is_file() and (flag / "site.json").is_file()


# -- bad input ------------------------------------------------------------------------------


def test_cache_path_is_a_file(tmp_path):
    f = tmp_path / "notadir"
    f.write_bytes(b"hello")
    with pytest.raises(CacheError) as ei:
        SiteCache(f)
    assert "not a directory" in str(ei.value)
    assert str(f) in str(ei.value)
    assert ei.value.exit_code == 10
    assert f.read_bytes() == b"hello"
    # A path *below* a file is no better.
    with pytest.raises(CacheError):
        SiteCache(f / "sub")


@pytest.mark.parametrize(
    "garbage",
    # Fixed bytes, and ids: each pytest-xdist worker collects the same tests.
    [b"garbage!" * 512, random.Random(1).randbytes(100), b"SQLite format 3\x00" + random.Random(2).randbytes(4080)],
    ids=["text", "random", "sqlite-header"],
)
def test_garbage_index_is_a_cache_error(open_cache, tmp_path, make_chunks, garbage):
    c = open_cache(tmp_path / "c")
    (e,) = make_chunks(1, 2000)
    c.put(e.tag, e.data)
    c.close()
    for p in (tmp_path / "c").glob("index.db*"):
        p.unlink()
    (tmp_path / "c" / "index.db").write_bytes(garbage)
    with pytest.raises(CacheError) as ei:
        SiteCache(tmp_path / "c")
    assert "index" in str(ei.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"null",
        b"[1, 2]",
        b'{"other": 1}',
        b'{"site_id": "not-a-uuid"}',
        b'{"site_id": 123}',
        b'{"site_id": ["x"]}',
    ],
    ids=[
        "empty",
        "truncated-json",
        "binary",
        "null",
        "list",
        "no-key",
        "bad-uuid",
        "int-id",
        "list-id",
    ],
)
def test_damaged_site_json_is_a_cache_error(open_cache, tmp_path, content):
    open_cache(tmp_path / "c").close()
    (tmp_path / "c" / "site.json").write_bytes(content)
    with pytest.raises(CacheError) as ei:
        SiteCache(tmp_path / "c")
    assert "site.json" in str(ei.value)


def test_fresh_cache_on_readonly_tmpfs(mounts, tmp_path):
    ro = mounts.tmpfs(tmp_path / "ro", "size=4m,ro")
    for target in (ro, ro / "cache"):
        with pytest.raises(CacheError) as ei:
            SiteCache(target)
        assert "read-only" in str(ei.value).lower()


def test_existing_cache_on_readonly_remount(mounts, open_cache, tmp_path, make_chunks):
    mnt = mounts.tmpfs(tmp_path / "mnt", "size=4m")
    c = open_cache(mnt / "cache")
    chunks = make_chunks(2, 3000)
    c.put_many([(e.tag, e.data) for e in chunks])
    c.close()
    mounts.remount(mnt, "ro")
    with pytest.raises(CacheError):
        c2 = SiteCache(mnt / "cache")
        try:
            (e,) = make_chunks(1, 3000)
            c2.put(e.tag, e.data)
        finally:
            c2.close()
    mounts.remount(mnt, "rw")
    c3 = open_cache(mnt / "cache")
    assert sorted(c3.tags()) == sorted(e.tag for e in chunks)


@pytest.mark.parametrize("has_segment", [True, False], ids=["with-segment", "fresh"])
def test_put_into_readonly_cache_dir_is_a_cache_error(
    mounts, open_cache, tmp_path, make_chunks, has_segment
):
    """The cache dir turns read-only under an open cache (ro bind mount over it)."""
    root = tmp_path / "c"
    c = open_cache(root)
    old = make_chunks(2, 3000)
    if has_segment:
        c.put_many([(e.tag, e.data) for e in old])
    before = sorted(c.tags())
    mounts.bind_readonly(root, root)
    new = make_chunks(2, 3000)
    with pytest.raises(IsrError) as ei:
        c.put_many([(e.tag, e.data) for e in new])
    assert isinstance(ei.value, (CacheError, StorageFull)), repr(ei.value)
    assert sorted(c.tags()) == before
    assert all(c.get(e.tag) is None for e in new)
    if has_segment:
        assert all(c.get(e.tag) == e.data for e in old)
    mounts.unmount(root)
    # Writable again: the same cache object carries on.
    assert c.put_many([(e.tag, e.data) for e in new]) == 2
    assert all(c.get(e.tag) == e.data for e in new)
    assert c.verify() == []


# -- full disk ------------------------------------------------------------------------------


def _full_disk_layout(mounts, tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """Mount the file systems for one layout; returns (cache dir, filler file to delete).

    The filler is big enough that deleting it makes room for five 128 KiB chunks.

    same-fs:       the whole cache on one small tmpfs (whichever write fails first)
    segments-full: only segments/ on a small tmpfs (the chunk append hits ENOSPC)
    index-full:    the cache dir (index.db and its WAL) on a small tmpfs, segments/
                   on a roomy one (the index commit hits ENOSPC)
    """
    if layout == "same-fs":
        root = mounts.tmpfs(tmp_path / "mnt", "size=3m") / "cache"
        filler = root.parent / "filler"
        filler.write_bytes(os.urandom(768 * 1024))
    elif layout == "segments-full":
        root = tmp_path / "cache"
        segs = mounts.tmpfs(root / "segments", "size=2m")
        filler = segs / "filler"
        filler.write_bytes(os.urandom(768 * 1024))
    else:
        root = mounts.tmpfs(tmp_path / "cache", "size=1m")
        mounts.tmpfs(root / "segments", "size=64m")
        filler = root / "filler"
        filler.write_bytes(os.urandom(256 * 1024))
    return root, filler


@pytest.mark.parametrize(
    "layout,size",
    [
        ("same-fs", CHUNK_SIZE),
        ("same-fs", 4000),
        ("same-fs", 700),
        ("segments-full", CHUNK_SIZE),
        ("segments-full", 60000),
        ("segments-full", 4000),
        ("segments-full", 700),
        ("index-full", 700),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v}b",
)
def test_full_disk(mounts, open_cache, tmp_path, secret, layout, size):
    overhead = record_overhead(open_cache, tmp_path, secret)
    root, filler = _full_disk_layout(mounts, tmp_path, layout)
    c = open_cache(root)
    rnd = random.Random(size)
    committed: list = []
    failure: BaseException | None = None
    failed_batch: list = []
    for _ in range(20000):
        batch = [encode(os.urandom(size), secret) for _ in range(rnd.randint(1, 4))]
        try:
            n = c.put_many([(e.tag, e.data) for e in batch])
        except Exception as e:  # noqa: BLE001 - checked below
            failure = e
            failed_batch = batch
            break
        assert n == len(batch)
        committed += batch
    assert failure is not None, "the tmpfs never filled up"
    assert committed, "nothing fitted at all"

    def check(cache):
        for e in committed:
            assert cache.get(e.tag) == e.data
        for e in failed_batch:
            assert not cache.has(e.tag)
        assert cache.verify() == []
        assert sorted(cache.tags()) == sorted(e.tag for e in committed)

    check(
        c
    )  # first what matters most: nothing committed was lost, nothing failed was kept
    assert isinstance(failure, StorageFull), f"expected StorageFull, got {failure!r}"
    assert "space" in str(failure)
    # No half-written record tail: the segment holds the committed records exactly.
    need = sum(overhead + len(e.data) for e in committed)
    assert sum(p.stat().st_size for p in segment_files(root)) == need
    c.close()
    c = open_cache(root)
    check(c)
    assert not list(root.rglob(".*.tmp"))
    # Make room, and the cache takes chunks again.
    filler.unlink()
    fresh = [encode(os.urandom(size), secret)]
    assert c.put_many([(e.tag, e.data) for e in fresh + failed_batch]) == 1 + len(
        failed_batch
    )
    for e in committed + fresh + failed_batch:
        assert c.get(e.tag) == e.data
    assert c.verify() == []
