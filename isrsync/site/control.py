"""The control socket of a running parcel: how `isrsync suspend|sync|status` reach
the `isrsync resume` process that serves the guest's disk and runs its QEMU.

One JSON object per line each way: a request ``{"cmd": ...}``, then one reply
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ..., "kind": ...,
"exit_code": ...}``. The socket lives in the user's runtime directory (mode
0700) next to the run's NBD and QMP sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from .. import errors
from ..errors import IsrError, NotFound
from .account import runtime_dir

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def run_dir(site_id: str, parcel: uuid.UUID) -> Path:
    # Short: unix socket paths must stay under 108 bytes.
    d = runtime_dir() / f"run-{site_id[:8]}-{str(parcel)[:8]}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def running(site_id: str) -> list[tuple[str, Path]]:
    """(parcel id prefix, control socket) of parcels this site is running."""
    out = []
    for d in runtime_dir().glob(f"run-{site_id[:8]}-*"):
        sock = d / "control.sock"
        if sock.exists():
            out.append((d.name.rsplit("-", 1)[1], sock))
    return out


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError
                reply: dict[str, Any] = {"ok": True, "result": await self.handler(req)}
            except IsrError as e:
                reply = {"ok": False, "error": str(e), "kind": type(e).__name__, "exit_code": e.exit_code}
            except (ValueError, UnicodeDecodeError):
                reply = {"ok": False, "error": "malformed control request", "kind": "UsageError", "exit_code": 2}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def call(path: Path, req: dict[str, Any], timeout: float = 3600.0) -> Any:
    """Send one request to a running parcel and return its result (or raise its error)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotFound("that parcel is not running at this site", hint="`isrsync status` shows what runs here") from None
    try:
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise errors.QemuError("the running parcel hung up without answering")
    reply = json.loads(line)
    if reply.get("ok"):
        return reply.get("result")
    cls = getattr(errors, str(reply.get("kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, IsrError)):
        cls = IsrError
    e = cls(str(reply.get("error")), hint="")
    raise e
