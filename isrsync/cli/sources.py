"""`isrsync sources ...`: the lookaside sources of a running parcel: list, add, withdraw."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..site.cache import open_cache
from ..site.control import ask_add_source, ask_sources, ask_withdraw_source, find_run
from ..site.sources import SourceInfo
from .render import emit_json, out, sources_table
from .state import JsonOpt, state

app = typer.Typer(
    help="List, add and withdraw the lookaside sources of a running parcel.\n\n"
    "With no subcommand, lists the sources of the parcel running here.",
    invoke_without_command=True,
)
ParcelOpt = Annotated[Optional[str], typer.Option("--parcel", "-p", help="Parcel name or id (default: the one running here).")]


def _site_id() -> str:
    with open_cache(state.cache_dir) as cache:
        return cache.site_id


def _show(rows: list[SourceInfo], json_out: bool) -> None:
    if json_out:
        emit_json([r.__dict__ for r in rows])
        return
    out.print(sources_table(rows))
    if len(rows) <= 2:
        out.print("only the cache and the home server; `isrsync sources add DIR` adds another site's cache directory")


@app.callback()
def root(ctx: typer.Context, parcel: ParcelOpt = None, json_out: JsonOpt = False) -> None:
    if ctx.invoked_subcommand is None:
        list_cmd(parcel, json_out)


@app.command("list")
def list_cmd(
    parcel: Annotated[Optional[str], typer.Argument(help="Parcel name or id (default: the one running here).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the sources of a running parcel: hits, bytes, bad answers, errors and latency."""

    async def go() -> list[SourceInfo]:
        sock, _ = await find_run(_site_id(), parcel)
        return await ask_sources(sock)

    _show(asyncio.run(go()), json_out)


@app.command("add")
def add(
    directory: Annotated[Path, typer.Argument(help="A medium (a tree with .isrsync/) or another site's cache "
                                              "directory (read-only; every chunk is verified).")],
    parcel: ParcelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Offer a medium or another site's cache directory to a running parcel as a lookaside source."""

    async def go() -> SourceInfo:
        sock, _ = await find_run(_site_id(), parcel)
        return await ask_add_source(sock, str(directory.expanduser().resolve()))

    info = asyncio.run(go())
    if json_out:
        emit_json(info)
    else:
        out.print(f"added lookaside source {info.name}; `isrsync sources` shows what it serves")


@app.command("withdraw")
def withdraw(
    name: Annotated[str, typer.Argument(help="The source's name, as `isrsync sources` shows it.")],
    parcel: ParcelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Withdraw a lookaside source from a running parcel (the cache and the server stay)."""

    async def go() -> None:
        sock, _ = await find_run(_site_id(), parcel)
        await ask_withdraw_source(sock, name)

    asyncio.run(go())
    if json_out:
        emit_json({"withdrawn": name})
    else:
        out.print(f"withdrew {name}")
