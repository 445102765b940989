"""Fixtures for the Store conformance suite: one suite, every backend.

``backend`` is parametrized over the Store implementations, so every test that
asks for ``store`` (directly or through ``home``) runs once per backend:

* ``local``: :class:`LocalStore` over a data directory in ``tmp_path``
  (``LocalStore.open(..., create=True, create_user=True)``; further users share its
  :class:`Repository`);
* ``http``: :class:`HttpStore` against the real ``isrsync serve`` subprocess,
  one bearer token per user; the server is shared by the run's tests
  (``shared_servers`` in tests/conftest.py) and each test's users are its own
  (``alice-<test>``: :meth:`Home.name_of`), so every test still starts in an
  empty home;
* ``memory``: :class:`MemoryStore` (no files); further clients share its
  :class:`MemoryHome` (``MemoryStore.client(user)``);
* ``pg``: as ``local``, with the rows in a PostgreSQL database of the test's own
  (tests/pg/pgkit.py; packs stay in the data directory);
* ``http-pg``: as ``http``, the server run with ``--metadata postgresql://…``;
* ``s3``: as ``pg``, with the packs in a bucket of moto's S3 server on loopback;
* ``http-s3``: as ``http-pg``, the server run with ``--packs s3://…`` too.

Every store a test opens is closed at teardown (the http ones explicitly, so
no aiohttp session is left unclosed), non-owning stores before the owner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
import uuid

import sys

import pytest

from isrsync.store.base import Store
from isrsync.store.http import HttpStore
from isrsync.server.local import LocalStore
from isrsync.store.memory import MemoryStore

sys.path.insert(0, str(Path(__file__).parents[1] / "pg"))
import pgkit  # noqa: E402  (tests/pg is no package; its helper is shared here)

BACKENDS = ["local", "http", "memory", "pg", "http-pg", "s3", "http-s3"]


class Home:
    """One user home reachable through a backend; hands out Store clients."""

    def __init__(self, backend: str, root: Path, server=None, metadata: str | None = None,
                 packs: str | None = None) -> None:
        self.backend = backend
        self.metadata = metadata
        self.packs = packs
        self.root = root
        self.server = server
        self._owner: LocalStore | None = None
        self._memory: MemoryStore | None = None
        self._tokens: dict[str, str] = {}
        self._stores: list[Store] = []
        self._test = uuid.uuid4().hex[:8]  # this test's users on a shared server

    def name_of(self, user: str) -> str:
        """The server's name for this test's ``user``."""
        return f"{user}-{self._test}" if self.server is not None else user

    def _token(self, user: str) -> str:
        if user not in self._tokens:
            self._tokens[user] = self.server.add_user(self.name_of(user))
        return self._tokens[user]

    def store(self, user: str = "alice") -> Store:
        """A new client of ``user``'s home (the user is created on first use).

        Two calls for the same user give two independent clients, as two sites
        of that user would have.
        """
        s: Store
        if self.backend in ("local", "pg", "s3"):
            if self._owner is None:
                self._owner = LocalStore.open(self.root, user, create=True, create_user=True,
                                              metadata=self.metadata, packs=self.packs)
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


@pytest.fixture(scope="session")
def _shared_db():
    # The shared http-pg and http-s3 servers' database, for the whole run.
    made: list[pgkit.FreshDb] = []

    def get() -> str:
        if not made:
            made.append(pgkit.FreshDb())
        return made[0].dsn

    yield get
    for db in made:
        db.close()


@pytest.fixture(scope="session")
def _shared_bucket():
    made: list[str] = []

    def get() -> str:
        if not made:
            made.append(pgkit.s3_url())
        return made[0]

    return get


@pytest.fixture
def _metadata(backend: str, _shared_db):
    # Only the PostgreSQL backends get a database: the in-process ones one of this
    # test's own, the http ones their shared server's (the test's users are its own).
    if backend in ("http-pg", "http-s3"):
        yield _shared_db()
        return
    if not backend.endswith(("pg", "s3")):
        yield None
        return
    db = pgkit.FreshDb()
    try:
        yield db.dsn
    finally:
        db.close()


@pytest.fixture
def _home_server(backend: str, _metadata, _packs, shared_servers):
    # Only the http backends talk to the real server subprocess.
    if backend == "http":
        return shared_servers("http")
    if backend in ("http-pg", "http-s3"):
        extra = ["--metadata", _metadata, *(["--packs", _packs] if _packs else [])]
        return pgkit.with_metadata(shared_servers(backend, extra), _metadata, _packs)
    return None


@pytest.fixture
def _packs(backend: str, _shared_bucket) -> str | None:
    if backend == "http-s3":
        return _shared_bucket()
    return pgkit.s3_url() if backend.endswith("s3") else None


@pytest.fixture
async def home(backend: str, _home_server, _metadata, _packs, tmp_path: Path) -> AsyncIterator[Home]:
    h = Home(backend, tmp_path / "home", _home_server, _metadata, _packs)
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
