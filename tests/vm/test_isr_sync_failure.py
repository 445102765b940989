"""A sync that cannot save its memory image (a full disk) reports it and leaves the
guest running, and the same run commits once there is space again."""

from __future__ import annotations

import asyncio

import pytest

from isrsync.errors import StorageFull
from isrsync.site import machine
from isrsync.demo.console import GuestConsole


async def test_a_sync_that_cannot_save_leaves_the_guest_running(api_parcel, monkeypatch) -> None:
    rt = api_parcel.runtime()
    await rt.resume()
    con = await asyncio.to_thread(GuestConsole, api_parcel.short / "ser")
    await asyncio.to_thread(con.wait_for, "GUEST: READY")

    real = machine.save_ram

    def full(*a, **k):
        raise StorageFull("no space left while writing a pack")

    monkeypatch.setattr(machine, "save_ram", full)
    with pytest.raises(StorageFull):
        await rt.sync()
    assert rt.qemu is not None and await rt.qemu.status() == "running"
    c1 = int((await asyncio.to_thread(con.command, "counter")).split()[-1])
    await asyncio.sleep(0.5)
    assert int((await asyncio.to_thread(con.command, "counter")).split()[-1]) > c1  # it runs on

    monkeypatch.setattr(machine, "save_ram", real)
    res = await rt.sync()  # space again: the same run commits
    assert res.version == 2 and await rt.qemu.status() == "running"
    con.close()
