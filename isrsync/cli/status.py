"""What this site has and runs: `isrsync ls` and `isrsync status`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import typer

from rich.table import Table

from ..errors import NotFound
from ..site.cache import CacheStats, open_cache
from ..site.control import ask_status, running
from ..site.results import RunStatus
from ..site.state import LocalStatus, LocalSummary, local_summaries
from .common import OptParcel, site_session
from .render import emit_json, human_bytes, out, sources_table
from .state import JsonOpt, state


def ls(json_out: JsonOpt = False) -> None:
    """List your parcels with their versions and lock holders."""

    async def go() -> list[Any]:
        async with site_session() as site:
            return await site.store.list_parcels()

    parcels = asyncio.run(go())
    if json_out:
        emit_json([{"parcel": str(p.parcel), "name": p.name, "version": p.version,
                    "holder": p.lock.holder.__dict__ if p.lock.holder else None, "epoch": p.lock.epoch}
                   for p in parcels])
        return
    if not parcels:
        out.print("no parcels yet; `isrsync init NAME --image DISK` makes one from a disk image")
        return
    t = Table("name", "version", "held by", "since", "id")
    for p in parcels:
        h = p.lock.holder
        held = "-" if h is None else f"medium {h.host} (carried)" if h.medium else f"{h.host} ({h.site[:8]})"
        t.add_row(p.name, str(p.version), held,
                  time.strftime("%Y-%m-%d %H:%M", time.localtime(h.since)) if h else "-", str(p.parcel))
    out.print(t)


def status(parcel: OptParcel = None, json_out: JsonOpt = False) -> None:
    """What runs here: dirty and trickled chunks, and which source served what.

    Needs no login: it reads this site's cache and asks its running parcels.
    """

    async def go() -> tuple[CacheStats, list[RunStatus], list[LocalSummary]]:
        with open_cache(state.cache_dir) as cache:
            runs = []
            for _, sock in running(cache.site_id):
                with contextlib.suppress(NotFound):
                    runs.append(await ask_status(sock))
            local = await asyncio.to_thread(local_summaries, cache.path)
            return await asyncio.to_thread(cache.stats), runs, local

    cache, runs, local = asyncio.run(go())
    live = {r.parcel for r in runs}
    kept = [s for s in local if s.parcel not in live]
    if parcel is not None:
        runs = [r for r in runs if parcel in (r.parcel, r.name)]
        kept = [s for s in kept if parcel in (s.parcel, s.name)]
    if json_out:
        emit_json({"cache": dataclasses.asdict(cache), "running": [r.to_json() for r in runs],
                   "local": [{**s.to_json(), "next": _next_step(s)} for s in kept]})
        return
    out.print(f"cache {cache.path}: {cache.chunks} chunks, {human_bytes(cache.chunk_bytes)}")
    for s in kept:
        out.print(f"parcel {s.name or s.parcel}: {_local_line(s)}; next: {_next_step(s)}", markup=False)
    if not runs:
        out.print(f"parcel {parcel} is not running here" if parcel else "no parcel is running here")
        if not kept:
            out.print("`isrsync ls` lists your parcels; `isrsync resume PARCEL` runs one here")
    for r in runs:
        out.print(f"parcel {r.name or r.parcel} (base version {r.base}, policy {r.policy}): {r.dirty_chunks} dirty,"
                  f" {r.trickled_chunks} trickled, residue {r.residue_chunks}")
        mem = r.memory
        if mem.get("mode") == "lazy":
            left = "all in" if mem.get("completed_seconds") is not None else "still coming in"
            out.print(f"guest memory restored lazily, {left}: {mem['hot_chunks']} chunks in place at the start, "
                      f"{mem['requests']} page faults served (median {mem['fault_ms_median'] or 0:.2f} ms, "
                      f"p99 {mem.get('fault_ms_p99') or 0:.2f} ms, max {mem.get('fault_ms_max') or 0:.2f} ms), "
                      f"{mem['pushed_chunks']} chunks pushed")
        if r.damaged_from_server:
            packs = ", ".join(p[:16] for p in r.damaged_packs) or "unknown packs"
            out.print(f"[bold red]the home server answered with damaged data for {r.damaged_from_server} chunk(s)"
                      f"[/] (pack(s) {packs}): run `isrsync server check` on the server")
        out.print(sources_table(r.sources))


def _local_line(s: LocalSummary) -> str:
    changed = f"{s.dirty_chunks} changed chunk{'s' if s.dirty_chunks != 1 else ''} on top of version {s.base}"
    if s.status is LocalStatus.RUNNING:
        return f"its run ended without a suspend (killed or crashed); {changed} kept, its memory is lost"
    if s.status is LocalStatus.SUSPENDED_LOCAL:
        return f"suspended here but not committed (the server was unreachable); {changed} and its memory image kept"
    if s.status is LocalStatus.HELD:
        return f"committed as version {s.base}, the lock kept at this site"
    return f"fenced: the lock was broken or taken elsewhere; {changed} kept here, never merged"


def _next_step(s: LocalSummary) -> str:
    name = s.name or s.parcel
    if s.status in (LocalStatus.RUNNING, LocalStatus.SUSPENDED_LOCAL):
        return f"`isrsync sync {name}` commits it, or `isrsync resume {name}` goes on with it"
    if s.status is LocalStatus.HELD:
        return f"`isrsync resume {name}` goes on here"
    return f"`isrsync fork {name} NEW-NAME` makes them a parcel of their own; `isrsync discard {name}` drops them"


def register(app: typer.Typer) -> None:
    app.command("ls")(ls)
    app.command("status")(status)
