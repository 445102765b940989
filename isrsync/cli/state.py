"""Global CLI state set by the root callback, and shared option types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer


@dataclass
class State:
    debug: bool = False
    cache_dir: str | None = None


state = State()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
