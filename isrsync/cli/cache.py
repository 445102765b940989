"""`isrsync cache ...`: look at and check this site's cache."""

from __future__ import annotations

import typer
from rich.table import Table

from ..site.cache import open_cache
from .render import emit_json, human_bytes, out
from .state import JsonOpt, state

app = typer.Typer(help="Inspect and check this site's cache.", no_args_is_help=True)

#: What to do with an empty cache (printed under listings that would show nothing).
EMPTY_HINT = "the cache is empty; `isrsync hoard PARCEL` fetches a parcel into it (`isrsync ls` lists parcels)"


@app.command("info")
def info(json_out: JsonOpt = False) -> None:
    """Show where the cache is, its site id and what it holds."""
    with open_cache(state.cache_dir) as cache:
        st = cache.stats()
    if json_out:
        emit_json(st)
        return
    t = Table(show_header=False, box=None)
    t.add_row("cache", st.path)
    t.add_row("site id", st.site_id)
    t.add_row("chunks", f"{st.chunks} ({human_bytes(st.chunk_bytes)})")
    t.add_row("packs", str(st.packs))
    t.add_row("segments", str(st.segments))
    t.add_row("on disk", human_bytes(st.disk_bytes))
    out.print(t)
    if st.chunks == 0:
        out.print(EMPTY_HINT, soft_wrap=True)


@app.command("verify")
def verify(json_out: JsonOpt = False) -> None:
    """Check every cached chunk against its tag; damaged ones are dropped.

    Dropped chunks are fetched again from another source when next needed, so a
    damaged cache costs time, never data.
    """
    with open_cache(state.cache_dir) as cache:
        total = len(cache.tags())
        bad = cache.verify()
    if json_out:
        emit_json({"checked": total, "dropped": [t.hex() for t in bad]})
        return
    if total == 0:
        out.print(f"nothing to check: {EMPTY_HINT}", soft_wrap=True)
    elif bad:
        out.print(f"checked {total} chunks: dropped {len(bad)} damaged (they will be fetched again)")
    else:
        out.print(f"checked {total} chunks: all verify")
