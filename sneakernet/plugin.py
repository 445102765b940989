"""What isrsync sees of sneakernet: the ``isrsync.media`` entry point (isrsync.site.media).

isrsync never imports this package; it loads :func:`plugin` through the entry
point and uses the object it returns through the protocols of
:mod:`isrsync.site.media`. Every method here blocks (file I/O on a device that
may be slow or pulled): isrsync calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

from isrsync.site.media import MediumInfo, OnMedium, Progress

from . import format as fmt
from . import medium as md
from .attach import MediumDevice
from .known import index_and_remember
from .mounts import default_media_dir, read_mountinfo
from .seed import SeedSource, open_seeds
from .source import MediumSource
from .watch import Watcher


class Sink:
    """One publishing run of a :class:`~sneakernet.medium.MediumWriter`."""

    def __init__(self, root: Path) -> None:
        self.medium = md.open_medium(root)
        self.medium_id, self.label = self.medium.medium_id, self.medium.label
        self.name = f"{self.medium.label or 'medium'} ({self.medium.medium_id.hex[:8]})"
        self._w = self.medium.writer()

    def add_chunks(self, chunks: Iterable[tuple[bytes, bytes]], progress: Progress | None = None) -> int:
        written = 0

        def counted() -> Iterator[tuple[bytes, bytes]]:
            nonlocal written
            for tag, data in chunks:
                yield tag, data
                written += len(data)
                if progress is not None:
                    progress(len(data))

        self._w.add_chunks(counted())
        return written

    def add_manifest(self, raw: bytes) -> None:
        self._w.add_manifest(raw)

    def set_keybundle(self, sealed: bytes) -> None:
        self._w.set_keybundle(sealed)

    def set_lock_token(self, parcel: uuid.UUID, token: bytes) -> None:
        self._w.set_lock_token(parcel, token)

    def publish(self) -> None:
        self._w.publish()

    def abort(self) -> None:
        self._w.abort()


class Media:
    def is_medium(self, path: Path) -> bool:
        return md.read_header(path) is not None if path.is_dir() else False

    def info(self, path: Path) -> MediumInfo:
        m = md.open_medium(path)
        return MediumInfo(m.root, m.medium_id, m.label)

    def open_source(self, path: Path, cache_dir: Path) -> MediumSource:
        done = index_and_remember(path, cache_dir)
        return MediumSource(path, index_dir=done.index_dir)

    def open_sink(self, path: Path) -> Sink:
        return Sink(path)

    def find_media(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for e in read_mountinfo():
            if e.root == "/" and (e.mountpoint / fmt.DIR / fmt.HEADER_FILE).is_file():
                seen.setdefault(e.mountpoint, None)
        return list(seen)

    def read_manifests(self, path: Path, parcel: uuid.UUID) -> dict[int, bytes]:
        return md.parcel_manifests(md.open_medium(path).root, parcel)

    def read_keybundle(self, path: Path) -> bytes | None:
        return md.open_medium(path).keybundle()

    def read_lock_token(self, path: Path, parcel: uuid.UUID) -> bytes | None:
        return md.open_medium(path).lock_token(parcel)

    @contextlib.asynccontextmanager
    async def watch(self, on_medium: OnMedium, on_gone: OnMedium) -> AsyncIterator[Watcher]:
        async def appeared(dev: MediumDevice) -> None:
            await on_medium(dev.mountpoint)

        async def went(dev: MediumDevice) -> None:
            await on_gone(dev.mountpoint)

        # A resume never mounts anything itself: it would mount every unmounted
        # filesystem of the machine to look for .isrsync/. It offers media that
        # are mounted (by a desktop's udisks2, the udev unit, or the user) as
        # the mounts come and go.
        async with Watcher(default_media_dir(), appeared, went, mount=False) as w:
            yield w


    def open_seeds(self, cache_dir: Path, secret: bytes) -> list[SeedSource]:
        return open_seeds(cache_dir, secret)


def plugin() -> Media:
    return Media()
