"""Background work of a running parcel (isrsync.site.background) on a real ParcelDisk
over a real LocalStore: the trace-order hoard, the trickle and the choice by policy."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from array import array

import pytest
from diskkit import CH

from isrsync import manifest
from isrsync.site import parcel as parcel_mod
from isrsync.site.background import Trickle, TraceHoard, background_for
from isrsync.site.policy import Policy
from isrsync.site.session import ParcelSession
from isrsync.store.base import Holder


async def _base(p) -> manifest.Manifest:
    (raw,) = await p.store.get_manifests(p.id, 1, 1)
    return manifest.decode(raw, p.master_key, p.id)


async def _session(p, site, base: manifest.Manifest) -> ParcelSession:
    # The trickle needs only the site's cache and its store; the account and keys stay out of it.
    lock = await p.store.acquire(p.id, Holder("test-site", "test-host"))
    s = parcel_mod.Site(site.cache, p.store, acct=None, bundle=None, host="test-host")  # type: ignore[arg-type]
    return ParcelSession(s, p.id, site.state, base, lock.epoch)


async def test_the_hoard_fetches_the_trace_first_in_its_order_then_everything(make_parcel, make_site) -> None:
    p = await make_parcel()
    site = await make_site(p)
    nonzero = p.nonzero()
    trace = [nonzero[9], nonzero[2], nonzero[9], nonzero[5]]
    base = dataclasses.replace(await _base(p), trace=array("I", trace))
    events: list[tuple[str, dict]] = []
    hoard = TraceHoard(site.disk, base, lambda kind, data: events.append((kind, data)), batch=2,
                       trace_pause=0.0, hoard_pause=0.0)
    assert hoard.order()[:3] == [nonzero[9], nonzero[2], nonzero[5]]
    await hoard.run()
    asked = site.server.asked
    assert asked[:3] == [p.keyring[i].tag for i in (nonzero[9], nonzero[2], nonzero[5])]
    assert set(asked) == {p.keyring[i].tag for i in nonzero}  # everything else too, each once
    assert len(asked) == len(set(asked))
    for i in nonzero:
        assert await site.disk.read(i * CH, len(p.chunk(i))) == p.chunk(i)
    (kind, data), = events
    assert kind == "hoarded" and data["chunks"] == len(p.keyring) and "cache" in data["message"]


async def test_the_trickle_uploads_only_what_has_settled(make_parcel, make_site) -> None:
    p = await make_parcel()
    site = await make_site(p)
    session = await _session(p, site, await _base(p))
    trickle = Trickle(site.disk, session, settle=10.0)
    await site.disk.write(0, os.urandom(CH))
    await site.disk.write(3 * CH, os.urandom(CH))
    await site.disk.write_zeroes(5 * CH, CH)  # all zeros: nothing to upload, ever
    t = time.monotonic()
    assert trickle.settled(t) == []  # just written
    await site.disk.write(3 * CH, os.urandom(CH))  # rewritten: its clock starts again
    settled = trickle.settled(t + 10.0)
    assert settled == [site.disk.dirty[0].tag]
    assert sorted(trickle.settled(t + 20.0)) == sorted([site.disk.dirty[0].tag, site.disk.dirty[3].tag])

    await session.upload_settled(settled)
    assert session.staged_tags == {site.disk.dirty[0].tag}
    assert trickle.settled(t + 20.0) == [site.disk.dirty[3].tag]  # staged chunks are not sent twice
    assert await p.store.have_packs(p.id, session.staged) == set(session.staged) != set()


async def test_the_trickle_runs_within_its_rate(make_parcel, make_site) -> None:
    p = await make_parcel()
    site = await make_site(p)
    session = await _session(p, site, await _base(p))
    for i in range(6):
        await site.disk.write(i * CH, os.urandom(CH))
    # settle 0.1 s: a round every 0.1 s; a rate of 20 chunks/s allows 2 chunks a round.
    task = asyncio.create_task(Trickle(site.disk, session, settle=0.1, rate=20 * CH).run())
    try:
        await asyncio.sleep(0.25)
        early = len(session.staged_tags)
        deadline = time.monotonic() + 10
        while len(session.staged_tags) < 6:
            assert time.monotonic() < deadline, session.staged_tags
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert early <= 4  # at most two rounds of two chunks
    assert session.staged_tags == {site.disk.dirty[i].tag for i in range(6)}
    assert await p.store.have_packs(p.id, session.staged) == set(session.staged)


async def test_the_policy_decides_what_runs(make_parcel, make_site) -> None:
    p = await make_parcel()
    site = await make_site(p)
    base = await _base(p)
    session = await _session(p, site, base)

    def names(policy: Policy, online: bool) -> list[str]:
        work = background_for(policy, online=online, disk=site.disk, session=session, events=lambda k, d: None)
        return [w.name for w in work]

    assert names(Policy.AUTO, True) == ["hoard", "trickle"]
    assert names(Policy.AUTO, False) == ["hoard"]  # offline: nowhere to trickle to
    for policy in (Policy.DEMAND, Policy.LOOKASIDE, Policy.PROACTIVE, Policy.BASELINE):
        assert names(policy, True) == ["trickle"] and names(policy, False) == []


async def test_a_session_on_an_older_version_loads_the_head_at_its_commit_not_at_resume(make_parcel, make_site) -> None:
    """Resuming an older version must not wait for the head's manifests (a round of fetches over a slow
    link before the guest starts); the commit that goes on top of the head loads them."""
    p = await make_parcel()
    site = await make_site(p)
    base = await _base(p)
    asked: list[tuple[int, int]] = []
    real = p.store.get_manifests

    async def counting(parcel, first: int, last: int):
        asked.append((first, last))
        return await real(parcel, first, last)

    p.store.get_manifests = counting  # type: ignore[method-assign]
    from isrsync.keys import KeyBundle

    lock = await p.store.acquire(p.id, Holder("test-site", "test-host"))
    keyed = parcel_mod.Site(site.cache, p.store, acct=None, host="test-host",  # type: ignore[arg-type]
                            bundle=KeyBundle(os.urandom(32), {str(p.id): p.master_key}))
    site.state.start_running(1, lock.epoch, "test-host")
    session = ParcelSession(keyed, p.id, site.state, base, lock.epoch)
    session.head_version = 1  # as Runtime.resume sets it when the head is newer than the version resumed
    assert asked == [] and session.head is None
    assert base.keyring is not None
    v = await session.commit(base.keyring, [], None, [], release=True)
    assert v.version == 2 and (1, 1) in asked, asked
    assert session.head is None and session.head_version is None
