"""Output helpers shared by the CLI commands: rich for people, JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from ..errors import IsrError
from ..site.sources import SourceInfo

# Into a pipe or a file, rich would wrap at 80 columns: a table of sources (ten columns)
# then folds its numbers mid-value and cuts its kinds. A reader of a log or a grep is
# better served by long lines. A terminal, or $COLUMNS, still decides its own width.
out = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
err = Console(stderr=True, highlight=False)


def emit_json(obj: Any, *, one_line: bool = False) -> None:
    """Write one JSON document to stdout (for ``--json``), indented unless ``one_line``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    sys.stdout.write(json.dumps(obj, indent=None if one_line else 2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def error_json(e: IsrError) -> None:
    """An error as the last JSON document of a ``--json`` command (the exit code still says it failed).

    One line: commands that stream events (resume, jukebox) write one document
    per line, and a reader of that stream reads the error the same way.
    """
    emit_json({"error": {"type": type(e).__name__, "message": e.message, "hint": e.hint,
                         "exit_code": e.exit_code, "details": e.details}}, one_line=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def error_line(message: str, prog: str = "isrsync") -> None:
    # Messages carry paths and names: never let rich read them as markup.
    err.print(f"[bold red]{prog}:[/] {escape(message)}", markup=True, soft_wrap=True)


# A resume's breakdown: boot files are decoded while QEMU starts, so they sit inside it.
RESUME_STEPS = (
    ("manifest", "manifest"),
    ("lock", "lock"),
    ("fetch_before_start", "fetch before start"),
    ("qemu_start", "QEMU start (machine built)"),
    ("boot_files", "  boot files, decoded meanwhile"),
    ("ram", "  guest RAM, decoded by then"),
    ("memory_image", "memory image restored"),
    ("total", "total"),
)


def resume_rows(seconds: dict[str, float]) -> list[tuple[str, str]]:
    return [(label, f"{seconds[k]:.3f}") for k, label in RESUME_STEPS if k in seconds]


def sources_table(rows: list[SourceInfo]) -> Table:
    """Who served what: the cache, then every source in the order it is asked."""
    t = Table(*(Column(h, no_wrap=True) for h in ("kind", "hits", "bytes", "bad", "errors", "late", "wasted",
                                                  "rate", "mean latency ms")))
    # A source's name is its path or address: fold it, never cut it.
    t.columns.insert(0, Column("source", overflow="fold", ratio=1))
    for s in rows:
        # Late answers are slow, not failed; wasted bytes crossed the link for nothing.
        wasted = "-" if s.kind == "cache" else \
            f"{human_bytes(s.wasted_bytes)} ({100 * s.wasted_bytes / max(1, s.bytes + s.wasted_bytes):.1f}%)"
        rate = "-" if s.rate_kib_s is None else f"{human_bytes(int(s.rate_kib_s * 1024))}/s"
        t.add_row(s.name, s.kind, str(s.hits), human_bytes(s.bytes), str(s.bad), str(s.errors),
                  "-" if s.kind == "cache" else str(s.late), wasted, rate,
                  f"{s.mean_latency_ms:.2f}" if s.hits and s.kind != "cache" else "-")
    return t
