"""`isrsync view [PARCEL]`: the guest's screen, for a run started without a window."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import UsageError
from ..site.cache import open_cache
from ..site.control import ask_screendump, find_run
from ..site.view import LoopbackProxy, Viewer, find_viewer, parse_listen, vnc_socket
from .render import emit_json, err
from .state import JsonOpt, state

_GONE_POLL = 1.0  # seconds between looks at whether the run (and its socket) is still there


def view(
    parcel: Annotated[Optional[str], typer.Argument(help="Parcel name or id (default: the one running here).")] = None,
    listen: Annotated[Optional[str], typer.Option(
        "--listen", metavar="[HOST:]PORT", help="Serve the screen on this loopback TCP port (0: any free one) "
        "until Ctrl-C or the run ends, for a VNC client that takes no unix socket (or an ssh tunnel).")] = None,
    screenshot: Annotated[Optional[Path], typer.Option(
        "--screenshot", metavar="FILE", dir_okay=False, help="Write the screen as it is now to FILE (PNG) "
        "and end.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the screen of a parcel running here: in a VNC viewer when there is one and a
    $DISPLAY, else print where a VNC client can connect.

    Every run serves its screen on a unix socket that only you can reach; nothing
    listens on the network unless --listen asks for a loopback port.
    """
    if listen is not None and screenshot is not None:
        raise UsageError("--listen serves the screen and --screenshot takes one picture of it: give one of them")
    tcp = parse_listen(listen) if listen is not None else None

    async def go() -> None:
        with open_cache(state.cache_dir) as cache:
            site_id = cache.site_id
        sock, run = await find_run(site_id, parcel)
        name = run.name or run.parcel
        screen = vnc_socket(sock.parent)
        if not screen.exists():
            raise UsageError(f"parcel {name} runs without a VNC screen",
                             hint="it was started by an older isrsync: suspend it and resume it again")
        where: dict[str, Any] = {"parcel": run.parcel, "name": run.name, "protocol": "vnc",
                                 "socket": str(screen), "uri": f"vnc+unix://{screen}"}
        if screenshot is not None:
            png = screenshot.expanduser().resolve()  # QEMU writes it, from its own working directory
            if not png.parent.is_dir():
                raise UsageError(f"--screenshot {screenshot}: no directory {png.parent}")
            await ask_screendump(sock, png)
            if json_out:
                emit_json({**where, "screenshot": str(png)})
            else:
                err.print(f"the screen of {name} is in {png}", markup=False)
            return
        if tcp is not None:
            await _serve(screen, tcp, where, name, json_out)
            return
        viewer = None if json_out else find_viewer()
        if json_out:
            emit_json(where)
        elif viewer is None or not os.environ.get("DISPLAY"):
            _print_address(where, name, "no $DISPLAY to open a viewer on" if viewer is not None
                           else "no VNC viewer here (Debian: apt-get install tigervnc-viewer)")
        else:
            await _launch(viewer, screen, name)

    async def main() -> None:
        # Ended by a signal as by Ctrl-C: the finally blocks stop the viewer and the proxy.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        await go()

    # Ctrl-C (or a signal) is how a --listen or a viewer is ended: not an error.
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(main())


def _print_address(where: dict[str, Any], name: str, why: str) -> None:
    err.print(f"{why}; the screen of {name} is here:", markup=False)
    print(f"vnc unix socket: {where['socket']}", flush=True)
    err.print(f"e.g. `vncviewer {where['socket']}` (TigerVNC), `remote-viewer {where['uri']}`, "
              "or `isrsync view --listen 127.0.0.1:0` for a client that takes TCP only", markup=False)


async def _serve(screen: Path, tcp: tuple[str, int], where: dict[str, Any], name: str, json_out: bool) -> None:
    proxy = LoopbackProxy(screen, *tcp)
    host, port = await proxy.start()
    try:
        if json_out:
            # One line (not emit_json's indented document): a script reads it while we serve.
            print(json.dumps({**where, "host": host, "port": port}), flush=True)
        else:
            print(f"vnc {host}::{port}", flush=True)  # a line for a script to read while we serve
            err.print(f"the screen of {name} is served on {host} port {port} until Ctrl-C or the run ends",
                      markup=False)
        while screen.exists():  # the run's directory goes when the run ends
            await asyncio.sleep(_GONE_POLL)
    finally:
        await proxy.close()


async def _launch(viewer: Viewer, screen: Path, name: str) -> None:
    proxy = None
    tcp = None
    if not viewer.unix:
        proxy = LoopbackProxy(screen, "127.0.0.1", 0)
        tcp = await proxy.start()
    argv = viewer.argv(screen, tcp)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        except OSError as e:
            raise UsageError(f"cannot start {argv[0]}: {e.strerror}") from None
        err.print(f"showing the screen of {name} in {os.path.basename(viewer.exe)}; close its window to end",
                  markup=False)
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # Ctrl-C here: the viewer goes with us
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                await proc.wait()
        if code not in (0, None) and screen.exists():
            raise UsageError(f"{os.path.basename(viewer.exe)} ended with status {code}",
                             hint="run it by hand to see why: " + " ".join(argv))
    finally:
        if proxy is not None:
            await proxy.close()
