"""`isrsync jukebox`: seed this site cache to the LAN and keep announcing it (issue 12, part 4)."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import IsrError, StateError, UsageError
from ..site import account
from ..site.cache import open_cache
from ..site.evict import parse_size
from ..site.parcel import open_site
from ..swarm.discovery import check_interfaces
from .render import emit_json, out
from .state import JsonOpt, state

app = typer.Typer(help="Seed this site cache to the LAN (an idle site as the paper's jukebox).",
                  invoke_without_command=True, no_args_is_help=False)

UNIT_NAME = "isrsync-jukebox.service"
UNITS_DIR = Path("etc/systemd/system")


@app.callback()
def jukebox(
    ctx: typer.Context,
    cache_limit: Annotated[Optional[str], typer.Option(
        "--cache-limit", help="Keep at most SIZE of cached chunks (e.g. 20G); least recently used go first, "
                              "never a parcel's own uncommitted state.")] = None,
    interface: Annotated[Optional[list[str]], typer.Option(
        "--interface", help="IPv4 address of the LAN interface to announce on (repeatable; default: all).")] = None,
    round_seconds: Annotated[float, typer.Option(
        "--round", help="Seconds between two looks at the cache (new chunks, the limit).", min=1.0)] = 30.0,
    json_out: JsonOpt = False,
) -> None:
    """Seed everything in the site cache over BitTorrent and announce it over mDNS, until SIGTERM or Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    limit = None
    if cache_limit is not None:
        try:
            limit = parse_size(cache_limit)
        except ValueError:
            raise UsageError(f"--cache-limit {cache_limit!r} is not a size", hint="e.g. 500M, 20G, 1T") from None
    from ..swarm.jukebox import (
        JukeboxConfig,  # libtorrent loads only for the jukebox itself
    )

    config = JukeboxConfig(limit, check_interfaces(interface), round_seconds)
    result = asyncio.run(_run(config, json_out))
    _say(json_out)("stopped", {"message": f"stopped; {result['packs']} pack(s) were seeded", **result})


def _say(json_out: bool) -> Any:
    def say(kind: str, data: dict[str, Any]) -> None:
        if json_out:
            # One JSON object per line: a supervisor or a test reads the events as they come.
            sys.stdout.write(json.dumps({"event": kind, **data}, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()
        else:
            out.print(f"{kind}: {data.get('message', '')}", soft_wrap=True)
    return say


async def _run(config: Any, json_out: bool) -> dict[str, Any]:
    from ..swarm.jukebox import run_jukebox

    say = _say(json_out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cache = open_cache(state.cache_dir)
    try:
        acct = account.load_account()
    except IsrError as e:
        # Not logged in: nothing can be located or protected, but the cache still announces.
        say("warning", {"message": f"not logged in ({e}): announcing only, nothing seeded or evicted"})
        try:
            return await run_jukebox(cache, None, server=None, token="", state_of=None, config=config, say=say,
                                     stop=stop)
        finally:
            cache.close()
    site = await open_site(cache, acct)
    try:
        return await run_jukebox(cache, site.store, server=acct.server, token=acct.token, state_of=site.state,
                                 config=config, say=say, stop=stop)
    finally:
        await site.close()


@app.command("install-unit")
def install_unit(
    prefix: Annotated[Optional[Path], typer.Option(
        "--prefix", help="Write under this root instead of / (for packaging; no systemctl reload).")] = None,
    user: Annotated[Optional[str], typer.Option("--user", help="The user the jukebox runs as (default: you).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Install the systemd unit that runs `isrsync jukebox` (then: systemctl enable --now isrsync-jukebox)."""
    path = (prefix or Path("/")) / UNITS_DIR / UNIT_NAME
    text = resources.files("isrsync.swarm").joinpath(UNIT_NAME).read_text(encoding="utf-8")
    text = text.replace("@ISRSYNC@", _command()).replace("@USER@", user or getpass.getuser())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except PermissionError as e:
        raise UsageError(f"cannot write {e.filename}: permission denied",
                         hint="run it as root, or give --prefix") from None
    except OSError as e:
        raise StateError(f"cannot write {e.filename}: {e.strerror}") from None
    reloaded = False
    if prefix is None and Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        import subprocess

        reloaded = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, check=False,
                                  stdin=subprocess.DEVNULL).returncode == 0
    if json_out:
        emit_json({"written": str(path), "reloaded": reloaded})
        return
    out.print(f"wrote {path}" + ("; systemd reloaded" if reloaded else ""))
    out.print("start it with: systemctl enable --now isrsync-jukebox")


def _command() -> str:
    beside = Path(sys.executable).parent / "isrsync"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("isrsync")
    if found:
        return str(Path(found).absolute())
    return f"{Path(sys.executable).absolute()} -m isrsync.cli.main"

