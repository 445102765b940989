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


if __name__ == "__main__":
    run()
