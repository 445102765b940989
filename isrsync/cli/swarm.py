"""`isrsync swarm secret ...`: restrict this site's LAN swarm to its organisation (issue 12, part 6).

The secret is never printed back (only a fingerprint of the CA derived from it,
which sites compare), and is read from a hidden prompt or standard input, never
from the command line, where `ps` and shell history would keep it.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..site.cache import open_cache
from .render import emit_json, out
from .state import JsonOpt, state

app = typer.Typer(help="The LAN swarm's settings for this site.", no_args_is_help=True)
secret_app = typer.Typer(help="A shared secret that limits the swarm to your organisation's sites.",
                         no_args_is_help=True)
app.add_typer(secret_app, name="secret")


@secret_app.command("set")
def set_cmd(
    generate: Annotated[bool, typer.Option("--generate", help="Make a new random secret and print it once, "
                                                              "to set on the organisation's other sites.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Set the swarm secret: from then on this site swaps packs only with sites that have the same one.

    Without --generate the secret is read from a hidden prompt, or from standard
    input when it is not a terminal. It applies from the next resume, hoard or jukebox start.
    """
    from ..swarm.org import (  # libtorrent loads only here
        generate_secret,
        org_tls,
        write_secret,
    )

    if generate:
        text = generate_secret()
    elif sys.stdin.isatty():
        text = typer.prompt("swarm secret", hide_input=True, confirmation_prompt=True)
    else:
        text = sys.stdin.readline()
    with open_cache(state.cache_dir) as cache:
        write_secret(cache.path, text)
    fp = org_tls(text.strip()).fingerprint
    if json_out:
        emit_json({"restricted": True, "fingerprint": fp, **({"secret": text} if generate else {})})
        return
    if generate:
        out.print(f"swarm secret (set it on every site of the organisation): {text}", markup=False)
    out.print(f"the swarm of this site is restricted to its organisation (CA fingerprint {fp})", markup=False)


@secret_app.command("show")
def show_cmd(json_out: JsonOpt = False) -> None:
    """Say whether the swarm is restricted, with the CA fingerprint to compare between sites (never the secret)."""
    from ..swarm.org import org_tls, read_secret

    with open_cache(state.cache_dir) as cache:
        secret = read_secret(cache.path)
    fp = org_tls(secret).fingerprint if secret is not None else None
    if json_out:
        emit_json({"restricted": secret is not None, "fingerprint": fp})
    elif fp is None:
        out.print("the swarm of this site is open to every isrsync site on the LAN (no swarm secret)")
    else:
        out.print(f"the swarm of this site is restricted to its organisation (CA fingerprint {fp})", markup=False)


@secret_app.command("clear")
def clear_cmd(json_out: JsonOpt = False) -> None:
    """Forget the swarm secret: the swarm is open to every isrsync site on the LAN again."""
    from ..swarm.org import clear_secret

    with open_cache(state.cache_dir) as cache:
        had = clear_secret(cache.path)
    if json_out:
        emit_json({"restricted": False, "cleared": had})
    else:
        out.print("swarm secret removed" if had else "there was no swarm secret")
