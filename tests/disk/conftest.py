"""Fixtures for tests/disk: a parcel committed to a real Store, and sites serving it.

* ``local_store``: alice's :class:`LocalStore` over a data directory in tmp_path.
* ``make_parcel(size=..., seed=..., store=None)``: version 1 of a new parcel from
  a mixed image (zero, compressible, random and repeated chunks), committed to
  ``store`` (the local one by default); returns a :class:`diskkit.Parcel`.
* ``make_site(parcel, name="site", **kw)``: a fresh SiteCache, a SourceRegistry with
  the (recording) ServerSource, a ParcelState and a ParcelDisk, served by an
  NbdServer on a unix socket; see :func:`diskkit.open_site` for the options.
  Every site is closed at teardown (NBD server first, then state and cache).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from diskkit import CH, Parcel, Site, kit, open_site
from diskkit import make_parcel as _make_parcel

from isrsync.server.local import LocalStore

SIZE = 40 * CH + 96 * 1024  # 41 chunks, the last one short


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[LocalStore]:
    store = LocalStore.open(tmp_path / "home", "alice", create=True, create_user=True)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def make_parcel(tmp_path: Path, local_store: LocalStore):
    async def make(size: int = SIZE, seed: int = 1, store=None) -> Parcel:
        image = kit.mixed_image(size, seed)
        return await _make_parcel(store or local_store, tmp_path / "work", image)

    return make


@pytest.fixture
async def make_site(tmp_path: Path) -> AsyncIterator:
    sites: list[Site] = []

    async def make(parcel: Parcel, name: str = "site", **kw) -> Site:
        site = await open_site(parcel, tmp_path / name, **kw)
        sites.append(site)
        return site

    yield make
    for s in reversed(sites):
        await s.close()
