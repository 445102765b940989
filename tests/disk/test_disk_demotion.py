"""A cheap source that stops answering drops behind the home server: one miss
pays its timeout, the next ones do not wait for it."""

from __future__ import annotations

import time

from diskkit import CH, DictSource, SlowSource, kit


async def test_a_silent_cheap_source_is_demoted_after_it_times_out(make_parcel, make_site) -> None:
    parcel = await make_parcel(seed=41)
    silent = SlowSource(DictSource("peer", parcel.blobs), None, name="silent-peer", cost=0.0)
    site = await make_site(parcel, sources=[silent])
    site.chain.source_timeout = 0.5
    nz = parcel.nonzero()

    t0 = time.monotonic()
    res = await kit.qemu_io(site.uri, f"read -q {nz[0] * CH} 100")
    first = time.monotonic() - t0
    assert res.rc == 0, res.out + res.err
    assert first >= 0.5  # the first miss waited for the silent source once
    assert silent.calls == 1

    t0 = time.monotonic()
    for i in nz[1:6]:
        res = await kit.qemu_io(site.uri, f"read -q {i * CH} 100")
        assert res.rc == 0, res.out + res.err
    later = time.monotonic() - t0
    # The server answers the next misses at once: the silent peer is not asked
    # again while its penalty lasts (five reads, each far below the 0.5 s timeout).
    assert silent.calls == 1, silent.calls
    assert later < 5 * 0.5, later
    stats = site.chain.stats()
    distinct = {parcel.keyring[i].tag for i in nz[:6]}  # the mixed image repeats content
    assert stats["silent-peer"].errors == 1 and stats["server"].hits == len(distinct)
