"""`isrsync demo`: the complete ISR cycle on embedded defaults, no set-up needed.

An embedded home server on loopback (the real HTTP server, in process), a
user whose keys are sealed under a passphrase, a tiny Linux guest built on
the spot, and two sites (two cache directories). Site A creates the parcel
and resumes it (a cold boot); the guest writes a file and counts in memory;
site A suspends. Site B, starting from an empty cache, resumes it: the counter
continues (memory came along) and the file is there (disk came along). While B
runs, A is refused the lock. Every step is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager

import platformdirs
from aiohttp import web

from ..errors import LockHeld
from ..keys import KdfLimits
from ..server.app import make_app
from ..server.repo import Repository
from ..site import account
from ..site.cache import SiteCache
from ..site.create import init_parcel
from ..site.parcel import Site, open_site
from ..site.policy import Policy
from ..site.runtime import Runtime
from .console import GuestConsole
from .guest import build_guest, make_disk_image


class DemoUI:
    """How the demo reports progress; the CLI supplies a rich implementation."""

    def step(self, title: str) -> ContextManager[None]:
        raise NotImplementedError

    def note(self, text: str) -> None:
        raise NotImplementedError


@dataclass
class DemoReport:
    server: str = ""
    parcel: str = ""
    timings: list[tuple[str, float]] = field(default_factory=list)
    resume_b: dict[str, float] = field(default_factory=dict)
    facts: list[tuple[str, str]] = field(default_factory=list)
    counter_a: int = 0
    counter_b: int = 0
    file_at_b: str = ""
    refused: str = ""

    @property
    def memory_moved(self) -> bool:
        return 0 < self.counter_a <= self.counter_b

    @property
    def disk_moved(self) -> bool:
        return self.file_at_b == "GUEST: DATA written-at-site-a"


async def _embedded_server(data: Path) -> tuple[web.AppRunner, Repository, str]:
    repo = Repository(data, create=True)
    runner = web.AppRunner(make_app(repo), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, repo, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def run_demo(work: Path, ui: DemoUI, *, memory_mib: int = 256, guest_cache: Path | None = None) -> DemoReport:
    rep = DemoReport()
    # The demo's sites keep their config and unlocked keys inside the workdir.
    os.environ[account.ENV_CONFIG] = str(work / "config.json")
    os.environ[account.ENV_RUNTIME] = str(short_runtime(work))

    async def timed(title: str, coro):
        t0 = time.perf_counter()
        with ui.step(title):
            result = await coro
        rep.timings.append((title, time.perf_counter() - t0))
        return result

    with ui.step("building a tiny Linux guest (kernel + busybox), cached after the first run"):
        guest = await asyncio.to_thread(
            build_guest, guest_cache or Path(platformdirs.user_cache_dir("isrsync")) / "demo-guest"
        )
    runner, repo, url = await timed("starting the home server on loopback", _embedded_server(work / "home"))
    rep.server = url
    token = repo.add_user("demo")
    acct = account.Account(url, "demo", token)
    sites: list[Site] = []
    try:
        await timed("logging in (the key bundle is sealed under the passphrase)",
                    account.login(acct, "correct horse battery staple", limits=KdfLimits.MIN))
        site_a = await open_site(SiteCache(work / "site-a"), acct)
        sites.append(site_a)
        img = work / "disk.img"
        make_disk_image(img, 64, {"hello.txt": b"made at init"})
        pid, _ = await timed("site A: isrsync init (encode, upload, commit version 1)", init_parcel(
            site_a, "demo-vm", img, memory_mib=memory_mib, kernel=guest.kernel, initrd=guest.initrd,
            append=guest.cmdline))
        img.unlink()
        rep.parcel = str(pid)

        run_a = Runtime(site_a, pid, policy=Policy.AUTO, serial=work / "a.ser", rundir=short_runtime(work) / "a")
        rep_a = await timed("site A: isrsync resume (cold boot: no memory image yet)", run_a.resume())
        con = await asyncio.to_thread(GuestConsole, work / "a.ser")
        await timed("site A: the guest boots", asyncio.to_thread(con.wait_for, "GUEST: READY"))
        await asyncio.to_thread(con.command, "write note written-at-site-a")
        await asyncio.sleep(1.5)  # let the in-memory counter run
        rep.counter_a = int((await asyncio.to_thread(con.command, "counter")).split()[-1])
        con.close()
        res_a = await timed("site A: isrsync suspend (save memory, commit version 2)", run_a.suspend())
        await run_a.close()
        rep.facts += [
            ("guest", f"Linux {guest.kernel_version}, {memory_mib} MiB, {rep_a.accel.upper()}"),
            ("memory image", f"{res_a.memory_bytes / 2**20:.1f} MiB"),
            ("dirty disk chunks at suspend", str(res_a.dirty_chunks)),
        ]

        site_b = await open_site(SiteCache(work / "site-b"), acct)
        sites.append(site_b)
        run_b = Runtime(site_b, pid, policy=Policy.AUTO, serial=work / "b.ser", rundir=short_runtime(work) / "b")
        rep_b = await timed("site B: isrsync resume (empty cache, demand fetch)", run_b.resume())
        rep.resume_b = rep_b.seconds
        con = await asyncio.to_thread(GuestConsole, work / "b.ser")
        rep.counter_b = int((await asyncio.to_thread(con.command, "counter")).split()[-1])
        rep.file_at_b = await asyncio.to_thread(con.command, "read note")
        con.close()
        try:
            await site_a.store.acquire(pid, site_a.holder())
        except LockHeld as e:
            rep.refused = e.message
        st = run_b.status().source("server")
        assert st is not None
        rep.facts.append(("fetched by site B to resume", f"{st.bytes / 2**20:.1f} MiB in {st.hits} chunks"))
        if rep_b.memory == "lazy":
            mem = run_b.status().memory
            rep.facts.append(("guest memory at site B", f"lazy: the guest ran before its RAM was in; "
                                                        f"{mem['requests']} page faults served on demand"))
        await timed("site B: isrsync suspend (commit version 3)", run_b.suspend())
        await run_b.close()
    finally:
        for s in sites:
            with contextlib.suppress(Exception):
                await s.close()
        await runner.cleanup()
        repo.close()
    return rep


def short_runtime(work: Path) -> Path:
    """The demo's runtime directory for ``work``: short, because Unix socket paths
    must be; the workdir may be deep. The caller removes it when the demo ends."""
    d = Path("/tmp") / f"isrsync-demo-{uuid.uuid5(uuid.NAMESPACE_URL, str(work)).hex[:10]}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d
