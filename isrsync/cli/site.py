"""`isrsync site ...`: this site's own identity (its name for people, its id for machines)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..site.cache import open_cache
from ..site.identity import set_site_name, site_name
from .render import emit_json, out
from .state import JsonOpt, state

app = typer.Typer(help="This site's name and id.", no_args_is_help=True)


@app.command("name")
def name_cmd(
    name: Annotated[Optional[str], typer.Argument(help="The new name (default: show the current one).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show or set the name this site goes by, where a lock holder is named (default: the host name).

    The name is for people; the site id still tells sites apart. It applies
    from the next resume, suspend or lock this site takes.
    """
    with open_cache(state.cache_dir) as cache:
        current = set_site_name(cache.path, name) if name is not None else site_name(cache.path)
        sid = cache.site_id
    if json_out:
        emit_json({"name": current, "site": sid})
    else:
        out.print(f"{'this site is now' if name is not None else 'this site is'} {current} (site {sid})",
                  markup=False)
