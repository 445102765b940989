"""Parcel commands that move a parcel: init, resume, suspend, sync, hoard, discard, fork, rollback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Optional

import typer
from rich.table import Table

from ..errors import NotFound, UsageError
from ..site import carry
from ..site.cache import open_cache
from ..site.media import open_lookaside, open_seeds, pick_medium
from ..site.control import ask_suspend, ask_sync, running
from ..site.fork import ForkResult, fork_parcel
from ..site.create import init_parcel
from ..site.parcel import DiscardResult, Site, discard, hoard, rollback
from ..site.policy import Display, MemoryMode, Policy
from ..site.results import SuspendResult, SyncResult
from ..site.run import run_parcel
from ..site.session import commit_offline_suspend
from ..site.sources import Source
from ..site.view import choose_display
from .account import ask_passphrase
from .bars import ResumeBars, transfer_progress
from .common import OptParcel, ParcelArg, YesOpt, resolve_parcel, site_session
from .render import emit_json, err, human_bytes, out, resume_rows, sources_table
from .state import JsonOpt, state

# -- parcels -----------------------------------------------------------------------------


def init(
    name: ParcelArg,
    image: Annotated[Path, typer.Option("--image", exists=True, dir_okay=False, help="Disk image, raw or qcow2.")],
    memory: Annotated[int, typer.Option("--memory", min=16, help="Guest memory in MiB.")] = 256,
    cpus: Annotated[int, typer.Option("--cpus", min=1, help="Guest CPUs.")] = 1,
    machine: Annotated[str, typer.Option("--machine", help="QEMU machine type.")] = "q35",
    kernel: Annotated[Optional[Path], typer.Option("--kernel", exists=True, help="Boot this kernel (kept inside the parcel).")] = None,
    initrd: Annotated[Optional[Path], typer.Option("--initrd", exists=True, help="Initial ramdisk for --kernel.")] = None,
    append: Annotated[Optional[str], typer.Option("--append", help="Kernel command line for --kernel.")] = None,
    free_page_reporting: Annotated[bool, typer.Option(
        "--free-page-reporting/--no-free-page-reporting",
        help="Give the guest a virtio-balloon that reports its free memory, so that memory is never saved "
        "or sent (the guest needs the virtio_balloon driver).")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Create a parcel from a disk image: encode, upload, commit version 1."""

    async def go() -> tuple[uuid.UUID, Any]:
        async with site_session() as site:
            with transfer_progress(json_out) as prog:
                enc = prog.add_task("encoding", total=None)
                up = prog.add_task("uploading", total=None, visible=False)
                return await init_parcel(
                    site, name, image, memory_mib=memory, cpus=cpus, machine=machine, kernel=kernel,
                    initrd=initrd, append=append, free_page_reporting=free_page_reporting,
                    encode_progress=lambda d, t: prog.update(enc, completed=d, total=t),
                    upload_progress=lambda d, t: prog.update(up, completed=d, total=t, visible=True),
                )

    pid, v = asyncio.run(go())
    if json_out:
        emit_json({"parcel": str(pid), "name": name, "version": v.version, "uploaded": v.new_pack_bytes})
    else:
        out.print(f"parcel {name} ({pid}) created at version {v.version}; uploaded {human_bytes(v.new_pack_bytes)}")


LookasideOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--lookaside", metavar="DIR", help="A medium (USB key, any tree with .isrsync/) or another "
                 "site's cache directory to read chunks from before the server (read-only, every chunk verified); "
                 "repeatable. Used by the lookaside and auto policies."),
]


async def _lookaside(dirs: list[Path] | None, site: Site) -> list[Source]:
    # Opening a medium may index it (reads the whole key once): off the loop.
    named = [await asyncio.to_thread(open_lookaside, d, site.cache.path) for d in dirs or []]
    return named + await asyncio.to_thread(open_seeds, site.cache.path, site.secret())


def resume(
    parcel: ParcelArg,
    policy: Annotated[Policy, typer.Option("--policy", help="Transfer policy (paper section 6).")] = Policy.AUTO,
    version: Annotated[Optional[int], typer.Option("--version", min=1, help="Resume this version (default: latest).")] = None,
    display: Annotated[Display, typer.Option("--display", help="Show the guest's screen this way; auto: a window "
                                             "when $DISPLAY is set, else none (`isrsync view` shows it later).")] = Display.AUTO,
    serial: Annotated[Optional[Path], typer.Option("--serial", help="Expose the guest's serial console on this unix socket.")] = None,
    memory: Annotated[MemoryMode, typer.Option("--memory", help="Restore guest RAM lazily (the guest runs at once, RAM "
                                               "follows as it is touched) or eagerly (all of it first).")] = MemoryMode.LAZY,
    lookaside: LookasideOpt = None,
    from_usb: Annotated[Optional[str], typer.Option(
        "--from-usb", metavar="PATH|auto", help="Take the parcel off a medium that carries its lock (`suspend "
        "--to-usb --carry-lock`): works with no network; the next `sync` commits.")] = None,
    watch_media: Annotated[bool, typer.Option("--watch-media/--no-watch-media", envvar="ISRSYNC_WATCH_MEDIA",
                                              help="Offer media plugged in while the guest runs as lookaside "
                                              "sources (udev). ISRSYNC_WATCH_MEDIA=off sets the default.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Resume a parcel here and run it until `isrsync suspend` (or Ctrl-C, which suspends)."""
    if lookaside and not policy.uses_lookaside:
        raise UsageError(f"the {policy.value} policy asks no lookaside source",
                         hint="drop --lookaside, or use --policy lookaside or auto")

    display, why = choose_display(display, os.environ)
    if why is not None:
        err.print(why, markup=False)
    bars = ResumeBars(json_out)

    def events(kind: str, data: dict[str, Any]) -> None:
        if kind == "resumed":
            bars.resumed()
        if json_out:
            print(json.dumps({"event": kind, **data}, default=str), flush=True)
        elif kind == "resumed":
            _render_resume(data)
        else:
            # One event, one line: a warning wrapped at the terminal's width reads as
            # several, and its paths and names are text, never rich markup.
            err.print(f"{kind}: {data.get('message', data)}", markup=False, soft_wrap=True)
        if kind == "resumed":
            bars.guest_running()

    if from_usb is not None and not policy.uses_lookaside:
        raise UsageError(f"the {policy.value} policy reads no medium", hint="use --policy lookaside or auto")

    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[tuple[Site, uuid.UUID, list[Source]]]:
        if from_usb is None:
            async with site_session() as site:
                yield site, await resolve_parcel(site, parcel), []
            return
        carried = await carry.take(from_usb, parcel, open_cache(state.cache_dir), ask_passphrase)
        try:
            yield carried.site, carried.parcel, [carried.source]
        finally:
            await carried.site.close()

    async def go() -> dict[str, Any]:
        async with opened() as (site, pid, carried):
            sources = carried + await _lookaside(lookaside, site)
            if not _is_uuid(parcel):
                st = site.state(pid)
                st.set_name(parcel)
                st.close()
            return await run_parcel(site, pid, policy=policy, version=version, display=display,
                                    serial=serial, events=events, memory=memory, lookaside=sources,
                                    watch_media=watch_media, progress=bars.update)

    try:
        res = asyncio.run(go())
    finally:
        bars.stop()
    if json_out:
        print(json.dumps({"event": "ended", **res}, default=str), flush=True)
    else:
        _render_end(res)


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
        return True
    except ValueError:
        return False


def _render_resume(data: dict[str, Any]) -> None:
    what = (f"this site's local changes on top of version {data['version']}" if data.get("local_changes")
            else f"version {data['version']}")
    out.print(f"resumed {what} ({data['policy']} policy, {data['accel']})", markup=False)
    t = Table("step", "seconds")
    for row in resume_rows(data["seconds"]):
        t.add_row(*row)
    out.print(t)
    out.print({"none": "cold boot (no memory image)", "eager": "memory image restored",
               "lazy": "device state restored; the guest runs while the rest of its RAM comes in"}
              .get(data.get("memory", "eager"), "memory image restored"))
    out.print("running; `isrsync suspend` (or Ctrl-C) suspends it")


def _render_end(res: dict[str, Any]) -> None:
    if res.get("committed"):
        out.print(f"{res['how']}: committed version {res['version']}")
    else:
        out.print(f"{res['how']} locally: {res.get('reason', '')}; the lock is still yours, "
                  "run `isrsync sync` when the server is reachable")


async def _control(site: Site, ref: str | None) -> Path:
    runs = running(site.site_id)
    if ref is None:
        if len(runs) == 1:
            return runs[0][1]
        if not runs:
            raise NotFound("no parcel is running at this site")
        raise UsageError("several parcels run here", hint="name the one you mean")
    pid = await resolve_parcel(site, ref)
    for prefix, sock in runs:
        if str(pid).startswith(prefix):
            return sock
    raise NotFound(f"parcel {ref} is not running at this site")


def suspend(
    parcel: OptParcel = None,
    keep_lock: Annotated[bool, typer.Option("--keep-lock", help="Commit but keep this site's ownership.")] = False,
    to_usb: Annotated[Optional[str], typer.Option(
        "--to-usb", metavar="PATH|auto", help="Also copy the memory image, the changed chunks and the new version's "
        "manifests to this medium (`auto`: the one mounted medium), while the upload runs.")] = None,
    full: Annotated[bool, typer.Option("--full", help="With --to-usb: the whole parcel, so a site with no "
                                       "network and an empty cache can resume from the medium.")] = False,
    carry_lock: Annotated[bool, typer.Option("--carry-lock", help="With --to-usb: hand the lock to the medium "
                                             "instead of releasing it; `isrsync resume --from-usb` takes it, "
                                             "even with no network.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Suspend a running parcel: save memory and disk, commit, release the lock."""
    if (full or carry_lock) and to_usb is None:
        raise UsageError(f"{'--full' if full else '--carry-lock'} needs --to-usb", hint="add --to-usb PATH (or auto)")
    if carry_lock and keep_lock:
        raise UsageError("--carry-lock and --keep-lock contradict each other", hint="choose where the lock goes")
    medium = str(pick_medium(to_usb)) if to_usb is not None else ""

    async def go() -> SuspendResult:
        async with site_session() as site:
            sock = await _control(site, parcel)
            with transfer_progress(json_out) as prog:
                names = {"upload": "uploading", "medium": "to the medium"}
                tasks: dict[str, Any] = {}

                def step(stream: str, done: int, total: int | None) -> None:
                    if stream not in tasks:
                        tasks[stream] = prog.add_task(names.get(stream, stream), total=total)
                    prog.update(tasks[stream], completed=done, total=total)

                return await ask_suspend(sock, keep_lock, to_medium=medium, full=full, carry_lock=carry_lock,
                                         on_progress=step)

    res = asyncio.run(go())
    if json_out:
        emit_json(res)
        return
    if res.committed:
        out.print(f"suspended: version {res.version} committed ({human_bytes(res.memory_bytes)} of memory,"
                  f" {res.memory_new_chunks} RAM chunks new, {res.memory_kept_chunks} unchanged;"
                  f" {res.dirty_chunks} dirty disk chunks) in {res.seconds or 0:.2f} s")
    else:
        out.print(f"suspended locally ({res.reason}); the lock is still yours: "
                  "run `isrsync sync` when the server is reachable")
    m = res.medium
    if m is not None and m.published:
        out.print(f"copied to {m.medium}: {m.chunks} chunks, {human_bytes(m.bytes)} in {m.seconds:.2f} s; "
                  "the medium is safe to unplug")
        if m.carries_lock:
            out.print("the medium carries the lock: resume from it with `isrsync resume --from-usb`")
    elif m is not None:
        err.print(f"the copy to {m.medium} was dropped ({m.problem}); the medium holds what it held before "
                  "and is safe to unplug")


def sync(parcel: OptParcel = None, json_out: JsonOpt = False) -> None:
    """Commit now: a running parcel pauses briefly; a locally suspended one is committed."""

    async def go() -> SyncResult:
        async with site_session() as site:
            with transfer_progress(json_out) as prog:
                up = prog.add_task("uploading", total=None, visible=False)

                def step(done: int, total: int | None) -> None:
                    prog.update(up, completed=done, total=total, visible=True)

                try:
                    sock = await _control(site, parcel)
                except NotFound:
                    if parcel is None:
                        raise
                    return SyncResult(await commit_offline_suspend(site, await resolve_parcel(site, parcel), step))
                return await ask_sync(sock, lambda stream, done, total: step(done, total))

    res = asyncio.run(go())
    if json_out:
        emit_json(res)
    else:
        out.print(f"committed version {res.version}")


def hoard_cmd(
    parcel: ParcelArg,
    follow: Annotated[bool, typer.Option("--follow", help="Keep hoarding new versions as they are committed.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=1.0, help="Seconds between checks with --follow.")] = 30.0,
    lookaside: LookasideOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fetch every chunk of the latest version into this site's cache (lookaside sources first)."""

    async def go() -> None:
        async with site_session() as site:
            pid = await resolve_parcel(site, parcel)
            last = -1
            while True:
                info = await site.store.parcel(pid)
                if info.version != last:
                    with transfer_progress(json_out) as prog:
                        task = prog.add_task(f"hoarding version {info.version}", total=None)
                        res = await hoard(site, pid, info.version,
                                          lambda d, t: prog.update(task, completed=d, total=t),
                                          lookaside=await _lookaside(lookaside, site))
                    if json_out:
                        print(json.dumps(res.to_json()), flush=True)
                    else:
                        out.print(f"version {res.version}: fetched {res.fetched} of {res.chunks} chunks; all cached")
                        if res.sources:
                            out.print(sources_table(res.sources))
                    last = info.version
                if not follow:
                    return
                await asyncio.sleep(interval)

    asyncio.run(go())


def discard_cmd(parcel: ParcelArg, yes: YesOpt = False, json_out: JsonOpt = False) -> None:
    """Drop this site's uncommitted changes to a parcel and release its lock."""
    if not yes:
        typer.confirm(f"drop the uncommitted changes to {parcel} at this site?", abort=True, err=True)

    async def go() -> DiscardResult:
        async with site_session() as site:
            return await discard(site, await resolve_parcel(site, parcel))

    res = asyncio.run(go())
    if json_out:
        emit_json(res)
    else:
        out.print(f"dropped {res.dirty_chunks_dropped} dirty chunk(s)" + ("; lock released" if res.released_lock else ""))


def fork_cmd(
    parcel: ParcelArg,
    name: Annotated[str, typer.Argument(help="Name of the new parcel.")],
    json_out: JsonOpt = False,
) -> None:
    """Make this site's uncommitted (for example fenced) changes to a parcel a new parcel of their own.

    Its version 1 is the disk as this site has it, and the memory image saved
    with it, if any. The original parcel and this site's local state of it
    stay as they are (`isrsync discard` drops the latter).
    """

    async def go() -> ForkResult:
        async with site_session() as site:
            pid = await resolve_parcel(site, parcel)
            with transfer_progress(json_out) as prog:
                fetch = prog.add_task("fetching what this site lacks", total=None)
                up = prog.add_task("uploading the new parcel", total=None, visible=False)
                return await fork_parcel(
                    site, pid, name,
                    fetch_progress=lambda d, t: prog.update(fetch, completed=d, total=t),
                    upload_progress=lambda d, t: prog.update(up, completed=d, total=t, visible=True))

    res = asyncio.run(go())
    if json_out:
        emit_json(res.to_json())
    else:
        what = f"{res.dirty_chunks} changed chunk(s) on version {res.base}" + \
            (" and its memory image" if res.memory_image else "")
        out.print(f"parcel {res.name} ({res.parcel}) created at version {res.version} from {what}; "
                  f"uploaded {human_bytes(res.uploaded)}. `isrsync discard {parcel}` drops the old copy here",
                  markup=False)


def rollback_cmd(parcel: ParcelArg, version: Annotated[int, typer.Argument(min=1, help="Version to return to.")],
                 json_out: JsonOpt = False) -> None:
    """Commit a new version equal to an older one (history is kept)."""

    async def go() -> Any:
        async with site_session() as site:
            return await rollback(site, await resolve_parcel(site, parcel), version)

    v = asyncio.run(go())
    if json_out:
        emit_json({"version": v.version, "equal_to": version})
    else:
        out.print(f"version {v.version} committed, equal to version {version}")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("resume")(resume)
    app.command("suspend")(suspend)
    app.command("sync")(sync)
    app.command("hoard")(hoard_cmd)
    app.command("discard")(discard_cmd)
    app.command("fork")(fork_cmd)
    app.command("rollback")(rollback_cmd)

