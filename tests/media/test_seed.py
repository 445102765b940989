"""Plaintext seeds (`sneakernet seed`): raw, ISO and qcow2 images as lookaside sources.

Real images: raw files, qcow2 files made by the real qemu-img (plain,
compressed, and an overlay over a backing file), read through the registry
that checks every answer. A changed image, another user's secret, or a
damaged index can only fail to help. The CLI runs in process through the
real runner, logged in to a real (directory) home.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from isrsync.chunk import CHUNK_SIZE, encode
from isrsync.errors import FormatError
from isrsync.keys import KdfLimits, new_convergence_secret
from isrsync.server.local import LocalStore
from isrsync.site import account
from isrsync.site.cache import SiteCache
from isrsync.site.sources import SourceKind
from isrsync.site.registry import SourceRegistry
from sneakernet import cli as sncli
from sneakernet import seed as seeds
from sneakernet import seedfmt as sf

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LONG_AGO = 1_600_000_000 * 10**9  # outside the racy window: a re-seed trusts size + mtime


def _image(path: Path, chunks: int, *, zeros: tuple[int, ...] = (), tail: int = 0,
           compressible: tuple[int, ...] = ()) -> bytes:
    """An image of ``chunks`` full chunks (plus ``tail`` bytes): random, but all-zero at
    ``zeros`` and text (which zstd and qcow2 compress) at ``compressible``."""
    parts = []
    for i in range(chunks):
        if i in zeros:
            parts.append(bytes(CHUNK_SIZE))
        elif i in compressible:
            parts.append((b"the quick brown fox %d " % i * 8000)[:CHUNK_SIZE])
        else:
            parts.append(os.urandom(CHUNK_SIZE))
    data = b"".join(parts) + os.urandom(tail)
    path.write_bytes(data)
    os.utime(path, ns=(LONG_AGO, LONG_AGO))
    return data


def _encoded(data: bytes, secret: bytes) -> dict[bytes, bytes]:
    out = {}
    for i in range(0, len(data), CHUNK_SIZE):
        e = encode(data[i:i + CHUNK_SIZE], secret)
        if e.data:
            out[e.tag] = e.data
    return out


async def _fetch_all(cache_dir: Path, secret: bytes, tags: list[bytes], site: Path) -> tuple[dict, dict]:
    reg = SourceRegistry(SiteCache(site))
    try:
        for src in seeds.open_seeds(cache_dir, secret):
            reg.add(src)
        got = await reg.fetch_many(tags, required=False)
        return got, {n: s for n, s in reg.stats().items()}
    finally:
        await reg.close()
        reg.cache.close()


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def secret() -> bytes:
    return new_convergence_secret()


# -- the index format -------------------------------------------------------------------------


def _index(**kw) -> sf.SeedIndex:
    rows = [(os.urandom(32), i) for i in range(5)]
    args = dict(file_size=5 * CHUNK_SIZE, mtime_ns=123, virtual_size=5 * CHUNK_SIZE,
                secret_fingerprint=sf.fingerprint(bytes(32)), path="/images/base.raw",
                extents=[sf.Extent(0, 3 * CHUNK_SIZE, 0), sf.Extent(3 * CHUNK_SIZE, CHUNK_SIZE, sf.HOLE),
                         sf.Extent(4 * CHUNK_SIZE, CHUNK_SIZE, sf.ABSENT)], rows=rows, created_ns=9)
    args.update(kw)
    return sf.build(sf.ImageKind.RAW, **args)


def test_index_round_trips_and_finds_every_tag() -> None:
    ix = _index()
    back = sf.decode(sf.encode(ix))
    assert back == ix
    for i in range(len(ix)):
        assert back.chunk_of(ix.tag_at(i)) == ix.chunk_nos[i]
    assert back.chunk_of(os.urandom(32)) is None
    assert [p.is_hole for p in back.pieces(3)] == [True] and back.pieces(4)[0].is_absent
    assert back.pieces(1) == [sf.Piece(CHUNK_SIZE, CHUNK_SIZE)]


def test_pieces_span_extents() -> None:
    ext = [sf.Extent(0, 1000, 5000), sf.Extent(1000, 2000, sf.HOLE), sf.Extent(3000, CHUNK_SIZE, 9000)]
    assert sf.pieces_of(ext, 500, 3000) == [sf.Piece(5500, 500), sf.Piece(sf.HOLE, 2000), sf.Piece(9000, 500)]
    with pytest.raises(FormatError):
        sf.pieces_of(ext, CHUNK_SIZE + 2000, 2000)


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "version", "kind"])
def test_a_damaged_index_is_a_format_error(damage: str) -> None:
    raw = bytearray(sf.encode(_index()))
    if damage == "flip":
        raw[sf.HEADER_SIZE + 7] ^= 1
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "magic":
        raw[0] ^= 1
    elif damage == "version":
        raw[8] = 99
    else:
        raw[10] = 77
    with pytest.raises(FormatError):
        sf.decode(bytes(raw))


@pytest.mark.parametrize("bad", ["gap", "past_end", "short_map", "chunk_no"])
def test_an_inconsistent_index_is_refused_both_ways(bad: str) -> None:
    kw: dict = {}
    if bad == "gap":
        kw["extents"] = [sf.Extent(0, CHUNK_SIZE, 0), sf.Extent(2 * CHUNK_SIZE, 3 * CHUNK_SIZE, 0)]
    elif bad == "past_end":
        kw["extents"] = [sf.Extent(0, 5 * CHUNK_SIZE, 1)]
    elif bad == "short_map":
        kw["extents"] = [sf.Extent(0, 4 * CHUNK_SIZE, 0)]
    else:
        kw["rows"] = [(os.urandom(32), 5)]
    with pytest.raises(FormatError):
        sf.encode(_index(**kw))


# -- raw and ISO images -------------------------------------------------------------------------


async def test_a_raw_image_serves_every_chunk_it_has_byte_exact(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "base.raw"
    data = _image(img, 12, zeros=(3, 4), tail=5000)
    rep = seeds.seed_image(img, tmp_path / "cache", secret)
    want = _encoded(data, secret)
    assert (rep.kind, rep.chunks, rep.zero_chunks, rep.absent_chunks) == (sf.ImageKind.RAW, 11, 2, 0)
    assert rep.chunk_bytes == 10 * CHUNK_SIZE + 5000 and rep.read_bytes == len(data)
    got, stats = await _fetch_all(tmp_path / "cache", secret, list(want), tmp_path / "site")
    assert got == want
    (name,) = [n for n in stats if n.startswith("seed:")]
    assert (stats[name].hits, stats[name].bad, stats[name].errors) == (11, 0, 0)


def test_an_iso_is_read_as_raw_and_says_so(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "dvd.iso"
    data = bytearray(_image(img, 4))
    at = seeds.ISO_MAGIC_AT
    data[at:at + 5] = b"CD001"
    img.write_bytes(bytes(data))
    rep = seeds.seed_image(img, tmp_path / "cache", secret)
    assert rep.kind is sf.ImageKind.ISO and rep.chunks == 4


def test_reseeding_an_unchanged_image_reads_nothing_and_a_changed_one_again(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "base.raw"
    _image(img, 6)
    first = seeds.seed_image(img, tmp_path / "cache", secret)
    again = seeds.seed_image(img, tmp_path / "cache", secret)
    assert not first.up_to_date and again.up_to_date and again.read_bytes == 0 and again.chunks == 6
    with open(img, "r+b") as f:
        f.seek(CHUNK_SIZE + 10)
        f.write(b"changed")
    os.utime(img, ns=(LONG_AGO + 10**9, LONG_AGO + 10**9))
    third = seeds.seed_image(img, tmp_path / "cache", secret)
    assert not third.up_to_date and third.read_bytes == 6 * CHUNK_SIZE
    forced = seeds.seed_image(img, tmp_path / "cache", secret, force=True)
    assert not forced.up_to_date


def test_an_image_changed_within_the_racy_window_is_read_again(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "fresh.raw"
    img.write_bytes(os.urandom(2 * CHUNK_SIZE))  # mtime: now
    seeds.seed_image(img, tmp_path / "cache", secret)
    assert not seeds.seed_image(img, tmp_path / "cache", secret).up_to_date


# -- qcow2 --------------------------------------------------------------------------------------


async def test_a_qcow2_serves_the_same_chunks_as_its_raw_image(tmp_path: Path, secret: bytes) -> None:
    raw = tmp_path / "base.raw"
    data = _image(raw, 10, zeros=(2,))
    q = tmp_path / "base.qcow2"
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(q))
    rep = seeds.seed_image(q, tmp_path / "cache", secret)
    assert (rep.kind, rep.chunks, rep.zero_chunks, rep.absent_chunks) == (sf.ImageKind.QCOW2, 9, 1, 0)
    want = _encoded(data, secret)
    got, _ = await _fetch_all(tmp_path / "cache", secret, list(want), tmp_path / "site")
    assert got == want


async def test_compressed_and_backing_clusters_are_left_to_other_sources(tmp_path: Path, secret: bytes) -> None:
    raw = tmp_path / "base.raw"
    data = _image(raw, 8, compressible=(1, 5))
    packed = tmp_path / "packed.qcow2"
    _qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(packed))
    rep = seeds.seed_image(packed, tmp_path / "cache", secret)
    assert rep.absent_chunks == 2 and rep.chunks == 6, rep
    want = _encoded(data, secret)
    got, _ = await _fetch_all(tmp_path / "cache", secret, list(want), tmp_path / "site")
    assert got == {t: d for t, d in want.items() if t in got} and len(got) == 6

    # An overlay: only what was written into it is in the file; the rest is its backing file's.
    overlay = tmp_path / "overlay.qcow2"
    _qemu_img("create", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {3 * CHUNK_SIZE} {CHUNK_SIZE}", str(overlay)],
                   check=True, capture_output=True)
    rep = seeds.seed_image(overlay, tmp_path / "cache2", secret)
    assert rep.chunks == 1 and rep.absent_chunks == 7, rep
    got, _ = await _fetch_all(tmp_path / "cache2", secret, [encode(b"\x5a" * CHUNK_SIZE, secret).tag],
                              tmp_path / "site2")
    assert len(got) == 1


# -- what can only fail to help -----------------------------------------------------------------


async def test_an_image_changed_after_seeding_is_left_out_and_an_open_source_fails_as_a_whole(
    tmp_path: Path, secret: bytes
) -> None:
    img = tmp_path / "base.raw"
    data = _image(img, 4)
    seeds.seed_image(img, tmp_path / "cache", secret)
    (src,) = seeds.open_seeds(tmp_path / "cache", secret)
    want = _encoded(data, secret)
    assert await src.get_many(list(want)) == want
    with open(img, "ab") as f:
        f.write(b"more")
    with pytest.raises(OSError, match="changed since it was seeded"):
        await src.get_many(list(want))
    await src.close()
    assert seeds.open_seeds(tmp_path / "cache", secret) == []
    (info,) = seeds.known_seeds(tmp_path / "cache", secret)
    assert info.status == "changed"
    img.unlink()
    assert seeds.known_seeds(tmp_path / "cache", secret)[0].status == "missing"


def test_another_users_seed_is_never_used(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "base.raw"
    _image(img, 3)
    seeds.seed_image(img, tmp_path / "cache", secret)
    other = new_convergence_secret()
    assert seeds.open_seeds(tmp_path / "cache", other) == []
    assert seeds.known_seeds(tmp_path / "cache", other)[0].status == "other user"
    # Seeding it again under the other secret makes it theirs (the index is per image).
    assert not seeds.seed_image(img, tmp_path / "cache", other).up_to_date
    assert len(seeds.open_seeds(tmp_path / "cache", other)) == 1


def test_a_damaged_index_is_skipped_and_listed_as_damaged(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "base.raw"
    _image(img, 3)
    rep = seeds.seed_image(img, tmp_path / "cache", secret)
    raw = bytearray(rep.index_file.read_bytes())
    raw[-40] ^= 1
    rep.index_file.write_bytes(bytes(raw))
    assert seeds.open_seeds(tmp_path / "cache", secret) == []
    assert seeds.known_seeds(tmp_path / "cache", secret)[0].status == "damaged"


def test_forget(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "base.raw"
    _image(img, 2)
    seeds.seed_image(img, tmp_path / "cache", secret)
    assert seeds.forget_seed(tmp_path / "cache", img) is True
    assert seeds.known_seeds(tmp_path / "cache") == [] and not seeds.forget_seed(tmp_path / "cache", img)


def test_a_seed_source_is_a_seed(tmp_path: Path, secret: bytes) -> None:
    img = tmp_path / "base.raw"
    _image(img, 2)
    seeds.seed_image(img, tmp_path / "cache", secret)
    (src,) = seeds.open_seeds(tmp_path / "cache", secret)
    assert src.kind is SourceKind.SEED and src.name.startswith("seed:base.raw:")
    asyncio.run(src.close())


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """``run(*args) -> (code, stdout, stderr)`` with this test's own site cache and login."""
    for var in ("ISRSYNC_CACHE", "ISRSYNC_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv(account.ENV_CONFIG, str(tmp_path / "config.json"))
    monkeypatch.setenv(account.ENV_RUNTIME, str(tmp_path / "run"))
    cache = tmp_path / "site-cache"

    def go(*args: str) -> tuple[int, str, str]:
        code = sncli.run(["--cache-dir", str(cache), *args])
        cap = capsys.readouterr()
        return code, ANSI.sub("", cap.out), ANSI.sub("", cap.err)

    def login() -> bytes:
        home = tmp_path / "home"
        LocalStore.open(home, "alice", create=True, create_user=True).repo.close()
        bundle, _ = asyncio.run(account.login(account.Account(f"file://{home}", "alice"), "pw",
                                              limits=KdfLimits.MIN))
        return bundle.convergence_secret

    go.cache, go.login = cache, login  # type: ignore[attr-defined]
    return go


def test_seed_without_a_login_is_one_line(run, tmp_path: Path) -> None:
    img = tmp_path / "base.raw"
    _image(img, 2)
    code, out, err = run("seed", str(img), "--json")
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "login" in err
    assert json.loads(out)["error"]["exit_code"] == code


def test_seed_seeds_and_lists(run, tmp_path: Path) -> None:
    secret = run.login()
    img = tmp_path / "base.raw"
    data = _image(img, 5, zeros=(1,))
    code, out, err = run("seed", str(img))
    assert code == 0, err
    assert f"{img} (raw, 640.0 KiB): serves 4 chunks, 512.0 KiB (80% of the image)" in out
    assert "1 all-zero chunks need no seed" in out
    code, out, _ = run("seed", str(img), "--json")
    doc = json.loads(out)["seed"]
    assert doc["up_to_date"] is True and doc["chunks"] == 4 and doc["kind"] == "raw"
    assert doc["index_file"] == str(seeds.index_file(run.cache, img))
    code, out, _ = run("seeds", "--json")
    (s,) = json.loads(out)
    assert (s["path"], s["status"], s["chunks"]) == (str(img), "ready", 4)
    code, out, _ = run("seeds")
    assert code == 0 and "ready" in out and "base.raw" in out
    assert len(seeds.open_seeds(run.cache, secret)) == 1 and _encoded(data, secret)
    code, out, _ = run("seed", str(img), "--forget")
    assert code == 0 and "no longer a seed" in out
    assert run("seeds", "--json")[1] == "[]\n"


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_seed_of_something_that_is_not_an_image_is_one_line(run, tmp_path: Path, what: str) -> None:
    run.login()
    target = tmp_path / "nothing" if what == "missing" else tmp_path
    code, out, err = run("seed", str(target))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("cannot read the image" if what == "missing" else "not a regular file") in err


def test_a_changed_image_is_reported_by_seeds(run, tmp_path: Path) -> None:
    run.login()
    img = tmp_path / "base.raw"
    _image(img, 2)
    assert run("seed", str(img))[0] == 0
    with open(img, "ab") as f:
        f.write(b"x")
    (s,) = json.loads(run("seeds", "--json")[1])
    assert s["status"] == "changed"
