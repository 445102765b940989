"""Lock and commit races against a real `isrsync serve` (DESIGN.md, "Lock record").

Twenty clients (each its own HttpStore, connection pool and site id) hit the
server at the same instant; the compare-and-set must pick exactly one winner,
and the epoch must move by exactly one per acquire.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from isrsync.errors import Conflict, LockHeld
from isrsync.manifest import manifest_hash
from isrsync.store.base import Holder, LockState, VersionInfo
from isrsync.server.repo import Repository

from srvkit import Chain, verify_chain

N = 20
ROUNDS = 6


async def _race_acquire(clients, pid: uuid.UUID) -> tuple[int, LockState, list]:
    # Warm every pool first so the acquires leave within microseconds of each other.
    await asyncio.gather(*(c.lock_status(pid) for c in clients))
    results = await asyncio.gather(
        *(c.acquire(pid, Holder(f"site-{i:02d}", f"host-{i:02d}.example")) for i, c in enumerate(clients)),
        return_exceptions=True,
    )
    winners = [i for i, r in enumerate(results) if isinstance(r, LockState)]
    assert len(winners) == 1, f"{len(winners)} winners: {results}"
    w = winners[0]
    return w, results[w], results


async def test_twenty_acquires_one_winner_epoch_steps_by_one(live_server, stores) -> None:
    token = live_server.add_user("alice")
    clients = [stores(live_server.url, token) for _ in range(N)]
    pid = uuid.uuid4()
    await clients[0].create_parcel(pid, "race")
    seen_winners = []
    for rnd in range(1, ROUNDS + 1):
        w, st, results = await _race_acquire(clients, pid)
        seen_winners.append(w)
        assert st.epoch == rnd, f"round {rnd}: epoch {st.epoch}"
        assert st.holder is not None and st.holder.site == f"site-{w:02d}"
        assert st.holder.host == f"host-{w:02d}.example" and st.holder.user == "alice"
        for i, r in enumerate(results):
            if i == w:
                continue
            assert isinstance(r, LockHeld), f"client {i}: {r!r}"
            assert r.details.get("site") == f"site-{w:02d}", r.details
            assert r.details.get("host") == f"host-{w:02d}.example", r.details
            assert f"host-{w:02d}.example" in r.message and f"site-{w:02d}" in r.message, r.message
        # Every client sees the same record.
        states = await asyncio.gather(*(c.lock_status(pid) for c in clients))
        assert {(s.epoch, s.holder.site if s.holder else None) for s in states} == {(rnd, f"site-{w:02d}")}
        # The winner re-acquiring is idempotent (same epoch), a loser still cannot.
        again = await clients[w].acquire(pid, Holder(f"site-{w:02d}", f"host-{w:02d}.example"))
        assert again.epoch == rnd
        loser = (w + 1) % N
        try:
            await clients[loser].acquire(pid, Holder(f"site-{loser:02d}", "x"))
        except LockHeld:
            pass
        else:
            raise AssertionError("a second site acquired a held lock")
        rel = await clients[w].release(pid, st.epoch)
        assert rel.holder is None and rel.epoch == rnd, "release must not move the epoch"
    final = await clients[0].lock_status(pid)
    assert final.epoch == ROUNDS and final.holder is None
    repo = Repository(live_server.data)
    try:
        events = [r for r in repo.audit_log(pid) if r[3] == "acquire"]
    finally:
        repo.close()
    assert len(events) == ROUNDS, events
    for rnd, (row, w) in enumerate(zip(events, seen_winners), start=1):
        assert f"epoch {rnd} site site-{w:02d}" in row[4], row


async def test_acquire_race_after_break(live_server, stores) -> None:
    """A break bumps the epoch too: the next race's winner gets break-epoch + 1."""
    token = live_server.add_user("alice")
    clients = [stores(live_server.url, token) for _ in range(N)]
    pid = uuid.uuid4()
    await clients[0].create_parcel(pid, "race-break")
    w, st, _ = await _race_acquire(clients, pid)
    assert st.epoch == 1
    broken = await clients[(w + 3) % N].break_lock(pid, "site lost")
    assert broken.holder is None and broken.epoch == 2
    w2, st2, _ = await _race_acquire(clients, pid)
    assert st2.epoch == 3
    # The fenced-off first winner cannot release the new holder's lock.
    try:
        await clients[w].release(pid, 1)
    except Conflict:
        pass
    else:
        raise AssertionError("a stale epoch released the lock")
    assert (await clients[0].lock_status(pid)).holder.site == f"site-{w2:02d}"


async def test_twenty_sites_take_one_carried_lock(live_server, stores) -> None:
    """Twenty copies of one medium, each resumed at its own site, all take the carried
    lock back at once (`--carry-lock`): one wins with carried epoch + 1, the others get
    Conflict naming the winner; the winner carries it away again for the next round."""
    token = live_server.add_user("alice")
    clients = [stores(live_server.url, token) for _ in range(N)]
    pid = uuid.uuid4()
    await clients[0].create_parcel(pid, "race-carried")
    medium = Holder.for_medium("0d15ea5e", "USB-KEY")
    lock = await clients[0].acquire(pid, Holder("suspender", "suspender-host"))
    carry = await clients[0].hand_over(pid, lock.epoch, medium)
    seen_winners = []
    for rnd in range(ROUNDS):
        await asyncio.gather(*(c.lock_status(pid) for c in clients))
        results = await asyncio.gather(
            *(c.hand_over(pid, carry.epoch, Holder(f"site-{i:02d}", f"host-{i:02d}.example"))
              for i, c in enumerate(clients)),
            return_exceptions=True,
        )
        winners = [i for i, r in enumerate(results) if isinstance(r, LockState)]
        assert len(winners) == 1, f"round {rnd}: {len(winners)} winners: {results}"
        w = winners[0]
        seen_winners.append(w)
        won = results[w]
        assert won.epoch == carry.epoch + 1 and won.holder.site == f"site-{w:02d}"
        for i, r in enumerate(results):
            if i != w:
                assert isinstance(r, Conflict), f"client {i}: {r!r}"
                assert r.details == {"epoch": won.epoch, "site": f"site-{w:02d}", "host": f"host-{w:02d}.example"}
                assert f"site-{w:02d}" in r.message and "local changes are kept" in str(r)
        states = await asyncio.gather(*(c.lock_status(pid) for c in clients))
        assert set(states) == {won}
        carry = await clients[w].hand_over(pid, won.epoch, medium)
    assert carry.epoch == lock.epoch + 1 + 2 * ROUNDS
    repo = Repository(live_server.data)
    try:
        events = [r[4] for r in repo.audit_log(pid) if r[3] == "hand-over"]
    finally:
        repo.close()
    assert len(events) == 1 + 2 * ROUNDS, events
    for rnd, w in enumerate(seen_winners):
        assert f"from site medium:0d15ea5e host USB-KEY to site site-{w:02d} " in events[1 + 2 * rnd], events


async def test_twenty_commits_of_the_same_next_version(live_server, stores, tmp_path: Path) -> None:
    """From the holder's epoch, 20 commits of version N+1 at once: one lands.

    Half the racers send byte-identical commits (a retried request: every one
    that does not land must be answered with the landed version, replay-equal),
    the other half send their own manifest and pack (all but a winner get Conflict).
    """
    token = live_server.add_user("alice")
    clients = [stores(live_server.url, token) for _ in range(N)]
    pid = uuid.uuid4()
    await clients[0].create_parcel(pid, "commit-race")
    chain = Chain(pid, disk_chunks=256)
    lock = await clients[0].acquire(pid, Holder("holder", "holder-host"))
    rounds = 5
    for rnd in range(rounds):
        parent = chain.version
        shared_change = chain.make_change(tmp_path / f"r{rnd}-shared", 2)
        await clients[0].put_pack(pid, shared_change.pack_id, shared_change.pack_path)
        shared_req, _ = chain.request(shared_change, lock.epoch, site="holder")
        own = []
        for i in range(N // 2, N):
            ch = chain.make_change(tmp_path / f"r{rnd}-{i}", 1)
            await clients[i].put_pack(pid, ch.pack_id, ch.pack_path)
            req, _ = chain.request(ch, lock.epoch, site="holder")
            own.append((ch, req))
        reqs = [shared_req] * (N // 2) + [r for _, r in own]
        await asyncio.gather(*(c.lock_status(pid) for c in clients))
        results = await asyncio.gather(
            *(c.commit(pid, r) for c, r in zip(clients, reqs)), return_exceptions=True
        )
        ok = [(i, r) for i, r in enumerate(results) if isinstance(r, VersionInfo)]
        bad = [(i, r) for i, r in enumerate(results) if not isinstance(r, VersionInfo)]
        assert all(isinstance(r, Conflict) for _, r in bad), bad
        landed = {manifest_hash(reqs[i].manifest) for i, _ in ok}
        assert len(landed) == 1, f"round {rnd}: {len(landed)} different manifests landed"
        (winner_hash,) = landed
        assert {r.version for _, r in ok} == {parent + 1}
        assert len({(r.version, r.time, r.manifest_hash, r.new_pack_bytes) for _, r in ok}) == 1, \
            "replays must answer exactly what the landed commit answered"
        if winner_hash == manifest_hash(shared_req.manifest):
            # Every identical racer is a replay of the one that landed.
            assert [i for i, _ in ok] == list(range(N // 2)), results
            assert len(bad) == N // 2
        else:
            assert len(ok) == 1 and ok[0][0] >= N // 2, results
            assert len(bad) == N - 1
        for _, r in bad:
            assert "local changes are kept" in str(r), str(r)
        (m,) = await clients[0].get_manifests(pid, parent + 1, parent + 1)
        assert manifest_hash(m) == winner_hash
        chain.landed(m)
        # Packs of the losing commits stay staged, the winner's is live.
        repo = Repository(live_server.data)
        try:
            states = dict(repo._q("SELECT pack, state FROM parcel_packs WHERE parcel=?", (str(pid),)))
        finally:
            repo.close()
        winner_req = next(r for r in reqs if manifest_hash(r.manifest) == winner_hash)
        assert states[winner_req.packs[0]] == "live"
        for ch, r in own:
            if manifest_hash(r.manifest) != winner_hash:
                assert states[ch.pack_id] == "staged"
        if winner_hash != manifest_hash(shared_req.manifest):
            assert states[shared_change.pack_id] == "staged"
    versions = await clients[0].list_versions(pid)
    assert [v.version for v in versions] == list(range(1, rounds + 1)), versions
    st = await clients[0].lock_status(pid)
    assert st.version == rounds and st.epoch == lock.epoch and st.holder.site == "holder"
    manifests = await clients[5].get_manifests(pid, 1, rounds)
    assert [manifest_hash(m) for m in manifests] == [v.manifest_hash for v in versions]
    verify_chain(manifests, pid, chain.master)
    # And a plain sequential commit still works after the races.
    req, _ = chain.request(None, lock.epoch, release=True, site="holder")
    v = await clients[7].commit(pid, req)
    assert v.version == rounds + 1
    assert (await clients[0].lock_status(pid)).holder is None


async def test_twenty_concurrent_uploads_of_one_pack(live_server, stores, tmp_path: Path) -> None:
    """The same pack from 20 clients at once (half to a second parcel): every put_pack
    returns, the pack is stored once, staged in both parcels, and nothing is left over."""
    token = live_server.add_user("alice")
    clients = [stores(live_server.url, token) for _ in range(N)]
    p1, p2 = uuid.uuid4(), uuid.uuid4()
    await clients[0].create_parcel(p1, "up-1")
    await clients[0].create_parcel(p2, "up-2")
    chain = Chain(p1, disk_chunks=64)
    ch = chain.make_change(tmp_path / "one", 40)  # ~5 MiB: long enough for the uploads to overlap
    await asyncio.gather(*(c.lock_status(p1) for c in clients))
    results = await asyncio.gather(
        *(c.put_pack(p1 if i % 2 else p2, ch.pack_id, ch.pack_path) for i, c in enumerate(clients)),
        return_exceptions=True,
    )
    assert all(r is None for r in results), results
    assert await clients[0].pack_size(p1, ch.pack_id) == ch.pack_size
    assert await clients[0].pack_size(p2, ch.pack_id) == ch.pack_size
    assert await clients[3].get_pack(p2, ch.pack_id) == ch.pack_path.read_bytes()
    repo = Repository(live_server.data)
    try:
        assert repo._q("SELECT COUNT(*) FROM packs")[0][0] == 1
        states = sorted(repo._q("SELECT parcel, state FROM parcel_packs"))
    finally:
        repo.close()
    assert states == sorted([(str(p1), "staged"), (str(p2), "staged")])
    leftovers = [p for p in (live_server.data / "uploads").rglob("*") if p.is_file()]
    assert leftovers == []
    assert [p.name for p in (live_server.data / "packs").rglob("*") if p.is_file()] == [ch.pack_id.hex()]
