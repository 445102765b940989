"""The source chain under a served ParcelDisk: liars, failures, sources that come and
go, and a home server that is not there."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

from diskkit import CH, DictSource, FailingSource, LyingSource, SlowSource, kit

from isrsync.errors import Unreachable
from isrsync.store.http import HttpStore


async def _read_check(site, chunks: list[int], *, straddle: bool = True) -> None:
    """Read most of each of ``chunks`` through NBD (straddling into the next chunk
    unless told not to) and check the bytes against the image."""
    p = site.parcel
    spans = []
    for i in chunks:
        lo = i * CH + 1234
        hi = min(p.size, (i + 1) * CH + (100 if straddle else -100))
        spans.append((lo, hi - lo))
    res = (await kit.qemu_io(site.uri, *(f"read -v {o} {n}" for o, n in spans))).check()
    got = kit.parse_dumps(res.out, spans)
    for (o, n), data in zip(spans, got):
        assert data == p.image[o : o + n], f"read {o}+{n} returned wrong bytes"


async def test_lying_and_failing_sources_are_skipped(make_parcel, make_site, tmp_path: Path) -> None:
    parcel = await make_parcel(seed=31)
    liar = LyingSource("liar", parcel.blobs, cost=0.0)
    yanked = FailingSource("yanked", OSError(5, "medium removed"), cost=0.001)
    down = FailingSource("down", Unreachable("peer went away"), cost=0.002)
    site = await make_site(parcel, sources=[liar, yanked, down])
    assert site.chain.names() == ["liar", "yanked", "down", "server"]
    got = await kit.export_bytes(site.uri, tmp_path / "x.img", "qemu-img")
    assert got == parcel.image, kit.first_difference(got, parcel.image)
    stats = site.chain.stats()
    tags = parcel.keyring.tags()
    assert stats["liar"].hits == 0 and stats["liar"].bad == liar.answered == len(tags)
    # Each failure is counted; after its first, a failing source drops behind the
    # server for a while, so how many requests still reach it depends on timing.
    assert stats["yanked"].errors == yanked.calls >= 1
    assert stats["down"].errors == down.calls >= 1
    assert stats["server"].hits == len(tags) and stats["server"].bad == 0
    # nothing that failed verification was kept
    assert site.cache.verify() == []
    assert set(site.cache.tags()) == tags
    for t in site.cache.tags():
        assert site.cache.get(t) == parcel.blobs[t]


async def test_a_source_raising_an_unexpected_error_is_skipped(make_parcel, make_site, tmp_path: Path) -> None:
    """A third-party source (sneakernet reaches isrsync only through the Source
    protocol) with a bug must not take the disk down: it can only fail to help."""
    parcel = await make_parcel(seed=32)
    buggy = FailingSource("buggy", RuntimeError("bug in a medium reader"), cost=0.0)
    site = await make_site(parcel, sources=[buggy])
    res = await kit.qemu_io(site.uri, f"read -q {2 * CH} {CH}")
    assert res.rc == 0, f"a raising source broke the read: {(res.out + res.err).strip()}"
    assert site.chain.stats()["buggy"].errors >= 1
    assert site.chain.stats()["server"].hits >= 1


async def test_sources_added_and_removed_while_serving(make_parcel, make_site) -> None:
    parcel = await make_parcel(seed=33)
    site = await make_site(parcel)
    nz = [i for i in parcel.nonzero() if i + 1 < len(parcel.keyring)]
    first, second, third = nz[0:4], nz[8:12], nz[16:20]

    def new_tags(chunks: list[int], seen: set[bytes]) -> set[bytes]:
        ts = set()
        for i in chunks:
            for j in (i, i + 1):
                r = parcel.keyring[j]
                if not r.is_zero and r.tag not in seen:
                    ts.add(r.tag)
        return ts

    await _read_check(site, first)
    seen = set(site.cache.tags())
    hits0 = site.chain.stats()["server"].hits
    assert hits0 == len(seen) > 0

    # a USB key with everything appears: misses go to it, not the server
    usb = DictSource("usb", parcel.blobs, cost=0.0)
    site.chain.add(usb)
    assert site.chain.names()[0] == "usb"
    want = new_tags(second, seen)
    assert want
    await _read_check(site, second)
    assert site.chain.stats()["usb"].hits == len(want)
    assert set(usb.asked) == want
    assert site.chain.stats()["server"].hits == hits0
    seen |= want

    # it is pulled out: the server again
    site.chain.remove("usb")
    assert "usb" not in site.chain.names()
    want = new_tags(third, seen)
    assert want
    calls = usb.calls
    await _read_check(site, third)
    assert usb.calls == calls
    assert site.chain.stats()["server"].hits == hits0 + len(want)
    assert set(site.cache.tags()) == seen | want


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_unreachable_home_gives_eio_after_the_timeout(make_parcel, make_site, tmp_path: Path) -> None:
    parcel = await make_parcel(seed=34)
    dead = HttpStore(f"http://127.0.0.1:{_dead_port()}", "no-token", retries=0, connect_timeout=2)
    try:
        site = await make_site(parcel, store=dead, fetch_timeout=1.0)
        # some chunks arrive while a medium is plugged in, then it goes
        usb = DictSource("usb", parcel.blobs)
        site.chain.add(usb)
        cached = [1, 2, 3]
        await _read_check(site, cached)
        site.chain.remove("usb")

        miss = 12
        assert not parcel.keyring[miss].is_zero and site.cache.get(parcel.keyring[miss].tag) is None
        t0 = time.monotonic()
        res = await kit.qemu_io(site.uri, f"read -q {miss * CH + 10} 100", timeout=30)
        took = time.monotonic() - t0
        assert res.rc != 0 and "Input/output error" in res.out + res.err, res.out + res.err
        # it kept trying for the whole fetch_timeout (1 s), and not much longer
        assert 0.9 <= took < 10, took
        # it waited and asked again before giving up
        assert site.chain.stats()["server"].errors >= 2 and site.chain.stats()["server"].hits == 0
        # a partial write needs the old chunk: EIO too; a whole-chunk write does not
        res = await kit.qemu_io(site.uri, f"write -q -P 0x11 {miss * CH + 10} 100", timeout=30)
        assert res.rc != 0 and "Input/output error" in res.out + res.err, res.out + res.err
        (await kit.qemu_io(site.uri, f"write -q -P 0x22 {13 * CH} {CH}", f"read -q -P 0x22 {13 * CH} {CH}")).check()

        # the server keeps serving what is local: cached chunks and ZERO chunks
        await _read_check(site, cached)
        zero = parcel.zero()[2]
        (await kit.qemu_io(site.uri, f"read -q -P 0 {zero * CH} {CH}")).check()
        info = json.loads((await kit.ok("nbdinfo", "--json", site.uri)).out)
        assert info["exports"][0]["export-size"] == parcel.size

        # and a source coming back serves the chunk that failed
        site.chain.add(usb)
        await _read_check(site, [miss], straddle=False)
    finally:
        await dead.close()


class _FirstMiss(DictSource):
    """An empty source that calls ``hook`` when it is first asked (the first miss)."""

    def __init__(self, hook) -> None:
        super().__init__("probe", {})
        self._hook = hook

    async def get_many(self, tags):
        if self.calls == 0:
            self._hook()
        return await super().get_many(tags)


async def test_a_source_back_before_the_fetch_timeout_serves_the_read(make_parcel, make_site) -> None:
    """The guest blocks on a miss "as on a slow disk, while sources may come back"
    for fetch_timeout: a medium plugged in 1.6 s after the miss, inside a 2 s
    fetch_timeout, serves it."""
    parcel = await make_parcel(seed=36)
    site = await make_site(parcel, server=False, fetch_timeout=2.0)
    loop = asyncio.get_running_loop()
    usb = DictSource("usb", parcel.blobs)
    missed: list[float] = []

    def plug_in_later() -> None:
        missed.append(time.monotonic())
        loop.call_later(1.6, site.chain.add, usb)

    site.chain.add(_FirstMiss(plug_in_later))
    res = await kit.qemu_io(site.uri, f"read -v {2 * CH + 5} 64", timeout=30)
    took = time.monotonic() - missed[0]
    assert res.rc == 0, (
        f"the read failed {took:.2f} s after the miss although a source came back at 1.6 s, "
        f"inside the 2 s fetch_timeout: {(res.out + res.err).strip()}"
    )
    assert kit.parse_dumps(res.out, [(2 * CH + 5, 64)]) == [parcel.image[2 * CH + 5 : 2 * CH + 69]]
    assert site.chain.stats()["usb"].hits == 1


async def test_a_hanging_source_is_bounded_by_the_fetch_timeout(make_parcel, make_site) -> None:
    """A source that never answers (a peer that accepted and went silent) must not
    hold a guest read longer than ParcelDisk.fetch_timeout."""
    parcel = await make_parcel(seed=35)
    site = await make_site(parcel, server=False, fetch_timeout=1.0)
    site.chain.add(SlowSource(DictSource("peer", parcel.blobs), None, name="silent-peer"))
    t0 = time.monotonic()
    try:
        res = await asyncio.wait_for(kit.qemu_io(site.uri, f"read -q {2 * CH} 100"), 6)
    except TimeoutError:
        raise AssertionError(
            f"a read behind a silent source still hangs after {time.monotonic() - t0:.1f} s "
            "(fetch_timeout is 1 s)"
        ) from None
    assert res.rc != 0 and "Input/output error" in res.out + res.err, res.out + res.err
