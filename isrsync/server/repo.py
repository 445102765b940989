"""The data directory behind the home server (and ``file://`` homes).

    store.db          SQLite (WAL, synchronous=FULL): users, parcels, lock
                      records, versions, pack index, tag references, audit log
    packs/ab/<id>     verified pack files, named by id, shared by id
    uploads/<user>/   partial uploads (resumable) and temporaries

Crash safety comes from ordering: a pack file is durable under its final name
before any row names it, and every change to rows is one transaction. A crash
can leave a pack file no row names (collected by :meth:`Repository.gc`) or a
partial upload (resumed, or collected after the grace period), never a row that
names missing bytes.

This module is synchronous; :mod:`.local` wraps it for asyncio.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import (
    AuthError, Conflict, FormatError, IntegrityError, NotFound, UsageError,
)
from ..fsutil import fsync_dir, os_error
from ..manifest import NO_PARENT, manifest_hash, parse_header
from ..pack import PackEntry, verify_stream
from ..store import lockrules
from ..store.base import CommitRequest, Holder, LockState, ParcelInfo, VersionInfo

SCHEMA_VERSION = 1
STAGING_GRACE = 24 * 3600.0
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,63}$")
PARCEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, token_hash BLOB NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS bundles (
    user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    data BLOB NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS parcels (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name TEXT NOT NULL, created REAL NOT NULL, hardware TEXT NOT NULL,
    version INTEGER NOT NULL, epoch INTEGER NOT NULL,
    holder_site TEXT, holder_host TEXT, holder_user TEXT, holder_since REAL,
    UNIQUE (owner, name));
CREATE TABLE IF NOT EXISTS versions (
    parcel TEXT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE, version INTEGER NOT NULL,
    time REAL NOT NULL, site TEXT NOT NULL, manifest BLOB NOT NULL, hash BLOB NOT NULL,
    new_pack_bytes INTEGER NOT NULL, PRIMARY KEY (parcel, version));
CREATE TABLE IF NOT EXISTS packs (id BLOB PRIMARY KEY, size INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pack_entries (
    pack BLOB NOT NULL REFERENCES packs(id) ON DELETE CASCADE, tag BLOB NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, PRIMARY KEY (pack, tag)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pack_entries_tag ON pack_entries(tag);
CREATE TABLE IF NOT EXISTS parcel_packs (
    parcel TEXT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    pack BLOB NOT NULL REFERENCES packs(id),
    state TEXT NOT NULL CHECK (state IN ('staged', 'live')), since REAL NOT NULL,
    PRIMARY KEY (parcel, pack)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS parcel_packs_pack ON parcel_packs(pack);
CREATE TABLE IF NOT EXISTS refs (
    parcel TEXT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE, tag BLOB NOT NULL,
    first INTEGER NOT NULL, last INTEGER);
CREATE INDEX IF NOT EXISTS refs_by_tag ON refs(parcel, tag, last);
CREATE INDEX IF NOT EXISTS refs_by_last ON refs(parcel, last, tag);
CREATE TABLE IF NOT EXISTS audit (
    time REAL NOT NULL, user TEXT NOT NULL, parcel TEXT, event TEXT NOT NULL, detail TEXT NOT NULL);
"""


def hash_token(token: str) -> bytes:
    # errors="replace": a token of undecodable bytes hashes to something no
    # user has, rather than raising.
    return hashlib.blake2b(token.encode("utf-8", "replace"), digest_size=32, person=b"isrsync-token").digest()


def check_user_name(name: str) -> str:
    if not USER_RE.fullmatch(name):
        raise UsageError(
            f"{name[:80]!r} is not a valid user name",
            hint="use lower-case letters, digits, '_', '.', '-' (at most 64)",
        )
    return name


def check_parcel_name(name: str) -> str:
    if not PARCEL_NAME_RE.fullmatch(name):
        raise UsageError(
            f"{name[:80]!r} is not a valid parcel name",
            hint="use letters, digits, '_', '.', '-' (at most 128), not starting with a symbol",
        )
    return name


def parse_parcel_id(ref: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(ref, uuid.UUID):
        return ref
    try:
        return uuid.UUID(ref)
    except (ValueError, AttributeError):
        return None


class Repository:
    """A home server's data directory. Thread-safe (one connection, one lock).

    Opens an existing data directory; a path that holds none is refused with
    :class:`~isrsync.errors.NotFound` and nothing is created there (a mistyped
    ``--data`` or ``file://`` path must not become an empty home that answers
    "no users", "no parcels"). Only what sets up a home passes ``create=True``:
    ``isrsync server add-user``, ``isrsync serve`` and the demo.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root)
        db = self.root / "store.db"
        if not create and not db.is_file():
            raise NotFound(
                f"{self.root} holds no isrsync server data",
                hint=f"check the path, or create it with `isrsync server add-user NAME --data {self.root}`",
            )
        try:
            for sub in ("", "packs", "uploads"):
                (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            # Without create, mode=rw: SQLite never makes a new, empty database file.
            target, uri = (db, False) if create else (f"file:{urllib.parse.quote(str(db))}?mode=rw", True)
            self._db = sqlite3.connect(
                target, timeout=60, isolation_level=None, check_same_thread=False, uri=uri
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise UsageError(f"data directory schema {row[0]} is not supported", hint="upgrade isrsync")
        except sqlite3.DatabaseError as e:
            raise IntegrityError(f"the server database in {self.root} is unreadable ({e})") from None
        except OSError as e:
            raise os_error(e, f"the data directory {self.root}") from e
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- users ---------------------------------------------------------------------

    def add_user(self, name: str) -> str:
        """Create a user; returns their bearer token (only its hash is stored)."""
        check_user_name(name)
        token = secrets.token_urlsafe(32)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise Conflict(f"user {name} already exists", hint="pick another name")
            db.execute("INSERT INTO users VALUES (?,?,?)", (name, hash_token(token), time.time()))
            self._audit(db, name, None, "add-user", "")
        return token

    def remove_user(self, name: str) -> None:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise NotFound(f"no user {name}")
            db.execute("DELETE FROM users WHERE name=?", (name,))
            self._audit(db, name, None, "remove-user", "")

    def list_users(self) -> list[tuple[str, float, int]]:
        return self._q(
            "SELECT u.name, u.created, COUNT(p.id) FROM users u LEFT JOIN parcels p ON p.owner=u.name "
            "GROUP BY u.name ORDER BY u.name"
        )

    def authenticate(self, token: str) -> str:
        rows = self._q("SELECT name FROM users WHERE token_hash=?", (hash_token(token),))
        if not rows:
            raise AuthError("the server does not know this token")
        return rows[0][0]

    # -- key bundles ---------------------------------------------------------------

    def get_key_bundle(self, user: str) -> bytes | None:
        rows = self._q("SELECT data FROM bundles WHERE user=?", (user,))
        return rows[0][0] if rows else None

    def put_key_bundle(self, user: str, sealed: bytes, expect: bytes | None) -> None:
        if not sealed:
            raise FormatError("key bundle is empty")
        with self._tx() as db:
            row = db.execute("SELECT hash FROM bundles WHERE user=?", (user,)).fetchone()
            current = row[0] if row else None
            if current == hashlib.blake2b(sealed, digest_size=32).digest():
                return  # a retried put that already landed
            if current != expect:
                raise Conflict("the key bundle changed on the server since it was read",
                               hint="read it again and retry")
            db.execute(
                "INSERT INTO bundles VALUES (?,?,?) ON CONFLICT(user) DO UPDATE SET data=excluded.data,"
                " hash=excluded.hash",
                (user, sealed, hashlib.blake2b(sealed, digest_size=32).digest()),
            )

    # -- parcels -------------------------------------------------------------------

    def create_parcel(self, user: str, parcel: uuid.UUID, name: str, hardware: str) -> ParcelInfo:
        check_parcel_name(name)
        with self._tx() as db:
            row = db.execute("SELECT owner, name FROM parcels WHERE id=?", (str(parcel),)).fetchone()
            if row is not None:
                if tuple(row) == (user, name):
                    return self._info(self._owned(db, user, parcel))  # a retried create
                raise Conflict(f"parcel id {parcel} is taken")
            if db.execute("SELECT 1 FROM parcels WHERE owner=? AND name=?", (user, name)).fetchone():
                raise Conflict(f"you already have a parcel named {name}", hint="pick another name")
            db.execute(
                "INSERT INTO parcels (id, owner, name, created, hardware, version, epoch) "
                "VALUES (?,?,?,?,?,0,0)",
                (str(parcel), user, name, time.time(), hardware),
            )
            self._audit(db, user, parcel, "create", name)
        return self.parcel(user, parcel)

    _PARCEL_COLS = (
        "id, name, created, version, epoch, holder_site, holder_host, holder_user, holder_since, hardware, "
        "(SELECT hash FROM versions v WHERE v.parcel = parcels.id AND v.version = parcels.version)"
    )

    def _info(self, row: tuple) -> ParcelInfo:
        pid, name, created, version, epoch, site, host, huser, since, hw, head = row
        holder = Holder(site, host, huser, since) if site is not None else None
        pu = uuid.UUID(pid)
        return ParcelInfo(pu, name, created, version, LockState(pu, epoch, version, holder, hw), bytes(head or b""))

    def parcel(self, user: str, ref: uuid.UUID | str) -> ParcelInfo:
        pid = parse_parcel_id(ref)
        if pid is None:
            check_parcel_name(str(ref))
        if pid is not None:
            rows = self._q(f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? AND id=?", (user, str(pid)))
        else:
            rows = self._q(f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? AND name=?", (user, str(ref)))
        if not rows:
            raise NotFound(f"no parcel {str(ref)[:80]}", hint="`isrsync ls` lists your parcels")
        return self._info(rows[0])

    def list_parcels(self, user: str) -> list[ParcelInfo]:
        rows = self._q(f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? ORDER BY name", (user,))
        return [self._info(r) for r in rows]

    def _owned(self, db: sqlite3.Connection, user: str, parcel: uuid.UUID) -> tuple:
        row = db.execute(
            f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? AND id=?", (user, str(parcel))
        ).fetchone()
        if row is None:
            raise NotFound(f"no parcel {parcel}", hint="`isrsync ls` lists your parcels")
        return row

    def list_versions(self, user: str, parcel: uuid.UUID) -> list[VersionInfo]:
        self.parcel(user, parcel)
        rows = self._q(
            "SELECT version, time, site, hash, LENGTH(manifest), new_pack_bytes FROM versions "
            "WHERE parcel=? ORDER BY version",
            (str(parcel),),
        )
        return [VersionInfo(*r) for r in rows]

    def get_manifests(self, user: str, parcel: uuid.UUID, first: int, last: int) -> list[bytes]:
        self.parcel(user, parcel)
        if first < 1 or last < first or last - first > 100_000:
            raise NotFound(f"no versions {first}..{last}")
        rows = self._q(
            "SELECT version, manifest FROM versions WHERE parcel=? AND version BETWEEN ? AND ? "
            "ORDER BY version",
            (str(parcel), first, last),
        )
        if [r[0] for r in rows] != list(range(first, last + 1)):
            raise NotFound(f"parcel {parcel} has no version(s) {first}..{last} (pruned or never committed)")
        return [r[1] for r in rows]

    # -- packs ---------------------------------------------------------------------

    def pack_path(self, pack_id: bytes) -> Path:
        h = pack_id.hex()
        return self.root / "packs" / h[:2] / h

    def upload_dir(self, user: str) -> Path:
        d = self.root / "uploads" / check_user_name(user)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d

    def adopt_pack(self, user: str, parcel: uuid.UUID, pack_id: bytes, src: Path) -> int:
        """Verify ``src`` against ``pack_id``, move it into place, stage it for the parcel.

        Idempotent: a pack already present is only staged (``src`` is removed).
        Returns the pack size. ``src`` must be on the data directory's filesystem.
        """
        self.parcel(user, parcel)
        # Verify even when the id is known: staging a pack for a parcel must
        # prove possession of its bytes, or anyone who learned an id could
        # claim another user's pack.
        try:
            with open(src, "rb+") as f:
                try:
                    info = verify_stream(f, pack_id)
                except (IntegrityError, FormatError):
                    src.unlink(missing_ok=True)
                    raise
                os.fsync(f.fileno())  # durable before any row names it
        except OSError as e:
            raise os_error(e, f"pack {pack_id.hex()[:16]}") from e
        dest = self.pack_path(pack_id)
        # Placing the file and recording it happen under the write lock, which
        # the deleters (prune, GC) also hold while they unlink: a re-upload can
        # never land between a deleter's decision and its unlink.
        with self._tx() as db:
            self._owned(db, user, parcel)
            if db.execute("SELECT 1 FROM packs WHERE id=?", (pack_id,)).fetchone() and dest.exists():
                src.unlink(missing_ok=True)
            else:
                try:
                    dest.parent.mkdir(mode=0o700, exist_ok=True)
                    os.replace(src, dest)
                    fsync_dir(dest.parent)
                except OSError as e:
                    raise os_error(e, f"pack {pack_id.hex()[:16]}") from e
                db.execute("INSERT OR IGNORE INTO packs VALUES (?,?,?)", (pack_id, info.size, time.time()))
                db.executemany(
                    "INSERT OR IGNORE INTO pack_entries VALUES (?,?,?,?)",
                    [(pack_id, e.tag, e.offset, e.length) for e in info.entries],
                )
            db.execute(
                "INSERT INTO parcel_packs VALUES (?,?, 'staged', ?) ON CONFLICT(parcel, pack) DO UPDATE"
                " SET since=excluded.since WHERE state='staged'",
                (str(parcel), pack_id, time.time()),
            )
        return info.size

    def put_pack_file(self, user: str, parcel: uuid.UUID, pack_id: bytes, path: Path) -> int:
        """Copy a pack from anywhere into the data directory and adopt it."""
        self.parcel(user, parcel)
        tmp = self.upload_dir(user) / f".{secrets.token_hex(8)}.tmp"
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise os_error(e, f"pack {pack_id.hex()[:16]}") from e
        return self.adopt_pack(user, parcel, pack_id, tmp)

    def reachable_pack(self, user: str, parcel: uuid.UUID, pack_id: bytes) -> int | None:
        """Size of a pack the user's parcel has (staged or live), else None."""
        self.parcel(user, parcel)
        rows = self._q(
            "SELECT p.size FROM packs p JOIN parcel_packs pp ON pp.pack=p.id "
            "JOIN parcels c ON c.id=pp.parcel WHERE c.owner=? AND pp.parcel=? AND p.id=?",
            (user, str(parcel), pack_id),
        )
        return rows[0][0] if rows else None

    def read_pack(self, user: str, parcel: uuid.UUID, pack_id: bytes, offset: int, length: int | None) -> bytes:
        size = self.reachable_pack(user, parcel, pack_id)
        if size is None:
            raise NotFound(f"no pack {pack_id.hex()[:16]} in parcel {parcel}")
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise UsageError(f"range {offset}+{length} is outside pack of {size} bytes")
        with open(self.pack_path(pack_id), "rb") as f:
            f.seek(offset)
            return f.read(size - offset if length is None else length)

    def have_packs(self, user: str, parcel: uuid.UUID, ids: Iterable[bytes]) -> set[bytes]:
        self.parcel(user, parcel)
        out = set()
        for pid in ids:
            if self._q("SELECT 1 FROM parcel_packs WHERE parcel=? AND pack=?", (str(parcel), pid)):
                out.add(pid)
        return out

    def locate(self, user: str, parcel: uuid.UUID, tags: Iterable[bytes]) -> dict[bytes, PackEntry]:
        self.parcel(user, parcel)
        out: dict[bytes, PackEntry] = {}
        with self._lock:
            for tag in tags:
                row = self._db.execute(
                    "SELECT e.pack, e.offset, e.length FROM pack_entries e JOIN parcel_packs pp "
                    "ON pp.pack=e.pack AND pp.parcel=? AND pp.state='live' WHERE e.tag=? LIMIT 1",
                    (str(parcel), tag),
                ).fetchone()
                if row:
                    out[tag] = PackEntry(tag, row[0], row[1], row[2])
        return out

    # -- locks and commits ---------------------------------------------------------

    def lock_status(self, user: str, parcel: uuid.UUID) -> LockState:
        return self.parcel(user, parcel).lock

    def acquire(self, user: str, parcel: uuid.UUID, holder: Holder) -> LockState:
        with self._tx() as db:
            info = self._info(self._owned(db, user, parcel))
            new = lockrules.acquire(info.lock, info.name, Holder(holder.site, holder.host, user, time.time()))
            if new == info.lock:
                return new
            self._set_lock(db, parcel, new)
            self._audit(db, user, parcel, "acquire", f"epoch {new.epoch} site {holder.site} host {holder.host}")
        return self.lock_status(user, parcel)

    def release(self, user: str, parcel: uuid.UUID, epoch: int) -> LockState:
        with self._tx() as db:
            info = self._info(self._owned(db, user, parcel))
            new = lockrules.release(info.lock, epoch)
            if new == info.lock:
                return new
            self._set_lock(db, parcel, new)
            self._audit(db, user, parcel, "release", f"epoch {epoch}")
        return self.lock_status(user, parcel)

    def break_lock(self, user: str, parcel: uuid.UUID, reason: str) -> LockState:
        with self._tx() as db:
            info = self._info(self._owned(db, user, parcel))
            old = info.lock.holder
            new = lockrules.break_lock(info.lock)
            self._set_lock(db, parcel, new)
            was = f"site {old.site} host {old.host}" if old else "nobody"
            self._audit(db, user, parcel, "break", f"epoch {new.epoch}; held by {was}; {reason[:500]}")
        return self.lock_status(user, parcel)

    def hand_over(self, user: str, parcel: uuid.UUID, epoch: int, holder: Holder) -> LockState:
        with self._tx() as db:
            info = self._info(self._owned(db, user, parcel))
            old = info.lock.holder
            new = lockrules.hand_over(info.lock, info.name, epoch, Holder(holder.site, holder.host, user, time.time()))
            if new == info.lock:
                return new  # a retry of a hand-over that landed
            self._set_lock(db, parcel, new)
            was = f"site {old.site} host {old.host}" if old else "nobody"
            self._audit(db, user, parcel, "hand-over",
                        f"epoch {new.epoch}; from {was} to site {holder.site} host {holder.host}")
        # What this call decided, not a re-read: another hand-over may follow at once.
        return new

    def commit(self, user: str, parcel: uuid.UUID, req: CommitRequest) -> VersionInfo:
        header = parse_header(req.manifest)
        now = time.time()
        with self._tx() as db:
            info = self._info(self._owned(db, user, parcel))
            done = db.execute(
                "SELECT version, time, site, hash, LENGTH(manifest), new_pack_bytes FROM versions "
                "WHERE parcel=? AND version=? AND hash=?",
                (str(parcel), req.parent + 1, manifest_hash(req.manifest)),
            ).fetchone()
            if done is not None:
                # A retry of a commit that landed (its answer was lost): same result.
                return VersionInfo(*done)
            lockrules.check_commit(info.lock, info.name, req.epoch, req.parent)
            if header.parcel != parcel or header.version != req.parent + 1:
                raise IntegrityError("the manifest is not the next version of this parcel")
            parent_hash = NO_PARENT
            if req.parent:
                parent_hash = db.execute(
                    "SELECT hash FROM versions WHERE parcel=? AND version=?", (str(parcel), req.parent)
                ).fetchone()[0]
            if header.parent != parent_hash:
                raise IntegrityError("the manifest names a different parent version")
            new_bytes = 0
            for pid in dict.fromkeys(req.packs):
                row = db.execute(
                    "SELECT pp.state, p.size FROM parcel_packs pp JOIN packs p ON p.id=pp.pack "
                    "WHERE pp.parcel=? AND pp.pack=?",
                    (str(parcel), pid),
                ).fetchone()
                if row is None:
                    raise NotFound(f"pack {pid.hex()[:16]} was not uploaded", hint="upload it, then commit")
                if row[0] == "staged":
                    new_bytes += row[1]
                    db.execute(
                        "UPDATE parcel_packs SET state='live', since=? WHERE parcel=? AND pack=?",
                        (now, str(parcel), pid),
                    )
            missing = [t for t in dict.fromkeys([*req.added, *req.memory]) if not db.execute(
                "SELECT 1 FROM pack_entries e JOIN parcel_packs pp ON pp.pack=e.pack AND pp.parcel=? "
                "AND pp.state='live' WHERE e.tag=? LIMIT 1", (str(parcel), t)).fetchone()]
            if missing:
                raise NotFound(
                    f"the new version references {len(missing)} chunk(s) the server does not have "
                    f"(first {missing[0].hex()[:16]})",
                    hint="upload the missing packs, then commit",
                )
            v = req.parent + 1
            db.executemany(
                "UPDATE refs SET last=? WHERE parcel=? AND tag=? AND last IS NULL",
                [(req.parent, str(parcel), t) for t in dict.fromkeys(req.removed)],
            )
            db.executemany(
                "INSERT INTO refs VALUES (?,?,?,NULL)", [(str(parcel), t, v) for t in dict.fromkeys(req.added)]
            )
            db.executemany(
                "INSERT INTO refs VALUES (?,?,?,?)", [(str(parcel), t, v, v) for t in dict.fromkeys(req.memory)]
            )
            mhash = manifest_hash(req.manifest)
            site = req.site or (info.lock.holder.site if info.lock.holder else "")
            db.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?)",
                (str(parcel), v, now, site, req.manifest, mhash, new_bytes),
            )
            db.execute("UPDATE parcels SET version=? WHERE id=?", (v, str(parcel)))
            if req.release:
                db.execute(
                    "UPDATE parcels SET holder_site=NULL, holder_host=NULL, holder_user=NULL,"
                    " holder_since=NULL WHERE id=?",
                    (str(parcel),),
                )
            self._audit(db, user, parcel, "commit", f"version {v} epoch {req.epoch} release {req.release}")
        return VersionInfo(v, now, site, mhash, len(req.manifest), new_bytes)

    def _set_lock(self, db: sqlite3.Connection, parcel: uuid.UUID, lock: LockState) -> None:
        h = lock.holder
        db.execute(
            "UPDATE parcels SET epoch=?, holder_site=?, holder_host=?, holder_user=?, holder_since=? WHERE id=?",
            (lock.epoch, *((h.site, h.host, h.user, h.since) if h else (None,) * 4), str(parcel)),
        )

    def _audit(self, db: sqlite3.Connection, user: str, parcel: uuid.UUID | None, event: str, detail: str) -> None:
        db.execute(
            "INSERT INTO audit VALUES (?,?,?,?,?)",
            (time.time(), user, str(parcel) if parcel else None, event, detail),
        )

    def audit_log(self, parcel: uuid.UUID | None = None) -> list[tuple]:
        if parcel is None:
            return self._q("SELECT * FROM audit ORDER BY rowid")
        return self._q("SELECT * FROM audit WHERE parcel=? ORDER BY rowid", (str(parcel),))

