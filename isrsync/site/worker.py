"""The asyncio side of a source that reads files on a worker thread of its own.

Re-exported by :mod:`isrsync.site.sources` (the Source protocol's module, all a
media plugin may import): directory, medium and seed sources build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


class WorkerSource:
    """The asyncio side of a source whose file work runs on a worker thread of its own.

    A directory on a slow or hung network filesystem, or a dying USB key, must
    block neither the event loop serving a guest's disk nor the shared thread
    pool: a subclass does its reads in :meth:`_read` (on the worker) and
    releases its files in :meth:`_release` (on the worker, at close). Its cost
    is learned from answers, starting at ``per_chunk`` seconds a chunk.
    """

    name: str

    def __init__(self, per_chunk: float, thread_name: str) -> None:
        self._per_chunk = per_chunk
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=thread_name)

    def cost(self) -> float:
        return self._per_chunk

    def _read(self, tags: list[bytes]) -> dict[bytes, bytes]:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _closed_error(self) -> OSError:
        return OSError(f"the source {self.name} is closed")

    async def _on_worker(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            # Checked here, not only on the worker: the pool is shut down by now,
            # and submitting to it would fail with a RuntimeError, not as a source.
            raise self._closed_error()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        if not tags and not self._closed:
            return {}
        t0 = time.perf_counter()
        out = await self._on_worker(self._read, list(tags))
        if out:
            self._per_chunk = 0.8 * self._per_chunk + 0.2 * (time.perf_counter() - t0) / len(out)
        return out

    async def close(self) -> None:
        if self._closed:
            return
        # Set on the loop, before the worker gets to _release: reads already queued
        # behind a hung one then fail instead of reopening files.
        self._closed = True
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._release)
        with contextlib.suppress(asyncio.TimeoutError):
            # A hung filesystem or a dying medium may hold the worker: give it a moment, never wait forever.
            await asyncio.wait_for(asyncio.shield(fut), 2.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
