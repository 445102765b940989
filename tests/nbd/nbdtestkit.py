"""Helpers for driving an :class:`isrsync.vm.nbd.NbdServer` with real NBD clients.

Shared by tests/nbd and tests/disk (tests/disk loads this file by path through
its ``diskkit`` module). Everything here is async: the server runs in the test's
own event loop and the clients (qemu-io, qemu-img, nbdinfo, nbdcopy) run as
asyncio subprocesses, so the loop keeps serving while they talk to it.

The random operation sequence (:func:`gen_ops`) is applied with qemu-io to the
export and mirrored in a :class:`Model` (a bytearray); every read is dumped by
qemu-io (``read -v``) and compared with what the model held at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from isrsync.vm import nbd

CH = 128 * 1024  # the parcel chunk size: straddling its boundaries is the point

for _tool in ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy"):
    assert shutil.which(_tool), f"{_tool} is required (apt-get install qemu-utils libnbd-bin)"


# -- running clients ---------------------------------------------------------------------


@dataclass
class Result:
    cmd: list[str]
    rc: int
    out: str
    err: str

    def check(self) -> Result:
        assert self.rc == 0, f"{self.cmd[0]} failed (rc={self.rc}):\n{self.err[-3000:]}\n{self.out[-2000:]}"
        return self


async def run(*cmd: str | os.PathLike[str], timeout: float = 60.0) -> Result:
    """Run a client to completion without blocking the event loop (the server's)."""
    args = [str(c) for c in cmd]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return Result(args, proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


async def ok(*cmd: str | os.PathLike[str], timeout: float = 60.0) -> Result:
    """Run a client that must succeed."""
    return (await run(*cmd, timeout=timeout)).check()


def uri(sock: Path, name: str = "disk") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


async def qemu_io(u: str, *cmds: str, timeout: float = 60.0, read_only: bool = False) -> Result:
    args = ["qemu-io", "-f", "raw"]
    if read_only:
        args.append("-r")
    for c in cmds:
        args += ["-c", c]
    return await run(*args, u, timeout=timeout)


async def export_bytes(u: str, dest: Path, tool: str = "qemu-img") -> bytes:
    """The whole export, copied to ``dest`` by a real client."""
    dest.unlink(missing_ok=True)
    if tool == "qemu-img":
        await ok("qemu-img", "convert", "-f", "raw", "-O", "raw", u, dest)
    else:
        await ok("nbdcopy", "--requests=32", u, dest)
    return dest.read_bytes()


# -- a served export ---------------------------------------------------------------------


class Served:
    """An NbdServer on a unix socket in a short private directory."""

    def __init__(self, backend: nbd.BlockBackend, name: str = "disk") -> None:
        self.backend = backend
        self.server = nbd.NbdServer(backend, name)
        # sun_path is 108 bytes: pytest's tmp_path can be longer than that.
        self.dir = Path(tempfile.mkdtemp(prefix="isr-nbd-", dir="/tmp"))
        self.sock = self.dir / "s"
        self.uri = uri(self.sock, name)

    async def start(self) -> Served:
        await self.server.start_unix(self.sock)
        return self

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.close(timeout=3.0)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- hexdumps ----------------------------------------------------------------------------

_DUMP = re.compile(r"^([0-9a-f]{8,}):  ")


def parse_dumps(out: str, reads: list[tuple[int, int]]) -> list[bytes]:
    """Split qemu-io ``read -v`` dumps back into the bytes of each read, in order."""
    lines = [ln for ln in out.splitlines() if _DUMP.match(ln)]
    got: list[bytes] = []
    pos = 0
    for off, length in reads:
        buf = bytearray()
        cur, end = off, off + length
        while cur < end:
            assert pos < len(lines), f"dump of read {off}+{length} is truncated"
            ln = lines[pos]
            pos += 1
            colon = ln.index(":")
            assert int(ln[:colon], 16) == cur, f"dump line {ln[:20]!r} out of sequence (want {cur:#x})"
            n = min(16, end - cur)
            buf += bytes.fromhex(ln[colon + 3 : colon + 3 + 3 * n])
            cur += n
        got.append(bytes(buf))
    assert pos == len(lines), "more dump lines than reads"
    return got


# -- random operations and their model ------------------------------------------------------


@dataclass
class Op:
    kind: str  # read | write (random data) | pattern | zero | discard | flush
    offset: int = 0
    length: int = 0
    pattern: int = 0
    data: bytes = b""
    fua: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def writes(self) -> bool:
        return self.kind in ("write", "pattern", "zero", "discard")

    def chunks(self) -> range:
        if not self.writes or not self.length:
            return range(0)
        return range(self.offset // CH, (self.end - 1) // CH + 1)

    def straddles(self) -> bool:
        return self.length > 0 and self.offset // CH != (self.end - 1) // CH


def _span(rng: random.Random, size: int) -> tuple[int, int]:
    nchunks = (size + CH - 1) // CH
    shape = rng.random()
    if shape < 0.45 and nchunks > 1:  # straddle a chunk boundary, unaligned both ends
        b = rng.randrange(1, nchunks) * CH
        off, end = max(0, b - rng.randint(1, 40_000)), min(size, b + rng.randint(1, 40_000))
    elif shape < 0.58:  # several chunks, unaligned
        off = rng.randrange(size)
        end = min(size, off + rng.randint(CH, 2 * CH + CH // 2))
    elif shape < 0.68:  # whole chunks, aligned (no read-modify-write)
        c = rng.randrange(nchunks)
        off, end = c * CH, min(size, (c + rng.randint(1, 2)) * CH)
    elif shape < 0.74:  # the tail of the disk (the short last chunk)
        end = size
        off = max(0, size - rng.randint(1, 70_000))
    else:  # small and unaligned
        off = rng.randrange(size)
        end = min(size, off + rng.randint(1, 9_000))
    if end <= off:
        end = min(size, off + 1)
        off = end - 1
    return off, end


def gen_ops(seed: int, size: int, n: int) -> list[Op]:
    """A seeded random sequence of reads, writes, write-zeroes, discards and flushes."""
    rng = random.Random(seed)
    kinds = ["read", "write", "pattern", "zero", "discard", "flush"]
    weights = [30, 20, 14, 13, 12, 8]
    ops: list[Op] = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "flush":
            ops.append(Op("flush"))
            continue
        off, end = _span(rng, size)
        op = Op(kind, off, end - off, fua=kind in ("write", "pattern") and rng.random() < 0.1)
        if kind == "write":
            op.data = rng.randbytes(op.length)
        elif kind == "pattern":
            op.pattern = 0 if rng.random() < 0.1 else rng.randrange(1, 256)
        ops.append(op)
    return ops


class Model:
    """What the export must contain: a bytearray with the same operations applied."""

    def __init__(self, initial: bytes) -> None:
        self.buf = bytearray(initial)
        self.written: set[int] = set()  # chunk indices any write-like op touched

    def apply(self, op: Op) -> bytes | None:
        if op.kind == "read":
            return bytes(self.buf[op.offset : op.end])
        if op.kind == "write":
            self.buf[op.offset : op.end] = op.data
        elif op.kind == "pattern":
            self.buf[op.offset : op.end] = bytes([op.pattern]) * op.length
        elif op.kind in ("zero", "discard"):
            self.buf[op.offset : op.end] = bytes(op.length)
        self.written.update(op.chunks())
        return None


def _command(op: Op, datafile: Path | None) -> str:
    f = " -f" if op.fua else ""
    if op.kind == "read":
        return f"read -v {op.offset} {op.length}"
    if op.kind == "write":
        assert datafile is not None
        return f"write -q{f} -s {datafile} {op.offset} {op.length}"
    if op.kind == "pattern":
        return f"write -q{f} -P {op.pattern:#x} {op.offset} {op.length}"
    if op.kind == "zero":
        return f"write -q -z {op.offset} {op.length}"
    if op.kind == "discard":
        return f"discard -q {op.offset} {op.length}"
    return "flush"


@dataclass
class RunStats:
    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    straddling: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


async def apply_ops(u: str, ops: list[Op], model: Model, workdir: Path, batch: int = 60) -> RunStats:
    """Apply ``ops`` to the export with qemu-io (``batch`` commands per process, so
    one connection carries many requests) and to ``model``; every read is checked
    against the model as it was when the read was issued."""
    workdir.mkdir(parents=True, exist_ok=True)
    st = RunStats()
    for b0 in range(0, len(ops), batch):
        cmds: list[str] = []
        reads: list[tuple[int, int, bytes, int]] = []
        for k, op in enumerate(ops[b0 : b0 + batch], start=b0):
            datafile = None
            if op.kind == "write":
                datafile = workdir / f"op{k}.bin"
                datafile.write_bytes(op.data)
            cmds.append(_command(op, datafile))
            want = model.apply(op)
            if want is not None:
                reads.append((op.offset, op.length, want, k))
            st.kinds[op.kind] = st.kinds.get(op.kind, 0) + 1
            st.straddling += op.straddles()
            st.writes += op.writes
        res = await qemu_io(u, *cmds, timeout=120)
        assert res.rc == 0 and "failed" not in res.err + res.out, (
            f"qemu-io batch at op {b0} failed (rc={res.rc}): {res.err[-2000:]}"
        )
        got = parse_dumps(res.out, [(o, n) for o, n, _, _ in reads])
        for (o, n, want, k), data in zip(reads, got):
            if data != want:
                bad = next(i for i in range(n) if data[i] != want[i])
                raise AssertionError(
                    f"op {k}: read {o}+{n} differs from the model at offset {o + bad} "
                    f"(chunk {(o + bad) // CH}): got {data[bad:bad + 8].hex()} want {want[bad:bad + 8].hex()}"
                )
            st.reads += 1
            st.read_bytes += n
    return st


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    for off in range(0, len(a), CH):
        if a[off : off + CH] != b[off : off + CH]:
            i = next(j for j in range(off, min(len(a), off + CH)) if a[j] != b[j])
            return f"first difference at {i} (chunk {i // CH})"
    return "identical"


def mixed_image(size: int, seed: int) -> bytes:
    """Disk-like content: zero chunks, compressible text, random bytes, a repeated chunk."""
    rng = random.Random(seed)
    text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py"))[:20])
    out = bytearray()
    n = (size + CH - 1) // CH
    first_random: bytes | None = None
    for i in range(n):
        kind = i % 5
        if kind == 0:
            c = bytes(CH)
        elif kind == 1:
            s = rng.randrange(len(text) - CH)
            c = text[s : s + CH]
        elif kind == 2:
            c = rng.randbytes(CH)
            first_random = first_random or c
        elif kind == 3:  # mostly zeros with a little data: compressible, not ZERO
            b = bytearray(CH)
            p = rng.randrange(CH - 64)
            b[p : p + 64] = rng.randbytes(64)
            c = bytes(b)
        else:  # a repeat of an earlier chunk: dedups to one tag
            c = first_random or rng.randbytes(CH)
        out += c
    return bytes(out[:size])


# -- a minimal raw NBD client (for what real clients never send) ---------------------------------


class RawClient:
    """Speaks fixed-newstyle NBD by hand over a unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.handle = 0

    @classmethod
    async def connect(cls, sock: Path) -> tuple[RawClient, int]:
        r, w = await asyncio.open_unix_connection(str(sock))
        c = cls(r, w)
        magic, opt_magic, hflags = struct.unpack(">QQH", await asyncio.wait_for(r.readexactly(18), 10))
        assert magic == nbd.NBDMAGIC and opt_magic == nbd.IHAVEOPT
        return c, hflags

    def send(self, data: bytes) -> None:
        self.w.write(data)

    def client_flags(self, flags: int) -> None:
        self.w.write(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.w.write(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)

    async def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, n = struct.unpack(">QIII", await asyncio.wait_for(self.r.readexactly(20), 10))
        assert magic == nbd.OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return opt, rtype, await self.r.readexactly(n)

    async def read_exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.r.readexactly(n), 10)

    async def eof(self, timeout: float = 10.0) -> bool:
        """True when the server hangs up (anything it still sends is drained)."""
        try:
            while True:
                if not await asyncio.wait_for(self.r.read(65536), timeout):
                    return True
        except (ConnectionError, asyncio.IncompleteReadError):
            return True

    def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        self.handle += 1
        self.w.write(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, self.handle, offset, length) + data)
        return self.handle

    async def simple_reply(self, payload: int = 0) -> tuple[int, int, bytes]:
        magic, err, handle = struct.unpack(">IIQ", await self.read_exactly(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        data = await self.read_exactly(payload) if payload and not err else b""
        return err, handle, data

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(Exception):
            await self.w.wait_closed()
