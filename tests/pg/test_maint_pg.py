"""The maintenance suite's prune tests, over PostgreSQL metadata.

The test functions are tests/maint's own, unchanged; only the fixtures differ:
the store's rows live in a PostgreSQL database of the test's own, and the
"second-connection" pruner of the concurrency test is a second Repository with
its own connection pool to that database (its module's ``Repository`` is
pointed at it), so prune's re-check is exercised across connections.

Left out: tests that read SQLite itself (row tampering, step counting) and the
unlink-window tests, whose hook looks for the deleter's own uncommitted delete
through a second connection (SQLite shares one; PostgreSQL does not show it).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "maint"))
from maintkit import USER, Client, client_factory  # noqa: E402
import test_maint_concurrent as _concurrent  # noqa: E402
import test_maint_prune as _prune  # noqa: E402

from isrsync.server.local import LocalStore  # noqa: E402
from isrsync.server.repo import Repository  # noqa: E402

test_prune_keeps_newest_and_their_bases_and_all_stay_readable = \
    _prune.test_prune_keeps_newest_and_their_bases_and_all_stay_readable
test_prune_keep_everything_changes_nothing = _prune.test_prune_keep_everything_changes_nothing
test_prune_leaves_staged_packs_to_gc = _prune.test_prune_leaves_staged_packs_to_gc
test_prune_is_safe_against_concurrent_commits = _concurrent.test_prune_is_safe_against_concurrent_commits


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "server-data"


@pytest.fixture
async def store(data_dir: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalStore]:
    monkeypatch.setattr(_concurrent, "Repository", functools.partial(Repository, metadata=pg_dsn))
    repo = Repository(data_dir, create=True, metadata=pg_dsn)
    repo.add_user(USER)
    s = LocalStore(repo, USER, owns_repo=True)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def make_client(store: LocalStore, tmp_path: Path) -> Callable[..., Client]:
    return client_factory(store, tmp_path)
