"""`check`: a clean data directory passes; every kind of damage is reported.

The repository is built by real commits (real packs, real delta manifests), then
damaged the way disks and people damage things: a flipped byte, a cut file, a
deleted file, a hand-edited database row.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from maintkit import Client, isrsync_cmd

from isrsync.manifest import HEADER_SIZE
from isrsync.pack import FOOTER_SIZE
from isrsync.pack import HEADER_SIZE as PACK_HEADER
from isrsync.server.maint import check
from isrsync.server.local import LocalStore


async def _build(client: Client) -> Client:
    await client.start()
    rng = client.rng
    await client.commit({i: client.random_plain() for i in range(client.chunks) if i % 5})  # some ZERO chunks
    for v in range(2, 6):
        writes = {i: client.random_plain() for i in rng.sample(range(client.chunks), 4)}
        await client.commit(writes, memory_chunks=2 if v % 2 else 0)
    return client


@pytest.fixture
async def built(store: LocalStore, make_client) -> Client:
    return await _build(make_client(16))


def _db(store: LocalStore) -> sqlite3.Connection:
    return sqlite3.connect(store.repo.root / "store.db", isolation_level=None)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _pack_with_entries(client: Client, at_least: int = 2):
    return next(p for p in client.packs.values() if len(p.info.entries) >= at_least)


def _one_problem_about(rep, needle: str) -> str:
    assert not rep.ok
    hits = [p for p in rep.problems if needle in p]
    assert hits, rep.problems
    return hits[0]


async def test_clean_repository_after_real_commits_is_ok(store: LocalStore, built: Client) -> None:
    rep = check(store.repo)
    assert rep.ok, rep.problems
    assert rep.versions == 5
    assert rep.packs == len(built.packs) > 5
    assert check(store.repo, verify_packs=False).ok


def _regions(client: Client) -> dict[str, int]:
    p = _pack_with_entries(client)
    e0, e1 = p.info.entries[0], p.info.entries[1]
    size = p.info.size
    return {
        "header-reserved": 12,
        "entry-tag": e0.offset - 36 + 5,
        "entry-length": e1.offset - 4,
        "chunk-first-byte": e0.offset,
        "chunk-middle": e1.offset + e1.length // 2,
        "chunk-last-byte": e1.offset + e1.length - 1,
        "index": size - FOOTER_SIZE - 10,
        "footer-count": size - FOOTER_SIZE + 8,
        "footer-reserved": size - FOOTER_SIZE + 12,
        "footer-hash": size - 20,
        "footer-magic": size - 1,
        "magic": 0,
    }


@pytest.mark.parametrize(
    "region",
    ["header-reserved", "entry-tag", "entry-length", "chunk-first-byte", "chunk-middle", "chunk-last-byte",
     "index", "footer-count", "footer-reserved", "footer-hash", "footer-magic", "magic"],
)
async def test_flipped_byte_in_a_pack_is_reported(store: LocalStore, built: Client, region: str) -> None:
    p = _pack_with_entries(built)
    stored = store.repo.pack_path(p.id)
    _flip(stored, _regions(built)[region])
    rep = check(store.repo)
    _one_problem_about(rep, f"pack {p.id.hex()[:16]}")
    assert len(rep.problems) == 1, rep.problems  # only that pack; nothing else is blamed
    # --quick does not hash, so it cannot see a flipped byte; the size is right
    assert check(store.repo, verify_packs=False).ok


async def test_truncated_pack_is_reported(store: LocalStore, built: Client) -> None:
    p = _pack_with_entries(built)
    stored = store.repo.pack_path(p.id)
    os.truncate(stored, p.info.size - 1000)
    line = _one_problem_about(check(store.repo), f"pack {p.id.hex()[:16]}")
    assert "size" in line
    # Even the quick check sees a size that differs from the record.
    assert not check(store.repo, verify_packs=False).ok


async def test_truncated_pack_with_doctored_size_row_is_reported(store: LocalStore, built: Client) -> None:
    p = _pack_with_entries(built)
    stored = store.repo.pack_path(p.id)
    os.truncate(stored, PACK_HEADER + 100)
    with _db(store) as db:
        db.execute("UPDATE packs SET size=? WHERE id=?", (PACK_HEADER + 100, p.id))
    _one_problem_about(check(store.repo), f"pack {p.id.hex()[:16]}")


async def test_deleted_pack_file_is_reported(store: LocalStore, built: Client) -> None:
    p = _pack_with_entries(built)
    store.repo.pack_path(p.id).unlink()
    line = _one_problem_about(check(store.repo), f"pack {p.id.hex()[:16]}")
    assert "missing" in line
    assert not check(store.repo, verify_packs=False).ok


async def test_index_rows_that_do_not_match_the_pack_are_reported(store: LocalStore, built: Client) -> None:
    p = _pack_with_entries(built)
    e = p.info.entries[0]
    with _db(store) as db:
        db.execute("UPDATE pack_entries SET offset=offset+1 WHERE pack=? AND tag=?", (p.id, e.tag))
    line = _one_problem_about(check(store.repo), f"pack {p.id.hex()[:16]}")
    assert "index" in line


@pytest.mark.parametrize("where", ["body", "header-version", "header-parent", "truncated"])
async def test_tampered_manifest_row_is_reported(store: LocalStore, built: Client, where: str) -> None:
    v = 3
    raw = bytearray(built.versions[v].raw)
    if where == "body":
        raw[HEADER_SIZE + 40] ^= 1
    elif where == "header-version":
        raw[32] ^= 0x04  # u64 version at offset 8+2+2+4+16
    elif where == "header-parent":
        raw[48 + 5] ^= 1  # parent hash at 8+2+2+4+16+8+8 = 48
    else:
        raw = raw[:-1]
    with _db(store) as db:
        assert db.execute("UPDATE versions SET manifest=? WHERE version=?", (bytes(raw), v)).rowcount == 1
    line = _one_problem_about(check(store.repo), f"version {v}")
    assert str(built.parcel) in line


async def test_manifest_replaced_with_its_hash_breaks_the_chain(store: LocalStore, built: Client) -> None:
    # A forger who rewrites both the manifest and its recorded hash is caught by
    # the next version, whose header names the real parent's hash.
    import hashlib

    v = 3
    raw = bytearray(built.versions[v].raw)
    raw[-3] ^= 1
    with _db(store) as db:
        db.execute(
            "UPDATE versions SET manifest=?, hash=? WHERE version=?",
            (bytes(raw), hashlib.blake2b(bytes(raw), digest_size=32).digest(), v),
        )
    line = _one_problem_about(check(store.repo), f"version {v + 1}")
    assert "chain" in line


async def test_chunk_whose_only_live_pack_is_gone_is_reported(store: LocalStore, built: Client) -> None:
    head = built.versions[built.version]
    live = head.tags()
    p = next(p for p in built.packs.values() if p.tags & live)
    with _db(store) as db:
        assert db.execute("DELETE FROM parcel_packs WHERE pack=?", (p.id,)).rowcount == 1
    rep = check(store.repo)
    line = _one_problem_about(rep, "referenced chunk(s) are in no live pack")
    # Every tag any stored version still references and that lived only there.
    refs = {t for ver in built.versions.values() for t in ver.tags()}
    assert line.split(": ")[1].startswith(f"{len(p.tags & refs)} ")
    assert len(rep.problems) == 1, rep.problems


async def test_delta_whose_keyring_base_is_gone_is_reported(store: LocalStore, built: Client) -> None:
    # versions 2..4 are deltas on version 1 (full_every=4); 5 is full again
    with _db(store) as db:
        db.execute("DELETE FROM versions WHERE version=1")
    rep = check(store.repo)
    bad = sorted(int(p.split("version ")[1].split(":")[0]) for p in rep.problems if "keyring base was pruned" in p)
    assert bad == [2, 3, 4], rep.problems


async def test_parcel_whose_current_version_is_not_its_last_is_reported(store: LocalStore, built: Client) -> None:
    with _db(store) as db:
        db.execute("UPDATE parcels SET version=7")
    _one_problem_about(check(store.repo), "current version 7 is not its last version")


# -- the real command line --------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*isrsync_cmd(), *args], check=False, capture_output=True, text=True, timeout=120)


async def test_cli_check_exit_codes(store: LocalStore, built: Client) -> None:
    data = str(store.repo.root)
    ok = _cli("server", "check", "--data", data)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all good" in ok.stdout
    assert "problem" not in ok.stdout

    js = _cli("server", "check", "--data", data, "--json")
    assert js.returncode == 0
    body = json.loads(js.stdout)
    assert body["ok"] is True and body["problems"] == [] and body["versions"] == 5

    p = _pack_with_entries(built)
    _flip(store.repo.pack_path(p.id), p.info.entries[0].offset + 7)
    gone = next(q for q in built.packs.values() if q.id != p.id)
    store.repo.pack_path(gone.id).unlink()

    bad = _cli("server", "check", "--data", data)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    problems = [ln for ln in bad.stdout.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 2, bad.stdout
    assert any(p.id.hex()[:16] in ln for ln in problems)
    assert any(gone.id.hex()[:16] in ln and "missing" in ln for ln in problems)
    assert "2 problem(s)" in bad.stdout

    js = _cli("server", "check", "--data", data, "--json")
    assert js.returncode == 3
    body = json.loads(js.stdout)
    assert body["ok"] is False and len(body["problems"]) == 2

    quick = _cli("server", "check", "--data", data, "--quick")
    assert quick.returncode == 3  # the missing file is seen without hashing
    assert sum(ln.startswith("problem:") for ln in quick.stdout.splitlines()) == 1
