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
import secrets
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import ContextManager, Iterable

from ..errors import (
    AuthError, Conflict, FormatError, IntegrityError, NotFound, UsageError,
)
from ..fsutil import os_error
from ..manifest import NO_PARENT, manifest_hash, parse_header
from ..pack import PackEntry, verify_stream
from ..store import lockrules
from ..store.base import CommitRequest, Holder, LockState, ParcelInfo, VersionInfo
from ..store.names import check_parcel_name, check_user_name, parse_parcel_id
from .db import Conn, Database, SqliteDatabase
from .packstore import DirPackStore, PackStore
from .partials import DirPartials, Partials, SharedPartials
from .schema import hash_token

STAGING_GRACE = 24 * 3600.0
TAG_BATCH = 500  # well under SQLite's limit of 999 parameters in old builds


class Repository:
    """A home server's data directory. Thread-safe (one connection, one lock).

    Opens an existing data directory; a path that holds none is refused with
    :class:`~isrsync.errors.NotFound` and nothing is created there (a mistyped
    ``--data`` or ``file://`` path must not become an empty home that answers
    "no users", "no parcels"). Only what sets up a home passes ``create=True``:
    ``isrsync server add-user``, ``isrsync serve`` and the demo.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False,
                 metadata: str | None = None, packs: str | None = None) -> None:
        """``metadata``: a ``postgresql://`` address for the rows; ``packs``: an
        ``s3://`` address for the packs. With both, partial uploads live in
        them too (:mod:`.partials`); otherwise in ``root``."""
        self.root = Path(root)
        db = self.root / "store.db"
        if metadata is None and not create and not db.is_file():
            raise NotFound(
                f"{self.root} holds no isrsync server data",
                hint=f"check the path, or create it with `isrsync server add-user NAME --data {self.root}`",
            )
        if metadata is not None and not create and not (self.root / "uploads").is_dir():
            raise NotFound(f"{self.root} holds no isrsync server data",
                           hint="check the --data path, or create it with `isrsync serve`")
        self.db: Database
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.packs: PackStore
            if packs is not None:
                from .s3packs import S3PackStore

                self.packs = S3PackStore(packs, self.root)
            else:
                self.packs = DirPackStore(self.root)
            if metadata is not None:
                from .pg import PgDatabase

                self.db = PgDatabase(metadata)
            else:
                self.db = SqliteDatabase(db, create=create)
            self.partials: Partials
            if packs is not None and metadata is not None:
                # Fronts share only the database and the bucket: so do uploads.
                self.partials = SharedPartials(self.packs, self.db)  # type: ignore[arg-type]
            else:
                self.partials = DirPartials(self.packs)
        except sqlite3.DatabaseError as e:
            raise IntegrityError(f"the server database in {self.root} is unreadable ({e})") from None
        except OSError as e:
            raise os_error(e, f"the data directory {self.root}") from e

    def close(self) -> None:
        self.db.close()

    @property
    def _db(self) -> sqlite3.Connection:
        """The embedded backend's SQLite connection (tests count its steps)."""
        assert isinstance(self.db, SqliteDatabase)
        return self.db._db

    def _tx(self) -> ContextManager[Conn]:
        return self.db.tx()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.db.q(sql, args)

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
        rows = self._q('SELECT data FROM bundles WHERE "user"=?', (user,))
        return rows[0][0] if rows else None

    def put_key_bundle(self, user: str, sealed: bytes, expect: bytes | None) -> None:
        if not sealed:
            raise FormatError("key bundle is empty")
        with self._tx() as db:
            row = db.execute('SELECT hash FROM bundles WHERE "user"=?', (user,)).fetchone()
            current = row[0] if row else None
            if current == hashlib.blake2b(sealed, digest_size=32).digest():
                return  # a retried put that already landed
            if current != expect:
                raise Conflict("the key bundle changed on the server since it was read",
                               hint="read it again and retry")
            db.execute(
                'INSERT INTO bundles VALUES (?,?,?) ON CONFLICT("user") DO UPDATE SET data=excluded.data,'
                " hash=excluded.hash",
                (user, sealed, hashlib.blake2b(sealed, digest_size=32).digest()),
            )

    # -- parcels -------------------------------------------------------------------

    def create_parcel(self, user: str, parcel: uuid.UUID, name: str, hardware: str) -> ParcelInfo:
        check_parcel_name(name)
        with self._tx() as db:
            row = db.execute("SELECT name FROM parcels WHERE owner=? AND ext=?", (user, str(parcel))).fetchone()
            if row is not None:
                if row[0] == name:
                    return self._info(self._owned(db, user, parcel))  # a retried create
                raise Conflict(f"you already have a parcel with id {parcel}")
            if db.execute("SELECT 1 FROM parcels WHERE owner=? AND name=?", (user, name)).fetchone():
                raise Conflict(f"you already have a parcel named {name}", hint="pick another name")
            # Parcel ids are per user: another user's parcel of this id must not
            # show, so it gets a row key of its own.
            key = str(parcel)
            if db.execute("SELECT 1 FROM parcels WHERE id=?", (key,)).fetchone():
                key = str(uuid.uuid4())
            db.execute(
                "INSERT INTO parcels (id, owner, name, created, hardware, version, epoch, ext) "
                "VALUES (?,?,?,?,?,0,0,?)",
                (key, user, name, time.time(), hardware, str(parcel)),
            )
            self._audit(db, user, parcel, "create", name)
        return self.parcel(user, parcel)

    # ``ext`` is the id the user knows; ``id``, last, the row key of the other tables.
    _PARCEL_COLS = (
        "ext, name, created, version, epoch, holder_site, holder_host, holder_user, holder_since, hardware, "
        "(SELECT hash FROM versions v WHERE v.parcel = parcels.id AND v.version = parcels.version), id"
    )

    def _info(self, row: tuple) -> ParcelInfo:
        pid, name, created, version, epoch, site, host, huser, since, hw, head, _key = row
        holder = Holder(site, host, huser, since) if site is not None else None
        pu = uuid.UUID(pid)
        return ParcelInfo(pu, name, created, version, LockState(pu, epoch, version, holder, hw), bytes(head or b""))

    def parcel(self, user: str, ref: uuid.UUID | str) -> ParcelInfo:
        pid = parse_parcel_id(ref)
        if pid is None:
            check_parcel_name(str(ref))
        if pid is not None:
            rows = self._q(f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? AND ext=?", (user, str(pid)))
        else:
            rows = self._q(f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? AND name=?", (user, str(ref)))
        if not rows:
            raise NotFound(f"no parcel {str(ref)[:80]}", hint="`isrsync ls` lists your parcels")
        return self._info(rows[0])

    def list_parcels(self, user: str) -> list[ParcelInfo]:
        rows = self._q(f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? ORDER BY name", (user,))
        return [self._info(r) for r in rows]

    def _owned(self, db: Conn, user: str, parcel: uuid.UUID) -> tuple:
        """The user's parcel's row (its row key last); NotFound if it is not theirs."""
        row = db.execute(
            f"SELECT {self._PARCEL_COLS} FROM parcels WHERE owner=? AND ext=?", (user, str(parcel))
        ).fetchone()
        if row is None:
            raise NotFound(f"no parcel {parcel}", hint="`isrsync ls` lists your parcels")
        return row

    def _key(self, user: str, parcel: uuid.UUID) -> str:
        """The row key of the user's parcel, for the tables that refer to it."""
        with self.db.read() as db:
            return self._owned(db, user, parcel)[-1]

    def list_versions(self, user: str, parcel: uuid.UUID) -> list[VersionInfo]:
        key = self._key(user, parcel)
        rows = self._q(
            "SELECT version, time, site, hash, LENGTH(manifest), new_pack_bytes FROM versions "
            "WHERE parcel=? ORDER BY version",
            (key,),
        )
        return [VersionInfo(*r) for r in rows]

    def get_manifests(self, user: str, parcel: uuid.UUID, first: int, last: int) -> list[bytes]:
        key = self._key(user, parcel)
        if first < 1 or last < first or last - first > 100_000:
            raise NotFound(f"no versions {first}..{last}")
        rows = self._q(
            "SELECT version, manifest FROM versions WHERE parcel=? AND version BETWEEN ? AND ? "
            "ORDER BY version",
            (key, first, last),
        )
        if [r[0] for r in rows] != list(range(first, last + 1)):
            raise NotFound(f"parcel {parcel} has no version(s) {first}..{last} (pruned or never committed)")
        return [r[1] for r in rows]

    # -- packs ---------------------------------------------------------------------

    def pack_path(self, pack_id: bytes) -> Path:
        return self.packs.path(pack_id)

    def upload_dir(self, user: str) -> Path:
        return self.packs.upload_dir(user)

    def pack_file(self, pack_id: bytes) -> ContextManager[Path]:
        """A local file of the pack for reading it whole (check, compaction):
        the pack itself in a directory (through pack_path, which tests hook), a
        temporary copy from object storage."""
        if self.packs.local:
            return contextlib.nullcontext(self.pack_path(pack_id))
        return self.packs.local_copy(pack_id)

    def unlink_pack(self, pack_id: bytes) -> bool:
        """Delete a pack's bytes (maintenance, under the writer lock)."""
        if not self.packs.local:
            return self.packs.delete(pack_id)
        # Through pack_path: the tests hook it to land a re-upload in this window.
        try:
            self.pack_path(pack_id).unlink()
            return True
        except FileNotFoundError:
            return False

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
        # Placing the file and recording it happen under the write lock, which
        # the deleters (prune, GC) also hold while they unlink: a re-upload can
        # never land between a deleter's decision and its unlink.
        with self._tx() as db:
            key = self._owned(db, user, parcel)[-1]
            if db.execute("SELECT 1 FROM packs WHERE id=?", (pack_id,)).fetchone() and self.packs.exists(pack_id):
                src.unlink(missing_ok=True)
            else:
                self.packs.place(pack_id, src)
                db.execute("INSERT INTO packs VALUES (?,?,?) ON CONFLICT DO NOTHING", (pack_id, info.size, time.time()))
                db.executemany(
                    "INSERT INTO pack_entries VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                    [(pack_id, e.tag, e.offset, e.length) for e in info.entries],
                )
            db.execute(
                "INSERT INTO parcel_packs VALUES (?,?, 'staged', ?) ON CONFLICT(parcel, pack) DO UPDATE"
                " SET since=excluded.since WHERE parcel_packs.state='staged'",
                (key, pack_id, time.time()),
            )
        return info.size

    def adopt_upload(self, user: str, parcel: uuid.UUID, pack_id: bytes) -> int:
        """Adopt a partial upload whose last byte is in; a pack that fails its
        check takes its partial with it (the client starts over)."""
        src = self.partials.assemble(user, pack_id)
        try:
            size = self.adopt_pack(user, parcel, pack_id, src)
        except (IntegrityError, FormatError):
            self.partials.drop(user, pack_id)
            raise
        finally:
            src.unlink(missing_ok=True)
        self.partials.drop(user, pack_id)
        return size

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
        key = self._key(user, parcel)
        rows = self._q(
            "SELECT p.size FROM packs p JOIN parcel_packs pp ON pp.pack=p.id "
            "JOIN parcels c ON c.id=pp.parcel WHERE c.owner=? AND pp.parcel=? AND p.id=?",
            (user, key, pack_id),
        )
        return rows[0][0] if rows else None

    def read_pack(self, user: str, parcel: uuid.UUID, pack_id: bytes, offset: int, length: int | None) -> bytes:
        size = self.reachable_pack(user, parcel, pack_id)
        if size is None:
            raise NotFound(f"no pack {pack_id.hex()[:16]} in parcel {parcel}")
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise UsageError(f"range {offset}+{length} is outside pack of {size} bytes")
        return self.packs.read(pack_id, offset, size - offset if length is None else length)

    def put_torrent(self, user: str, parcel: uuid.UUID, pack_id: bytes, data: bytes) -> None:
        """Keep ``user``'s torrent of a pack the parcel has (replacing theirs).

        Per user, not per pack: the server cannot check a torrent's hashes
        without hashing the pack, so one user's torrent is never served to another.
        Going with the pack row (ON DELETE CASCADE), it dies when GC or prune drops the pack.
        """
        with self._tx() as db:
            # The row key, not the id: another user's parcel may have this id.
            key = self._owned(db, user, parcel)[-1]
            if not db.execute("SELECT 1 FROM parcel_packs WHERE parcel=? AND pack=?", (key, pack_id)).fetchone():
                raise NotFound(f"no pack {pack_id.hex()[:16]} in parcel {parcel}", hint="upload the pack first")
            db.execute("INSERT INTO torrents VALUES (?,?,?) ON CONFLICT (pack, owner) DO UPDATE SET data=excluded.data", (pack_id, user, data))

    def get_torrent(self, user: str, parcel: uuid.UUID, pack_id: bytes) -> bytes | None:
        """``user``'s torrent of a pack the parcel has; None if there is none (an older pack)."""
        if self.reachable_pack(user, parcel, pack_id) is None:
            raise NotFound(f"no pack {pack_id.hex()[:16]} in parcel {parcel}")
        rows = self._q("SELECT data FROM torrents WHERE pack=? AND owner=?", (pack_id, user))
        return rows[0][0] if rows else None

    def have_packs(self, user: str, parcel: uuid.UUID, ids: Iterable[bytes]) -> set[bytes]:
        key = self._key(user, parcel)
        out = set()
        for pid in ids:
            if self._q("SELECT 1 FROM parcel_packs WHERE parcel=? AND pack=?", (key, pid)):
                out.add(pid)
        return out

    def locate(self, user: str, parcel: uuid.UUID, tags: Iterable[bytes]) -> dict[bytes, PackEntry]:
        key = self._key(user, parcel)
        out: dict[bytes, PackEntry] = {}
        with self.db.read() as db:
            for tag in tags:
                row = db.execute(
                    'SELECT e.pack, e."offset", e.length FROM pack_entries e JOIN parcel_packs pp '
                    "ON pp.pack=e.pack AND pp.parcel=? AND pp.state='live' WHERE e.tag=? LIMIT 1",
                    (key, tag),
                ).fetchone()
                if row:
                    out[tag] = PackEntry(tag, row[0], row[1], row[2])
        return out

    # -- locks and commits ---------------------------------------------------------

    def lock_status(self, user: str, parcel: uuid.UUID) -> LockState:
        return self.parcel(user, parcel).lock

    def acquire(self, user: str, parcel: uuid.UUID, holder: Holder) -> LockState:
        with self._tx() as db:
            row = self._owned(db, user, parcel)
            info, key = self._info(row), row[-1]
            new = lockrules.acquire(info.lock, info.name, Holder(holder.site, holder.host, user, time.time()))
            if new == info.lock:
                return new
            self._set_lock(db, key, new)
            self._audit(db, user, parcel, "acquire", f"epoch {new.epoch} site {holder.site} host {holder.host}")
        return self.lock_status(user, parcel)

    def release(self, user: str, parcel: uuid.UUID, epoch: int) -> LockState:
        with self._tx() as db:
            row = self._owned(db, user, parcel)
            info, key = self._info(row), row[-1]
            new = lockrules.release(info.lock, epoch)
            if new == info.lock:
                return new
            self._set_lock(db, key, new)
            self._audit(db, user, parcel, "release", f"epoch {epoch}")
        return self.lock_status(user, parcel)

    def break_lock(self, user: str, parcel: uuid.UUID, reason: str) -> LockState:
        with self._tx() as db:
            row = self._owned(db, user, parcel)
            info, key = self._info(row), row[-1]
            old = info.lock.holder
            new = lockrules.break_lock(info.lock)
            self._set_lock(db, key, new)
            was = f"site {old.site} host {old.host}" if old else "nobody"
            self._audit(db, user, parcel, "break", f"epoch {new.epoch}; held by {was}; {reason[:500]}")
        return self.lock_status(user, parcel)

    def hand_over(self, user: str, parcel: uuid.UUID, epoch: int, holder: Holder) -> LockState:
        with self._tx() as db:
            row = self._owned(db, user, parcel)
            info, key = self._info(row), row[-1]
            old = info.lock.holder
            new = lockrules.hand_over(info.lock, info.name, epoch, Holder(holder.site, holder.host, user, time.time()))
            if new == info.lock:
                return new  # a retry of a hand-over that landed
            self._set_lock(db, key, new)
            was = f"site {old.site} host {old.host}" if old else "nobody"
            self._audit(db, user, parcel, "hand-over",
                        f"epoch {new.epoch}; from {was} to site {holder.site} host {holder.host}")
        # What this call decided, not a re-read: another hand-over may follow at once.
        return new

    def commit(self, user: str, parcel: uuid.UUID, req: CommitRequest) -> VersionInfo:
        header = parse_header(req.manifest)
        now = time.time()
        with self._tx() as db:
            row = self._owned(db, user, parcel)
            info, key = self._info(row), row[-1]
            done = db.execute(
                "SELECT version, time, site, hash, LENGTH(manifest), new_pack_bytes FROM versions "
                "WHERE parcel=? AND version=? AND hash=?",
                (key, req.parent + 1, manifest_hash(req.manifest)),
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
                    "SELECT hash FROM versions WHERE parcel=? AND version=?", (key, req.parent)
                ).fetchone()[0]
            if header.parent != parent_hash:
                raise IntegrityError("the manifest names a different parent version")
            new_bytes = 0
            for pid in dict.fromkeys(req.packs):
                row = db.execute(
                    "SELECT pp.state, p.size FROM parcel_packs pp JOIN packs p ON p.id=pp.pack "
                    "WHERE pp.parcel=? AND pp.pack=?",
                    (key, pid),
                ).fetchone()
                if row is None:
                    raise NotFound(f"pack {pid.hex()[:16]} was not uploaded", hint="upload it, then commit")
                if row[0] == "staged":
                    new_bytes += row[1]
                    db.execute(
                        "UPDATE parcel_packs SET state='live', since=? WHERE parcel=? AND pack=?",
                        (now, key, pid),
                    )
            want = list(dict.fromkeys([*req.added, *req.memory]))
            have = self._live_tags(db, key, want)
            missing = [t for t in want if t not in have]
            if missing:
                raise NotFound(
                    f"the new version references {len(missing)} chunk(s) the server does not have "
                    f"(first {missing[0].hex()[:16]})",
                    hint="upload the missing packs, then commit",
                )
            v = req.parent + 1
            db.executemany(
                "UPDATE refs SET last=? WHERE parcel=? AND tag=? AND last IS NULL",
                [(req.parent, key, t) for t in dict.fromkeys(req.removed)],
            )
            db.executemany(
                "INSERT INTO refs VALUES (?,?,?,NULL)", [(key, t, v) for t in dict.fromkeys(req.added)]
            )
            db.executemany(
                "INSERT INTO refs VALUES (?,?,?,?)", [(key, t, v, v) for t in dict.fromkeys(req.memory)]
            )
            mhash = manifest_hash(req.manifest)
            site = req.site or (info.lock.holder.site if info.lock.holder else "")
            db.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?)",
                (key, v, now, site, req.manifest, mhash, new_bytes),
            )
            db.execute("UPDATE parcels SET version=? WHERE id=?", (v, key))
            if req.release:
                db.execute(
                    "UPDATE parcels SET holder_site=NULL, holder_host=NULL, holder_user=NULL,"
                    " holder_since=NULL WHERE id=?",
                    (key,),
                )
            self._audit(db, user, parcel, "commit", f"version {v} epoch {req.epoch} release {req.release}")
        return VersionInfo(v, now, site, mhash, len(req.manifest), new_bytes)

    @staticmethod
    def _live_tags(db: Conn, key: str, tags: list[bytes]) -> set[bytes]:
        """Which of ``tags`` are in a live pack of the parcel ``key``, in O(len(tags)).

        One correlated lookup per tag (the tag index, then the parcel_packs
        key), never a join over the parcel's packs: with ``tag IN (…)`` joined
        to parcel_packs, PostgreSQL without statistics yet (a new or freshly
        imported database) read every entry of every live pack of the parcel
        and filtered them, so a fixed delta cost more the larger the disk; and
        with statistics it may scan the whole table. A scalar subquery is never
        flattened into a join by either engine, so the plan stays per tag.
        In batches, not a query per tag: over a network database each query is
        a round trip, and a 1 %-of-16-GiB commit names 1311 tags.
        """
        have: set[bytes] = set()
        for i in range(0, len(tags), TAG_BATCH):
            part = tags[i:i + TAG_BATCH]
            rows = db.execute(
                "SELECT t.column1, (SELECT 1 FROM pack_entries e JOIN parcel_packs pp ON pp.pack=e.pack"
                " AND pp.parcel=? AND pp.state='live' WHERE e.tag=t.column1 LIMIT 1)"
                f" FROM (VALUES {','.join(['(?)'] * len(part))}) t",
                (key, *part)).fetchall()
            have.update(bytes(r[0]) for r in rows if r[1] is not None)
        return have

    def _set_lock(self, db: Conn, key: str, lock: LockState) -> None:
        h = lock.holder
        db.execute(
            "UPDATE parcels SET epoch=?, holder_site=?, holder_host=?, holder_user=?, holder_since=? WHERE id=?",
            (lock.epoch, *((h.site, h.host, h.user, h.since) if h else (None,) * 4), key),
        )

    def _audit(self, db: Conn, user: str, parcel: uuid.UUID | None, event: str, detail: str) -> None:
        db.execute(
            'INSERT INTO audit (time, "user", parcel, event, detail) VALUES (?,?,?,?,?)',
            (time.time(), user, str(parcel) if parcel else None, event, detail),
        )

    def audit_log(self, parcel: uuid.UUID | None = None) -> list[tuple]:
        cols = 'time, "user", parcel, event, detail'
        if parcel is None:
            return self._q(f'SELECT {cols} FROM audit ORDER BY {self.db.audit_order}')
        return self._q(f'SELECT {cols} FROM audit WHERE parcel=? ORDER BY {self.db.audit_order}', (str(parcel),))

