"""Fixtures for the PostgreSQL tests: a migrated database of each test's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgkit import FreshDb


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    db = FreshDb()
    try:
        yield db.dsn
    finally:
        db.close()


@pytest.fixture
def empty_pg_dsn() -> Iterator[str]:
    db = FreshDb(migrate=False)
    try:
        yield db.dsn
    finally:
        db.close()


@pytest.fixture
async def stores():
    """Make HttpStores that are all closed at teardown."""
    from isrsync.store.http import HttpStore

    made: list[HttpStore] = []

    def make(url: str, token: str, **kw) -> HttpStore:
        kw.setdefault("retries", 2)
        kw.setdefault("backoff", 0.05)
        s = HttpStore(url, token, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


@pytest.fixture
def fronts(pg_dsn: str, server_factory, tmp_path):
    """Start ``n`` `isrsync serve` fronts sharing one database and one pack directory."""
    import pgkit

    def start(n: int = 3):
        data = tmp_path / "shared-data"
        return [pgkit.with_metadata(server_factory(data=data, extra=["--metadata", pg_dsn]), pg_dsn)
                for _ in range(n)]

    return start
