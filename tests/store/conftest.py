"""Fixtures for the Store conformance suite: one suite, every backend.

``backend`` is parametrized over the Store implementations, so every test that
asks for ``store`` (directly or through ``home``) runs once per backend:

* ``local``: :class:`LocalStore` over a data directory in ``tmp_path``
  (``LocalStore.open(..., create=True, create_user=True)``; further users share its
  :class:`Repository`);
* ``http``: :class:`HttpStore` against the real ``isrsync serve`` subprocess
  (``live_server`` from tests/conftest.py), one bearer token per user;
* ``memory``: :class:`MemoryStore` (no files); further clients share its
  :class:`MemoryHome` (``MemoryStore.client(user)``).

Every store a test opens is closed at teardown (the http ones explicitly, so
no aiohttp session is left unclosed), non-owning stores before the owner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from isrsync.store.base import Store
from isrsync.store.http import HttpStore
from isrsync.server.local import LocalStore
from isrsync.store.memory import MemoryStore

BACKENDS = ["local", "http", "memory"]


class Home:
    """One user home reachable through a backend; hands out Store clients."""

    def __init__(self, backend: str, root: Path, server=None) -> None:
        self.backend = backend
        self.root = root
        self.server = server
        self._owner: LocalStore | None = None
        self._memory: MemoryStore | None = None
        self._tokens: dict[str, str] = {}
        self._stores: list[Store] = []

    def _token(self, user: str) -> str:
        if user not in self._tokens:
            self._tokens[user] = self.server.add_user(user)
        return self._tokens[user]

    def store(self, user: str = "alice") -> Store:
        """A new client of ``user``'s home (the user is created on first use).

        Two calls for the same user give two independent clients, as two sites
        of that user would have.
        """
        s: Store
        if self.backend == "local":
            if self._owner is None:
                self._owner = LocalStore.open(self.root, user, create=True, create_user=True)
                s = self._owner
            else:
                repo = self._owner.repo
                if user not in {u[0] for u in repo.list_users()}:
                    repo.add_user(user)
                s = LocalStore(repo, user)
        elif self.backend == "memory":
            if self._memory is None:
                s = self._memory = MemoryStore(user)
            else:
                s = self._memory.client(user)
        else:
            s = HttpStore(self.server.url, self._token(user), retries=3, backoff=0.05)
        self._stores.append(s)
        return s

    async def aclose(self) -> None:
        # Non-owning LocalStores first: the owner closes the shared Repository.
        for s in reversed(self._stores):
            if s is not self._owner:
                await s.close()
        if self._owner is not None:
            await self._owner.close()
        self._stores.clear()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def _home_server(backend: str, request: pytest.FixtureRequest):
    # Only the http backend starts the real server subprocess.
    return request.getfixturevalue("live_server") if backend == "http" else None


@pytest.fixture
async def home(backend: str, _home_server, tmp_path: Path) -> AsyncIterator[Home]:
    h = Home(backend, tmp_path / "home", _home_server)
    try:
        yield h
    finally:
        await h.aclose()


@pytest.fixture
async def store(home: Home) -> Store:
    """Alice's store (the first user of the home)."""
    return home.store("alice")


@pytest.fixture
async def other_user_store(home: Home, store: Store) -> Store:
    """Bob's store: a second user of the same home."""
    return home.store("bob")


@pytest.fixture
async def second_site_store(home: Home, store: Store) -> Store:
    """Another client of Alice's home, as a second site of hers would have."""
    return home.store("alice")
