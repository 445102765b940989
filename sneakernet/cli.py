"""The `sneakernet` command: prepare and inspect media that carry parcels between sites.

Media commands arrive with the sneakernet format; this is the entry point they
hang off, sharing isrsync's error handling.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from isrsync import __version__

app = typer.Typer(
    name="sneakernet",
    help="Prepare and inspect USB keys and directories that carry isrsync parcels.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"sneakernet {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())


def run(argv: list[str] | None = None) -> int:
    from isrsync.cli.main import run_app

    return run_app(app, "sneakernet", sys.argv[1:] if argv is None else argv, exit_=argv is None)


if __name__ == "__main__":
    run()
