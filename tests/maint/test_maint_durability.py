"""Crash safety that GC and check build on: a pack is durable before a row names it.

isrsync/server/repo.py: "a pack file is durable under its final name before any
row names it". GC only ever removes files no row names, and check trusts that a
row's file holds the bytes it was verified with; both assume the bytes were
fsynced before the rename and the row. Recorded here by wrapping os.fsync while
a pack is uploaded through each way in: the HTTP API (the real server app, in
process) and LocalStore.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from aiohttp import test_utils
from maintkit import USER, Client

from isrsync.server.app import make_app
from isrsync.store.http import HttpStore
from isrsync.server.local import LocalStore
from isrsync.server.repo import Repository


@pytest.mark.parametrize("way", ["http", "local"])
async def test_uploaded_pack_bytes_are_fsynced_before_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    repo = Repository(tmp_path / "data", create=True)
    token = repo.add_user(USER)
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    server = None
    if way == "http":
        server = test_utils.TestServer(make_app(repo))
        await server.start_server()
        store = HttpStore(str(server.make_url("")).rstrip("/"), token, retries=1)
    else:
        store = LocalStore(repo, USER)
    try:
        client = Client(store, tmp_path / "client", 8)
        await client.start()
        pack = client.pack([client.random_plain() for _ in range(4)])[1][0]
        monkeypatch.setattr(os, "fsync", recording)
        await client.upload([pack])
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert await store.pack_size(client.parcel, pack.id) == pack.info.size
        st = repo.pack_path(pack.id).stat()
        assert (st.st_dev, st.st_ino) in synced, (
            f"pack uploaded via {way}: its bytes were never fsynced before it was renamed into "
            "packs/ and recorded; a power cut can leave a row naming a file with lost data"
        )
    finally:
        await store.close()
        if server is not None:
            await server.close()
        repo.close()
