"""Several `isrsync serve` fronts over one PostgreSQL database (issue 17).

Three fronts share the database and the pack directory; clients are spread
over them round robin, as a load balancer would. The lock's compare-and-set
and the fenced commit must hold across processes exactly as within one: the
writer lock of :mod:`isrsync.server.pg` serialises them in the database.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

from isrsync.errors import Conflict, LockHeld
from isrsync.manifest import manifest_hash
from isrsync.store.base import Holder, LockState, VersionInfo

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from srvkit import Chain, verify_chain  # noqa: E402

N = 20


def _clients(fronts, stores, token: str, n: int = N):
    return [stores(fronts[i % len(fronts)].url, token) for i in range(n)]


async def test_twenty_acquires_across_three_fronts_one_winner(fronts, stores) -> None:
    fs = fronts(3)
    token = fs[0].add_user("alice")
    clients = _clients(fs, stores, token)
    pid = uuid.uuid4()
    await clients[0].create_parcel(pid, "race")
    for rnd in range(1, 5):
        await asyncio.gather(*(c.lock_status(pid) for c in clients))
        results = await asyncio.gather(
            *(c.acquire(pid, Holder(f"site-{i:02d}", f"host-{i:02d}")) for i, c in enumerate(clients)),
            return_exceptions=True,
        )
        winners = [i for i, r in enumerate(results) if isinstance(r, LockState)]
        assert len(winners) == 1, f"round {rnd}: {len(winners)} winners: {results}"
        (w,) = winners
        assert results[w].epoch == rnd
        assert all(isinstance(r, LockHeld) for i, r in enumerate(results) if i != w), results
        states = await asyncio.gather(*(c.lock_status(pid) for c in clients))
        assert {(s.epoch, s.holder.site if s.holder else None) for s in states} == {(rnd, f"site-{w:02d}")}
        await clients[(w + 1) % N].release(pid, rnd)  # another front releases it


async def test_twenty_commits_of_one_version_across_three_fronts(fronts, stores, tmp_path: Path) -> None:
    fs = fronts(3)
    token = fs[0].add_user("alice")
    clients = _clients(fs, stores, token)
    pid = uuid.uuid4()
    await clients[0].create_parcel(pid, "commit-race")
    chain = Chain(pid, disk_chunks=128)
    lock = await clients[0].acquire(pid, Holder("holder", "holder-host"))
    for rnd in range(3):
        parent = chain.version
        reqs = []
        for i in range(N):
            ch = chain.make_change(tmp_path / f"r{rnd}-{i}", 1)
            # Uploaded through one front, committed through another.
            await clients[(i + 1) % N].put_pack(pid, ch.pack_id, ch.pack_path)
            reqs.append(chain.request(ch, lock.epoch, site="holder")[0])
        await asyncio.gather(*(c.lock_status(pid) for c in clients))
        results = await asyncio.gather(*(c.commit(pid, r) for c, r in zip(clients, reqs)),
                                       return_exceptions=True)
        ok = [i for i, r in enumerate(results) if isinstance(r, VersionInfo)]
        assert len(ok) == 1, f"round {rnd}: {len(ok)} winners: {results}"
        assert all(isinstance(r, Conflict) for i, r in enumerate(results) if i != ok[0]), results
        assert results[ok[0]].version == parent + 1
        (m,) = await clients[2].get_manifests(pid, parent + 1, parent + 1)
        assert manifest_hash(m) == manifest_hash(reqs[ok[0]].manifest)
        chain.landed(m)
    verify_chain(await clients[1].get_manifests(pid, 1, chain.version), pid, chain.master)


async def test_fenced_commit_is_refused_across_fronts(fronts, stores, tmp_path: Path) -> None:
    a, b, c = fronts(3)
    token = a.add_user("alice")
    sa, sb, sc = stores(a.url, token), stores(b.url, token), stores(c.url, token)
    pid = uuid.uuid4()
    await sa.create_parcel(pid, "fenced")
    chain = Chain(pid, disk_chunks=64)
    old = await sa.acquire(pid, Holder("site-a", "host-a"))
    ch = chain.make_change(tmp_path / "a", 2)
    await sa.put_pack(pid, ch.pack_id, ch.pack_path)
    stale, _ = chain.request(ch, old.epoch, site="site-a")
    broken = await sb.break_lock(pid, "site-a lost")  # on another front
    new = await sc.acquire(pid, Holder("site-c", "host-c"))  # on a third
    assert broken.epoch == old.epoch + 1 and new.epoch == old.epoch + 2
    for s in (sa, sb, sc):  # the stale epoch is refused whichever front it reaches
        try:
            await s.commit(pid, stale)
        except Conflict:
            pass
        else:
            raise AssertionError("a commit under a broken lock's epoch landed")
    fresh, _ = chain.request(ch, new.epoch, site="site-c")
    v = await sb.commit(pid, fresh)
    assert v.version == 1 and (await sa.lock_status(pid)).holder.site == "site-c"


async def test_check_and_prune_on_postgresql(fronts, stores, tmp_path: Path, pg_dsn: str) -> None:
    from pgkit import isrsync_cmd

    (a, b) = fronts(2)
    token = a.add_user("alice")
    sa, sb = stores(a.url, token), stores(b.url, token)
    pid = uuid.uuid4()
    await sa.create_parcel(pid, "maint")
    chain = Chain(pid, disk_chunks=64)
    lock = await sa.acquire(pid, Holder("s", "h"))
    for i in range(4):
        ch = chain.make_change(tmp_path / f"c{i}", 8, start=0)
        await (sa if i % 2 else sb).put_pack(pid, ch.pack_id, ch.pack_path)
        req, _ = chain.request(ch, lock.epoch, site="s")
        await (sb if i % 2 else sa).commit(pid, req)
        (m,) = await sa.get_manifests(pid, i + 1, i + 1)
        chain.landed(m)
    args = ["--data", str(a.data), "--metadata", pg_dsn]
    r = subprocess.run([*isrsync_cmd(), "server", "check", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checked" in r.stdout and "all good" in r.stdout
    r = subprocess.run([*isrsync_cmd(), "server", "prune", "alice", "maint", "--keep", "1", "--json", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    # A kept delta keeps its full-keyring base: prune cuts down to it, no further.
    assert [v.version for v in await sb.list_versions(pid)] == list(range(rep["kept_from"], 5))
    r = subprocess.run([*isrsync_cmd(), "server", "check", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "password" not in r.stderr


async def test_upload_begun_on_one_front_resumes_on_another(fronts, stores, tmp_path: Path) -> None:
    """Half a pack goes to front A; front B reports that offset, and a client
    resuming through B finishes it (partial uploads live with the packs, in the
    shared --data directory)."""
    import aiohttp

    a, b = fronts(2)
    token = a.add_user("alice")
    sb = stores(b.url, token)
    pid = uuid.uuid4()
    await sb.create_parcel(pid, "resume")
    chain = Chain(pid, disk_chunks=64)
    ch = chain.make_change(tmp_path / "c", 16)
    raw = ch.pack_path.read_bytes()
    half = len(raw) // 2
    url = f"/v1/parcels/{pid}/packs/{ch.pack_id.hex()}"
    hdr = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.put(a.url + url, data=raw[:half], headers={
                **hdr, "Content-Range": f"bytes 0-{half - 1}/{len(raw)}"}) as r:
            assert r.status == 202, await r.text()
        async with http.get(f"{b.url}/v1/parcels/{pid}/uploads/{ch.pack_id.hex()}", headers=hdr) as r:
            assert (await r.json()) == {"complete": False, "offset": half}
    await sb.put_pack(pid, ch.pack_id, ch.pack_path)
    assert b.requests("PUT", "/packs/") >= 1
    req, _ = chain.request(ch, (await sb.acquire(pid, Holder("s", "h"))).epoch, site="s")
    assert (await stores(a.url, token).commit(pid, req)).new_pack_bytes == len(raw)
