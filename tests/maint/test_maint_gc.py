"""`collect_garbage`: what no commit named, and crash leftovers, go after the
grace period; nothing younger, and nothing committed, ever goes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from maintkit import USER, Client, read_version

from isrsync.server.maint import TMP_GRACE, check, collect_garbage
from isrsync.store.http import HttpStore
from isrsync.server.local import LocalStore
from isrsync.server.repo import STAGING_GRACE, Repository

G = 600.0  # a grace period for the tests


def _rows(repo: Repository, pack_id: bytes) -> tuple[int, int, int]:
    return (
        repo._q("SELECT COUNT(*) FROM packs WHERE id=?", (pack_id,))[0][0],
        repo._q("SELECT COUNT(*) FROM pack_entries WHERE pack=?", (pack_id,))[0][0],
        repo._q("SELECT COUNT(*) FROM parcel_packs WHERE pack=?", (pack_id,))[0][0],
    )


def _backdate(repo: Repository, pack_id: bytes, seconds: float) -> None:
    """Make a pack (rows and file) look ``seconds`` older than it is."""
    db = sqlite3.connect(repo.root / "store.db", isolation_level=None)
    db.execute("UPDATE parcel_packs SET since=since-? WHERE pack=?", (seconds, pack_id))
    db.execute("UPDATE packs SET added=added-? WHERE id=?", (seconds, pack_id))
    db.close()
    p = repo.pack_path(pack_id)
    st = p.stat()
    os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


async def _committed(client: Client) -> Client:
    await client.start()
    await client.commit({i: client.random_plain() for i in range(8)})
    await client.commit({1: client.random_plain()}, memory_chunks=1)
    return client


async def test_staged_pack_never_committed_goes_after_grace(store: LocalStore, make_client) -> None:
    client = await _committed(make_client(8))
    committed = list(client.packs.values())
    staged = client.pack([client.random_plain() for _ in range(3)])[1][0]
    await client.upload([staged])
    repo = store.repo
    t0 = time.time()
    assert _rows(repo, staged.id) == (1, 3, 1)

    assert collect_garbage(repo, grace=G, now=t0 + G / 2) == 0  # young: kept
    assert _rows(repo, staged.id) == (1, 3, 1) and repo.pack_path(staged.id).exists()
    assert await store.have_packs(client.parcel, [staged.id]) == {staged.id}

    assert collect_garbage(repo, grace=G, now=t0 + 2 * G) >= 2  # old: rows and file
    assert _rows(repo, staged.id) == (0, 0, 0)
    assert not repo.pack_path(staged.id).exists()
    assert await store.have_packs(client.parcel, [staged.id]) == set()
    # Committed packs are as old, and are never touched.
    for p in committed:
        assert repo.pack_path(p.id).exists() and _rows(repo, p.id)[0] == 1
    assert check(repo).ok
    for v in client.versions:
        await read_version(store, client, v)


async def test_old_and_young_staged_packs_in_one_run(store: LocalStore, make_client) -> None:
    client = await _committed(make_client(8, seed=2))
    old = client.pack([client.random_plain() for _ in range(2)])[1][0]
    young = client.pack([client.random_plain() for _ in range(2)])[1][0]
    await client.upload([old, young])
    _backdate(store.repo, old.id, STAGING_GRACE + 60)
    assert collect_garbage(store.repo) >= 2  # default grace, real clock
    assert not store.repo.pack_path(old.id).exists() and _rows(store.repo, old.id) == (0, 0, 0)
    assert store.repo.pack_path(young.id).exists() and _rows(store.repo, young.id) == (1, 2, 1)
    # The young one still commits; the old one must be uploaded again first.
    _, packs, req = client.build({2: client.random_plain()})
    await client.upload(packs)
    req.packs += [young.id]
    await store.commit(client.parcel, req)


async def test_staged_pack_that_a_commit_named_is_never_collected(store: LocalStore, make_client) -> None:
    client = await _committed(make_client(8, seed=3))
    far = time.time() + 10 * 365 * 86400
    assert collect_garbage(store.repo, grace=G, now=far) == 0
    for p in client.packs.values():
        assert store.repo.pack_path(p.id).exists()
    assert check(store.repo).ok
    for v in client.versions:
        await read_version(store, client, v)


async def test_pack_shared_with_a_live_parcel_survives_expiry_elsewhere(store: LocalStore, make_client) -> None:
    a = await _committed(make_client(8, seed=4))
    b = make_client(8, seed=5)
    await b.start("q")
    shared = next(iter(a.packs.values()))
    await store.put_pack(b.parcel, shared.id, shared.path)  # staged in b, live in a
    assert collect_garbage(store.repo, grace=G, now=time.time() + 2 * G) >= 1  # b's staging row
    assert store.repo.pack_path(shared.id).exists()
    assert await store.have_packs(b.parcel, [shared.id]) == set()
    assert await store.have_packs(a.parcel, [shared.id]) == {shared.id}
    assert check(store.repo).ok


async def test_crash_leftover_pack_file_without_a_row(store: LocalStore, make_client, tmp_path: Path) -> None:
    """A crash between placing a verified pack and recording it leaves a file no row names."""
    client = await _committed(make_client(8, seed=6))
    leftover = client.pack([client.random_plain() for _ in range(2)])[1][0]
    dest = store.repo.pack_path(leftover.id)
    dest.parent.mkdir(exist_ok=True)
    shutil.copyfile(leftover.path, dest)
    mtime = dest.stat().st_mtime
    assert collect_garbage(store.repo, grace=G, now=mtime + G / 2) == 0
    assert dest.exists()
    assert collect_garbage(store.repo, grace=G, now=mtime + 2 * G) == 1
    assert not dest.exists()
    for p in client.packs.values():
        if p.id != leftover.id:
            assert store.repo.pack_path(p.id).exists()
    assert check(store.repo).ok


async def test_row_without_any_parcel_goes_after_grace(store: LocalStore, make_client) -> None:
    """A pack row no parcel names (its staging expired in an earlier run) is collected."""
    client = await _committed(make_client(8, seed=7))
    orphan = client.pack([client.random_plain() for _ in range(2)])[1][0]
    await client.upload([orphan])
    db = sqlite3.connect(store.repo.root / "store.db", isolation_level=None)
    db.execute("DELETE FROM parcel_packs WHERE pack=?", (orphan.id,))
    db.close()
    t0 = time.time()
    assert collect_garbage(store.repo, grace=G, now=t0 + G / 2) == 0
    assert _rows(store.repo, orphan.id) == (1, 2, 0)
    assert collect_garbage(store.repo, grace=G, now=t0 + 2 * G) == 1
    assert _rows(store.repo, orphan.id) == (0, 0, 0) and not store.repo.pack_path(orphan.id).exists()


async def test_temporaries_go_after_an_hour(store: LocalStore, make_client) -> None:
    d = store.repo.upload_dir(USER)
    tmp = d / ".0123456789abcdef.tmp"
    tmp.write_bytes(b"x" * 100)
    m = tmp.stat().st_mtime
    assert collect_garbage(store.repo, now=m + TMP_GRACE / 2) == 0 and tmp.exists()
    # An hour, not the (day-long) staging grace.
    assert collect_garbage(store.repo, now=m + TMP_GRACE + 10) == 1 and not tmp.exists()


_KILL_MID_COMPACTION = """
import os, signal, sys, uuid
from isrsync.server import maint
from isrsync.server.repo import Repository

orig = maint.PackWriter.add

def add(self, tag, data):
    r = orig(self, tag, data)
    self._out.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # power cut in the middle of the copy
    return r

maint.PackWriter.add = add
maint.prune(Repository(sys.argv[1]), sys.argv[2], uuid.UUID(sys.argv[3]), 1)
"""


def _stray_files(repo: Repository) -> list[Path]:
    """Files in the data directory that no row accounts for."""
    known = {r[0].hex() for r in repo._q("SELECT id FROM packs")}
    out = [f for f in (repo.root / "uploads").rglob("*") if f.is_file()]
    out += [f for f in (repo.root / "packs").glob("*/*") if f.name not in known]
    return out


async def test_prune_killed_mid_compaction_leaves_nothing_gc_cannot_take(
    store: LocalStore, make_client
) -> None:
    """prune is SIGKILLed while compaction copies live chunks into a new pack: the
    versions stay readable, and everything the crash left (the half-written
    compaction temporary, the dropped packs it never deleted) is collected
    once it is old enough."""
    client = make_client(16, seed=9, full_every=1)
    await client.start()
    await client.commit({i: client.random_plain() for i in range(16)}, memory_chunks=2)
    await client.commit({i: client.random_plain() for i in range(12)})  # v1's pack: 4/16 live
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _KILL_MID_COMPACTION, str(store.repo.root), USER, str(client.parcel)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert check(store.repo).ok
    assert [v.version for v in await store.list_versions(client.parcel)] == [2]
    await read_version(store, client, 2)
    assert _stray_files(store.repo), "the kill left nothing behind: the test did not hit the copy"

    far = time.time() + STAGING_GRACE + TMP_GRACE + 60
    collect_garbage(store.repo, now=far)
    assert _stray_files(store.repo) == [], "crash leftovers that GC never collects"
    dead = client.versions[1].memory.refs.tags()
    for p in client.packs.values():
        if p.tags <= dead:  # v1's memory pack: dropped by the killed prune's first transaction
            assert not store.repo.pack_path(p.id).exists() and not _rows(store.repo, p.id)[0]
    assert check(store.repo).ok
    await read_version(store, client, 2)
    # and prune, run again, finishes the job
    from isrsync.server.maint import prune

    assert prune(store.repo, USER, client.parcel, 1).packs_compacted == 1
    assert check(store.repo).ok
    await read_version(store, client, 2)


# -- partial uploads through the real server ---------------------------------------------


async def test_partial_upload_goes_after_grace_and_upload_starts_over(live_server, tmp_path: Path) -> None:
    token = live_server.add_user(USER)
    store = HttpStore(live_server.url, token, retries=1)
    try:
        client = Client(store, tmp_path / "client", 8)
        await client.start()
        p = client.pack([client.random_plain() for _ in range(4)])[1][0]
        data = p.path.read_bytes()
        half = len(data) // 2
        base = f"{live_server.url}/v1/parcels/{client.parcel}"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            async with s.put(
                f"{base}/packs/{p.id.hex()}", data=data[:half],
                headers={"Content-Range": f"bytes 0-{half - 1}/{len(data)}"},
            ) as r:
                assert r.status == 202, await r.text()

            async def offset() -> int:
                async with s.get(f"{base}/uploads/{p.id.hex()}") as r:
                    body = await r.json()
                    assert body["complete"] is False
                    return body["offset"]

            assert await offset() == half
            part = live_server.data / "uploads" / USER / f"{p.id.hex()}.part"
            assert part.exists()
            m = part.stat().st_mtime

            repo = Repository(live_server.data)  # an admin run beside the server
            try:
                assert collect_garbage(repo, grace=G, now=m + G / 2) == 0
                assert await offset() == half  # a young partial upload is resumable
                assert collect_garbage(repo, grace=G, now=m + 2 * G) == 1
            finally:
                repo.close()
            assert not part.exists()
            assert await offset() == 0

        # The client starts over and the version commits.
        await client.upload([p])
        ver, packs, req = client.build({i: client.plain_of[t] for i, t in enumerate(sorted(p.tags))})
        assert not packs
        req.packs.append(p.id)
        await store.commit(client.parcel, req)
        client.versions[ver.number] = ver
        await read_version(store, client, 1)
    finally:
        await store.close()
