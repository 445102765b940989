"""`isrsync lock status|break`: who holds a parcel, and fencing a lost site off."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer

from ..errors import UsageError
from .common import ParcelArg, YesOpt, resolve_parcel, site_session
from .render import emit_json, err, out
from .state import JsonOpt

lock_app = typer.Typer(help="Inspect and break parcel locks.", no_args_is_help=True)


@lock_app.command("break")
def lock_break(
    parcel: ParcelArg,
    reason: Annotated[str, typer.Option("--reason", help="Recorded in the server's audit log.")] = "",
    yes: YesOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Break a parcel's lock held by a lost or stolen site.

    The old site is fenced off: its later commits are refused and whatever it
    did not commit stays there, never merged.
    """

    async def go() -> Any:
        async with site_session() as site:
            pid = await resolve_parcel(site, parcel)
            lock = await site.store.lock_status(pid)
            if lock.holder is None:
                raise UsageError(f"parcel {parcel} is not locked")
            if not yes:
                who = "that medium's copies" if lock.holder.medium else "that site"
                err.print(f"parcel {parcel} is held by {lock.holder.describe()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(lock.holder.since))}. Breaking the lock "
                          f"fences {who} off: anything not committed stays there and is never merged.")
                if not typer.confirm("break the lock?", err=True):
                    raise typer.Abort()
            return await site.store.break_lock(pid, reason or f"broken from {site.host}")

    lock = asyncio.run(go())
    if json_out:
        emit_json({"parcel": str(lock.parcel), "epoch": lock.epoch})
    else:
        out.print(f"lock broken; epoch is now {lock.epoch}")


@lock_app.command("status")
def lock_status(parcel: ParcelArg, json_out: JsonOpt = False) -> None:
    """Show who holds a parcel's lock."""

    async def go() -> Any:
        async with site_session() as site:
            return await site.store.lock_status(await resolve_parcel(site, parcel))

    lock = asyncio.run(go())
    if json_out:
        emit_json({"parcel": str(lock.parcel), "epoch": lock.epoch, "version": lock.version,
                   "holder": lock.holder.__dict__ if lock.holder else None})
    elif lock.holder is None:
        out.print(f"free (epoch {lock.epoch}, version {lock.version})")
    else:
        out.print(f"held by {lock.holder.describe()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(lock.holder.since))}; epoch {lock.epoch}"
                  + ("; take it with `isrsync resume --from-usb`" if lock.holder.medium else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(lock_app, name="lock")
