"""`isrsync peers`: the LAN sites (jukeboxes, running resumes) that mDNS finds near this one."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import UsageError
from ..site.cache import default_cache_dir
from ..swarm.discovery import Browser, Peer, browse_once, check_interfaces, lan, local_parcels
from .render import emit_json, human_bytes, out
from .state import JsonOpt, state

WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to listen before answering.", min=0.0, max=60.0)]
InterfaceOpt = Annotated[
    Optional[list[str]],
    typer.Option("--interface", help="IPv4 address of an interface to use (repeatable; default: all)."),
]
WatchOpt = Annotated[bool, typer.Option("--watch", help="Keep the table on screen and update it live (Ctrl-C ends).")]


def peers_cmd(wait: WaitOpt = 3.0, interface: InterfaceOpt = None, watch: WatchOpt = False,
              json_out: JsonOpt = False) -> None:
    """List the isrsync sites on this LAN (found by mDNS, checked alive by a TCP probe)."""
    if watch and json_out:
        raise UsageError("--watch and --json do not go together", hint="use --json alone for scripts")
    ifaces = check_interfaces(interface)
    parcels = local_parcels(default_cache_dir(state.cache_dir))
    if watch:
        try:
            asyncio.run(_watch(ifaces, parcels))
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends
        return
    rows = asyncio.run(browse_once(wait=wait, interfaces=ifaces, parcels=parcels))
    if json_out:
        emit_json([p.to_json() for p in rows])
        return
    if not rows:
        out.print(f"no isrsync sites found on this LAN within {wait:g} s "
                  "(a site announces while it runs a parcel, hoards or runs `isrsync jukebox`)", soft_wrap=True)
        return
    out.print(peers_table(rows))


async def _watch(interfaces: list[str] | None, parcels: list[uuid.UUID]) -> None:
    async with lan(interfaces) as zc, Browser(zc, parcels=parcels) as b:
        with Live(peers_table(b.peers()), console=out, refresh_per_second=4) as live:
            while True:
                # Redraw every second anyway: "last seen" and the RTT move without events.
                await asyncio.sleep(1.0)
                live.update(peers_table(b.peers()))


def peers_table(rows: list[Peer]) -> Table:
    t = Table("name", "address", "port", "cached", "parcels in common", "last seen", "rtt ms",
              title=f"isrsync sites on this LAN: {len(rows)}")
    now = time.time()
    for p in rows:
        t.add_row(escape(p.name), p.address, str(p.port), human_bytes(p.cached_bytes), str(p.parcels_in_common),
                  f"{max(0.0, now - p.last_seen):.0f} s ago", "-" if p.rtt_ms is None else f"{p.rtt_ms:.2f}")
    return t
