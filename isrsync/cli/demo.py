"""`isrsync demo`: render the embedded end-to-end demo with rich."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..site.demo import Advance, DemoUI, run_demo
from .render import emit_json, out
from .state import JsonOpt


class RichUI(DemoUI):
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        with out.status(title):
            yield
        out.print(f"[green]✓[/] {title}")

    @contextlib.contextmanager
    def bar(self, title: str, total: int) -> Iterator[Advance]:
        if self.quiet:
            yield lambda n: None
            return
        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=out, transient=True,
        ) as prog:
            task = prog.add_task(title, total=total)
            yield lambda n: prog.advance(task, n)
        out.print(f"[green]✓[/] {title}")

    def note(self, text: str) -> None:
        if not self.quiet:
            out.print(text)


def demo(
    disk_mib: Annotated[int, typer.Option("--disk-mib", min=1, max=4096, help="Size of the demo disk.")] = 64,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Keep the demo's files here.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a complete local demo: a home server, two sites, a parcel moving between them."""
    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="isrsync-demo-"))
        workdir = tmp
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rep = asyncio.run(run_demo(workdir, RichUI(json_out), disk_mib=disk_mib))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if json_out:
        emit_json(rep)
    else:
        facts = Table("what", "value", title="parcel")
        for k, v in rep.facts:
            facts.add_row(k, v)
        out.print(facts)
        times = Table("step", "seconds", title="timings")
        for k, v in rep.timings:
            times.add_row(k, f"{v:.2f}")
        out.print(times)
        out.print(f"site B rebuilt the disk byte for byte: [bold]{'yes' if rep.identical else 'NO'}[/]")
        out.print(f"site A, after site B took the lock, was refused: {rep.refused}")
    if not rep.identical or not rep.refused:
        raise typer.Exit(1)
