"""Fixtures for tests/nbd: an NbdServer over a RawFileBackend on a unix socket.

``raw_export(size, seed=..., read_only=False, backend=RawFileBackend)`` writes an
image file of random content (with some zero regions) under tmp_path, serves it
and returns ``(served, path, initial_bytes)``; every server it started is
closed and its socket directory removed at teardown.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nbdtestkit import CH, Served

from isrsync.vm.nbd import RawFileBackend


@pytest.fixture
async def raw_export(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[Served, Path, bytes]]]]:
    made: list[tuple[Served, RawFileBackend]] = []

    async def make(
        size: int, seed: int = 1, read_only: bool = False, backend: type[RawFileBackend] = RawFileBackend
    ) -> tuple[Served, Path, bytes]:
        rng = random.Random(seed)
        data = bytearray(rng.randbytes(size))
        for c in range(0, size, 3 * CH):  # every third chunk starts as zeros
            data[c : c + CH] = bytes(len(data[c : c + CH]))
        path = tmp_path / f"export-{len(made)}.img"
        path.write_bytes(data)
        b = backend(path, read_only=read_only)
        s = await Served(b).start()
        made.append((s, b))
        return s, path, bytes(data)

    yield make
    for s, b in reversed(made):
        await s.close()
        b.close()
