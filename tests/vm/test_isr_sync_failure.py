"""A sync that cannot save its memory image (a full disk) reports it and leaves the
guest running, and the same run commits once there is space again."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

# CPython 3.11.7 leaves its C recursion counter raised after this test's failing
# sync (an interpreter bug: Python code cannot touch that counter), and the next
# module pytest rewrites on import fails with "AST constructor recursion depth
# mismatch". Hypothesis's plugin imports it at the end of a session that has not
# yet: import it here, before the test, so a run of this file alone ends cleanly.
import hypothesis  # noqa: F401
import pytest

from isrsync.keys import KdfLimits
from isrsync.site import account
from isrsync.site.cache import SiteCache
from isrsync.site.parcel import init_parcel, open_site
from isrsync.site.runtime import Runtime
from isrsync.vm.console import GuestConsole
from isrsync.vm.guest import make_disk_image


async def test_a_sync_that_cannot_save_leaves_the_guest_running(guest, live_server, tmp_path: Path,
                                                                monkeypatch) -> None:
    from isrsync.errors import StorageFull
    from isrsync.site import runtime

    short = Path(f"/tmp/isr-sy-{os.getpid()}")
    short.mkdir(exist_ok=True)
    monkeypatch.setenv(account.ENV_CONFIG, str(tmp_path / "config.json"))
    monkeypatch.setenv(account.ENV_RUNTIME, str(short))
    acct = account.Account(live_server.url, "bob", live_server.add_user("bob"))
    await account.login(acct, "pw", limits=KdfLimits.MIN)
    site = await open_site(SiteCache(tmp_path / "b"), acct)
    rt = None
    try:
        img = tmp_path / "disk.img"
        make_disk_image(img, 64)
        pid, _ = await init_parcel(site, "vm", img, kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline)
        rt = Runtime(site, pid, serial=short / "ser", rundir=short / "run")
        await rt.resume()
        con = await asyncio.to_thread(GuestConsole, short / "ser")
        await asyncio.to_thread(con.wait_for, "GUEST: READY")

        real = runtime.save_ram

        def full(*a, **k):
            raise StorageFull("no space left while writing a pack")

        monkeypatch.setattr(runtime, "save_ram", full)
        with pytest.raises(StorageFull):
            await rt.sync()
        assert rt.qemu is not None and await rt.qemu.status() == "running"
        c1 = int((await asyncio.to_thread(con.command, "counter")).split()[-1])
        await asyncio.sleep(0.5)
        assert int((await asyncio.to_thread(con.command, "counter")).split()[-1]) > c1  # it runs on

        monkeypatch.setattr(runtime, "save_ram", real)
        res = await rt.sync()  # space again: the same run commits
        assert res["version"] == 2 and await rt.qemu.status() == "running"
        con.close()
    finally:
        if rt is not None:
            await rt.close()
        await site.close()
        subprocess.run(["rm", "-rf", str(short)], check=False)
