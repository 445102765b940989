"""Output helpers shared by the CLI commands: rich for people, JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from ..site.sources import SourceInfo

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout (for ``--json``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


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
    t = Table("kind", "hits", "bytes", "bad", "errors", "mean latency ms")
    # A source's name is its path or address: fold it, never cut it.
    t.columns.insert(0, Column("source", overflow="fold", ratio=1))
    for s in rows:
        t.add_row(s.name, s.kind, str(s.hits), human_bytes(s.bytes), str(s.bad), str(s.errors),
                  f"{s.mean_latency_ms:.2f}" if s.hits and s.kind != "cache" else "-")
    return t
