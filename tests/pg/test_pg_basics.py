"""PostgreSQL metadata: migrations, refusals with one clear line, a repository round trip."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from isrsync.errors import Unreachable, UsageError
from isrsync.server import pg
from isrsync.server.repo import Repository
from isrsync.store.base import Holder


def test_migrate_is_versioned_and_idempotent(empty_pg_dsn: str) -> None:
    assert pg.migrate(empty_pg_dsn) == [m[0] for m in pg.MIGRATIONS]
    assert pg.migrate(empty_pg_dsn) == []


def test_an_unmigrated_database_is_refused_with_the_command_to_run(empty_pg_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        Repository(tmp_path / "d", create=True, metadata=empty_pg_dsn)
    assert "no isrsync schema" in e.value.message and "isrsync server migrate" in e.value.hint


def test_a_newer_schema_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("INSERT INTO schema_migrations VALUES (999, 0)")
    with pytest.raises(UsageError) as e:
        Repository(tmp_path / "d", create=True, metadata=pg_dsn)
    assert "upgrade isrsync" in e.value.hint


def test_an_unreachable_database_is_one_line_without_its_password(tmp_path: Path) -> None:
    dsn = "postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere"
    with pytest.raises(Unreachable) as e:
        Repository(tmp_path / "d", create=True, metadata=dsn)
    assert "s3cret-pw" not in str(e.value) and "\n" not in e.value.message
    assert "127.0.0.1:1/nowhere" in e.value.message


def test_round_trip_and_lock_rules(pg_dsn: str, tmp_path: Path) -> None:
    repo = Repository(tmp_path / "d", create=True, metadata=pg_dsn)
    try:
        tok = repo.add_user("alice")
        assert repo.authenticate(tok) == "alice"
        pid = uuid.uuid4()
        repo.create_parcel("alice", pid, "p", "hw")
        st = repo.acquire("alice", pid, Holder("s1", "h1", "alice", 0))
        assert st.epoch == 1 and st.holder and st.holder.site == "s1"
        assert repo.release("alice", pid, st.epoch).holder is None
        assert [r[3] for r in repo.audit_log(pid)] == ["create", "acquire", "release"]
        assert repo.list_users() == [("alice", pytest.approx(repo.list_users()[0][1]), 1)]
    finally:
        repo.close()


def test_migration_3_swaps_refs_by_last_for_refs_by_end_and_keeps_the_rows(empty_pg_dsn: str, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """A database at schema 2 with references in it: `migrate` applies 3 alone,
    the rows stay, the repository opens, and prune's delete of ended references
    can search by (parcel, last)."""
    import psycopg

    monkeypatch.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:2])
    assert pg.migrate(empty_pg_dsn) == [1, 2]
    monkeypatch.undo()
    with psycopg.connect(empty_pg_dsn, autocommit=True) as c:
        c.execute("INSERT INTO users VALUES ('alice', %s, 0)", (b"h" * 32,))
        c.execute("INSERT INTO parcels (id, owner, name, created, hardware, version, epoch, ext) "
                  "VALUES ('k', 'alice', 'vm', 0, '', 1, 0, 'k')")
        c.cursor().executemany("INSERT INTO refs VALUES ('k', %s, 1, %s)",
                               [(bytes([i]) * 32, None if i % 2 else 1) for i in range(50)])
    assert pg.migrate(empty_pg_dsn) == [3]
    with psycopg.connect(empty_pg_dsn, autocommit=True) as c:
        names = {r[0] for r in c.execute("SELECT indexname FROM pg_indexes WHERE tablename='refs'")}
        assert names == {"refs_by_tag", "refs_by_end"}
        assert c.execute("SELECT COUNT(*), COUNT(last) FROM refs").fetchone() == (50, 25)
        c.execute("SET enable_seqscan = off")  # a 50-row table: ask whether the index can serve it at all
        plan = " ".join(r[0] for r in c.execute(
            "EXPLAIN DELETE FROM refs WHERE parcel='k' AND last IS NOT NULL AND last < 5").fetchall())
        assert "refs_by_end" in plan, plan
    Repository(tmp_path / "d", create=True, metadata=empty_pg_dsn).close()
