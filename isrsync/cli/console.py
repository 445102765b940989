"""`isrsync console [PARCEL]`: the guest's serial console, on this terminal."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import termios
import tty
from typing import Annotated, Iterator, Optional

import typer

from ..errors import UsageError
from ..site.cache import open_cache
from ..site.console import attach
from ..site.control import CONSOLE_SOCK, find_run
from .render import err
from .state import state


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Keys go to the guest as typed (Ctrl-C included); the terminal is put back after."""
    if not sys.stdin.isatty():
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def console(
    parcel: Annotated[Optional[str], typer.Argument(help="Parcel name or id (default: the one running here).")] = None,
) -> None:
    """Attach to the serial console of a parcel running here; Ctrl-] detaches.

    Several consoles may be attached at once (and the socket of `resume --serial`):
    all see what the guest prints, and what any of them types reaches it.
    """

    async def go() -> None:
        with open_cache(state.cache_dir) as cache:
            site_id = cache.site_id
        sock, run = await find_run(site_id, parcel)
        path = sock.parent / CONSOLE_SOCK
        if not path.exists():
            raise UsageError(f"parcel {run.name or run.parcel} runs without a shared console",
                             hint="it was started by an older isrsync: use its --serial socket")
        try:
            with _raw(sys.stdin.fileno()):
                # Said once the terminal is raw: a key typed after it reaches the
                # guest, never the terminal's own echo. Raw output has no newline
                # translation, hence the carriage return.
                err.print(f"attached to the console of {run.name or run.parcel}; Ctrl-] detaches", markup=False,
                          end="\r\n" if sys.stdin.isatty() else "\n")
                await attach(path, sys.stdin.fileno(), sys.stdout.fileno())
        except OSError as e:
            raise UsageError(str(e)) from None

    asyncio.run(go())
