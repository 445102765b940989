"""The guest's serial console, shared: any number of clients at once, across QEMU restarts.

QEMU's socket chardev takes one client and ignores the next one (it is
accepted and hears nothing). The hub is that one client: it keeps a
connection to QEMU's socket (reconnecting when QEMU is started again, as on
a guest reboot) and serves its own sockets, ``console.sock`` in the run's
directory (`isrsync console`) and the path the user gave with ``--serial``.
Whatever the guest prints goes to every client; whatever any client types
goes to the guest. A client that does not read is dropped rather than let
the guest's output pile up in memory. As with QEMU alone, output printed
while nobody is connected is gone. Input typed while the hub is not yet (or
no longer) connected to QEMU is held, up to a bound, and sent when it is: a
run announces it has resumed as soon as QEMU runs, and the hub may reach the
socket a few milliseconds later, so a script's first line would otherwise be
lost now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("isrsync.console")

_CHUNK = 4096
_MAX_QUEUED = 1 << 20  # bytes of output a client may leave unread before it is dropped
_RETRY = 0.05
_MAX_HELD = 64 << 10  # bytes of input held while QEMU's socket is not connected


class ConsoleHub:
    def __init__(self, qemu_socket: Path, listen: list[Path]) -> None:
        self.qemu_socket = qemu_socket
        self.listen = listen
        self._servers: list[asyncio.base_events.Server] = []
        self._clients: set[asyncio.StreamWriter] = set()
        self._upstream: asyncio.StreamWriter | None = None
        self._held = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        for path in self.listen:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a socket file a killed run left
            try:
                srv = await asyncio.start_unix_server(self._client, path=str(path))
            except OSError as e:  # bind's own error names no path ("AF_UNIX path too long")
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
            os.chmod(path, 0o600)  # the console is the guest's root shell for all we know
            self._servers.append(srv)
        self._task = asyncio.create_task(self._pump())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for srv in self._servers:
            srv.close()
        for w in list(self._clients):
            w.close()
        self._clients.clear()
        for path in self.listen:
            with contextlib.suppress(OSError):
                path.unlink()

    async def _pump(self) -> None:
        """Stay connected to QEMU's socket, and copy what the guest prints to every client."""
        while not self._closed:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.qemu_socket))
            except OSError:
                await asyncio.sleep(_RETRY)  # QEMU is not up yet, or is being started again
                continue
            self._upstream = writer
            if self._held:
                writer.write(bytes(self._held))
                self._held.clear()
            try:
                while data := await reader.read(_CHUNK):
                    self._broadcast(data)
            except OSError as e:
                log.debug("the guest's console closed: %s", e)
            finally:
                self._upstream = None
                writer.close()

    def _broadcast(self, data: bytes) -> None:
        for w in list(self._clients):
            if w.is_closing():
                self._clients.discard(w)
                continue
            if w.transport.get_write_buffer_size() > _MAX_QUEUED:
                log.info("a console client that does not read was dropped")
                self._clients.discard(w)
                w.close()
                continue
            w.write(data)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while data := await reader.read(_CHUNK):
                up = self._upstream
                if up is not None and not up.is_closing():
                    up.write(data)
                elif len(self._held) + len(data) <= _MAX_HELD:
                    self._held += data
                else:
                    log.info("console input typed while the guest was not reachable was dropped")
        except OSError:
            pass
        finally:
            self._clients.discard(writer)
            writer.close()


DETACH = b"\x1d"  # Ctrl-]: as telnet and virsh console


async def attach(path: Path, stdin_fd: int, stdout_fd: int) -> None:
    """Copy between a terminal (or any pair of descriptors) and the console at ``path``
    until the console closes, input ends, or the user types Ctrl-]."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError as e:
        raise OSError(e.errno, f"cannot attach to the console at {path}: {e.strerror}") from None
    loop = asyncio.get_running_loop()
    typed: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(stdin_fd, _CHUNK)
        except OSError:
            data = b""
        typed.put_nowait(data)

    async def keys() -> None:
        while True:
            data = await typed.get()
            if not data:
                return  # end of input: a script piped its lines in
            cut = data.find(DETACH)
            if cut >= 0:
                writer.write(data[:cut])
                return
            writer.write(data)
            await writer.drain()

    async def screen() -> None:
        while data := await reader.read(_CHUNK):
            await loop.run_in_executor(None, _write_all, stdout_fd, data)

    try:
        loop.add_reader(stdin_fd, readable)
        polled = True
    except (PermissionError, OSError):  # a regular file or /dev/null: it never blocks, read it in turn
        polled = False
        typed.put_nowait(os.read(stdin_fd, 1 << 20))
        typed.put_nowait(b"")
    tasks = [asyncio.create_task(keys()), asyncio.create_task(screen())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if polled:
            loop.remove_reader(stdin_fd)
        for t in tasks:
            t.cancel()
        writer.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
