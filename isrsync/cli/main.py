"""The `isrsync` command: parse, call the core, render. Nothing else lives here."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Optional

import typer

from .. import __version__
from ..errors import IsrError, UsageError
from ..site.cache import ENV_CACHE
from ..swarm.join import ENV_SWARM
from . import account, cache, console, demo, jukebox, lock, parcel, peers, server, site, sources, status, swarm, view
from .render import error_json, error_line, out
from .state import state

app = typer.Typer(
    name="isrsync",
    help="Internet Suspend/Resume for QEMU guests: suspend a whole VM at one site, resume it at another.",
    no_args_is_help=True,
    add_completion=False,  # completions are generated into completions/ instead
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(cache.app, name="cache")
app.add_typer(server.app, name="server")
app.add_typer(sources.app, name="sources")
app.add_typer(site.app, name="site")
app.add_typer(jukebox.app, name="jukebox")
app.add_typer(swarm.app, name="swarm")
app.command("serve")(server.serve_cmd)
app.command("demo")(demo.demo)
app.command("console")(console.console)
app.command("view")(view.view)
app.command("peers")(peers.peers_cmd)
account.register(app)
parcel.register(app)
status.register(app)
lock.register(app)


def _version(value: bool) -> None:
    if value:
        out.print(f"isrsync {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="ISRSYNC_DEBUG", help="Show tracebacks and debug logging.", show_envvar=True),
    ] = False,
    cache_dir: Annotated[
        Optional[str],
        typer.Option("--cache-dir", envvar=ENV_CACHE, help="Site cache directory.", show_envvar=True),
    ] = None,
    no_swarm: Annotated[
        bool,
        typer.Option("--no-swarm", help="Keep this site out of the LAN swarm (no mDNS, no BitTorrent): "
                     "resume and hoard fetch from media and the home server only.", show_envvar=False),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    state.debug = debug
    state.cache_dir = cache_dir
    if no_swarm:
        # An environment switch, so the resume's long-running side (and anything it
        # starts) sees it without every command passing it down.
        os.environ[ENV_SWARM] = "off"


def run(argv: list[str] | None = None) -> int:
    """Entry point of `isrsync`: errors become one clear line and an exit code."""
    return run_app(app, "isrsync", sys.argv[1:] if argv is None else argv, exit_=argv is None)


def run_app(typer_app: typer.Typer, prog: str, args: list[str], *, exit_: bool) -> int:
    """Run a typer app the isrsync way (shared by the `sneakernet` command)."""
    debug = "--debug" in args or os.environ.get("ISRSYNC_DEBUG") == "1"
    # A script that asked for --json reads its error as JSON on stdout too (the
    # line on stderr is for whoever watches).
    json_out = "--json" in args
    try:
        result = typer_app(args=args, prog_name=prog, standalone_mode=False)
        code = result if type(result) is int else 0
    except IsrError as e:
        if debug:
            traceback.print_exc()
        error_line(str(e), prog)
        if json_out:
            error_json(e)
        code = e.exit_code
    except KeyboardInterrupt:
        error_line("interrupted", prog)
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        error_line("aborted", prog)
        code = 1
    except Exception as e:  # noqa: BLE001 - the last line of defence
        usage = _usage_error(e)
        if usage is not None:
            if json_out:
                error_json(UsageError(e.format_message() if hasattr(e, "format_message") else str(e)))
            code = usage
        else:
            if debug:
                traceback.print_exc()
            error_line(f"internal error: {e.__class__.__name__}: {e}; rerun with --debug and report it", prog)
            code = 70
    if exit_:
        sys.exit(code)
    return code


def _usage_error(e: Exception) -> int | None:
    """Click-style usage errors (bad option, missing argument) know how to show themselves."""
    show = getattr(e, "show", None)
    code = getattr(e, "exit_code", None)
    if callable(show) and isinstance(code, int):
        show()
        return code
    return None


if __name__ == "__main__":
    run()
