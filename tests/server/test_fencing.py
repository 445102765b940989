"""Fencing through a real `isrsync serve`: a broken lock's old holder can change nothing.

Site A holds the lock and has uploaded its work; site B breaks the lock (A's
machine was lost). A's later commit must be refused with a Conflict that tells
the user their local changes are kept, and must leave every server-side record
as it was; B then acquires and commits normally.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from isrsync.errors import Conflict, LockHeld
from isrsync.manifest import manifest_hash
from isrsync.store.base import Holder
from isrsync.server.repo import Repository

from srvkit import Chain, db_snapshot, files_snapshot, verify_chain


def _parcel_rows(data: Path, pid: uuid.UUID) -> dict:
    """The server's records of one parcel, minus the audit log (which must grow)."""
    snap = db_snapshot(data)
    p = str(pid)
    return {
        "parcel": [r for r in snap["parcels"] if r[0] == p],
        "versions": [r for r in snap["versions"] if r[0] == p],
        "parcel_packs": [r for r in snap["parcel_packs"] if r[0] == p],
        "refs": [r for r in snap["refs"] if r[0] == p],
        "packs": snap["packs"],
        "pack_entries": snap["pack_entries"],
    }


async def _server_view(store, pid: uuid.UUID):
    versions = await store.list_versions(pid)
    manifests = await store.get_manifests(pid, 1, versions[-1].version) if versions else []
    return versions, manifests, await store.lock_status(pid)


@pytest.mark.parametrize("release", [True, False], ids=["suspend", "sync"])
async def test_broken_lock_fences_old_holder(live_server, stores, tmp_path: Path, release: bool) -> None:
    token = live_server.add_user("alice")
    a = stores(live_server.url, token)
    b = stores(live_server.url, token)
    pid = uuid.uuid4()
    await a.create_parcel(pid, "fenced")

    # History: version 1 committed by A, who keeps the lock and goes on working.
    chain_a = Chain(pid, disk_chunks=128)
    lock_a = await a.acquire(pid, Holder("site-a", "laptop-a"))
    assert lock_a.epoch == 1
    ch1 = chain_a.make_change(tmp_path / "v1", 4)
    await a.put_pack(pid, ch1.pack_id, ch1.pack_path)
    req1, _ = chain_a.request(ch1, lock_a.epoch, site="site-a")
    v1 = await a.commit(pid, req1)
    assert v1.version == 1
    chain_a.landed(req1.manifest)
    chain_b = Chain(pid, disk_chunks=128, master=chain_a.master, secret=chain_a.secret)
    chain_b.known.update(chain_a.known)
    chain_b.landed(req1.manifest)

    # A writes: its next pack reaches the server (staged), its commit has not happened yet.
    ch2 = chain_a.make_change(tmp_path / "v2a", 6)
    await a.put_pack(pid, ch2.pack_id, ch2.pack_path)
    assert await a.pack_size(pid, ch2.pack_id) == ch2.pack_size

    # B breaks the lock: audited, naming the old holder.
    broken = await b.break_lock(pid, "laptop-a was stolen")
    assert broken.holder is None and broken.epoch == 2
    repo = Repository(live_server.data)
    try:
        breaks = [r for r in repo.audit_log(pid) if r[3] == "break"]
    finally:
        repo.close()
    assert len(breaks) == 1, breaks
    _, user, parcel, _, detail = breaks[0]
    assert user == "alice" and parcel == str(pid)
    assert "site-a" in detail and "laptop-a" in detail and "laptop-a was stolen" in detail, detail
    assert "epoch 2" in detail, detail

    before_rows = _parcel_rows(live_server.data, pid)
    before_packs = files_snapshot(live_server.data / "packs")
    before_view = await _server_view(b, pid)

    # A, unaware, commits with its old epoch: refused, and says the work is safe locally.
    req2, _ = chain_a.request(ch2, lock_a.epoch, release=release, site="site-a")
    with pytest.raises(Conflict) as ei:
        await a.commit(pid, req2)
    msg = str(ei.value)
    assert "local changes are kept" in msg, msg
    assert "epoch 1" in msg and "2" in msg, msg
    assert ei.value.details.get("epoch") == 2
    # A retry of the very same request (as a flaky network would send) is refused too.
    with pytest.raises(Conflict):
        await a.commit(pid, req2)
    # So is releasing with the stale epoch.
    with pytest.raises(Conflict):
        await a.release(pid, lock_a.epoch)

    assert _parcel_rows(live_server.data, pid) == before_rows, "A's refused commit changed the records"
    assert files_snapshot(live_server.data / "packs") == before_packs
    after_view = await _server_view(b, pid)
    assert after_view == before_view
    versions, manifests, lock = after_view
    assert [v.version for v in versions] == [1] and lock.epoch == 2 and lock.holder is None
    assert manifest_hash(manifests[0]) == manifest_hash(req1.manifest)

    # A may not sneak back in with its old epoch after B acquires either.
    lock_b = await b.acquire(pid, Holder("site-b", "desktop-b"))
    assert lock_b.epoch == 3 and lock_b.holder.site == "site-b"
    with pytest.raises(Conflict):
        await a.commit(pid, req2)
    # A re-acquiring while B holds it: LockHeld naming B.

    with pytest.raises(LockHeld) as held:
        await a.acquire(pid, Holder("site-a", "laptop-a"))
    assert held.value.details["site"] == "site-b"

    # B commits version 2 (its own pack) and then version 3 reusing A's staged upload.
    ch2b = chain_b.make_change(tmp_path / "v2b", 3)
    await b.put_pack(pid, ch2b.pack_id, ch2b.pack_path)
    req2b, _ = chain_b.request(ch2b, lock_b.epoch, release=False, site="site-b")
    v2 = await b.commit(pid, req2b)
    assert v2.version == 2 and v2.site == "site-b" and v2.new_pack_bytes == ch2b.pack_size
    chain_b.landed(req2b.manifest)
    req3b, _ = chain_b.request(ch2, lock_b.epoch, release=True, site="site-b")
    v3 = await b.commit(pid, req3b)
    assert v3.version == 3 and v3.new_pack_bytes == ch2.pack_size

    versions, manifests, lock = await _server_view(a, pid)
    assert [v.version for v in versions] == [1, 2, 3]
    assert lock.holder is None and lock.epoch == 3 and lock.version == 3
    verify_chain(manifests, pid, chain_a.master)
    repo = Repository(live_server.data)
    try:
        events = [r[3] for r in repo.audit_log(pid)]
    finally:
        repo.close()
    assert events == ["create", "acquire", "commit", "break", "acquire", "commit", "commit"], events
