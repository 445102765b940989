"""A parcel's run at this site, from resume to suspend: the long-running side of
``isrsync resume``, and the offline commit of ``isrsync sync``.

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
from typing import Any

from ..errors import UsageError
from .control import ControlServer, run_dir
from .parcel import Site, commit_version, load_version
from .runtime import Events, Runtime


async def sync_offline(site: Site, parcel: uuid.UUID) -> dict[str, Any]:
    """Commit a suspend that could not reach the server (no VM running)."""
    state = site.state(parcel)
    try:
        meta = state.get_meta()
        if meta.get("status") != "suspended-local":
            raise UsageError(f"parcel {parcel} has nothing to sync at this site")
        base = await load_version(site, parcel, int(meta["base"]), state)
        assert base.keyring is not None
        ring = base.keyring.copy()
        dirty = state.dirty()
        for i, r in dirty.items():
            if i < len(ring):
                ring[i] = r
        memory = state.load_memory()
        v = await commit_version(
            site, parcel, epoch=int(meta["epoch"]), parent=base, keyring=ring, dirty=list(dirty), memory=memory,
            trace=state.load_trace(), release=True,
            staged=[bytes.fromhex(x) for x in meta.get("staged", [])],
            staged_tags=[bytes.fromhex(x) for x in meta.get("staged_tags", [])],
        )
        state.clear_dirty()
        state.save_memory(None)
        state.set_meta(status="idle", base=v.version, staged=[], staged_tags=[])
        return {"version": v.version, "committed": True}
    finally:
        state.close()


async def run_parcel(
    site: Site,
    parcel: uuid.UUID,
    *,
    policy: str = "auto",
    version: int | None = None,
    display: str = "none",
    serial: Path | None = None,
    events: Events | None = None,
    lookaside: list | None = None,
    memory: str = "lazy",
) -> dict[str, Any]:
    """Resume a parcel and serve it until it is suspended or the guest powers off.

    Control requests (status, sync, suspend) arrive on the run's control
    socket; SIGINT and SIGTERM suspend too. Returns how the run ended.
    """
    say = events or (lambda kind, data: None)
    rundir = run_dir(site.site_id, parcel)
    rt = Runtime(site, parcel, policy=policy, display=display, serial=serial, rundir=rundir, events=say,
                 lookaside=lookaside, memory=memory)
    ended: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    busy = asyncio.Lock()  # one control operation at a time

    async def handle(req: dict[str, Any]) -> Any:
        cmd = req.get("cmd")
        if cmd == "status":
            return rt.status()
        async with busy:
            if ended.done():
                raise UsageError("the parcel is already suspended")
            if rt.guest_rebooted:  # it rebooted a moment ago: the run loop has not restarted it yet
                await rt.reboot()
            if cmd == "sync":
                return await rt.sync()
            if cmd == "suspend":
                try:
                    res = await rt.suspend(bool(req.get("keep_lock")))
                except BaseException as e:
                    if rt.qemu is None or not rt.qemu.alive:
                        # The guest is saved locally but the commit was refused
                        # (fenced): end the run with that error, keep the state.
                        ended.set_exception(e)
                        ended.exception()
                    raise
                ended.set_result({"how": "suspended", **res})
                return res
        raise UsageError(f"unknown control command {cmd!r}")

    ctl = ControlServer(rundir / "control.sock", handle)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        report = await rt.resume(version)
        await ctl.start()
        say("resumed", report.__dict__)
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
                    res = await rt.suspend()
                    ended.set_result({"how": "suspended", **res})
                elif not ended.done():
                    # The guest powered off (or QEMU died): keep its disk, no memory image.
                    code = rt.qemu.proc.returncode if rt.qemu and rt.qemu.proc else None
                    how = "powered-off" if code == 0 else "qemu-died"
                    if how == "qemu-died" and rt.qemu is not None:
                        say("error", {"message": f"QEMU exited with status {code}: {rt.qemu.log_tail(300)}"})
                    res = await rt.commit_after_poweroff()
                    ended.set_result({"how": how, "qemu_status": code, **res})
        stopper.cancel()
        return ended.result()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await ctl.close()
        await rt.close()

