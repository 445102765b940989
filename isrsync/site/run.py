"""A parcel's run at this site, from resume to suspend: the long-running side of
``isrsync resume``.

:func:`run_parcel` resumes a :class:`~isrsync.site.runtime.Runtime` and serves
it: control requests (status, sync, suspend) on the run's control socket,
SIGINT and SIGTERM as a suspend, a guest reboot as a fresh QEMU on the same
disk, a guest power-off (or a QEMU that died) as a commit of its disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from ..errors import IsrError, UsageError
from ..longlived import settle
from . import media
from .control import (
    READ_ONLY,
    AddSource,
    ControlServer,
    ListSources,
    Progress,
    Screendump,
    Request,
    StatusRequest,
    SuspendRequest,
    SyncRequest,
    WithdrawSource,
    CONSOLE_SOCK,
    QEMU_SERIAL,
    claim_run_dir,
)
from .parcel import Site
from .policy import Display, MemoryMode, Policy
from .results import SuspendResult
from .console import ConsoleHub
from .runtime import Events, Runtime
from .tomedium import StreamProgress
from .sources import Source
from ..swarm.join import enabled as swarm_enabled


async def run_parcel(
    site: Site,
    parcel: uuid.UUID,
    *,
    policy: Policy = Policy.AUTO,
    version: int | None = None,
    display: Display = Display.NONE,
    serial: Path | None = None,
    events: Events | None = None,
    lookaside: Sequence[Source] = (),
    memory: MemoryMode = MemoryMode.LAZY,
    watch_media: bool = True,
    progress: StreamProgress | None = None,
) -> dict[str, Any]:
    """Resume a parcel and serve it until it is suspended or the guest powers off.

    Control requests (status, sync, suspend) arrive on the run's control
    socket; SIGINT and SIGTERM suspend too. Returns how the run ended. The
    run's directory (control socket, QEMU's sockets and log) is this run's
    alone and goes with it; one a killed run left is swept at the next start.
    """
    with claim_run_dir(site.site_id, parcel) as rundir:
        # QEMU's serial socket takes one client: the hub is it, and serves everyone else.
        hub = ConsoleHub(rundir / QEMU_SERIAL, [rundir / CONSOLE_SOCK, *([serial] if serial is not None else [])])
        try:
            await hub.start()
        except OSError as e:
            where = e.filename or serial
            raise UsageError(f"cannot make the console socket {where}: {e.strerror or e}",
                             hint="a socket's path must be short (107 bytes) and in a directory you can write; "
                             "the run's own sockets live under ISRSYNC_RUNTIME") from None
        try:
            return await _serve(site, parcel, rundir, policy=policy, version=version, display=display,
                                serial=rundir / QEMU_SERIAL, events=events, lookaside=lookaside, memory=memory,
                                watch_media=watch_media, progress=progress)
        finally:
            await hub.close()


async def _serve(site: Site, parcel: uuid.UUID, rundir: Path, *, policy: Policy, version: int | None,
                 display: Display, serial: Path | None, events: Events | None, lookaside: Sequence[Source],
                 memory: MemoryMode, watch_media: bool, progress: StreamProgress | None) -> dict[str, Any]:
    say = events or (lambda kind, data: None)
    rt = Runtime(site, parcel, policy=policy, display=display, serial=serial, rundir=rundir, events=say,
                 lookaside=lookaside, memory=memory, progress=progress)
    ended: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    busy = asyncio.Lock()  # one control operation at a time

    async def handle(req: Request, progress: Progress) -> Any:
        if isinstance(req, StatusRequest):
            return rt.status()
        if isinstance(req, ListSources):
            return rt.sources()
        if isinstance(req, AddSource):
            info = await rt.add_source(req.path)
            say("source", {"message": f"lookaside source {info.name} added", "name": info.name})
            return info
        if isinstance(req, WithdrawSource):
            await rt.withdraw_source(req.name)
            say("source", {"message": f"lookaside source {req.name} withdrawn", "name": req.name})
            return {"withdrawn": req.name}
        if isinstance(req, Screendump):
            qemu = rt.qemu
            if qemu is None or not qemu.alive:
                raise UsageError("the guest is not running now (starting, rebooting or suspended)")
            # QEMU writes the file itself (same user as us); PNG rather than its default PPM.
            await qemu.cmd("screendump", {"filename": req.path, "format": "png"})
            return {"path": req.path}
        assert not isinstance(req, READ_ONLY)
        async with busy:
            if ended.done():
                raise UsageError("the parcel is already suspended")
            if rt.guest_rebooted:  # it rebooted a moment ago: the run loop has not restarted it yet
                await rt.reboot()
            if isinstance(req, SyncRequest):
                return await rt.sync(progress)
            if isinstance(req, SuspendRequest):
                sink = await asyncio.to_thread(media.plugin().open_sink, Path(req.to_medium)) \
                    if req.to_medium else None
                try:
                    res = await rt.suspend(req.keep_lock, medium=sink, full=req.full, carry_lock=req.carry_lock,
                                           progress=progress)
                except BaseException as e:
                    if rt.qemu is None or not rt.qemu.alive:
                        # The guest is saved locally but the commit was refused
                        # (fenced): end the run with that error, keep the state.
                        ended.set_exception(e)
                        ended.exception()
                    raise
                ended.set_result({"how": "suspended", **res.to_json()})
                return res
        raise UsageError(f"unknown control request {type(req).__name__}")

    ctl = ControlServer(rundir / "control.sock", handle)
    feeders = contextlib.AsyncExitStack()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        if watch_media and rt.policy.uses_lookaside and media.available():
            # Before the resume: a key already plugged in helps restore memory.
            await feeders.enter_async_context(_media_feeder(rt, site, say))
        if rt.policy.uses_lookaside and swarm_enabled():
            # LAN peers (mDNS + BitTorrent) join like media do; off by --no-swarm or on failure.
            from ..swarm.feed import swarm_feeder  # libtorrent and zeroconf load only here

            await feeders.enter_async_context(swarm_feeder(rt, parcel, say))
        settle()  # no guest yet: a full collection here pauses nobody
        report = await rt.resume(version)
        # The guest runs: what the resume built (sources, indexes, QEMU's link) is kept
        # out of later collections without one more full pass now.
        settle(collect=False)
        await ctl.start()
        say("resumed", report.to_json())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopper = asyncio.create_task(stop.wait())
        while True:
            q = rt.qemu
            guest = asyncio.create_task(rt.wait_guest())
            await asyncio.wait([guest, stopper, ended], return_when=asyncio.FIRST_COMPLETED)
            if ended.done() or stop.is_set() or not guest.done():
                break
            async with busy:
                if rt.qemu is q and rt.guest_rebooted:
                    await rt.reboot()
                elif rt.qemu is q:
                    break  # powered off, or QEMU died
                # else a control request found it rebooted and started it again
            say("rebooted", {"message": "the guest rebooted; it boots again on the same disk"})
        if not ended.done():
            async with busy:
                if not ended.done() and stop.is_set() and rt.qemu is not None and rt.qemu.alive:
                    res: SuspendResult = await rt.suspend()
                    ended.set_result({"how": "suspended", **res.to_json()})
                elif not ended.done():
                    # The guest powered off (or QEMU died): keep its disk, no memory image.
                    code = rt.qemu.proc.returncode if rt.qemu and rt.qemu.proc else None
                    how = "powered-off" if code == 0 else "qemu-died"
                    if how == "qemu-died" and rt.qemu is not None:
                        say("error", {"message": f"QEMU exited with status {code}: {rt.qemu.log_tail(300)}"})
                    off = await rt.commit_after_poweroff()
                    ended.set_result({"how": how, "qemu_status": code, **off.to_json()})
        stopper.cancel()
        return ended.result()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await feeders.aclose()
        await ctl.close()
        await rt.close()



@contextlib.asynccontextmanager
async def _media_feeder(rt: Runtime, site: Site, say: Events) -> AsyncIterator[None]:
    """Media plugged in while the guest runs become lookaside sources; pulled, they are withdrawn.

    The feeder only adds and withdraws; every chunk a medium answers is still
    checked by the registry. A site where udev cannot be watched runs on
    without it, saying so once.
    """
    added: dict[Path, str] = {}

    async def appeared(path: Path) -> None:
        try:
            # Indexing a stale medium reads it: off the loop that serves the guest.
            src = await asyncio.to_thread(media.open_lookaside, path, site.cache.path)
        except (IsrError, OSError) as e:
            say("warning", {"message": f"the medium at {path} cannot help: {e}"})
            return
        rt.offer(src)
        added[path] = src.name
        say("source", {"message": f"medium {src.name} plugged in: a lookaside source now", "name": src.name})

    async def gone(path: Path) -> None:
        name = added.pop(path, None)
        if name is not None:
            with contextlib.suppress(IsrError):
                await rt.withdraw_source(name)
            say("source", {"message": f"medium {name} went away: withdrawn", "name": name})

    try:
        watching = media.plugin().watch(appeared, gone)
        await watching.__aenter__()
    except (IsrError, OSError, ImportError) as e:
        say("warning", {"message": f"plugged-in media are not noticed here: {e}"})
        yield
        return
    try:
        yield
    finally:
        await watching.__aexit__(None, None, None)
