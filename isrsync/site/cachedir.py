"""Another site's cache directory as a read-only lookaside source (paper section 7.4).

A colleague's cache exported over NFS, a cache copied to a disk, the cache of
another user of this machine: any directory laid out as a :mod:`site cache
<isrsync.site.cache>` can serve chunks by tag. It is opened read-only and never
written (not even its SQLite WAL): the index is a hint, and the registry checks
every answer against its tag, so a stale, damaged, foreign or vanished
directory can only fail to help.

Everything touching the directory runs on a worker thread of its own: it may
sit on a slow or hung network filesystem, and neither the event loop serving a
guest's disk nor the shared thread pool may wait on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import urllib.parse
from pathlib import Path

from ..chunk import CHUNK_SIZE, TAG_SIZE
from ..errors import UsageError
from .sources import SourceKind, WorkerSource

# An encoded chunk is at most the plaintext plus the AEAD tag (compression is
# kept only when it saves): anything the index claims beyond this is damage.
MAX_ENCODED = CHUNK_SIZE + 64
_QUERY_BATCH = 500  # SQLite's host-parameter limit is 999 on old builds


def is_cache_dir(path: Path) -> bool:
    return (path / "index.db").is_file() and (path / "site.json").is_file()


class CacheDirSource(WorkerSource):
    """Chunks by tag from another site cache directory, read-only."""

    kind = SourceKind.CACHE_DIR

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise UsageError(f"{self.path} is not a directory", hint="name another site's cache directory")
        if not is_cache_dir(self.path):
            raise UsageError(
                f"{self.path} is not an isrsync cache directory (it has no index.db and site.json)",
                hint="name the directory another site uses as its cache (its --cache-dir)",
            )
        try:
            self.site_id = str(json.loads((self.path / "site.json").read_bytes())["site_id"])
        except (OSError, ValueError, KeyError, TypeError):
            self.site_id = "unknown"
        self.name = name or f"dir:{self.path}"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._fds: dict[tuple[str, str], int] = {}
        # A local disk is near zero seconds a chunk, NFS over a slow link is not,
        # and the server's estimate is beside it: learned from answers.
        WorkerSource.__init__(self, per_chunk=0.002, thread_name="isrsync-cachedir")

    def _closed_error(self) -> OSError:
        return OSError(f"the cache directory source {self.path} is closed")

    # -- worker thread -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise self._closed_error()
        if self._db is None:
            uri = "file:" + urllib.parse.quote(str(self.path / "index.db"))
            try:
                db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=5, check_same_thread=False)
                db.execute("SELECT 1 FROM chunks LIMIT 1").fetchall()
            except sqlite3.OperationalError:
                # A read-only filesystem (an exported cache, a copy on a DVD) cannot
                # hold the WAL's shared-memory file: read the database as it lies.
                db = sqlite3.connect(uri + "?immutable=1", uri=True, timeout=5, check_same_thread=False)
            self._db = db
        return self._db

    def _read(self, tags: list[bytes]) -> dict[bytes, bytes]:
        with self._lock:
            try:
                db = self._connect()
                rows = []
                for k in range(0, len(tags), _QUERY_BATCH):
                    part = [t for t in tags[k : k + _QUERY_BATCH] if len(t) == TAG_SIZE]
                    if part:
                        rows += db.execute(
                            "SELECT c.tag, f.kind, f.name, c.offset, c.length FROM chunks c "
                            f"JOIN files f ON f.id = c.file WHERE c.tag IN ({','.join('?' * len(part))})",
                            part,
                        ).fetchall()
            except sqlite3.Error as e:
                self._drop_db()
                raise OSError(f"cannot read the index of {self.path}: {e}") from None
            out: dict[bytes, bytes] = {}
            for tag, kind, fname, off, length in rows:
                data = self._pread(kind, fname, off, length)
                if data is not None:
                    out[bytes(tag)] = data
            if rows and not out and not self.path.is_dir():
                raise OSError(f"the cache directory {self.path} is gone")
            return out

    def _pread(self, kind: str, fname: str, off: int, length: int) -> bytes | None:
        # The index is a hint from another machine: a name that is not a plain
        # file name, or a length no chunk can have, is damage, not an instruction.
        if kind not in ("segment", "pack") or not isinstance(fname, str) or "/" in fname or fname.startswith("."):
            return None
        if not (isinstance(off, int) and isinstance(length, int) and 0 <= off and 0 < length <= MAX_ENCODED):
            return None
        fd = self._fds.get((kind, fname))
        try:
            if fd is None:
                sub = "segments" if kind == "segment" else "packs"
                fd = os.open(self.path / sub / fname, os.O_RDONLY | os.O_CLOEXEC)
                self._fds[(kind, fname)] = fd
            data = os.pread(fd, length, off)
        except OSError:
            return None
        return data if len(data) == length else None

    def _drop_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _release(self) -> None:
        with self._lock:
            self._drop_db()
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
