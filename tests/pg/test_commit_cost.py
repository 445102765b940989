"""A commit costs what it adds, not what the parcel holds (issue 17's disk-size target).

The commit checks that every tag it adds is in a live pack of the parcel. Over
PostgreSQL with no statistics yet (a new or just-imported database: autovacuum
has not analysed it), ``tag IN (…)`` joined to the parcel's packs was planned
from the packs and read every entry of each to filter on tag; once analysed it
could scan the whole table instead. These tests give the parcel a live pack of
20,000 entries, commit 40 new tags in place of 40 old ones, replay what the
commit asked of ``pack_entries`` and ``refs`` with EXPLAIN ANALYZE, and count
the rows PostgreSQL read, before and after ANALYZE (ending a reference once
went through an index of the parcel's live references, filtered by tag). On SQLite the same commit must take as many virtual
machine steps whether the parcel holds 100 entries or 20,000.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from isrsync import manifest as mf
from isrsync.chunk import tag_of
from isrsync.manifest import Keyring
from isrsync.pack import PackWriter
from isrsync.server import pg
from isrsync.server.repo import Repository
from isrsync.store.base import CommitRequest, Holder
from isrsync.vmspec import VmSpec

BIG = 20_000
DELTA = 40


def tiny_pack(path: Path, n: int) -> tuple[bytes, list[bytes]]:
    """A real pack of ``n`` distinct small chunks (the server checks structure and tags, not size)."""
    tags = []
    with open(path, "wb") as f:
        w = PackWriter(f)
        for _ in range(n):
            data = os.urandom(48)
            tags.append(tag_of(data))
            w.add(tags[-1], data)
        info = w.finish()
    return info.pack_id, tags


class Parcel:
    """A parcel whose version 1 holds one live pack of ``held`` entries; ``delta`` commits version 2."""

    def __init__(self, repo: Repository, tmp: Path, held: int) -> None:
        self.repo, self.pid, self.master = repo, uuid.uuid4(), os.urandom(32)
        repo.create_parcel("alice", self.pid, f"p{held}", "")
        self.epoch = repo.acquire("alice", self.pid, Holder("s", "h", "alice", 0)).epoch
        big, self.tags = tiny_pack(tmp / f"big{held}", held)
        repo.put_pack_file("alice", self.pid, big, tmp / f"big{held}")
        self.ring = Keyring(1 << 30)
        self.head = self._commit([big], self.tags, [])
        self.new_pack, self.new_tags = tiny_pack(tmp / f"new{held}", DELTA)
        repo.put_pack_file("alice", self.pid, self.new_pack, tmp / f"new{held}")

    def _commit(self, packs: list[bytes], added: list[bytes], removed: list[bytes]) -> mf.Manifest:
        head = getattr(self, "head", None)
        v = head.version + 1 if head else 1
        raw = mf.encode(parcel=self.pid, version=v, master_key=self.master, vm=VmSpec(), keyring=self.ring,
                        parent=head, dirty=[] if head else None)
        self.repo.commit("alice", self.pid, CommitRequest(self.epoch, v - 1, raw, packs, sorted(added),
                                                          sorted(removed), [], release=False))
        return mf.decode(raw, self.master, self.pid)

    def delta(self) -> None:
        """Version 2: the DELTA new chunks replace DELTA of version 1's."""
        self.head = self._commit([self.new_pack], self.new_tags, self.tags[:DELTA])


def _rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows the executor took from ``table``: returned plus filtered away, over all loops."""
    n = 0
    if plan.get("Relation Name") == table:
        per_loop = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
                    + plan.get("Rows Removed by Index Recheck", 0))
        n += round(per_loop * plan.get("Actual Loops", 1))
    for sub in plan.get("Plans", []):
        n += _rows_read(sub, table)
    return n


@pytest.mark.parametrize("analyzed", [False, True], ids=["no-statistics", "analyzed"])
def test_pg_commit_reads_entries_in_proportion_to_the_delta(pg_dsn: str, tmp_path: Path, monkeypatch,
                                                            analyzed: bool) -> None:
    import psycopg

    repo = Repository(tmp_path / "d", create=True, metadata=pg_dsn)
    try:
        repo.add_user("alice")
        p = Parcel(repo, tmp_path, BIG)
        if analyzed:
            with psycopg.connect(pg_dsn, autocommit=True) as c:
                c.execute("ANALYZE")
        asked: list[tuple[str, tuple]] = []
        ended: list[tuple[str, tuple]] = []
        execute, executemany = pg._Conn.execute, pg._Conn.executemany

        def recording(self, sql: str, args=()):  # type: ignore[no-untyped-def]
            if sql.lstrip().upper().startswith("SELECT") and "pack_entries" in sql:
                asked.append((sql, tuple(args)))
            return execute(self, sql, args)

        def recording_many(self, sql: str, rows):  # type: ignore[no-untyped-def]
            rows = [tuple(r) for r in rows]
            if sql.lstrip().upper().startswith("UPDATE REFS"):
                ended.extend((sql, r) for r in rows)
            return executemany(self, sql, rows)

        monkeypatch.setattr(pg._Conn, "execute", recording)
        monkeypatch.setattr(pg._Conn, "executemany", recording_many)
        p.delta()
        monkeypatch.undo()
        assert asked, "the commit never looked its tags up"
        assert len(ended) == DELTA, "the commit did not end the references it removed"
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            if not analyzed:  # the replay must meet the planner state the commit met
                assert c.execute("SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables "
                                 "WHERE relname IN ('pack_entries', 'refs')").fetchall() == [(None, None)] * 2
            read = 0
            for sql, args in asked:
                (plan,), = c.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + pg._pg_sql(sql), args).fetchone()
                read += _rows_read(plan["Plan"], "pack_entries")
            # The references it ended: replayed on the state before the commit, then rolled back.
            refs_read = 0
            with c.transaction(force_rollback=True):
                c.execute("UPDATE refs SET last=NULL WHERE parcel=%s AND last=1", (ended[0][1][1],))
                for sql, args in ended:
                    (plan,), = c.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + pg._pg_sql(sql), args).fetchone()
                    refs_read += _rows_read(plan["Plan"], "refs")
        # Each new tag is found once; the parcel's 20,000 other entries are never read.
        assert read <= 3 * DELTA, f"the commit read {read} pack entries to check {DELTA} tags"
        # Each removed tag's live reference is found by its key, not among the parcel's 20,000.
        assert refs_read <= 3 * DELTA, f"the commit read {refs_read} references to end {DELTA}"
        assert repo.parcel("alice", p.pid).version == 2
    finally:
        repo.close()


def test_sqlite_commit_costs_the_same_whatever_the_parcel_holds(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "d", create=True)
    try:
        repo.add_user("alice")
        small, big = Parcel(repo, tmp_path, 100), Parcel(repo, tmp_path, BIG)
        steps = {}
        for name, p in (("small", small), ("big", big)):
            n = 0

            def count() -> int:
                nonlocal n
                n += 1
                return 0

            repo._db.set_progress_handler(count, 1)
            try:
                p.delta()
            finally:
                repo._db.set_progress_handler(None, 1)
            steps[name] = n
        # B-tree depth may add a little; reading the parcel's entries would be ~200x.
        assert steps["big"] <= 1.5 * steps["small"], steps
    finally:
        repo.close()
