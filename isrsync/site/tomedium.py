"""A suspend copied to a medium (`isrsync suspend --to-usb`), beside the upload.

The medium gets what a resume elsewhere would otherwise pull over the link: the
memory image and the chunks the guest wrote (with ``full``, the whole parcel),
then, once the commit is made, the encrypted manifests of the new version and
the sealed key bundle. Everything it gets is ciphertext: a lost key reveals
nothing. Only verified chunks from the site cache are written, and nothing is
listed on the medium before the final publish, so a key pulled early holds the
last published state, never half of this one.

The copy only ever helps: a full, read-only or pulled medium gives one warning,
the copy is dropped, and the suspend (upload and commit) goes on without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable, Iterator

from ..errors import IsrError
from .cache import SiteCache
from .media import MediumSink
from .results import MediumCopyResult

log = logging.getLogger("isrsync.tomedium")

# (stream, bytes done, bytes in all or None while unknown)
StreamProgress = Callable[[str, int, "int | None"], None]


class MediumCopy:
    """One copy to one medium: :meth:`chunks` while the upload runs, then :meth:`finish`."""

    def __init__(self, sink: MediumSink, cache: SiteCache, progress: StreamProgress | None = None) -> None:
        self.sink = sink
        self.cache = cache
        self.progress = progress or (lambda stream, done, total: None)
        self.problem: str | None = None
        self._chunks = 0
        self._bytes = 0
        self._missing = 0
        self._t0 = time.perf_counter()

    async def chunks(self, tags: list[bytes]) -> None:
        """Write the chunks of ``tags`` the site cache holds (verified) to the medium."""
        if self.problem is not None:
            return
        tags = list(dict.fromkeys(tags))
        total = len(tags) * (128 << 10)  # an estimate until read: compressed chunks are smaller

        def read() -> Iterator[tuple[bytes, bytes]]:
            for tag in tags:
                data = self.cache.get(tag)
                if data is None:
                    self._missing += 1
                    continue
                self._chunks += 1
                yield tag, data

        loop = asyncio.get_running_loop()

        def moved(n: int) -> None:  # on the writer's thread; the progress sink lives on the loop
            self._bytes += n
            loop.call_soon_threadsafe(self.progress, "medium", self._bytes, max(total, self._bytes))

        await self._guard(lambda: self.sink.add_chunks(read(), moved))

    async def finish(self, manifests: list[bytes], keybundle: bytes | None = None,
                     lock_token: tuple[uuid.UUID, bytes] | None = None) -> MediumCopyResult:
        """Add the manifests (and key bundle, lock token) and publish; or drop the copy."""

        def publish() -> None:
            for raw in manifests:
                self.sink.add_manifest(raw)
            if keybundle is not None:
                self.sink.set_keybundle(keybundle)
            if lock_token is not None:
                self.sink.set_lock_token(*lock_token)
            self.sink.publish()

        if self.problem is None:
            await self._guard(publish)
        if self.problem is not None:
            await asyncio.to_thread(self._abort)
        self.progress("medium", self._bytes, self._bytes)
        return MediumCopyResult(self.sink.name, self.problem is None, self._chunks, self._bytes,
                                round(time.perf_counter() - self._t0, 3), self._missing, self.problem)

    async def drop(self, why: str) -> MediumCopyResult:
        self.problem = self.problem or why
        return await self.finish([])

    async def _guard(self, work: Callable[[], object]) -> None:
        try:
            await asyncio.to_thread(work)
        except IsrError as e:
            self.problem = str(e)
        except OSError as e:
            # A key pulled mid-write: the medium code maps what it expects; anything
            # else from the device is still only a failed copy.
            self.problem = f"writing to the medium failed: {e.strerror or e}"

    def _abort(self) -> None:
        try:
            self.sink.abort()
        except (IsrError, OSError) as e:
            log.info("cleaning up the dropped copy on the medium: %s", e)
