"""LocalStore: one user's Store over a :class:`~.repo.Repository` data directory.

Used by the home server for every request, and by a site directly when its home
is a directory (``file:///path``: a mounted share, or the demo's embedded home).
SQLite work runs on one worker thread so the event loop never blocks on it;
pack hashing runs on the default executor so uploads verify in parallel.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from ..pack import PackEntry
from ..store.wire import check_torrent
from ..store.base import CommitRequest, Holder, LockState, ParcelInfo, VersionInfo
from .repo import Repository

T = TypeVar("T")


class LocalStore:
    def __init__(self, repo: Repository, user: str, *, owns_repo: bool = False) -> None:
        self.repo = repo
        self.user = user
        self._owns = owns_repo
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isrsync-store")

    @classmethod
    def open(cls, root: str | Path, user: str, *, create: bool = False, create_user: bool = False,
             metadata: str | None = None, packs: str | None = None) -> "LocalStore":
        """``user``'s Store over the data directory ``root``.

        ``create``: make the data directory if it holds none (else NotFound);
        ``create_user``: add ``user`` to it if they are not there yet;
        ``metadata``: a ``postgresql://`` address for the rows; ``packs``: an
        ``s3://`` address for the packs (partial uploads stay in ``root``).
        """
        repo = Repository(root, create=create, metadata=metadata, packs=packs)
        try:
            if create_user and user not in {u[0] for u in repo.list_users()}:
                repo.add_user(user)
        except BaseException:
            repo.close()
            raise
        return cls(repo, user, owns_repo=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, functools.partial(fn, *args))

    async def _run_bulk(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    async def get_key_bundle(self) -> bytes | None:
        return await self._run(self.repo.get_key_bundle, self.user)

    async def put_key_bundle(self, sealed: bytes, expect: bytes | None) -> None:
        await self._run(self.repo.put_key_bundle, self.user, sealed, expect)

    async def create_parcel(self, parcel: uuid.UUID, name: str, hardware: str = "") -> ParcelInfo:
        return await self._run(self.repo.create_parcel, self.user, parcel, name, hardware)

    async def list_parcels(self) -> list[ParcelInfo]:
        return await self._run(self.repo.list_parcels, self.user)

    async def parcel(self, ref: uuid.UUID | str) -> ParcelInfo:
        return await self._run(self.repo.parcel, self.user, ref)

    async def list_versions(self, parcel: uuid.UUID) -> list[VersionInfo]:
        return await self._run(self.repo.list_versions, self.user, parcel)

    async def get_manifests(self, parcel: uuid.UUID, first: int, last: int) -> list[bytes]:
        return await self._run(self.repo.get_manifests, self.user, parcel, first, last)

    async def put_pack(self, parcel: uuid.UUID, pack_id: bytes, path: Path) -> None:
        # Hashing a large pack is the slow part; keep it off the DB thread.
        await self._run_bulk(self.repo.put_pack_file, self.user, parcel, pack_id, Path(path))

    async def get_pack(
        self, parcel: uuid.UUID, pack_id: bytes, offset: int = 0, length: int | None = None
    ) -> bytes:
        return await self._run_bulk(self.repo.read_pack, self.user, parcel, pack_id, offset, length)

    async def pack_size(self, parcel: uuid.UUID, pack_id: bytes) -> int | None:
        return await self._run(self.repo.reachable_pack, self.user, parcel, pack_id)

    async def put_torrent(self, parcel: uuid.UUID, pack_id: bytes, data: bytes) -> None:
        check_torrent(data)
        await self._run(self.repo.put_torrent, self.user, parcel, pack_id, bytes(data))

    async def get_torrent(self, parcel: uuid.UUID, pack_id: bytes) -> bytes | None:
        return await self._run(self.repo.get_torrent, self.user, parcel, pack_id)

    async def have_packs(self, parcel: uuid.UUID, pack_ids: Iterable[bytes]) -> set[bytes]:
        return await self._run(self.repo.have_packs, self.user, parcel, list(pack_ids))

    async def locate(self, parcel: uuid.UUID, tags: Iterable[bytes]) -> dict[bytes, PackEntry]:
        return await self._run(self.repo.locate, self.user, parcel, list(tags))

    async def lock_status(self, parcel: uuid.UUID) -> LockState:
        return await self._run(self.repo.lock_status, self.user, parcel)

    async def acquire(self, parcel: uuid.UUID, holder: Holder) -> LockState:
        return await self._run(self.repo.acquire, self.user, parcel, holder)

    async def release(self, parcel: uuid.UUID, epoch: int) -> LockState:
        return await self._run(self.repo.release, self.user, parcel, epoch)

    async def break_lock(self, parcel: uuid.UUID, reason: str = "") -> LockState:
        return await self._run(self.repo.break_lock, self.user, parcel, reason)

    async def hand_over(self, parcel: uuid.UUID, epoch: int, holder: Holder) -> LockState:
        return await self._run(self.repo.hand_over, self.user, parcel, epoch, holder)

    async def commit(self, parcel: uuid.UUID, req: CommitRequest) -> VersionInfo:
        return await self._run(self.repo.commit, self.user, parcel, req)

    async def close(self) -> None:
        self._db.shutdown(wait=True)
        if self._owns:
            self.repo.close()
