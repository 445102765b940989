"""`isrsync demo`: render the embedded end-to-end demo with rich."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.table import Table

from ..demo.run import DemoUI, run_demo, short_runtime
from .render import emit_json, err, out, resume_rows
from .state import JsonOpt


class RichUI(DemoUI):
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        with err.status(title):
            yield
        err.print(f"[green]✓[/] {title}")

    def note(self, text: str) -> None:
        if not self.quiet:
            err.print(text)


def demo(
    memory: Annotated[int, typer.Option("--memory", min=64, max=4096, help="Guest memory in MiB.")] = 256,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Keep the demo's files here.")] = None,
    guest_cache: Annotated[Optional[Path], typer.Option("--guest-cache", hidden=True)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the complete ISR cycle locally: a home server, two sites, a guest moving between them."""
    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="isrsync-demo-"))
        workdir = tmp
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rep = asyncio.run(run_demo(workdir, RichUI(json_out), memory_mib=memory, guest_cache=guest_cache))
    finally:
        shutil.rmtree(short_runtime(workdir), ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if json_out:
        emit_json({**rep.__dict__, "memory_moved": rep.memory_moved, "disk_moved": rep.disk_moved})
    else:
        facts = Table("what", "value", title=f"parcel demo-vm ({rep.parcel})")
        for k, v in rep.facts:
            facts.add_row(k, v)
        out.print(facts)
        times = Table("step", "seconds", title="timings")
        for k, v in rep.timings:
            times.add_row(k, f"{v:.2f}")
        out.print(times)
        b = Table("resume at site B", "seconds")
        for row in resume_rows(rep.resume_b):
            b.add_row(*row)
        out.print(b)
        out.print(f"memory came along: counter {rep.counter_a} at suspend, {rep.counter_b} after resume at B: "
                  f"[bold]{'yes' if rep.memory_moved else 'NO'}[/]")
        out.print(f"disk came along: {rep.file_at_b!r}: [bold]{'yes' if rep.disk_moved else 'NO'}[/]")
        out.print(f"site A, while site B runs the parcel, is refused: {rep.refused}")
    if not (rep.memory_moved and rep.disk_moved and rep.refused):
        raise typer.Exit(1)
