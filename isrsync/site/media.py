"""Removable media (USB keys, SD cards, any directory carrying ``.isrsync/``) as the site sees them.

isrsync never imports the package that implements media (``sneakernet``): it
finds it through the ``isrsync.media`` entry point group, and talks to it only
through the protocols below (DESIGN.md, "Layout": isrsync reaches sneakernet
only through the Source protocol). A site without that package still runs;
the commands that need a medium then say so in one line.

The medium's own methods block (they read and write files on a device that
may be slow or yanked): callers run them on a worker thread.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import AsyncContextManager, Awaitable, Callable, Iterable, Protocol, Sequence, runtime_checkable

from ..errors import IsrError, UsageError
from ..manifest import chain_ending_at
from .account import load_account, session_keys
from .cachedir import CacheDirSource, is_cache_dir
from .sources import Source

GROUP = "isrsync.media"
log = logging.getLogger("isrsync.media")

Progress = Callable[[int], None]  # bytes just written


class MediumSink(Protocol):
    """Writing to one medium; nothing is visible to a reader before :meth:`publish`."""

    name: str
    medium_id: uuid.UUID
    label: str

    def add_chunks(self, chunks: Iterable[tuple[bytes, bytes]], progress: Progress | None = None) -> int:
        """Store encoded chunks (tag, ciphertext) the medium lacks; returns the bytes written.

        A full medium raises :class:`isrsync.errors.StorageFull` and keeps what
        it published before intact.
        """

    def add_manifest(self, raw: bytes) -> None: ...

    def set_keybundle(self, sealed: bytes) -> None: ...

    def set_lock_token(self, parcel: uuid.UUID, token: bytes) -> None: ...

    def publish(self) -> None:
        """Make everything written so far durable and visible at once (the key may be pulled after)."""

    def abort(self) -> None:
        """Drop what was written and not published."""


@runtime_checkable
class MediumReader(Source, Protocol):
    """A medium as a source, which can also say what it holds without reading it."""

    async def holds(self, tags: Sequence[bytes]) -> set[bytes]:
        """The tags of ``tags`` the medium's index lists (a hint: reads still verify)."""

    async def manifests(self, parcel: uuid.UUID) -> dict[int, bytes]:
        """The encrypted manifests of ``parcel`` the medium carries, by version (unverified:
        :func:`carried_chain` checks them against the server's hash before any is used)."""


@dataclass(frozen=True)
class MediumInfo:
    root: Path
    medium_id: uuid.UUID
    label: str


OnMedium = Callable[[Path], Awaitable[None]]


class MediaPlugin(Protocol):
    def is_medium(self, path: Path) -> bool: ...

    def info(self, path: Path) -> MediumInfo: ...

    def open_source(self, path: Path, cache_dir: Path) -> MediumReader:
        """The medium as a lookaside source, indexed first where its index is stale
        (on the medium, or beside it under ``cache_dir`` when it is read-only)."""

    def open_sink(self, path: Path) -> MediumSink: ...

    def find_media(self) -> list[Path]:
        """Mounted media carrying ``.isrsync/`` (for ``--to-usb auto``)."""

    def read_manifests(self, path: Path, parcel: uuid.UUID) -> dict[int, bytes]: ...

    def read_keybundle(self, path: Path) -> bytes | None: ...

    def read_lock_token(self, path: Path, parcel: uuid.UUID) -> bytes | None: ...

    def watch(self, on_medium: OnMedium, on_gone: OnMedium) -> AsyncContextManager[object]:
        """Notice media plugged in and pulled out while a parcel runs (udev)."""

    def open_seeds(self, cache_dir: Path, secret: bytes) -> Sequence[MediumReader]:
        """The plaintext seeds (``sneakernet seed``) indexed at this site under ``secret`` that can
        serve now; one that cannot (its image gone or changed) is left out, never an error."""


@functools.cache
def _installed() -> tuple[metadata.EntryPoint, ...]:
    # Scanning the installed distributions reads many files: once per process,
    # not at every medium plugged in or every lookaside path opened.
    return tuple(metadata.entry_points(group=GROUP))


def plugin() -> MediaPlugin:
    """The installed media implementation, or one clear line saying there is none."""
    for ep in _installed():
        return ep.load()()  # type: ignore[no-any-return]
    raise UsageError("no USB media support is installed here (the sneakernet package)",
                     hint="install isrsync with its sneakernet package (scripts/setup does)")


def available() -> bool:
    return bool(_installed())


def pick_medium(path: str) -> Path:
    """``--to-usb PATH|auto``: ``auto`` is the one mounted medium; several or none is a usage error."""
    media = plugin()
    if path != "auto":
        p = Path(path).expanduser().resolve()
        if not media.is_medium(p):
            raise UsageError(f"{p} carries no .isrsync/ medium", hint=f"prepare it with `sneakernet format {p}`")
        return p
    found = media.find_media()
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError("no mounted medium carries .isrsync/",
                         hint="plug in a key and mount it, or prepare one with `sneakernet format PATH`")
    raise UsageError("several media are mounted: " + ", ".join(map(str, found)), hint="name one: --to-usb PATH")


def session_secret() -> bytes:
    """The logged-in user's convergence secret, for a media plugin that encodes chunks
    itself (plaintext seeds). One line if nobody is logged in here."""
    return session_keys(load_account())[0].convergence_secret


def open_seeds(cache_dir: Path, secret: bytes) -> list[Source]:
    """This site's plaintext seeds as lookaside sources (none without the media package). Blocks."""
    return list(plugin().open_seeds(cache_dir, secret)) if available() else []


async def manifests_from_media(sources: Iterable[Source], parcel: uuid.UUID, version: int,
                               head_hash: bytes) -> dict[int, bytes]:
    """The manifest chain of ``version`` from the first medium among ``sources`` that carries
    all of it, checked against the server's ``head_hash``; empty if none does.

    On a slow link the keyring of a big disk is most of what a resume waits
    for before the guest runs; a key that went with the suspend has it.
    """
    for src in sources:
        if not isinstance(src, MediumReader):
            continue
        try:
            raws = await src.manifests(parcel)
        except (OSError, IsrError) as e:  # a pulled or failing key only fails to help
            log.info("medium %s: its manifests are not used: %s", src.name, e)
            continue
        chain = chain_ending_at(raws, version, head_hash)
        if chain:
            return chain
    return {}


def open_lookaside(path: str | Path, cache_dir: Path) -> Source:
    """The lookaside source at ``path``: a medium (indexed first if stale), else another
    site's cache directory. Blocks (indexing reads the medium): call it from a thread."""
    p = Path(path).expanduser().resolve()
    if not is_cache_dir(p) and available():
        media = plugin()
        if media.is_medium(p):
            return media.open_source(p, cache_dir)
    return CacheDirSource(p)
