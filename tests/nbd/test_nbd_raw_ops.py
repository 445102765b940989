"""NbdServer over a plain file, checked byte for byte against a model by real clients."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from nbdtestkit import (
    CH,
    Model,
    apply_ops,
    export_bytes,
    first_difference,
    gen_ops,
    ok,
    qemu_io,
)

from isrsync.vm.nbd import RawFileBackend

SIZE = 24 * CH + 96 * 1024  # the last chunk is short
SEED = 20240611


async def test_random_ops_match_a_model(raw_export, tmp_path: Path) -> None:
    served, path, initial = await raw_export(SIZE, seed=SEED)
    ops = gen_ops(SEED, SIZE, 320)
    model = Model(initial)
    st = await apply_ops(served.uri, ops, model, tmp_path / "ops")
    # the sequence is what it claims to be
    assert len(ops) >= 300 and st.reads >= 60 and st.straddling >= 100
    assert all(st.kinds.get(k, 0) >= 15 for k in ("read", "write", "pattern", "zero", "discard", "flush")), st.kinds
    assert any(op.offset % 512 for op in ops) and any(op.length % 512 for op in ops)
    assert any(op.end == SIZE for op in ops if op.writes)
    want = bytes(model.buf)
    got = await export_bytes(served.uri, tmp_path / "export.img", "qemu-img")
    assert got == want, first_difference(got, want)
    assert path.read_bytes() == want, first_difference(path.read_bytes(), want)
    assert served.server.requests >= len(ops)


async def test_nbdcopy_both_directions(raw_export, tmp_path: Path) -> None:
    served, path, _ = await raw_export(SIZE, seed=3)
    rng = random.Random(4)
    src = bytearray(rng.randbytes(SIZE))
    src[2 * CH : 5 * CH] = bytes(3 * CH)  # a zero run: nbdcopy may send it as WRITE_ZEROES
    srcfile = tmp_path / "src.img"
    srcfile.write_bytes(src)
    await ok("nbdcopy", "--connections=4", "--requests=32", "--request-size=65536", "--flush", srcfile, served.uri)
    assert path.read_bytes() == bytes(src), first_difference(path.read_bytes(), bytes(src))
    out = tmp_path / "out.img"
    await ok("nbdcopy", "--connections=4", "--requests=64", "--request-size=32768", served.uri, out)
    assert out.read_bytes() == bytes(src)
    assert await export_bytes(served.uri, tmp_path / "q.img", "qemu-img") == bytes(src)


class _SlowFile(RawFileBackend):
    """A raw file whose requests take a little time, so that many overlap."""

    inflight = 0
    peak = 0

    async def _hold(self) -> None:
        type(self).inflight += 1
        type(self).peak = max(type(self).peak, type(self).inflight)
        try:
            await asyncio.sleep(0.002)
        finally:
            type(self).inflight -= 1

    async def read(self, offset: int, length: int) -> bytes:
        await self._hold()
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._hold()
        await super().write(offset, data)


async def test_many_requests_in_flight(raw_export, tmp_path: Path) -> None:
    _SlowFile.peak = 0
    size = 64 * CH
    served, path, _ = await raw_export(size, seed=9, backend=_SlowFile)
    src = random.Random(10).randbytes(size)
    (tmp_path / "src.img").write_bytes(src)
    await ok("nbdcopy", "--requests=64", "--request-size=4096", "--flush", tmp_path / "src.img", served.uri)
    assert path.read_bytes() == src
    write_peak, _SlowFile.peak = _SlowFile.peak, 0
    out = tmp_path / "out.img"
    await ok("nbdcopy", "--requests=64", "--request-size=4096", served.uri, out)
    assert out.read_bytes() == src
    # the server really had many requests of one connection in progress at once
    assert write_peak >= 8 and _SlowFile.peak >= 8, f"peak requests in flight: writes {write_peak}, reads {_SlowFile.peak}"


async def test_concurrent_clients_on_disjoint_ranges(raw_export, tmp_path: Path) -> None:
    served, path, initial = await raw_export(SIZE, seed=11)
    model = bytearray(initial)
    jobs = []
    for k in range(6):
        # each client owns a range that straddles a chunk boundary
        off, n = (3 * k + 1) * CH - 5000 - k, 30000 + 17 * k
        data = random.Random(100 + k).randbytes(n)
        f = tmp_path / f"c{k}.bin"
        f.write_bytes(data)
        model[off : off + n] = data
        jobs.append(qemu_io(served.uri, f"write -q -s {f} {off} {n}", "flush"))
    for res in await asyncio.gather(*jobs):
        res.check()
    assert path.read_bytes() == bytes(model)
