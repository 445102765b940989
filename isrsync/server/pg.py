"""PostgreSQL metadata for ``isrsync serve --metadata postgresql://…``.

psycopg 3 with its connection pool, not asyncpg: the repository's logic is
synchronous and already runs on worker threads (aiohttp never waits on it),
so one body of transactional code serves SQLite and PostgreSQL alike and the
conformance of the two is by construction, not by a second copy in async.

**Isolation.** Every write transaction runs at READ COMMITTED and takes
``pg_advisory_xact_lock(WRITER_LOCK)`` as its first statement, held until it
commits or rolls back. Every front takes that same lock, so writers are
serialised across all fronts exactly as SQLite's ``BEGIN IMMEDIATE`` serialises
them in one process. Under READ COMMITTED each later statement takes a fresh
snapshot, so it sees everything every earlier writer committed: the lock's
compare-and-set (read the record, decide with :mod:`~isrsync.store.lockrules`,
write) and the fenced commit (check epoch and parent, write the version) cannot
interleave with another writer, and none of them ever meets a serialisation
failure to retry (SERIALIZABLE would give the same outcomes, at the price of
retries on every contended lock race). Reads take no lock and see only
committed rows. A front killed mid-transaction leaves nothing: the server
rolls its transaction back and the advisory lock goes with the session.

**Migrations** are numbered; ``isrsync server migrate`` applies the missing
ones, each in its own transaction under the writer lock, and records them in
``schema_migrations``. A front refuses a database whose schema is not exactly
the one it knows, with one line saying what to run.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Iterable, Iterator, Sequence

from ..errors import Busy, UsageError

#: the key every front's write transactions lock (any fixed 64-bit number)
WRITER_LOCK = 0x15A5_0001

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE users (
    name TEXT PRIMARY KEY, token_hash BYTEA NOT NULL UNIQUE, created DOUBLE PRECISION NOT NULL);
CREATE TABLE bundles (
    "user" TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    data BYTEA NOT NULL, hash BYTEA NOT NULL);
CREATE TABLE parcels (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, hardware TEXT NOT NULL,
    version BIGINT NOT NULL, epoch BIGINT NOT NULL,
    holder_site TEXT, holder_host TEXT, holder_user TEXT, holder_since DOUBLE PRECISION,
    ext TEXT NOT NULL, UNIQUE (owner, name), UNIQUE (owner, ext));
CREATE TABLE versions (
    parcel TEXT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE, version BIGINT NOT NULL,
    time DOUBLE PRECISION NOT NULL, site TEXT NOT NULL, manifest BYTEA NOT NULL, hash BYTEA NOT NULL,
    new_pack_bytes BIGINT NOT NULL, PRIMARY KEY (parcel, version));
CREATE TABLE packs (id BYTEA PRIMARY KEY, size BIGINT NOT NULL, added DOUBLE PRECISION NOT NULL);
CREATE TABLE pack_entries (
    pack BYTEA NOT NULL REFERENCES packs(id) ON DELETE CASCADE, tag BYTEA NOT NULL,
    "offset" BIGINT NOT NULL, length BIGINT NOT NULL, PRIMARY KEY (pack, tag));
CREATE INDEX pack_entries_tag ON pack_entries(tag);
CREATE TABLE parcel_packs (
    parcel TEXT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    pack BYTEA NOT NULL REFERENCES packs(id),
    state TEXT NOT NULL CHECK (state IN ('staged', 'live')), since DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (parcel, pack));
CREATE INDEX parcel_packs_pack ON parcel_packs(pack);
CREATE TABLE refs (
    parcel TEXT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE, tag BYTEA NOT NULL,
    first BIGINT NOT NULL, last BIGINT);
CREATE INDEX refs_by_tag ON refs(parcel, tag, last);
CREATE INDEX refs_by_last ON refs(parcel, last, tag);
CREATE TABLE torrents (
    pack BYTEA NOT NULL REFERENCES packs(id) ON DELETE CASCADE,
    owner TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    data BYTEA NOT NULL, PRIMARY KEY (pack, owner));
CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY, time DOUBLE PRECISION NOT NULL, "user" TEXT NOT NULL,
    parcel TEXT, event TEXT NOT NULL, detail TEXT NOT NULL);
"""),
    # Partial uploads shared by every front (packs in S3): each piece of an
    # upload is an object of its own under uploads/, listed here. A piece is
    # recorded only if it starts where the upload stands (a compare-and-set
    # under the writer lock), so the pieces of one upload are contiguous.
    (2, """
CREATE TABLE upload_parts (
    "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    pack BYTEA NOT NULL, start BIGINT NOT NULL, length BIGINT NOT NULL,
    object TEXT NOT NULL, time DOUBLE PRECISION NOT NULL,
    PRIMARY KEY ("user", pack, start));
"""),
    # Prune finds ended references by (parcel, last). refs_by_last (parcel, last,
    # tag) also held every live reference (last NULL), so a commit's new ones
    # landed at random places in the parcel's live group, more index pages the
    # larger the disk. The partial index holds only ended references; and a
    # commit ending one (last IS NULL) cannot be planned through it, only through
    # refs_by_tag by its key (a plain (parcel, last) index was chosen instead,
    # without statistics, and read the parcel's live references for every tag).
    (3, """
CREATE INDEX refs_by_end ON refs(parcel, last) WHERE last IS NOT NULL;
DROP INDEX refs_by_last;
"""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def describe(dsn: str) -> str:
    """``host:port/dbname`` of a connection string: never its password."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(dsn)
    except Exception:
        return "the metadata database (its address does not parse)"
    host = str(d.get("host") or "localhost")
    if host.startswith("/"):
        host = f"socket {host}"
    port = f":{d['port']}" if d.get("port") else ""
    return f"postgresql {host}{port}/{d.get('dbname') or d.get('user') or ''}"


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    # The shared dialect has no literal % and no ? other than parameters.
    return sql.replace("?", "%s")


class _Conn:
    """A pooled connection that speaks the shared dialect (``?`` → ``%s``)."""

    def __init__(self, conn: Any) -> None:
        self._c = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        cur = self._c.cursor()
        cur.execute(_pg_sql(sql), tuple(args))
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        cur = self._c.cursor()
        rows = [tuple(r) for r in rows]
        if rows:
            cur.executemany(_pg_sql(sql), rows)
        return cur


UNAVAILABLE_HINT = "check that the database runs and the --metadata address; retrying is safe"


def _unreachable(dsn: str, e: Exception) -> Busy:
    """A 503 (Busy) on the wire, exit code 8 in a command: the transaction was
    rolled back, so a retry is safe (a commit that landed answers replay-equal)."""
    # The first line of the driver's message only: it never holds the password.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return Busy(f"{describe(dsn)} is unreachable ({first})", hint=UNAVAILABLE_HINT)


@contextlib.contextmanager
def _mapped(dsn: str) -> Iterator[None]:
    """A lost or refused connection becomes one IsrError line (a 503 on the wire)."""
    import psycopg
    import psycopg_pool

    try:
        yield
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
        raise _unreachable(dsn, e) from None


def _connect(dsn: str) -> Any:
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise UsageError("--metadata must be a postgresql://… address", hint="e.g. postgresql://isrsync@db.example/isrsync")
    try:
        import psycopg
    except ImportError:
        raise UsageError("--metadata postgresql://… needs psycopg 3 and psycopg-pool",
                         hint="pip install 'isrsync[postgresql]'") from None

    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        raise _unreachable(dsn, e) from None


def schema_version(conn: Any) -> int:
    """The highest migration applied; 0 for an empty database."""
    exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0]
    if exists is None:
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])


def migrate(dsn: str) -> list[int]:
    """Apply the migrations ``dsn`` lacks; returns the versions applied."""
    applied: list[int] = []
    conn = _connect(dsn)
    try:
        with _mapped(dsn):
            for version, sql in MIGRATIONS:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
                    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                                 "version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
                    if schema_version(conn) >= version:
                        continue
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (version, time.time()))
                    applied.append(version)
            if schema_version(conn) > SCHEMA_VERSION:
                raise UsageError(f"{describe(dsn)} has schema {schema_version(conn)}, newer than this isrsync's "
                                 f"{SCHEMA_VERSION}", hint="upgrade isrsync")
    finally:
        conn.close()
    return applied


class PgDatabase:
    engine = "postgresql"
    audit_order = "seq"

    def __init__(self, dsn: str, *, pool_size: int = 8) -> None:
        try:
            from psycopg import IsolationLevel
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise UsageError("--metadata postgresql://… needs psycopg 3 and psycopg-pool",
                             hint="pip install 'isrsync[postgresql]'") from None

        self.dsn = dsn
        conn = _connect(dsn)
        try:
            with _mapped(dsn):
                have = schema_version(conn)
        finally:
            conn.close()
        if have != SCHEMA_VERSION:
            what = "has no isrsync schema" if have == 0 else f"has schema {have}, this isrsync needs {SCHEMA_VERSION}"
            raise UsageError(f"{describe(dsn)} {what}",
                             hint="run `isrsync server migrate --metadata URL`" if have < SCHEMA_VERSION
                             else "upgrade isrsync")

        def configure(c: Any) -> None:
            c.isolation_level = IsolationLevel.READ_COMMITTED

        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, configure=configure,
            kwargs={"autocommit": True, "connect_timeout": 5}, timeout=10, name="isrsync-metadata",
        )
        with _mapped(dsn):
            self._pool.open(wait=True, timeout=15)

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[_Conn]:
        with _mapped(self.dsn), self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            yield _Conn(conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[_Conn]:
        with _mapped(self.dsn), self._pool.connection() as conn:
            yield _Conn(conn)

    def q(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self.read() as c:
            return c.execute(sql, args).fetchall()
