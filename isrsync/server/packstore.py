"""The pack seam: where a :class:`~.repo.Repository` keeps pack bytes.

A pack store holds verified packs under their content name (the pack id), each
written once; it reads ranges, answers whether a pack is there, and deletes
one only when the repository's maintenance asks, under the metadata's writer
lock after the liveness re-check. Partial uploads (resumable) live beside it.

:class:`DirPackStore` is the embedded default: ``packs/ab/<id>`` and
``uploads/<user>/`` under the data directory. Fronts that share one metadata
database share packs by sharing that directory, or keep them in S3
(:mod:`.s3packs`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import ContextManager, Iterator, Protocol

from ..fsutil import fsync_dir, os_error
from ..store.names import check_user_name


class PackStore(Protocol):
    #: True when packs are local files (served with sendfile, read in place)
    local: bool

    def path(self, pack_id: bytes) -> Path: ...
    def exists(self, pack_id: bytes) -> bool: ...
    def size(self, pack_id: bytes) -> int | None: ...
    def place(self, pack_id: bytes, src: Path) -> None: ...
    def read(self, pack_id: bytes, offset: int, length: int) -> bytes: ...
    def delete(self, pack_id: bytes) -> bool: ...
    def names(self) -> Iterator[tuple[str, float]]: ...
    def local_copy(self, pack_id: bytes) -> ContextManager[Path]: ...
    def upload_dir(self, user: str) -> Path: ...
    def uploads_root(self) -> Path: ...


class DirPackStore:
    local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("packs", "uploads"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, pack_id: bytes) -> Path:
        h = pack_id.hex()
        return self.root / "packs" / h[:2] / h

    def exists(self, pack_id: bytes) -> bool:
        return self.path(pack_id).exists()

    def size(self, pack_id: bytes) -> int | None:
        try:
            return self.path(pack_id).stat().st_size
        except FileNotFoundError:
            return None

    def place(self, pack_id: bytes, src: Path) -> None:
        """Move a verified, fsynced file into place under its content name."""
        dest = self.path(pack_id)
        try:
            dest.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(src, dest)
            fsync_dir(dest.parent)
        except OSError as e:
            raise os_error(e, f"pack {pack_id.hex()[:16]}") from e

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        with open(self.path(pack_id), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def delete(self, pack_id: bytes) -> bool:
        with contextlib.suppress(FileNotFoundError):
            self.path(pack_id).unlink()
            return True
        return False

    def names(self) -> Iterator[tuple[str, float]]:
        """Every pack file's name and mtime (for GC of files no row names)."""
        for f in (self.root / "packs").glob("*/*"):
            try:
                yield f.name, f.stat().st_mtime
            except FileNotFoundError:
                continue

    @contextlib.contextmanager
    def local_copy(self, pack_id: bytes) -> Iterator[Path]:
        yield self.path(pack_id)  # already a local file: no copy

    def upload_dir(self, user: str) -> Path:
        d = self.root / "uploads" / check_user_name(user)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d

    def uploads_root(self) -> Path:
        return self.root / "uploads"
