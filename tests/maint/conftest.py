"""Fixtures for the maintenance tests: a data directory, a store over it, a client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from maintkit import USER, Client, client_factory

from isrsync.server.local import LocalStore
from isrsync.server.repo import Repository


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "server-data"


@pytest.fixture
async def store(data_dir: Path) -> AsyncIterator[LocalStore]:
    repo = Repository(data_dir, create=True)
    repo.add_user(USER)
    s = LocalStore(repo, USER, owns_repo=True)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def make_client(store: LocalStore, tmp_path: Path) -> Callable[..., Client]:
    return client_factory(store, tmp_path)
