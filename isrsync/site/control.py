"""The control socket of a running parcel: how `isrsync suspend|sync|status|sources`
reach the `isrsync resume` process that serves the guest's disk and runs its QEMU.

Requests are typed values (:data:`Request`); on the wire, one JSON object per
line each way: a request ``{"cmd": ..., <fields>}``, then any number of
progress lines ``{"progress": {"stream": ..., "done": ..., "total": ...}}``
(a long suspend reports its upload and its copy to a medium), then one reply
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ..., "kind": ...,
"exit_code": ...}``. A request is decoded and checked before it reaches the
handler, so the handler never sees a malformed one. The socket lives in the
user's runtime directory (mode 0700) next to the run's NBD and QMP sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Union

from .. import errors
from ..errors import IsrError, NotFound, UsageError
from .account import runtime_dir
from .results import RunStatus, SuspendResult, SyncResult
from .sources import SourceInfo


@dataclass(frozen=True)
class StatusRequest:
    cmd = "status"


@dataclass(frozen=True)
class SyncRequest:
    cmd = "sync"


@dataclass(frozen=True)
class SuspendRequest:
    cmd = "suspend"
    keep_lock: bool = False
    to_medium: str = ""  # the mount point of a medium to copy the suspend to (`--to-usb`)
    full: bool = False  # the whole parcel to the medium, not only what changed
    carry_lock: bool = False  # hand the lock to the medium instead of releasing it


@dataclass(frozen=True)
class ListSources:
    cmd = "sources"


@dataclass(frozen=True)
class AddSource:
    """Offer a lookaside source to the running parcel: a medium or another site's cache directory."""

    cmd = "add-source"
    path: str


@dataclass(frozen=True)
class WithdrawSource:
    cmd = "withdraw-source"
    name: str


@dataclass(frozen=True)
class Screendump:
    """Write the guest's screen as it is now to ``path`` (absolute), a PNG (`isrsync view --screenshot`)."""

    cmd = "screendump"
    path: str


Request = Union[StatusRequest, SyncRequest, SuspendRequest, ListSources, AddSource, WithdrawSource, Screendump]
_REQUESTS: dict[str, type] = {c.cmd: c for c in (StatusRequest, SyncRequest, SuspendRequest, ListSources,
                                                  AddSource, WithdrawSource, Screendump)}
# Requests that only read: answered at once, even while a suspend or sync runs.
READ_ONLY = (StatusRequest, ListSources)

# (stream, bytes done, bytes in all or None): a step of a long request, sent to the asker.
Progress = Callable[[str, int, "int | None"], None]
Handler = Callable[[Request, Progress], Awaitable[Any]]


def encode_request(req: Request) -> bytes:
    return json.dumps({"cmd": req.cmd, **dataclasses.asdict(req)}).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """A request from one line, with every field's type checked (UsageError if not)."""
    try:
        d = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise UsageError("malformed control request") from None
    if not isinstance(d, dict):
        raise UsageError("malformed control request")
    cls = _REQUESTS.get(d.get("cmd"))  # type: ignore[arg-type]
    if cls is None:
        raise UsageError(f"unknown control command {str(d.get('cmd'))[:40]!r}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            if f.default is dataclasses.MISSING:
                raise UsageError(f"control command {cls.cmd!r} needs {f.name!r}")
            continue
        want = {"bool": bool, "str": str}[str(f.type)]
        if type(d[f.name]) is not want:
            raise UsageError(f"control command {cls.cmd!r}: {f.name!r} must be a {want.__name__}")
        kw[f.name] = d[f.name]
    return cls(**kw)


def _run_path(site_id: str, parcel: uuid.UUID) -> Path:
    return runtime_dir() / f"run-{site_id[:8]}-{str(parcel)[:8]}"


def run_dir(site_id: str, parcel: uuid.UUID) -> Path:
    # Short: unix socket paths must stay under 108 bytes.
    d = _run_path(site_id, parcel)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


RUN_LOCK = ".run.lock"
CONSOLE_SOCK = "console.sock"  # the guest's serial console, shared (site/console.py)
QEMU_SERIAL = "serial.sock"  # QEMU's own end of it: one client, the hub
# A run directory with no lock file is one being made right now, or one left
# by an older isrsync: only the latter is old enough to sweep.
_UNLOCKED_GRACE = 60.0


@contextlib.contextmanager
def claim_run_dir(site_id: str, parcel: uuid.UUID) -> Iterator[Path]:
    """The run directory of ``parcel``, held for this run and removed when it ends.

    An flock on ``.run.lock`` lasts as long as this process holds it, so a run
    that was killed leaves a directory anyone can tell is stale; the next run
    sweeps those. A second run of one parcel at one site is refused here.
    """
    sweep_stale_runs()
    d, fd = _lock_run_dir(site_id, parcel)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)


def _lock_run_dir(site_id: str, parcel: uuid.UUID) -> tuple[Path, int]:
    for attempt in range(50):
        d = run_dir(site_id, parcel)
        fd = os.open(d / RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if attempt < 5:  # `status` or a sweep may be probing it for a moment
                time.sleep(0.02)
                continue
            raise UsageError(f"parcel {parcel} is already running at this site",
                             hint="`isrsync status` shows it; `isrsync suspend` ends it") from None
        try:
            # Another start may have swept the directory between our open and our lock.
            same = os.stat(d / RUN_LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return d, fd
        os.close(fd)
    raise UsageError(f"cannot claim a run directory for parcel {parcel} in {runtime_dir()}")


def run_is_live(site_id: str, parcel: uuid.UUID) -> bool:
    """Whether a run of ``parcel`` holds its run directory now (starting, running or ending)."""
    return _held(_run_path(site_id, parcel))


def _held(d: Path) -> bool:
    try:
        fd = os.open(d / RUN_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock if it got it
    return False


def sweep_stale_runs() -> int:
    """Remove run directories (sockets, logs) that no live run holds; returns how many."""
    gone = 0
    for d in runtime_dir().glob("run-*"):
        try:
            fd = os.open(d / RUN_LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime > _UNLOCKED_GRACE:
                    shutil.rmtree(d, ignore_errors=True)
                    gone += 1
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run holds it
        else:
            shutil.rmtree(d, ignore_errors=True)
            gone += 1
        finally:
            os.close(fd)
    return gone


def running(site_id: str) -> list[tuple[str, Path]]:
    """(parcel id prefix, control socket) of parcels this site is running."""
    out = []
    for d in runtime_dir().glob(f"run-{site_id[:8]}-*"):
        sock = d / "control.sock"
        # A killed run's socket file stays until the next start sweeps it: only a held run counts.
        if sock.exists() and _held(d):
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

            def progress(stream: str, done: int, total: int | None) -> None:
                # Buffered, never awaited: a slow or gone asker must not slow the suspend.
                if not writer.is_closing():
                    writer.write(json.dumps({"progress": {"stream": stream, "done": done, "total": total}})
                                 .encode() + b"\n")

            try:
                result = await self.handler(decode_request(line), progress)
                reply: dict[str, Any] = {"ok": True, "result": _plain(result)}
            except IsrError as e:
                reply = {"ok": False, "error": str(e), "kind": type(e).__name__, "exit_code": e.exit_code}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _plain(result: Any) -> Any:
    if isinstance(result, list):
        return [_plain(r) for r in result]
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return result


async def call(path: Path, req: Request, timeout: float = 3600.0, on_progress: Progress | None = None) -> Any:
    """Send one request to a running parcel and return its result as JSON values
    (or raise its error); the ``ask_*`` functions turn it into a typed value.
    ``timeout`` bounds the wait for each line, so a long suspend that reports
    progress is not cut off while it moves."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotFound("that parcel is not running at this site", hint="`isrsync status` shows what runs here") from None
    try:
        writer.write(encode_request(req))
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise errors.QemuError("the running parcel hung up without answering")
            try:
                reply = json.loads(line)
                step = reply.get("progress") if isinstance(reply, dict) else None
                if step is None:
                    break
                if on_progress is not None:
                    on_progress(str(step["stream"]), int(step["done"]),
                                None if step["total"] is None else int(step["total"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise errors.QemuError("the running parcel sent a malformed reply") from None
    finally:
        writer.close()
    if not isinstance(reply, dict):
        raise errors.QemuError("the running parcel sent a malformed reply")
    if reply.get("ok"):
        return reply.get("result")
    cls = getattr(errors, str(reply.get("kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, IsrError)):
        cls = IsrError
    e = cls(str(reply.get("error")), hint="")
    raise e


# -- typed requests from the CLI -----------------------------------------------------------


async def ask_status(path: Path) -> RunStatus:
    return RunStatus.from_json(await call(path, StatusRequest(), timeout=30))


async def ask_suspend(path: Path, keep_lock: bool = False, *, to_medium: str = "", full: bool = False,
                      carry_lock: bool = False, on_progress: Progress | None = None) -> SuspendResult:
    req = SuspendRequest(keep_lock, to_medium, full, carry_lock)
    return SuspendResult.from_json(await call(path, req, timeout=600, on_progress=on_progress))


async def ask_sync(path: Path, on_progress: Progress | None = None) -> SyncResult:
    return SyncResult.from_json(await call(path, SyncRequest(), on_progress=on_progress))


async def ask_sources(path: Path) -> list[SourceInfo]:
    rows = await call(path, ListSources(), timeout=30)
    if not isinstance(rows, list):
        raise errors.QemuError("the running parcel sent a malformed list of sources")
    return [SourceInfo.from_json(r) for r in rows]


async def ask_add_source(path: Path, directory: str) -> SourceInfo:
    return SourceInfo.from_json(await call(path, AddSource(directory), timeout=60))


async def ask_withdraw_source(path: Path, name: str) -> None:
    await call(path, WithdrawSource(name), timeout=60)


async def find_run(site_id: str, ref: str | None) -> tuple[Path, RunStatus]:
    """The control socket and status of the parcel ``ref`` (name or id) running at
    this site, or of the only one running when ``ref`` is None. Needs no login."""
    runs = []
    for _, sock in running(site_id):
        with contextlib.suppress(NotFound, errors.QemuError, OSError, asyncio.TimeoutError):
            runs.append((sock, await ask_status(sock)))
    if ref is not None:
        runs = [(p, r) for p, r in runs if ref in (r.parcel, r.name)]
        if not runs:
            raise NotFound(f"parcel {ref} is not running at this site", hint="`isrsync status` shows what runs here")
    if not runs:
        raise NotFound("no parcel is running at this site", hint="`isrsync resume PARCEL` runs one")
    if len(runs) > 1:
        raise UsageError("several parcels run here", hint="name the one you mean")
    return runs[0]


async def ask_screendump(path: Path, png: Path) -> None:
    await call(path, Screendump(str(png)), timeout=60)
