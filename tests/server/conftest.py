"""Fixtures for the home-server tests (the real `isrsync serve` comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest

from isrsync.store.http import HttpStore


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., HttpStore]]:
    """Make HttpStores that are all closed at teardown."""
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


@pytest.fixture(scope="session")
def live_server_cls(request: pytest.FixtureRequest) -> type:
    """tests/conftest.py's LiveServer class (for servers of a wider scope, or restarts)."""
    root = Path(__file__).resolve().parent.parent / "conftest.py"
    for plugin in request.config.pluginmanager.get_plugins():
        cls = getattr(plugin, "LiveServer", None)
        where = getattr(plugin, "__file__", None)
        if isinstance(cls, type) and where and Path(where).resolve() == root:
            return cls
    raise RuntimeError("tests/conftest.py's LiveServer is not loaded")


@pytest.fixture
def start_server(live_server_cls) -> Iterator[Callable[[Path], object]]:
    """``start_server(data)``: a LiveServer on ``data`` (restarts welcome); every one
    started is SIGKILLed at teardown if it is still running, whatever the test did."""
    made: list = []

    def start(data: Path) -> object:
        srv = live_server_cls(data)
        made.append(srv)
        return srv.start()

    yield start
    for srv in made:
        srv.kill()
