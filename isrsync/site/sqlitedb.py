"""SQLite as the site keeps it (the cache index, a parcel's local state): writers
serialized across processes, and SQLite's failures as isrsync's errors, so that
every database of the site fails alike."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Iterator

from ..errors import CacheError, StorageFull


def readonly_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def sqlite_error(e: sqlite3.Error, path: Path, what: str = "the cache index") -> StorageFull | CacheError:
    """The isrsync error for SQLite failing on a database of the site cache at ``path``.

    A full disk becomes :class:`StorageFull`, a read-only database or filesystem
    a :class:`CacheError` that says so, anything else a :class:`CacheError`
    quoting SQLite. Raise it ``from None``: SQLite's own traceback tells a user
    nothing more. Shared by every SQLite database the site keeps (the cache
    index, a parcel's local state) so they fail alike; ``what`` names which.
    """
    if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StorageFull(f"no space left while writing {what} at {path}")
    if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY or readonly_fs(path):
        return CacheError(f"the cache at {path} is read-only", hint="pick a writable cache with --cache-dir")
    return CacheError(f"{what} at {path} failed: {e}")


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection, where: Path, durable: bool = True) -> Iterator[None]:
    """BEGIN IMMEDIATE (serializes writers across processes) ... COMMIT, with
    SQLite's own failures (a full disk above all) mapped to our errors. A
    durable transaction fsyncs the WAL at its commit (and everything before it).
    A body may COMMIT itself (to act on a failed commit); then nothing is left to do.
    """
    try:
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            if db.in_transaction:
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as e:
        raise sqlite_error(e, where) from None
