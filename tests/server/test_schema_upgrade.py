"""A data directory written by schema 1 (parcels keyed by the client's id alone)
opens under schema 2: upgraded in place, every parcel still found by its id and
name, and a schema from a later isrsync refused in one line without a change."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from isrsync.errors import UsageError
from isrsync.server.repo import Repository
from isrsync.server.schema import SCHEMA_VERSION


def _as_schema_1(data: Path) -> None:
    db = sqlite3.connect(data / "store.db")
    db.execute("DROP INDEX parcels_by_ext")
    db.execute("ALTER TABLE parcels DROP COLUMN ext")
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.commit()
    db.close()


def _schema(data: Path) -> str:
    db = sqlite3.connect(data / "store.db")
    try:
        return db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
    finally:
        db.close()


def test_a_schema_1_directory_is_upgraded_and_keeps_its_parcels(tmp_path: Path) -> None:
    repo = Repository(tmp_path, create=True)
    repo.add_user("alice")
    pid = uuid.uuid4()
    repo.create_parcel("alice", pid, "vm", "x86_64")
    repo.close()
    _as_schema_1(tmp_path)
    assert _schema(tmp_path) == "1"

    repo = Repository(tmp_path)
    try:
        assert _schema(tmp_path) == str(SCHEMA_VERSION)
        assert repo.parcel("alice", pid).name == "vm"
        assert repo.parcel("alice", "vm").parcel == pid
        # The upgraded directory takes new parcels of its own, ids per user.
        repo.add_user("bob")
        repo.create_parcel("bob", pid, "vm", "x86_64")
        assert [p.parcel for p in repo.list_parcels("bob")] == [pid]
        assert [p.name for p in repo.list_parcels("alice")] == ["vm"]
    finally:
        repo.close()


def test_a_later_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    Repository(tmp_path, create=True).close()
    db = sqlite3.connect(tmp_path / "store.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(UsageError, match="schema 99 is not supported"):
        Repository(tmp_path)
    assert _schema(tmp_path) == "99"


def _indexes(data: Path) -> set[str]:
    db = sqlite3.connect(data / "store.db")
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='refs'")}
    finally:
        db.close()


def test_refs_by_last_gives_way_to_refs_by_end_and_prune_uses_it(tmp_path: Path) -> None:
    """A directory made before refs_by_end (its refs indexed by parcel, last and tag)
    opens with the narrower index in its place, the same schema number, every
    reference kept; prune's delete of ended references searches by it."""
    repo = Repository(tmp_path, create=True)
    repo.add_user("alice")
    pid = uuid.uuid4()
    repo.create_parcel("alice", pid, "vm", "x86_64")
    key = repo._q("SELECT id FROM parcels")[0][0]
    with repo._tx() as db:
        db.executemany("INSERT INTO refs VALUES (?,?,?,?)",
                       [(key, bytes([i]) * 32, 1, None if i % 2 else 1) for i in range(50)])
    repo.close()
    db = sqlite3.connect(tmp_path / "store.db")
    db.execute("DROP INDEX refs_by_end")
    db.execute("CREATE INDEX refs_by_last ON refs(parcel, last, tag)")
    db.commit()
    db.close()
    assert "refs_by_last" in _indexes(tmp_path)

    repo = Repository(tmp_path)
    try:
        assert _indexes(tmp_path) >= {"refs_by_end", "refs_by_tag"}
        assert "refs_by_last" not in _indexes(tmp_path)
        assert _schema(tmp_path) == str(SCHEMA_VERSION)
        assert repo._q("SELECT COUNT(*), COUNT(last) FROM refs") == [(50, 25)]
        plan = " ".join(str(r) for r in repo._db.execute(
            "EXPLAIN QUERY PLAN DELETE FROM refs WHERE parcel=? AND last IS NOT NULL AND last < ?", (key, 5)))
        assert "refs_by_end" in plan, plan
    finally:
        repo.close()
