"""The site cache: encoded chunks by tag, packs as files, and a crash-safe index.

Layout of a cache directory::

    site.json          the site id (random, made once)
    index.db           SQLite in WAL mode: where every cached chunk lives
    segments/NNNNNNNN  append-only logs of encoded chunks (demand fetches, dirty chunks)
    packs/<id>         whole packs (from the server, a medium or the swarm)

Everything stored is ciphertext named by its tag: the cache never holds VM state
in the clear. Crash safety comes from ordering: chunk bytes are appended and
fsynced before the index rows that point at them commit, so the index never
names bytes that are not durable; a crash between the two leaves only an
unreferenced tail, which the next writer appends after. Every read re-checks
the tag anyway, and a chunk that fails is dropped from the index (self-healing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import platformdirs

from ..chunk import VerifiedChunk, tag_of, verified
from ..errors import CacheError, IntegrityError
from ..fsutil import atomic_write, fsync_dir, os_error, remove_stale_temps
from ..pack import PackInfo, verify_stream
from .sqlitedb import readonly_fs, sqlite_error, write_transaction

ENV_CACHE = "ISRSYNC_CACHE"
SEGMENT_LIMIT = 256 << 20
_REC_MAGIC = b"ISRC"
_IN_BATCH = 500  # tags per "IN (...)" query: under SQLite's oldest limit of 999 parameters
_REC = struct.Struct("<4s32sI")
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('segment', 'pack')),
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS chunks (
    tag BLOB PRIMARY KEY,
    file INTEGER NOT NULL REFERENCES files(id),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    atime REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks(file);
"""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _held(db: sqlite3.Connection, tags: list[bytes]) -> set[bytes]:
    """Which of ``tags`` the index holds: one query per few hundred tags, not one each."""
    held: set[bytes] = set()
    for i in range(0, len(tags), _IN_BATCH):
        part = tags[i : i + _IN_BATCH]
        held.update(t for (t,) in db.execute(f"SELECT tag FROM chunks WHERE tag IN ({','.join('?' * len(part))})", part))
    return held


def default_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Flag beats environment beats the platform's per-user cache directory."""
    if override:
        return Path(override)
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    return Path(platformdirs.user_cache_dir("isrsync"))


@dataclass(frozen=True)
class CacheStats:
    path: str
    site_id: str
    chunks: int
    chunk_bytes: int
    packs: int
    segments: int
    disk_bytes: int


class SiteCache:
    """One site's cache directory. Thread-safe; several processes may share it.

    Writers in different processes serialize on SQLite's write lock; a segment
    is appended to only while that lock is held, so offsets never collide.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        # Reads whose stored bytes failed their check, since this cache was opened.
        self.damaged_reads = 0
        self._files: dict[tuple[str, str], BinaryIO] = {}  # read handles; under _rlock
        self._rlock = threading.Lock()
        self._unsynced: set[str] = set()  # segments written since the last sync()
        if self.path.exists() and not self.path.is_dir():
            raise CacheError(
                f"the cache path {self.path} is not a directory",
                hint="pick another with --cache-dir or ISRSYNC_CACHE",
            )
        self._users_fd: int | None = None
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Set-up (site id, WAL switch, schema) is serialized across processes;
            # every open cache holds a shared lock on .users, so stale temporaries
            # are removed only when nobody else has the cache open.
            init_fd = os.open(self.path / ".init.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(init_fd, fcntl.LOCK_EX)
                (self.path / "segments").mkdir(mode=0o700, exist_ok=True)
                (self.path / "packs").mkdir(mode=0o700, exist_ok=True)
                self._users_fd = os.open(self.path / ".users.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    remove_stale_temps(self.path)
                    remove_stale_temps(self.path / "packs")
                except BlockingIOError:
                    pass
                fcntl.flock(self._users_fd, fcntl.LOCK_SH)
                self.site_id = self._load_site_id()
                self._db = sqlite3.connect(
                    self.path / "index.db", timeout=60, isolation_level=None, check_same_thread=False
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a commit survives a killed process; power-loss
                # durability comes at commit points (durable puts and sync()),
                # which switch to FULL so the WAL is fsynced with them.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._check_schema()
                # Lookups have a connection of their own: in WAL mode a reader never waits
                # for a writer, and a fault's lookup waited up to 130 ms on the write lock
                # behind a hoard's store and its checkpoint (measured at 100 Mb/s).
                self._rdb = sqlite3.connect(
                    self.path / "index.db", timeout=60, isolation_level=None, check_same_thread=False
                )
                self._rdb.execute("PRAGMA query_only=1")
            finally:
                os.close(init_fd)
        except sqlite3.DatabaseError as e:
            self._close_users()
            if os.access(self.path, os.W_OK) is False or readonly_fs(self.path):
                raise CacheError(
                    f"the cache at {self.path} is on a read-only filesystem or not writable",
                    hint="pick a writable cache with --cache-dir",
                ) from None
            raise CacheError(
                f"the cache index at {self.path} is unreadable ({e})",
                hint="move the cache directory aside; the server and other sources still hold the data",
            ) from None
        except OSError as e:
            self._close_users()
            raise CacheError(
                f"cannot open the cache at {self.path}: {e.strerror or e}",
                hint="check the path and its permissions, or pick another with --cache-dir",
            ) from None

    def _close_users(self) -> None:
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None

    # -- set-up ------------------------------------------------------------------

    def _load_site_id(self) -> str:
        p = self.path / "site.json"
        if p.exists():
            try:
                sid = json.loads(p.read_bytes())["site_id"]
                if not isinstance(sid, str):
                    raise TypeError
                uuid.UUID(sid)
                return sid
            except (ValueError, KeyError, TypeError, RecursionError):
                raise CacheError(f"{p} is damaged", hint="remove it to give this site a new id") from None
        # Two processes may open a new cache at once: write a temporary and
        # link it into place, so exactly one id wins and both read it.
        tmp = p.with_name(f".site.{uuid.uuid4().hex}.tmp")
        atomic_write(tmp, json.dumps({"site_id": str(uuid.uuid4()), "created": time.time()}).encode())
        try:
            os.link(tmp, p)
            fsync_dir(self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return self._load_site_id()

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
        elif int(row[0]) != _SCHEMA_VERSION:
            raise CacheError(f"cache schema {row[0]} is not supported", hint="upgrade isrsync")

    def close(self) -> None:
        with self._lock, self._rlock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self._rdb.close()
            self._db.close()
            self._close_users()

    def __enter__(self) -> "SiteCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------

    def has(self, tag: bytes) -> bool:
        with self._rlock:
            return self._rdb.execute("SELECT 1 FROM chunks WHERE tag=?", (tag,)).fetchone() is not None

    def missing(self, tags: Iterable[bytes]) -> list[bytes]:
        """The tags (in the given order) that the cache does not hold.

        One query per few hundred tags: a query per tag cost 30-70 us each, which a
        resume's hot RAM chunks paid on the path to the guest's start.
        """
        tags = list(tags)
        with self._rlock:
            held = _held(self._rdb, tags)
        return [t for t in tags if t not in held]

    def get(self, tag: bytes, *, verify: bool = True) -> bytes | None:
        """The ciphertext for ``tag``, or None if absent or damaged.

        ``verify=False`` skips the tag check for callers that decode at once
        (the AEAD checks the bytes; they call :meth:`forget` on failure).
        Only the index lookup holds the (readers') lock, so readers hash in parallel
        and none waits for a writer. A row a writer drops meanwhile (eviction,
        another reader's :meth:`forget`) reads as damaged and is forgotten again,
        which counts nothing.
        """
        with self._rlock:
            row = self._rdb.execute(
                "SELECT f.kind, f.name, c.offset, c.length FROM chunks c JOIN files f ON f.id=c.file "
                "WHERE c.tag=?",
                (tag,),
            ).fetchone()
            if row is None:
                return None
            kind, name, off, n = row
            try:
                fd = self._fd(kind, name)
            except OSError:
                fd = -1
        try:
            data = os.pread(fd, n, off) if fd >= 0 else b""
        except OSError:
            data = b""
        if len(data) == n and (not verify or tag_of(data) == tag):
            return data
        self.forget(tag, damaged=True)
        return None

    def forget(self, tag: bytes, *, damaged: bool = False) -> None:
        """Drop a damaged or lost chunk from the index so the next source is asked.

        ``damaged``: its bytes failed their check (counted in :attr:`damaged_reads`,
        which the source statistics and their one warning come from), once per copy:
        another thread that read it before it went (one tag at two offsets) counts nothing.
        """
        with self._lock:
            try:
                gone = self._db.execute("DELETE FROM chunks WHERE tag=?", (tag,)).rowcount
            except sqlite3.Error:
                gone = 1  # not dropped, but still damaged: it is said all the same
            if damaged and gone:
                self.damaged_reads += 1

    def _fd(self, kind: str, name: str) -> int:
        f = self._files.get((kind, name))
        if f is None:
            f = self._files[(kind, name)] = open(self._file_path(kind, name), "rb")
        return f.fileno()

    def _file_path(self, kind: str, name: str) -> Path:
        return self.path / ("segments" if kind == "segment" else "packs") / name

    # -- writes ------------------------------------------------------------------

    def put(self, tag: bytes, data: bytes) -> bool:
        return self.put_many([(tag, data)]) == 1

    def put_many(self, items: Iterable[tuple[bytes, bytes]], *, durable: bool = True) -> int:
        """Store chunks, checking each against its tag; returns how many were new.

        ``durable`` makes this call a commit point (bytes and index fsynced).
        Without it the chunks survive a killed process but not a power cut until
        the next :meth:`sync` (the guest's writes take this path; its FLUSH
        calls sync). A chunk whose bytes do not match its tag is refused
        (IntegrityError) before anything is written.
        """
        chunks = []
        for tag, data in items:
            v = verified(tag, data)
            if v is None:
                raise IntegrityError(f"refusing to cache chunk {tag.hex()[:16]}: bytes do not match tag")
            chunks.append(v)
        return self.put_verified(chunks, durable=durable)

    def put_verified(self, chunks: Iterable[VerifiedChunk], *, durable: bool = True) -> int:
        """:meth:`put_many` for chunks whose tags were checked already (no second hash pass).

        Plain (tag, bytes) pairs are refused with TypeError: only a
        :class:`VerifiedChunk` says the check was made.
        """
        batch: list[tuple[bytes, bytes]] = []
        seen: set[bytes] = set()
        for c in chunks:
            if not isinstance(c, VerifiedChunk):
                raise TypeError(f"put_verified takes VerifiedChunk, not {type(c).__name__}")
            if c.tag not in seen:
                seen.add(c.tag)
                batch.append((c.tag, c.data))
        if not batch:
            return 0
        with self._lock, self._write_tx(durable):
            held = _held(self._db, [t for t, _ in batch])
            new = [(t, d) for t, d in batch if t not in held]
            if new:
                rows, undo = self._append(new, durable)
                try:
                    self._db.executemany(
                        "INSERT INTO chunks(tag, file, offset, length, atime) VALUES (?,?,?,?,?)", rows
                    )
                    self._commit()
                except BaseException:
                    undo()  # the index will not name them: take the bytes back too
                    raise
        return len(new)

    def _write_tx(self, durable: bool = True) -> contextlib.AbstractContextManager[None]:
        return write_transaction(self._db, self.path, durable)

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def sync(self) -> None:
        """A commit point: everything stored so far survives a power cut."""
        with self._lock:
            dirty, self._unsynced = self._unsynced, set()
            try:
                for name in dirty:
                    fd = os.open(self.path / "segments" / name, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                with self._write_tx(durable=True):
                    self._db.execute("UPDATE meta SET value=value WHERE key='schema'")
            except OSError as e:
                self._unsynced |= dirty
                raise os_error(e, f"the cache at {self.path}") from e

    def _append(self, items: list[tuple[bytes, bytes]], durable: bool = True) -> tuple[list[tuple], Callable[[], None]]:
        """Append records durably; returns index rows and an undo that cuts them off."""
        try:
            file_id, name = self._current_segment()
            path = self.path / "segments" / name
            # Unbuffered: on failure nothing is left in a buffer to land later.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise os_error(e, f"the cache at {self.path}") from e
        now = time.time()
        rows = []
        try:
            start = pos = os.lseek(fd, 0, os.SEEK_END)
            try:
                for tag, data in items:
                    _write_all(fd, _REC.pack(_REC_MAGIC, tag, len(data)) + data)
                    rows.append((tag, file_id, pos + _REC.size, len(data), now))
                    pos += _REC.size + len(data)
                if durable:
                    os.fsync(fd)
                else:
                    self._unsynced.add(name)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise os_error(e, f"the cache at {self.path}") from e
        finally:
            os.close(fd)

        def undo() -> None:
            with contextlib.suppress(OSError):
                os.truncate(path, start)

        return rows, undo

    def _current_segment(self) -> tuple[int, str]:
        row = self._db.execute(
            "SELECT id, name FROM files WHERE kind='segment' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            try:
                if (self.path / "segments" / row[1]).stat().st_size < SEGMENT_LIMIT:
                    return row[0], row[1]
            except FileNotFoundError:
                pass
        n = self._db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM files").fetchone()[0]
        name = f"{n:08d}"
        cur = self._db.execute("INSERT INTO files(kind, name) VALUES ('segment', ?)", (name,))
        (self.path / "segments" / name).touch(mode=0o600)
        fsync_dir(self.path / "segments")
        return cur.lastrowid, name  # type: ignore[return-value]

    def add_pack(self, src: str | os.PathLike[str], pack_id: bytes, info: PackInfo | None = None) -> PackInfo:
        """Adopt a whole pack file: verify it against its id, move it in, index it.

        ``src`` must be on the same filesystem (it is renamed, not copied). A
        pack that does not verify raises and is left where it was. ``info``
        from the writer that just made the pack skips the verification pass
        (reads verify every chunk by tag anyway).
        """
        src = Path(src)
        if info is None or info.pack_id != pack_id:
            with open(src, "rb") as f:
                info = verify_stream(f, pack_id)
        name = pack_id.hex()
        dest = self.path / "packs" / name
        with self._lock, self._write_tx():
            try:
                os.replace(src, dest)
                fsync_dir(dest.parent)
            except OSError as e:
                raise os_error(e, str(dest)) from e
            self._db.execute("INSERT OR IGNORE INTO files(kind, name) VALUES ('pack', ?)", (name,))
            (fid,) = self._db.execute("SELECT id FROM files WHERE name=?", (name,)).fetchone()
            now = time.time()
            self._db.executemany(
                "INSERT OR IGNORE INTO chunks(tag, file, offset, length, atime) VALUES (?,?,?,?,?)",
                [(e.tag, fid, e.offset, e.length, now) for e in info.entries],
            )
        return info

    def drop(self, tags: Iterable[bytes]) -> int:
        """Forget chunks (their bytes are reclaimed when a segment is compacted)."""
        with self._lock:
            cur = self._db.executemany("DELETE FROM chunks WHERE tag=?", [(t,) for t in tags])
            return cur.rowcount

    # -- maintenance -------------------------------------------------------------

    def verify(self) -> list[bytes]:
        """Check every indexed chunk; drops and returns the tags that fail."""
        with self._lock:
            tags = [r[0] for r in self._db.execute("SELECT tag FROM chunks")]
        return [t for t in tags if self.get(t) is None]

    def stored_bytes(self, tags: Iterable[bytes]) -> int:
        """Encoded bytes the cache holds for ``tags`` (each distinct tag once)."""
        with self._lock:
            return sum(r[0] for t in set(tags) if (r := self._db.execute(
                "SELECT length FROM chunks WHERE tag=?", (t,)).fetchone()) is not None)

    def lru(self) -> list[tuple[bytes, int]]:
        """Every cached chunk as (tag, length), least recently used first (for eviction)."""
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute("SELECT tag, length FROM chunks ORDER BY atime, tag")]

    def tags(self) -> list[bytes]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT tag FROM chunks")]

    def stats(self) -> CacheStats:
        with self._lock:
            chunks, nbytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM chunks"
            ).fetchone()
            packs = self._db.execute("SELECT COUNT(*) FROM files WHERE kind='pack'").fetchone()[0]
            segs = self._db.execute("SELECT COUNT(*) FROM files WHERE kind='segment'").fetchone()[0]
        disk = sum(p.stat().st_blocks * 512 for p in self.path.rglob("*") if p.is_file())
        return CacheStats(str(self.path), self.site_id, chunks, nbytes, packs, segs, disk)


def open_cache(override: str | os.PathLike[str] | None = None) -> SiteCache:
    return SiteCache(default_cache_dir(override))


