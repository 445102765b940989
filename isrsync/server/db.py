"""The metadata seam: where a :class:`~.repo.Repository` keeps its rows.

A :class:`Database` hands out connections that speak one small dialect of SQL,
the common ground of SQLite and PostgreSQL (``?`` parameters, ``ON CONFLICT``
upserts, quoted ``"user"`` and ``"offset"``), so the repository's transactional
logic (the lock's compare-and-set, the fenced commit, staging and prune's
re-check) is written once and runs unchanged on either engine.

Every write is one :meth:`Database.tx`: a transaction that holds the
database's *writer lock* from its first statement to its commit. On SQLite that
is ``BEGIN IMMEDIATE``; on PostgreSQL an advisory lock every front takes (see
:mod:`.pg`). Under it, whatever a write transaction reads is what every earlier
writer committed, which is what makes a read-check-write a compare-and-set.

:class:`SqliteDatabase` is the embedded default (``store.db`` in ``--data``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, Protocol, Sequence


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What a transaction or a read gets: ``execute`` and ``executemany``."""

    def execute(self, sql: str, args: Sequence[Any] = ...) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor: ...


class Database(Protocol):
    #: "sqlite" or "postgresql", for messages and the few places that differ
    engine: str
    #: the column that orders the audit log by insertion
    audit_order: str

    def tx(self) -> ContextManager[Conn]: ...
    def read(self) -> ContextManager[Conn]: ...
    def q(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]: ...
    def close(self) -> None: ...


class SqliteDatabase:
    """``store.db``: one connection, one re-entrant lock (thread-safe)."""

    engine = "sqlite"
    audit_order = "rowid"

    def __init__(self, path: Path, *, create: bool) -> None:
        from .schema import open_db

        self._db = open_db(path, create=create)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def q(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()
