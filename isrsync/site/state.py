"""A parcel's local state at one site: what it runs from and what it changed.

    <cache>/parcels/<uuid>/state.db   SQLite (WAL)

It records the parcel's local status (a :class:`LocalStatus`, moved only by
the transition methods, which refuse illegal moves), the version the site runs
from (base) and the lock epoch it holds, the packs the trickle staged on the
server (rows, not a list rewritten whole), the dirty map (chunk index -> the ref of the chunk the guest wrote), a memory
image saved by a suspend that has not reached the server yet, the access trace
of the session, and the manifests the site has seen (so that a site can resume
again while offline).

Chunk keys are as sensitive as plaintext (a key and its ciphertext are the
plaintext), so every row that holds one is sealed with XChaCha20-Poly1305 under
a local key derived from the parcel master key, bound to its row by the
associated data. The ciphertext of the chunks themselves lives in the cache.
Nothing here is readable without the master key, and a row moved to another
slot or another parcel fails to open.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import sqlite3
import struct
import threading
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import nacl.utils
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from ..chunk import ChunkRef, chunk_count
from ..errors import CacheError, Conflict, IntegrityError, StateError
from ..manifest import Keyring, MemoryImage
from .cache import SiteCache
from .sqlitedb import sqlite_error, write_transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dirty (idx INTEGER PRIMARY KEY, sealed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, sealed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS manifests (version INTEGER PRIMARY KEY, raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS staged_packs (pack BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS staged_tags (tag BLOB PRIMARY KEY);
"""
_REF = struct.Struct("<32s32sB")
# A saved memory image: magic, u64 stream length, u64 RAM size (NO_RAM: none), refs, RAM refs.
_MEM_MAGIC = b"ISRMEM2\x00"
NO_RAM = (1 << 64) - 1


class LocalStatus(str, enum.Enum):
    """Where a parcel stands at this site.

    IDLE: nothing uncommitted here. RUNNING: a resume runs it (or crashed while
    it did: its disk changes survive). SUSPENDED_LOCAL: suspended, but the
    commit has not reached the server (offline); the lock stays here. HELD:
    committed with the lock kept (``suspend --keep-lock``). FENCED: the lock was
    broken or taken elsewhere while this site had uncommitted changes; they are
    kept, never merged, until discarded.
    """

    IDLE = "idle"
    RUNNING = "running"
    SUSPENDED_LOCAL = "suspended-local"
    HELD = "held"
    FENCED = "fenced"

    @property
    def has_lock(self) -> bool:
        """This site believes it holds the lock (a resume checks the epoch)."""
        return self in (LocalStatus.RUNNING, LocalStatus.SUSPENDED_LOCAL, LocalStatus.HELD)


_S = LocalStatus
# from -> the statuses it may move to (discarded() may leave any status, for IDLE)
_MOVES: dict[LocalStatus, frozenset[LocalStatus]] = {
    # IDLE -> HELD: a lock carried in on a medium (carried_in).
    _S.IDLE: frozenset({_S.RUNNING, _S.HELD}),
    # RUNNING -> RUNNING: a sync committed, or a resume after a crash.
    _S.RUNNING: frozenset({_S.RUNNING, _S.SUSPENDED_LOCAL, _S.HELD, _S.IDLE, _S.FENCED}),
    _S.SUSPENDED_LOCAL: frozenset({_S.RUNNING, _S.IDLE, _S.HELD, _S.FENCED, _S.SUSPENDED_LOCAL}),
    _S.HELD: frozenset({_S.RUNNING, _S.IDLE, _S.FENCED}),
    _S.FENCED: frozenset(),  # only discarded() leaves it
}


@dataclass(frozen=True)
class LocalInfo:
    status: LocalStatus
    base: int | None  # the version the local state builds on
    epoch: int | None  # the lock epoch it was made under
    host: str | None
    name: str | None


def local_key(master_key: bytes) -> bytes:
    return hashlib.blake2b(master_key, digest_size=32, person=b"isrsync-local").digest()


class ParcelState:
    def __init__(self, cache: SiteCache, parcel: uuid.UUID, master_key: bytes) -> None:
        self.parcel = parcel
        self.dir = cache.path / "parcels" / str(parcel)
        self._key = local_key(master_key)
        self._lock = threading.RLock()
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.dir / "state.db", timeout=60, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error as e:
            raise sqlite_error(e, self.dir, "the parcel's local state") from None
        except OSError as e:
            raise CacheError(f"cannot open the local state of parcel {parcel}: {e.strerror or e}") from None

    def close(self) -> None:
        self._db.close()

    @classmethod
    def exists(cls, cache: SiteCache, parcel: uuid.UUID) -> bool:
        return (cache.path / "parcels" / str(parcel) / "state.db").exists()

    @contextlib.contextmanager
    def _tx(self, durable: bool) -> Iterator[sqlite3.Connection]:
        # One connection, used from the disk's worker threads: one transaction at a time.
        with self._lock, write_transaction(self._db, self.dir, durable):
            yield self._db

    # -- sealing -------------------------------------------------------------------

    def _seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = nacl.utils.random(24)
        return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(data, self._ad(aad), nonce, self._key)

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed[24:], self._ad(aad), sealed[:24], self._key
            )
        except (CryptoError, ValueError):
            raise IntegrityError(
                f"the local state of parcel {self.parcel} is damaged or belongs to another key",
                hint="discard the local changes with `isrsync discard`, or restore the cache from a backup",
            ) from None

    def _ad(self, aad: bytes) -> bytes:
        return self.parcel.bytes + aad

    # -- status: the only writers of 'status', 'base' and 'epoch' -----------------------

    def _meta(self) -> dict:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM meta").fetchall()
        return {k: json.loads(v) for k, v in rows}

    def _put_meta(self, db: sqlite3.Connection, **values: object) -> None:
        for k, v in values.items():
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v)))

    def info(self) -> LocalInfo:
        m = self._meta()
        try:
            status = LocalStatus(m.get("status", "idle"))
        except ValueError:
            raise IntegrityError(f"the local state of parcel {self.parcel} has an unknown status {m.get('status')!r}",
                                 hint="upgrade isrsync, or `isrsync discard` the local changes") from None
        base, epoch = m.get("base"), m.get("epoch")
        return LocalInfo(status, int(base) if base is not None else None, int(epoch) if epoch is not None else None,
                         m.get("host"), m.get("name"))

    @property
    def status(self) -> LocalStatus:
        return self.info().status

    def _now(self, db: sqlite3.Connection) -> LocalStatus:
        row = db.execute("SELECT value FROM meta WHERE key='status'").fetchone()
        return LocalStatus(json.loads(row[0])) if row else LocalStatus.IDLE

    def _move(self, to: LocalStatus, db: sqlite3.Connection, **values: object) -> None:
        now = self._now(db)
        if to not in _MOVES[now]:
            if now is LocalStatus.FENCED:
                raise Conflict(
                    f"this site's uncommitted changes to parcel {self.parcel} were fenced off (the lock was broken "
                    "or taken elsewhere since)",
                    hint="they are kept here: `isrsync fork PARCEL NEW-NAME` makes them a parcel of their own, "
                         "`isrsync discard` drops them so the parcel can be resumed",
                )
            raise StateError(f"parcel {self.parcel} is {now.value} at this site; it cannot become {to.value}")
        self._put_meta(db, status=to.value, **values)

    def set_name(self, name: str) -> None:
        with self._tx(True) as db:
            self._put_meta(db, name=name)

    def start_running(self, base: int, epoch: int, host: str) -> None:
        """A resume runs the parcel from ``base`` under lock ``epoch``."""
        with self._tx(True) as db:
            self._move(LocalStatus.RUNNING, db, base=base, epoch=epoch, host=host)

    def suspended_locally(self) -> None:
        """Memory and disk are saved here; the commit is still to come (a fenced
        parcel stays fenced: saved, kept, not to be committed)."""
        with self._tx(True) as db:
            if self._now(db) is not LocalStatus.FENCED:
                self._move(LocalStatus.SUSPENDED_LOCAL, db)

    def committed(self, version: int, *, released: bool, running: bool = False, done: list[int] | None = None) -> None:
        """``version`` holds everything up to here, in one transaction: staged packs
        are part of it now, the saved memory image is spent, and the dirty rows
        it covers (``done``; all if None: a sync keeps what the guest wrote since
        its snapshot) are dropped."""
        to = LocalStatus.IDLE if released else LocalStatus.RUNNING if running else LocalStatus.HELD
        with self._tx(True) as db:
            self._move(to, db, base=version)
            if done is None:
                db.execute("DELETE FROM dirty")
            else:
                db.executemany("DELETE FROM dirty WHERE idx=?", [(i,) for i in done])
            db.execute("DELETE FROM blobs WHERE name IN ('memory', 'memory_hot')")
            db.execute("DELETE FROM staged_packs")
            db.execute("DELETE FROM staged_tags")

    def handed_over(self) -> None:
        """The lock went to a medium (`--carry-lock`): this site holds nothing of the parcel now."""
        with self._tx(True) as db:
            self._move(LocalStatus.IDLE, db)

    def carried_in(self, base: int, epoch: int, host: str, manifests: dict[int, bytes]) -> None:
        """A medium's lock (version ``base``, ``epoch``) is this site's now, with the manifests it carried."""
        self.put_manifests(manifests)
        with self._tx(True) as db:
            self._move(LocalStatus.HELD, db, base=base, epoch=epoch, host=host)

    def took_lock(self, epoch: int) -> None:
        """The lock this state was made under moved here under ``epoch`` (from a medium); the state
        and its changes stay as they are."""
        with self._tx(True) as db:
            now = self._now(db)
            if not now.has_lock:
                raise StateError(f"parcel {self.parcel} is {now.value} at this site; it holds no lock to move")
            self._put_meta(db, epoch=epoch)

    def fenced(self) -> None:
        """The server refused this site's epoch: keep everything, refuse to run it."""
        with self._tx(True) as db:
            self._move(LocalStatus.FENCED, db)

    def discarded(self) -> int:
        """Forget the uncommitted changes (any status); returns how many dirty chunks went."""
        with self._tx(True) as db:
            n = db.execute("SELECT COUNT(*) FROM dirty").fetchone()[0]
            db.execute("DELETE FROM dirty")
            db.execute("DELETE FROM blobs WHERE name IN ('memory', 'memory_hot')")
            db.execute("DELETE FROM staged_packs")
            db.execute("DELETE FROM staged_tags")
            self._put_meta(db, status=LocalStatus.IDLE.value)
        return n

    # -- staged packs (uploaded by the trickle, named by the next commit) ------------------

    def stage(self, packs: Iterable[bytes], tags: Iterable[bytes]) -> None:
        with self._tx(True) as db:
            db.executemany("INSERT OR IGNORE INTO staged_packs VALUES (?)", [(p,) for p in packs])
            db.executemany("INSERT OR IGNORE INTO staged_tags VALUES (?)", [(t,) for t in tags])

    def staged(self) -> tuple[list[bytes], set[bytes]]:
        with self._lock:
            packs = [bytes(r[0]) for r in self._db.execute("SELECT pack FROM staged_packs ORDER BY rowid")]
            tags = {bytes(r[0]) for r in self._db.execute("SELECT tag FROM staged_tags")}
        return packs, tags

    def _migrate(self) -> None:
        """State written before staging was kept in rows: move the JSON lists into them."""
        m = self._meta()
        if "staged" not in m and "staged_tags" not in m:
            return
        with self._tx(True) as db:
            db.executemany("INSERT OR IGNORE INTO staged_packs VALUES (?)",
                           [(bytes.fromhex(x),) for x in m.get("staged") or []])
            db.executemany("INSERT OR IGNORE INTO staged_tags VALUES (?)",
                           [(bytes.fromhex(x),) for x in m.get("staged_tags") or []])
            db.execute("DELETE FROM meta WHERE key IN ('staged', 'staged_tags')")

    # -- dirty map -----------------------------------------------------------------

    def dirty(self) -> dict[int, ChunkRef]:
        out = {}
        with self._lock:
            rows = self._db.execute("SELECT idx, sealed FROM dirty").fetchall()
        for idx, sealed in rows:
            tag, key, flags = _REF.unpack(self._open(sealed, b"dirty" + struct.pack("<Q", idx)))
            out[idx] = ChunkRef(tag, key, flags)
        return out

    def set_dirty(self, refs: Mapping[int, ChunkRef], durable: bool = False) -> None:
        rows = [
            (i, self._seal(_REF.pack(r.tag, r.key, r.flags), b"dirty" + struct.pack("<Q", i)))
            for i, r in refs.items()
        ]
        with self._tx(durable) as db:
            db.executemany("INSERT OR REPLACE INTO dirty VALUES (?, ?)", rows)

    def drop_dirty(self, idxs: list[int]) -> None:
        """Forget dirty entries that a commit has made part of the base."""
        with self._tx(True) as db:
            db.executemany("DELETE FROM dirty WHERE idx=?", [(i,) for i in idxs])

    def clear_dirty(self) -> None:
        with self._tx(True) as db:
            db.execute("DELETE FROM dirty")

    def sync(self) -> None:
        """A durability point for everything recorded so far."""
        with self._tx(True) as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('synced', ?)", (json.dumps(os.getpid()),))

    # -- sealed blobs: memory image, trace ---------------------------------------------

    def _put_blob(self, name: str, data: bytes | None) -> None:
        with self._tx(True) as db:
            if data is None:
                db.execute("DELETE FROM blobs WHERE name=?", (name,))
            else:
                db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?)", (name, self._seal(data, name.encode())))

    def _get_blob(self, name: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT sealed FROM blobs WHERE name=?", (name,)).fetchone()
        return None if row is None else self._open(row[0], name.encode())

    def save_memory(self, mem: MemoryImage | None) -> None:
        if mem is None:
            self._put_blob("memory", None)
            return
        ram = mem.ram
        head = struct.pack("<QQ", mem.length, NO_RAM if ram is None else ram.size)
        self._put_blob("memory_hot", array("I", mem.hot).tobytes() if mem.hot else None)
        self._put_blob("memory", _MEM_MAGIC + head + mem.refs.to_bytes() + (ram.to_bytes() if ram is not None else b""))

    def load_memory(self) -> MemoryImage | None:
        raw = self._get_blob("memory")
        if raw is None:
            return None
        if not raw.startswith(_MEM_MAGIC):  # written before RAM was kept apart
            (length,) = struct.unpack_from("<Q", raw)
            return MemoryImage(length, Keyring.from_bytes(length, raw[8:]))
        length, ram_size = struct.unpack_from("<QQ", raw, len(_MEM_MAGIC))
        body = raw[len(_MEM_MAGIC) + 16 :]
        split = chunk_count(length) * _REF.size
        ram = None if ram_size == NO_RAM else Keyring.from_bytes(ram_size, body[split:])
        mem = MemoryImage(length, Keyring.from_bytes(length, body[:split]), ram)
        hot = self._get_blob("memory_hot")
        if ram is not None and hot is not None and len(hot) % 4 == 0:
            # A hint written beside the image: whatever does not fit this RAM is dropped.
            mem.hot = [i for i in array("I", hot) if i < len(ram)]
        return mem

    def save_trace(self, trace: list[int]) -> None:
        self._put_blob("trace", array("I", trace).tobytes())

    def load_trace(self) -> list[int]:
        raw = self._get_blob("trace")
        return [] if raw is None else list(array("I", raw))

    # -- manifests seen ------------------------------------------------------------

    def put_manifests(self, raws: Mapping[int, bytes]) -> None:
        with self._tx(True) as db:
            db.executemany("INSERT OR REPLACE INTO manifests VALUES (?, ?)", list(raws.items()))

    def manifests(self, first: int, last: int) -> list[bytes] | None:
        with self._lock:
            rows = self._db.execute(
                "SELECT version, raw FROM manifests WHERE version BETWEEN ? AND ? ORDER BY version", (first, last)
            ).fetchall()
        if [r[0] for r in rows] != list(range(first, last + 1)):
            return None
        return [r[1] for r in rows]

    def forget(self) -> None:
        """Drop all local state of this parcel (after a discard)."""
        self.close()
        for p in sorted(self.dir.glob("*"), reverse=True):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


@dataclass(frozen=True)
class LocalSummary:
    """What one parcel's local state holds, read without its key (for `isrsync status`)."""

    parcel: str
    name: str | None
    status: LocalStatus
    base: int | None
    epoch: int | None
    dirty_chunks: int
    memory_image: bool  # a saved memory image waits to be committed or resumed

    def to_json(self) -> dict:
        return {"parcel": self.parcel, "name": self.name, "status": self.status.value, "base": self.base,
                "epoch": self.epoch, "dirty_chunks": self.dirty_chunks, "memory_image": self.memory_image}


def local_summaries(cache_dir: Path) -> list[LocalSummary]:
    """Every parcel with local state at this site that is not idle.

    The status, base and epoch are plaintext metadata and the counts need no
    key, so a site that is not logged in still sees what it holds. A state
    database that cannot be read is left out (its parcel's commands say why).
    """
    out = []
    for d in sorted((cache_dir / "parcels").glob("*")):
        db_path = d / "state.db"
        if not db_path.is_file():
            continue
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
            try:
                meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
                dirty = db.execute("SELECT COUNT(*) FROM dirty").fetchone()[0]
                saved = db.execute("SELECT 1 FROM blobs WHERE name='memory'").fetchone() is not None
            finally:
                db.close()
            status = LocalStatus(meta.get("status", "idle"))
        except (sqlite3.Error, ValueError):
            continue
        if status is LocalStatus.IDLE:
            continue
        base, epoch = meta.get("base"), meta.get("epoch")
        # Only a local suspend's image can be used: after a crash the disk moved on past any older one.
        memory = saved and status is LocalStatus.SUSPENDED_LOCAL
        out.append(LocalSummary(d.name, meta.get("name"), status, int(base) if base is not None else None,
                                int(epoch) if epoch is not None else None, int(dirty), memory))
    return out
