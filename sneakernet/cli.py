"""The `sneakernet` command: prepare and inspect media that carry parcels between sites.

Media commands arrive with the sneakernet format; this is the entry point they
hang off. sneakernet reaches isrsync only through the Source protocol and the
error tree (:mod:`isrsync.errors`), never through isrsync's CLI, so it has its
own small runner: an :class:`~isrsync.errors.IsrError` becomes one line on
stderr and its exit code, a traceback only with ``--debug`` (or
``ISRSYNC_DEBUG=1``). The exit codes are isrsync's (see ``man sneakernet``).
"""

from __future__ import annotations

import os
import sys
import traceback
from importlib import metadata
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from isrsync.errors import IsrError

PROG = "sneakernet"
DEBUG_ENV = "ISRSYNC_DEBUG"

app = typer.Typer(
    name=PROG,
    help="Prepare and inspect USB keys and directories that carry isrsync parcels.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_err = Console(stderr=True, highlight=False)


def version() -> str:
    # sneakernet ships in the isrsync distribution: one version for both commands.
    try:
        return metadata.version("isrsync")
    except metadata.PackageNotFoundError:
        return "unknown"


def _version(value: bool) -> None:
    if value:
        print(f"{PROG} {version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar=DEBUG_ENV, help="Show tracebacks on errors.", show_envvar=True),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())


def error_line(message: str) -> None:
    # Messages carry paths and names: never let rich read them as markup.
    _err.print(f"[bold red]{PROG}:[/] {escape(message)}", markup=True, soft_wrap=True)


def run(argv: list[str] | None = None) -> int:
    """Entry point of `sneakernet`: errors become one clear line and an exit code.

    With ``argv`` (tests) the code is returned; without, the process exits with it.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    code = _run(args, debug="--debug" in args or os.environ.get(DEBUG_ENV) == "1")
    if argv is None:
        sys.exit(code)
    return code


def _run(args: list[str], *, debug: bool) -> int:
    try:
        result = app(args=args, prog_name=PROG, standalone_mode=False)
        return result if type(result) is int else 0
    except IsrError as e:
        if debug:
            traceback.print_exc()
        error_line(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        error_line("aborted")
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence
        # Click usage errors (bad option, missing argument) know how to show themselves.
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        if debug:
            traceback.print_exc()
        error_line(f"internal error: {e.__class__.__name__}: {e}; rerun with --debug and report it")
        return 70


# ----------------------------------------------------------------------------
# Media as they are plugged in: install-udev, attach, detach, watch.
# The logic lives in sneakernet.udev, sneakernet.attach and sneakernet.watch;
# they are imported inside each command so `sneakernet --version` stays quick
# and does not need libudev.
# ----------------------------------------------------------------------------

# This block keeps its imports to itself, so it merges cleanly with the rest.
import json
from pathlib import Path
from typing import Any

_MediaDir = Annotated[
    Path | None,
    typer.Option("--media-dir", help="Where to mount media [default: media/ in the site's runtime directory]."),
]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a line of text.")]


def _media_dir(given: Path | None) -> Path:
    from .mounts import default_media_dir

    return given if given is not None else default_media_dir()


def _report(event: str, device: Any, devnode: str, as_json: bool) -> None:
    from .attach import describe

    if as_json:
        print(json.dumps({"event": event, "devnode": devnode,
                          "medium": device.to_json() if device is not None else None}), flush=True)
    elif device is not None:
        print(describe(event, device), flush=True)
    else:
        print(f"{event}: nothing to do for {devnode}", flush=True)


@app.command("install-udev")
def install_udev(
    prefix: Annotated[
        Path | None, typer.Option("--prefix", help="Install under this root instead of / (packaging, tests); reloads nothing.")
    ] = None,
    uninstall: Annotated[bool, typer.Option("--uninstall", help="Remove the rule and the unit.")] = False,
) -> None:
    """Install the udev rule and systemd unit that attach a medium when it is plugged in."""
    from .udev import install

    report = install(prefix, uninstall=uninstall)
    for path in report.written:
        print(f"wrote {path}")
    for path in report.removed:
        print(f"removed {path}")
    for command in report.reloaded:
        print(f"ran {command}")


@app.command("attach")
def attach_cmd(
    devnode: Annotated[str, typer.Argument(help="The block device, e.g. /dev/sdb1.")],
    media_dir: _MediaDir = None,
    offer_any: Annotated[bool, typer.Option("--any", help="Attach any filesystem, not only media with .isrsync/.")] = False,
    as_json: _Json = False,
) -> None:
    """Mount the filesystem on DEVNODE read-only (or find its mount) and offer the medium on it."""
    from .attach import attach

    _report("attached", attach(devnode, _media_dir(media_dir), offer_any=offer_any), devnode, as_json)


@app.command("detach")
def detach_cmd(
    devnode: Annotated[str, typer.Argument(help="The block device given to attach.")],
    media_dir: _MediaDir = None,
    as_json: _Json = False,
) -> None:
    """Withdraw the medium attached from DEVNODE and unmount it if sneakernet mounted it."""
    from .attach import detach

    _report("detached", detach(devnode, _media_dir(media_dir)), devnode, as_json)


@app.command("watch")
def watch_cmd(
    media_dir: _MediaDir = None,
    offer_any: Annotated[bool, typer.Option("--any", help="Offer any filesystem, not only media with .isrsync/.")] = False,
    only: Annotated[
        list[str] | None, typer.Option("--only", metavar="PATTERN", help="Watch only device nodes matching this shell pattern (repeatable).")
    ] = None,
    as_json: _Json = False,
) -> None:
    """Attach media as they appear and detach them as they go, until interrupted (no udev rule needed)."""
    import asyncio

    from .attach import HOOKS
    from .watch import devnode_filter, serve

    def emit(event: str, device: Any) -> None:
        _report(event, device, device.devnode, as_json)

    accept = devnode_filter(only or [])
    asyncio.run(serve(_media_dir(media_dir), emit, hooks=HOOKS, offer_any=offer_any, accept=accept))


if __name__ == "__main__":
    run()
