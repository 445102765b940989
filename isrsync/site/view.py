"""The guest's screen seen from outside its run: the window `resume` opens by default,
and `isrsync view`, a VNC client on the screen of a run that has none.

Every run has a VNC server on a unix socket in its run directory (mode 0700,
vm/screen.py): no TCP port, so no one but the user can connect. A viewer that
takes a unix socket is pointed at it; one that does not, and a client on
another machine's end of an ssh tunnel, get a proxy on loopback TCP that lives
as long as `isrsync view` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import UsageError
from ..vm.screen import VNC_SOCK, display_backends
from .policy import Display


def choose_display(asked: Display, env: Mapping[str, str]) -> tuple[Display, str | None]:
    """The display `resume` opens, and why it is not the one asked for (None when it is).

    auto: a GTK window when ``$DISPLAY`` is set and QEMU has its GTK module, else
    an SDL one, else none; without ``$DISPLAY`` none, silently (a server or an ssh
    session: `isrsync view` shows the screen later). An explicit choice is kept.
    """
    if asked is not Display.AUTO:
        return asked, None
    if not env.get("DISPLAY"):
        return Display.NONE, None
    if not x_server_answers(env["DISPLAY"]):
        # A stale $DISPLAY (an ssh session whose forwarding is gone, a desktop
        # that logged out) would make QEMU fail at start and take the resume along.
        return Display.NONE, (f"no window for the guest: the X server of DISPLAY={env['DISPLAY'][:60]} does not "
                              "answer; `isrsync view` shows the screen")
    have = display_backends()
    for d in (Display.GTK, Display.SDL):
        if d.value in have:
            return d, None
    return Display.NONE, ("no window for the guest: this QEMU has neither its gtk nor its sdl module "
                          "(Debian: apt-get install qemu-system-gui); `isrsync view` shows the screen")


def x_server_answers(display: str, timeout: float = 1.0) -> bool:
    """Whether the X server ``display`` names (``[host]:N[.S]``) accepts a connection."""
    host, sep, rest = display.rpartition(":")
    num = rest.split(".", 1)[0]
    if not sep or not num.isdigit():
        return False
    n = int(num)
    try:
        if host in ("", "unix") or host.startswith("/"):
            path = host if host.startswith("/") else f"/tmp/.X11-unix/X{n}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(path)
        else:
            with socket.create_connection((host, 6000 + n), timeout=timeout):
                pass
    except OSError:
        return False
    return True


def vnc_socket(run_dir: Path) -> Path:
    return run_dir / VNC_SOCK


@dataclass(frozen=True)
class Viewer:
    """A VNC client this machine has, and how it is told where the screen is."""

    exe: str
    unix: bool  # takes the unix socket itself; else a loopback TCP proxy is put in between

    def argv(self, sock: Path, tcp: tuple[str, int] | None) -> list[str]:
        name = os.path.basename(self.exe)
        if self.unix:
            if name == "remote-viewer":
                return [self.exe, f"vnc+unix://{sock}"]
            return [self.exe, str(sock)]  # TigerVNC: a path is a unix socket
        assert tcp is not None
        host, port = tcp
        return [self.exe, f"{host}::{port}"]  # host::port is a port, not a display number, for all of them


# In order of preference. TigerVNC (1.11 and later) and virt-viewer's remote-viewer
# reach a unix socket; the others only TCP. "vncviewer" may be any of them
# (Debian's alternatives), so it is taken as TCP-only.
_VIEWERS = (("xtigervncviewer", True), ("remote-viewer", True), ("gvncviewer", False),
            ("xtightvncviewer", False), ("vncviewer", False))


def find_viewer(path: str | None = None) -> Viewer | None:
    for name, unix in _VIEWERS:
        exe = shutil.which(name, path=path)
        if exe is not None:
            return Viewer(exe, unix)
    return None


def parse_listen(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``PORT``) on loopback only: the guest's VNC has no password,
    so a port anyone on the network can reach is refused (tunnel it with ssh instead)."""
    host, sep, port_s = spec.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise UsageError(f"--listen {spec}: the port must be a number from 0 to 65535") from None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UsageError(f"--listen {spec}: only a loopback address is allowed (the screen has no password)",
                         hint="use 127.0.0.1:PORT, and an ssh tunnel to reach it from elsewhere")
    return host, port


class LoopbackProxy:
    """A TCP port on loopback that carries each connection to the run's VNC socket."""

    def __init__(self, sock: Path, host: str, port: int) -> None:
        self.sock = sock
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        try:
            self._server = await asyncio.start_server(self._client, self.host, self.port)
        except OSError as e:
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        host, port = self._server.sockets[0].getsockname()[:2]
        self.port = port
        return host, port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._pipes):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            try:
                up_r, up_w = await asyncio.open_unix_connection(str(self.sock))
            except OSError:
                return  # the run ended: the client sees the connection close
            try:
                await asyncio.gather(_copy(reader, up_w), _copy(up_r, writer))
            finally:
                up_w.close()
        finally:
            writer.close()
            self._pipes.discard(task)


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()  # a slow viewer slows QEMU's updates rather than fill our memory
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()
