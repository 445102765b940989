"""A client for the demo guest's serial console (see :mod:`isrsync.demo.guest`).

The guest answers one ``GUEST: ...`` line per command. Blocking sockets: call
it from a worker thread when an event loop must keep serving the guest's disk.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from ..errors import QemuError


class GuestConsole:
    def __init__(self, path: Path, connect_timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise QemuError(f"the guest's serial console {path} did not open") from None
                time.sleep(0.05)
        self._buf = b""

    def _line(self, deadline: float) -> str:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError("the guest did not answer in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not data:
                raise QemuError("the guest's console closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line.startswith(prefix):
                return line

    def command(self, cmd: str, timeout: float = 60.0) -> str:
        self.sock.sendall(cmd.encode() + b"\n")
        return self.wait_for("GUEST: ", timeout)

    def close(self) -> None:
        self.sock.close()
