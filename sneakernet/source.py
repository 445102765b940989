"""A medium as a lookaside source (isrsync.site.sources.Source): chunks by tag, never trusted.

The index (on the medium, or beside it) says where a chunk should be; the
bytes are read and handed over unverified, and the registry checks every one
against its tag, so a stale, damaged or foreign medium can only fail to help.
A medium that is pulled, unmounted or replaced under its mount point fails
as a whole (OSError), which the registry counts and steps around.

All file work runs on a worker thread of this source's own: a dying USB key
or a hung network mount blocks that thread only, never the event loop that
serves a guest's disk, nor the shared pool other sources use.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from isrsync.chunk import TAG_SIZE
from isrsync.errors import UsageError
from isrsync.site.sources import SourceKind, WorkerSource

from . import format as fmt
from . import medium as md
from .format import Index

log = logging.getLogger("sneakernet.source")

_MAX_FDS = 64  # open files kept per medium (a tree of loose chunk files has many)


def source_name(root: Path, header: fmt.MediumHeader | None) -> str:
    """``medium:<label>:<id8>``, ``medium:<id8>``, or ``medium:<path hash>`` for an unformatted tree."""
    if header is None:
        return f"medium:{md.path_key(root)}"
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in header.label)
    return f"medium:{label}:{header.short_id}" if label else f"medium:{header.short_id}"


class MediumSource(WorkerSource):
    """Chunks by tag from a medium (or any indexed tree), read-only.

    ``index_dir`` names where the index is kept for a read-only or unformatted
    tree (the site cache's ``media/<key>/``); without it the index is the
    medium's own ``.isrsync/index``. The index is reread whenever the file
    changes (a writer published), so one source follows a medium being written.
    """

    kind = SourceKind.MEDIUM

    def __init__(self, root: str | os.PathLike[str], *, index_dir: str | os.PathLike[str] | None = None,
                 name: str | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise UsageError(f"cannot open the medium at {self.root}: {e.strerror}") from None
        if not os.path.isdir(self.root):
            raise UsageError(f"{self.root} is not a directory", hint="name the mount point of the medium")
        self.header = md.read_header(self.root)
        beside = Path(index_dir).expanduser().absolute() if index_dir is not None else None
        if self.header is None and beside is None:
            raise UsageError(f"{self.root} is not an isrsync medium",
                             hint="format it with `sneakernet format PATH`, or index it beside with --index-dir")
        self.index_file = md.index_path(self.root, beside)
        if beside is not None and not self.index_file.is_file():
            raise UsageError(f"{self.root} has no index in {beside}",
                             hint="run `sneakernet index PATH --index-dir DIR` first")
        self.medium_id = self.header.medium_id if self.header is not None else fmt.NO_MEDIUM
        self.label = self.header.label if self.header is not None else ""
        self.name = name or source_name(self.root, self.header)
        # The mount point's identity when opened: a pulled or unmounted medium
        # leaves another directory (or none) at the same path.
        self._ident = (st.st_dev, st.st_ino)
        self._index: Index = fmt.empty_index(self.medium_id)
        self._stamp: tuple[int, ...] | None = None
        self.index_problem: str | None = None
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        # Learned from answers; a local disk or key is far below the server.
        WorkerSource.__init__(self, per_chunk=0.001, thread_name="sneakernet-medium")

    def _closed_error(self) -> OSError:
        return OSError(f"the medium source {self.name} is closed")

    async def holds(self, tags: Sequence[bytes]) -> set[bytes]:
        """The tags the index lists (a hint: what a read would try, not what it would get)."""
        return await self._on_worker(self._holds, list(tags))

    async def manifests(self, parcel: uuid.UUID) -> dict[int, bytes]:
        """The encrypted manifests of ``parcel`` the medium carries (unverified)."""
        return await self._on_worker(self._manifests, parcel)

    def _manifests(self, parcel: uuid.UUID) -> dict[int, bytes]:
        with self._lock:
            self._check()
            return md.parcel_manifests(self.root, parcel) if self.header is not None else {}

    # -- worker thread -------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise self._closed_error()
        try:
            st = os.stat(self.root)
        except OSError as e:
            self._close_fds()
            raise OSError(e.errno, f"the medium at {self.root} is gone: {e.strerror}") from None
        if (st.st_dev, st.st_ino) != self._ident:
            self._close_fds()
            raise OSError(errno.ENODEV, f"the medium at {self.root} was unmounted or replaced")
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.index_file)
            stamp: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp == self._stamp and self._stamp is not None:
            return
        self._close_fds()  # offsets from the old index must not meet files of the new one
        self._index, self.index_problem = md.read_index(self.index_file, self.medium_id)
        self._stamp = stamp
        if self.index_problem:
            log.info("medium %s: its index is not used (%s)", self.name, self.index_problem)

    def _holds(self, tags: list[bytes]) -> set[bytes]:
        with self._lock:
            self._check()
            return {t for t in tags if len(t) == TAG_SIZE and t in self._index}

    def _read(self, tags: list[bytes]) -> dict[bytes, bytes]:
        with self._lock:
            self._check()
            index = self._index
            wanted = []
            for t in dict.fromkeys(tags):
                e = index.find(t) if len(t) == TAG_SIZE else None
                if e is not None:
                    wanted.append(e)
            # In file and offset order: a key or a DVD reads fastest forwards.
            wanted.sort(key=lambda e: (e.file, e.offset))
            out: dict[bytes, bytes] = {}
            failures = 0
            for e in wanted:
                rec = index.file_of(e)
                if not 0 < e.length <= fmt.MAX_ENCODED:
                    continue  # the decoder refuses such an index; never claim more than a chunk
                try:
                    data = os.pread(self._fd(rec.path), e.length, e.offset)
                except FileNotFoundError:
                    continue  # a stale index: the file went; the next source answers
                except OSError as err:
                    failures += 1
                    log.info("medium %s: reading %s failed: %s", self.name, rec.path, err)
                    continue
                if len(data) == e.length:
                    out[e.tag] = data
            if wanted and not out and failures:
                # Nothing read and real I/O errors (EIO from a dying key): the
                # medium has failed as a whole, which the registry counts.
                self._close_fds()
                raise OSError(errno.EIO, f"the medium at {self.root} cannot be read")
            return out

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        # O_NOFOLLOW: the index is a hint, not a licence to read through a link.
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._fds[rel] = fd
        while len(self._fds) > _MAX_FDS:
            _, old = self._fds.popitem(last=False)
            with contextlib.suppress(OSError):
                os.close(old)
        return fd

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _release(self) -> None:
        with self._lock:
            self._close_fds()
