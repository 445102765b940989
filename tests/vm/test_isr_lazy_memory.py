"""Guest memory restored lazily (post-copy) or eagerly, through the runtime with a real
guest and the real home server: the guest carries on either way, the chunks it touched
first are kept in the next version and put in place before the next lazy start, a host
without userfaultfd restores eagerly, and a suspend while RAM is still coming in waits
for the rest and commits it."""

from __future__ import annotations

import asyncio
import time

from isrsync.site import machine, memimage
from isrsync.site.policy import MemoryMode
from isrsync.site.parcel import load_version
from isrsync.demo.console import GuestConsole


async def counter(api_parcel) -> int:
    def go() -> int:
        con = GuestConsole(api_parcel.short / "ser")
        try:
            reply = con.command("counter")
        finally:
            con.close()
        assert reply.startswith("GUEST: COUNTER "), reply
        return int(reply.split()[-1])

    return await asyncio.to_thread(go)


async def cold_boot_and_suspend(api_parcel) -> int:
    rt = api_parcel.runtime()
    rep = await rt.resume()
    assert rep.memory == "none"
    con = await asyncio.to_thread(GuestConsole, api_parcel.short / "ser")
    await asyncio.to_thread(con.wait_for, "GUEST: READY")
    con.close()
    await asyncio.sleep(0.5)
    n = await counter(api_parcel)
    res = await rt.suspend()
    assert res.committed and res.version == 2
    await rt.close()
    return n


async def memory_of(api_parcel, version: int):
    m = await load_version(api_parcel.site, api_parcel.pid, version)
    assert m.memory is not None and m.memory.ram is not None
    return m.memory


async def test_lazy_and_eager_resumes_carry_on_and_keep_the_hot_chunks(api_parcel, monkeypatch) -> None:
    n = await cold_boot_and_suspend(api_parcel)
    assert list((await memory_of(api_parcel, 2)).hot) == []  # a cold boot faults on nothing

    rt = api_parcel.runtime(memory=MemoryMode.LAZY)
    rep = await rt.resume()
    assert rep.memory == "lazy" and rt.postcopy is not None
    assert "boot_files" not in rep.seconds  # a restored guest needs no kernel until it reboots
    assert (n := await counter(api_parcel)) >= 0
    st = rt.status().memory
    assert st["mode"] == "lazy" and st["requests"] > 0  # the guest faulted its pages in
    res = await rt.suspend()
    assert res.committed and res.version == 3
    touched = list(rt.postcopy.touched)
    await rt.close()
    m3 = await memory_of(api_parcel, 3)
    hot = list(m3.hot)
    assert hot and hot == [i for i in touched if not m3.ram[i].is_zero][: machine.HOT_CHUNKS]

    rt = api_parcel.runtime(memory=MemoryMode.EAGER)
    rep = await rt.resume()
    assert rep.memory == "eager" and rt.postcopy is None and "ram" in rep.seconds
    assert await counter(api_parcel) >= n
    assert (await rt.suspend()).version == 4
    await rt.close()
    m4 = await memory_of(api_parcel, 4)  # an eager run faults on nothing: the hot chunks are kept
    assert list(m4.hot) == [i for i in hot if not m4.ram[i].is_zero]

    # No userfaultfd for QEMU on this host: a lazy resume restores eagerly, and says so.
    monkeypatch.setattr(machine, "postcopy_usable", lambda: False)
    rt = api_parcel.runtime(memory=MemoryMode.LAZY)
    assert (await rt.resume()).memory == "eager"
    assert await counter(api_parcel) >= n
    assert (await rt.suspend()).version == 5
    await rt.close()
    monkeypatch.undo()

    # The hot chunks are in place before the guest starts: it never faults on them.
    hot = list((await memory_of(api_parcel, 5)).hot)
    rt = api_parcel.runtime(memory=MemoryMode.LAZY)
    rep = await rt.resume()
    assert rep.memory == "lazy" and rt.postcopy is not None
    assert hot and rt.postcopy.stats.hot_chunks == len(hot)
    assert not set(rt.postcopy.touched) & set(hot)
    assert await counter(api_parcel) >= n


async def test_a_suspend_while_guest_memory_still_comes_in(api_parcel, monkeypatch) -> None:
    n = await cold_boot_and_suspend(api_parcel)
    real = memimage.RamFetcher.__call__

    def slow(self, index: int, urgent: bool):
        if urgent:
            return real(self, index, urgent)

        async def later():
            await asyncio.sleep(0.2)  # the background push alone would take a minute
            return await real(self, index, urgent)

        return asyncio.ensure_future(later())

    monkeypatch.setattr(memimage.RamFetcher, "__call__", slow)
    rt = api_parcel.runtime()
    rep = await rt.resume()
    assert rep.memory == "lazy" and rt.postcopy is not None
    c = await counter(api_parcel)
    assert c >= n and not rt.postcopy.done  # the guest runs; its RAM is not all in yet
    res = await asyncio.wait_for(rt.suspend(), 120)  # the rest comes in at full speed first
    assert res.committed and res.version == 3
    assert rt.postcopy.done and rt.postcopy.stats.completed is not None
    await rt.close()
    monkeypatch.undo()

    rt = api_parcel.runtime(memory=MemoryMode.EAGER)
    await rt.resume()
    assert await counter(api_parcel) >= c  # what the suspend saved is the whole guest


def test_a_guest_that_reboots_after_a_resume_boots_again(sites, parcel) -> None:
    a, name = parcel
    assert a.boot_and_suspend(name, "write note before-reboot") == 2

    proc, ev, con = a.resume(name)
    assert ev["memory"] == "lazy" and ev["cold_boot"] is False
    assert con.command("reboot") == "GUEST: BYE"
    con.close()
    deadline = time.monotonic() + 60
    while (e := proc.next_event(deadline)) is not None and e["event"] != "rebooted":
        pass
    assert e is not None and e["event"] == "rebooted", proc.stderr[-2000:]
    con = type(con)(a.runtime / "ser.sock")
    a.consoles.append(con)
    con.wait_for("GUEST: READY", 120)  # a fresh boot, from the parcel's kernel
    assert int(con.command("counter").split()[-1]) < 10  # RAM started afresh: the counter too
    assert con.command("read note") == "GUEST: DATA before-reboot"  # the same disk
    assert con.command("write note after-reboot") == "GUEST: OK"
    con.close()
    res = a.json("suspend", name)
    assert res["committed"] is True and res["version"] == 3
    assert a.ended(proc)["how"] == "suspended"
