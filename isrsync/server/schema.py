"""The server database's schema, its opening and upgrades, and how tokens are kept.

Schema 2 names a parcel by (owner, the client's id) so one user's parcel id can
never reveal or collide with another's; schema 1 data directories are upgraded in
place when opened.
"""

from __future__ import annotations

import hashlib
import sqlite3
import urllib.parse
from pathlib import Path

from ..errors import UsageError

SCHEMA_VERSION = 2

SCHEMA = """
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
    ext TEXT,
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
CREATE INDEX IF NOT EXISTS refs_by_end ON refs(parcel, last) WHERE last IS NOT NULL;
CREATE TABLE IF NOT EXISTS torrents (
    pack BLOB NOT NULL REFERENCES packs(id) ON DELETE CASCADE,
    owner TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    data BLOB NOT NULL, PRIMARY KEY (pack, owner)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    time REAL NOT NULL, user TEXT NOT NULL, parcel TEXT, event TEXT NOT NULL, detail TEXT NOT NULL);
"""


def hash_token(token: str) -> bytes:
    # errors="replace": a token of undecodable bytes hashes to something no
    # user has, rather than raising.
    return hashlib.blake2b(token.encode("utf-8", "replace"), digest_size=32, person=b"isrsync-token").digest()


def open_db(db: Path, *, create: bool) -> sqlite3.Connection:
    """The database at ``db`` with the schema in place and upgraded.

    Without ``create``, mode=rw: SQLite never makes a new, empty database file.
    """
    target, uri = (db, False) if create else (f"file:{urllib.parse.quote(str(db))}?mode=rw", True)
    conn = sqlite3.connect(target, timeout=60, isolation_level=None, check_same_thread=False, uri=uri)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) == 1:
            _upgrade_from_1(conn)
        elif int(row[0]) != SCHEMA_VERSION:
            raise UsageError(f"data directory schema {row[0]} is not supported", hint="upgrade isrsync")
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS parcels_by_ext ON parcels(owner, ext)")
        # refs_by_end (above) replaced refs_by_last (parcel, last, tag): a commit's
        # new references (last NULL) landed at random places in the parcel's live
        # group of that index, one written page each, so a fixed delta wrote more
        # WAL the larger the disk. Prune, its only reader, needs only the ended
        # references by (parcel, last); live ones are not in the index at all, and
        # a commit ending a reference (last IS NULL) can only find it by refs_by_tag.
        # Not a schema version: an older isrsync opens the directory unchanged.
        conn.execute("DROP INDEX IF EXISTS refs_by_last")
    except BaseException:
        conn.close()
        raise
    return conn


def _upgrade_from_1(db: sqlite3.Connection) -> None:
        """Schema 2 names a parcel by (owner, the client's id): ``ext``. ``id`` stays
        the row's key that the other tables use; for parcels made under schema 1
        the two are equal."""
        db.execute("BEGIN IMMEDIATE")
        try:
            cols = [r[1] for r in db.execute("PRAGMA table_info(parcels)")]
            if "ext" not in cols:
                db.execute("ALTER TABLE parcels ADD COLUMN ext TEXT")
            db.execute("UPDATE parcels SET ext=id WHERE ext IS NULL")
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
