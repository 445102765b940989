"""An NBD server (fixed newstyle) that QEMU's own NBD client uses as the guest's disk.

The successor of ISR's Vulpes: it speaks the protocol, and a :class:`BlockBackend`
does the storage (the parcel disk with demand fetch in :mod:`isrsync.site.disk`,
or a raw file for tests and benchmarks). Requests are served concurrently, one
task each, and replies may go out of order as the protocol allows; the backend
is responsible for ordering overlapping writes.

Backpressure: per connection, at most :data:`MAX_INFLIGHT` requests are in
flight and at most :data:`MAX_QUEUED` bytes of read data and write payloads are
held (being read, or waiting for the client to take the reply); past either
bound the server stops reading requests until replies have gone out, so a
client that sends without reading cannot grow the server. Both bounds are above
what QEMU's NBD client keeps in flight (16 requests), so a guest never meets
them (benchmarks/nbd_depth.py). Failed requests are logged at most once a second
per connection, with a count of the rest.

Implemented: handshake flags FIXED_NEWSTYLE and NO_ZEROES; options EXPORT_NAME,
ABORT, LIST, INFO, GO (with EXPORT and BLOCK_SIZE info); commands READ, WRITE,
DISC, FLUSH, TRIM, WRITE_ZEROES and CACHE, with the FUA flag. Structured replies
and meta contexts are declined, which QEMU handles by using simple replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger("isrsync.nbd")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_CACHE = 1 << 10

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1

MAX_REQUEST = 32 << 20  # what we advertise as the maximum block size
MAX_INFLIGHT = 64  # requests per connection (QEMU keeps at most 16; nbdcopy 64)
MAX_QUEUED = 64 << 20  # bytes of data per connection (one MAX_REQUEST always fits)
WARN_INTERVAL = 1.0  # seconds between failure lines of one connection
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


class BlockBackend(Protocol):
    """Storage behind an export. Offsets and lengths are already range-checked."""

    size: int
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None:
        """A durability point: everything acknowledged so far survives a crash."""

    async def cache(self, offset: int, length: int) -> None:
        """A hint that this range will be read: fetch it now if it is remote."""


class NbdError(Exception):
    """A request failed with an errno to send back to the client."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or os.strerror(err))
        self.errno = err


class _ProtocolError(Exception):
    pass


class _Budget:
    """Requests and bytes a connection holds; :meth:`take` waits while either is spent."""

    def __init__(self, requests: int, nbytes: int) -> None:
        self._requests, self._bytes = requests, nbytes
        self.inflight = 0
        self.held = 0
        self._freed = asyncio.Event()

    def full(self, nbytes: int) -> bool:
        # A request larger than what is left still goes once nothing is held,
        # or it could never be served.
        return self.inflight >= self._requests or bool(self.held and self.held + nbytes > self._bytes)

    async def take(self, nbytes: int) -> None:
        while self.full(nbytes):
            self._freed.clear()
            await self._freed.wait()
        self.inflight += 1
        self.held += nbytes

    def give(self, nbytes: int) -> None:
        self.inflight -= 1
        self.held -= nbytes
        self._freed.set()


class _Warnings:
    """Failure lines of one connection, at most one per WARN_INTERVAL; the rest are counted."""

    def __init__(self) -> None:
        self._last = -WARN_INTERVAL
        self._quiet = 0

    def __call__(self, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < WARN_INTERVAL:
            self._quiet += 1
            return
        if self._quiet:
            msg += " (and %d more failed request(s) not logged)"
            args = (*args, self._quiet)
        self._last, self._quiet = now, 0
        log.warning(msg, *args, exc_info=exc_info)

    def flush(self) -> None:
        if self._quiet:
            log.warning("%d more failed nbd request(s) not logged", self._quiet)
            self._quiet = 0


class NbdServer:
    """Serves one export (named ``name``) from a backend on a unix or TCP socket."""

    def __init__(self, backend: BlockBackend, name: str = "disk") -> None:
        self.backend = backend
        self.name = name
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.requests = 0

    async def start_unix(self, path: str | os.PathLike[str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._client, path=str(path))
        os.chmod(path, 0o600)  # the guest's disk: only this user may attach

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._client, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self, timeout: float = 30.0) -> None:
        """Stop listening, hang up on clients, and let their handlers finish
        (in-flight requests and the final flush) before returning."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        tasks = list(self._conns)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for t in late:
                t.cancel()
            for t in late:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        try:
            if await self._handshake(reader, writer):
                await self._transmission(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, _ProtocolError) as e:
            log.debug("nbd client gone: %s", e)
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- handshake -----------------------------------------------------------------

    def _tflags(self) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE
        if self.backend.read_only:
            f |= TF_READ_ONLY
        else:
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return f

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        (cflags,) = struct.unpack(">I", await reader.readexactly(4))
        if not cflags & FLAG_C_FIXED_NEWSTYLE or cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _ProtocolError(f"unsupported client flags {cflags:#x}")
        no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(await reader.readexactly(_OPT.size))
            if magic != IHAVEOPT:
                raise _ProtocolError("bad option magic")
            if length > 65536:
                raise _ProtocolError("option too long")
            data = await reader.readexactly(length)
            if opt == OPT_EXPORT_NAME:
                if data.decode(errors="replace") not in (self.name, ""):
                    raise _ProtocolError("unknown export")  # EXPORT_NAME can only hang up
                writer.write(struct.pack(">QH", self.backend.size, self._tflags()))
                if not no_zeroes:
                    writer.write(bytes(124))
                await writer.drain()
                return True
            if opt == OPT_ABORT:
                self._opt_reply(writer, opt, REP_ACK)
                await writer.drain()
                return False
            if opt == OPT_LIST:
                if data:
                    self._opt_reply(writer, opt, REP_ERR_INVALID)
                else:
                    name = self.name.encode()
                    self._opt_reply(writer, opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                    self._opt_reply(writer, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if self._info(writer, opt, data) and opt == OPT_GO:
                    await writer.drain()
                    return True
            elif opt == OPT_STARTTLS:
                self._opt_reply(writer, opt, REP_ERR_POLICY)
            else:
                self._opt_reply(writer, opt, REP_ERR_UNSUP)
            await writer.drain()

    def _info(self, writer: asyncio.StreamWriter, opt: int, data: bytes) -> bool:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + nlen].decode()
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * nreq:
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError):
            self._opt_reply(writer, opt, REP_ERR_INVALID)
            return False
        if name not in (self.name, ""):
            self._opt_reply(writer, opt, REP_ERR_UNKNOWN)
            return False
        self._opt_reply(writer, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.backend.size, self._tflags()))
        # Always tell the block sizes: 1-byte minimum (we do read-modify-write),
        # the chunk size as preferred, our request limit as maximum.
        self._opt_reply(writer, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 128 * 1024, MAX_REQUEST))
        self._opt_reply(writer, opt, REP_ACK)
        return True

    @staticmethod
    def _opt_reply(writer: asyncio.StreamWriter, opt: int, rtype: int, data: bytes = b"") -> None:
        writer.write(_OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    # -- transmission --------------------------------------------------------------

    async def _transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        wlock = asyncio.Lock()
        inflight: set[asyncio.Task] = set()
        budget = _Budget(MAX_INFLIGHT, MAX_QUEUED)
        warn = _Warnings()
        try:
            while True:
                magic, flags, cmd, handle, offset, length = _REQ.unpack(await reader.readexactly(_REQ.size))
                if magic != REQUEST_MAGIC:
                    raise _ProtocolError("bad request magic")
                self.requests += 1
                if cmd == CMD_DISC or writer.is_closing():
                    # (Closing: requests still buffered here would be answered into a dead socket.)
                    break
                if cmd == CMD_WRITE and length > MAX_REQUEST:
                    raise _ProtocolError("write larger than the advertised maximum")
                # What this request will hold until its reply is out: its payload,
                # or the data it reads (a read too large is refused, holding nothing).
                held = length if cmd == CMD_WRITE or (cmd == CMD_READ and length <= MAX_REQUEST) else 0
                # Past the bounds, stop reading requests: the client's writes then
                # back up in its own socket, not in this process.
                if budget.full(held):
                    await budget.take(held)
                else:  # the common case, without a coroutine per request
                    budget.inflight += 1
                    budget.held += held
                try:
                    payload = await reader.readexactly(length) if cmd == CMD_WRITE else b""
                except BaseException:
                    budget.give(held)
                    raise
                t = asyncio.create_task(
                    self._do(writer, wlock, flags, cmd, handle, offset, length, payload, budget, held, warn))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
        finally:
            # DISC: finish what is in flight (and make it durable) before closing.
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
            warn.flush()
            with contextlib.suppress(Exception):
                await self.backend.flush()

    async def _do(
        self, writer: asyncio.StreamWriter, wlock: asyncio.Lock, flags: int, cmd: int, handle: int,
        offset: int, length: int, payload: bytes, budget: _Budget, held: int, warn: _Warnings,
    ) -> None:
        """One request, answered; what it holds goes back to the budget once its reply is out."""
        data = b""
        err = 0
        try:
            try:
                err = self._check(cmd, offset, length)
                if not err:
                    b = self.backend
                    if cmd == CMD_READ:
                        data = await b.read(offset, length)
                    elif cmd == CMD_WRITE:
                        await b.write(offset, payload)
                    elif cmd == CMD_FLUSH:
                        await b.flush()
                    elif cmd == CMD_TRIM:
                        await b.trim(offset, length)
                    elif cmd == CMD_WRITE_ZEROES:
                        await b.write_zeroes(offset, length)
                    elif cmd == CMD_CACHE:
                        await b.cache(offset, length)
                    else:
                        err = errno.EINVAL
                    if not err and flags & CMD_FLAG_FUA and cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM):
                        await b.flush()
            except NbdError as e:
                warn("nbd request %d at %d+%d failed: %s", cmd, offset, length, e)
                err, data = e.errno, b""
            except Exception:  # noqa: BLE001 - one bad request must not kill the disk
                warn("nbd request %d at %d+%d failed", cmd, offset, length, exc_info=True)
                err, data = errno.EIO, b""
            header = _REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle)
            if writer.is_closing():
                return  # the client is gone (or the server is closing): nobody to answer
            async with wlock:
                # One send per reply: header and data together.
                writer.writelines([header, data] if cmd == CMD_READ and not err else [header])
                await writer.drain()
        finally:
            budget.give(held)

    def _check(self, cmd: int, offset: int, length: int) -> int:
        if cmd in (CMD_FLUSH,):
            return 0
        if offset + length > self.backend.size:
            return errno.EINVAL if cmd != CMD_WRITE else errno.ENOSPC
        if length > MAX_REQUEST and cmd in (CMD_READ, CMD_WRITE):
            return errno.EINVAL
        if self.backend.read_only and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return errno.EPERM
        return 0


class RawFileBackend:
    """A plain file as the export: the reference the parcel disk is compared with."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self._fd).st_size

    async def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    async def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)

    async def write_zeroes(self, offset: int, length: int) -> None:
        os.pwrite(self._fd, bytes(length), offset)

    async def trim(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    async def flush(self) -> None:
        os.fsync(self._fd)

    async def cache(self, offset: int, length: int) -> None:
        return None

    def close(self) -> None:
        os.close(self._fd)
