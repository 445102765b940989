"""MemoryStore: a complete Store kept in process memory, for fast tests of the layers above.

Same contract and same answers as the home server's data directory
(:mod:`isrsync.server.repo` behind :mod:`isrsync.server.local`), with dicts for
SQLite and bytes for pack files, so it passes the one conformance suite
(tests/store/conformance.py) and needs no files: only
:meth:`MemoryStore.put_pack` reads the pack the caller names. The lock rules
come from :mod:`.lockrules`, which the server applies too; its other checks and
messages are copied, not imported: store/ never imports server/.

A :class:`MemoryHome` holds the state of one home (bundles, parcels, packs);
a :class:`MemoryStore` is one user's client of it. ``MemoryStore()`` makes a
fresh home; ``store.client(user)`` is another client of the same home (a second
site, or another user). Every change is checked and applied under the home's
lock with no ``await`` inside, so each call is atomic like one SQLite
transaction and nothing half-done is ever visible. Reading and verifying an
uploaded pack runs on a worker thread, outside the lock, so the event loop
never waits for it.

Not kept: the tag references of each version and the audit log (no Store call
reads them), and staged packs are never garbage-collected.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import (
    Conflict,
    FormatError,
    IntegrityError,
    NotFound,
    UsageError,
)
from ..fsutil import os_error
from ..manifest import NO_PARENT, manifest_hash, parse_header
from ..pack import PackEntry, PackInfo, verify_stream
from . import lockrules
from .wire import check_torrent
from .names import check_parcel_name, parse_parcel_id
from .base import CommitRequest, Holder, LockState, ParcelInfo, VersionInfo

# As the server's repository checks them: a name create refuses names no parcel.


@dataclass
class _Parcel:
    id: uuid.UUID
    owner: str
    name: str
    created: float
    hardware: str
    version: int = 0
    epoch: int = 0
    holder: Holder | None = None
    versions: dict[int, tuple[VersionInfo, bytes]] = field(default_factory=dict)  # -> (info, manifest)
    packs: dict[bytes, bool] = field(default_factory=dict)  # pack id -> live (False: staged)
    index: dict[bytes, PackEntry] = field(default_factory=dict)  # tag -> where, live packs only

    def lock(self) -> LockState:
        return LockState(self.id, self.epoch, self.version, self.holder, self.hardware)

    def set_lock(self, lock: LockState) -> LockState:
        self.epoch, self.holder = lock.epoch, lock.holder
        return lock

    def info(self) -> ParcelInfo:
        head = self.versions[self.version][0].manifest_hash if self.version in self.versions else b""
        return ParcelInfo(self.id, self.name, self.created, self.version, self.lock(), head)


@dataclass
class MemoryHome:
    """The state of one home: what the data directory holds, in dicts."""

    bundles: dict[str, bytes] = field(default_factory=dict)  # user -> sealed key bundle
    # Parcel ids are per user: another user's parcel of the same id is another parcel.
    parcels: dict[tuple[str, uuid.UUID], _Parcel] = field(default_factory=dict)  # (owner, id) ->
    packs: dict[bytes, tuple[bytes, PackInfo]] = field(default_factory=dict)  # id -> (bytes, index)
    torrents: dict[tuple[bytes, str], bytes] = field(default_factory=dict)  # (pack id, user) -> torrent
    lock: threading.Lock = field(default_factory=threading.Lock)


class MemoryStore:
    """One user's :class:`~.base.Store` over a :class:`MemoryHome`."""

    def __init__(self, user: str = "alice", home: MemoryHome | None = None) -> None:
        self.user = user
        self.home = home if home is not None else MemoryHome()

    def client(self, user: str | None = None) -> MemoryStore:
        """Another client of the same home (``user``, or this store's user)."""
        return MemoryStore(user or self.user, self.home)

    # -- lookups (call with the home's lock held) ---------------------------------

    def _owned(self, parcel: uuid.UUID) -> _Parcel:
        p = self.home.parcels.get((self.user, parcel))
        if p is None:
            raise NotFound(f"no parcel {parcel}", hint="`isrsync ls` lists your parcels")
        return p

    def _find(self, ref: uuid.UUID | str) -> _Parcel:
        pid = parse_parcel_id(ref)
        if pid is not None:
            found = self.home.parcels.get((self.user, pid))
        else:
            check_parcel_name(str(ref))
            found = next((p for p in self.home.parcels.values()
                          if p.owner == self.user and p.name == ref), None)
        if found is None:
            raise NotFound(f"no parcel {str(ref)[:80]}", hint="`isrsync ls` lists your parcels")
        return found

    # -- key bundle ---------------------------------------------------------------

    async def get_key_bundle(self) -> bytes | None:
        with self.home.lock:
            return self.home.bundles.get(self.user)

    async def put_key_bundle(self, sealed: bytes, expect: bytes | None) -> None:
        if not sealed:
            raise FormatError("key bundle is empty")
        with self.home.lock:
            old = self.home.bundles.get(self.user)
            current = _h32(old) if old is not None else None
            if current == _h32(sealed):
                return  # a retried put that already landed
            if current != expect:
                raise Conflict("the key bundle changed on the server since it was read",
                               hint="read it again and retry")
            self.home.bundles[self.user] = bytes(sealed)

    # -- parcels and versions -----------------------------------------------------

    async def create_parcel(self, parcel: uuid.UUID, name: str, hardware: str = "") -> ParcelInfo:
        check_parcel_name(name)
        with self.home.lock:
            p = self.home.parcels.get((self.user, parcel))
            if p is not None:
                if p.name == name:
                    return p.info()  # a retried create
                raise Conflict(f"you already have a parcel with id {parcel}")
            if any(q.owner == self.user and q.name == name for q in self.home.parcels.values()):
                raise Conflict(f"you already have a parcel named {name}", hint="pick another name")
            p = self.home.parcels[(self.user, parcel)] = _Parcel(parcel, self.user, name, time.time(), hardware)
            return p.info()

    async def list_parcels(self) -> list[ParcelInfo]:
        with self.home.lock:
            mine = [p.info() for p in self.home.parcels.values() if p.owner == self.user]
        return sorted(mine, key=lambda i: i.name)

    async def parcel(self, ref: uuid.UUID | str) -> ParcelInfo:
        with self.home.lock:
            return self._find(ref).info()

    async def list_versions(self, parcel: uuid.UUID) -> list[VersionInfo]:
        with self.home.lock:
            p = self._owned(parcel)
            return [p.versions[v][0] for v in sorted(p.versions)]

    async def get_manifests(self, parcel: uuid.UUID, first: int, last: int) -> list[bytes]:
        with self.home.lock:
            p = self._owned(parcel)
            if first < 1 or last < first or last - first > 100_000:
                raise NotFound(f"no versions {first}..{last}")
            if any(v not in p.versions for v in range(first, last + 1)):
                raise NotFound(f"parcel {parcel} has no version(s) {first}..{last} (pruned or never committed)")
            return [p.versions[v][1] for v in range(first, last + 1)]

    # -- packs ----------------------------------------------------------------------

    async def put_pack(self, parcel: uuid.UUID, pack_id: bytes, path: Path) -> None:
        with self.home.lock:
            self._owned(parcel)
        # Verify even when the id is known: staging a pack must prove possession
        # of its bytes, or anyone who learned an id could claim another's pack.
        data, info = await asyncio.to_thread(_read_verified, Path(path), pack_id)
        with self.home.lock:
            p = self._owned(parcel)
            self.home.packs.setdefault(pack_id, (data, info))
            p.packs.setdefault(pack_id, False)

    async def get_pack(
        self, parcel: uuid.UUID, pack_id: bytes, offset: int = 0, length: int | None = None
    ) -> bytes:
        with self.home.lock:
            p = self._owned(parcel)
            if pack_id not in p.packs:
                raise NotFound(f"no pack {pack_id.hex()[:16]} in parcel {parcel}")
            data = self.home.packs[pack_id][0]
        size = len(data)
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise UsageError(f"range {offset}+{length} is outside pack of {size} bytes")
        return data[offset : size if length is None else offset + length]

    async def pack_size(self, parcel: uuid.UUID, pack_id: bytes) -> int | None:
        with self.home.lock:
            p = self._owned(parcel)
            return self.home.packs[pack_id][1].size if pack_id in p.packs else None

    async def put_torrent(self, parcel: uuid.UUID, pack_id: bytes, data: bytes) -> None:
        check_torrent(data)
        with self.home.lock:
            p = self._owned(parcel)
            if pack_id not in p.packs:
                raise NotFound(f"no pack {pack_id.hex()[:16]} in parcel {parcel}", hint="upload the pack first")
            self.home.torrents[(pack_id, self.user)] = bytes(data)

    async def get_torrent(self, parcel: uuid.UUID, pack_id: bytes) -> bytes | None:
        with self.home.lock:
            p = self._owned(parcel)
            if pack_id not in p.packs:
                raise NotFound(f"no pack {pack_id.hex()[:16]} in parcel {parcel}")
            return self.home.torrents.get((pack_id, self.user))

    async def have_packs(self, parcel: uuid.UUID, pack_ids: Iterable[bytes]) -> set[bytes]:
        with self.home.lock:
            p = self._owned(parcel)
            return {pid for pid in pack_ids if pid in p.packs}

    async def locate(self, parcel: uuid.UUID, tags: Iterable[bytes]) -> dict[bytes, PackEntry]:
        with self.home.lock:
            p = self._owned(parcel)
            return {t: p.index[t] for t in tags if t in p.index}

    # -- lock and commit ----------------------------------------------------------

    async def lock_status(self, parcel: uuid.UUID) -> LockState:
        with self.home.lock:
            return self._owned(parcel).lock()

    async def acquire(self, parcel: uuid.UUID, holder: Holder) -> LockState:
        with self.home.lock:
            p = self._owned(parcel)
            return p.set_lock(lockrules.acquire(
                p.lock(), p.name, Holder(holder.site, holder.host, self.user, time.time())))

    async def release(self, parcel: uuid.UUID, epoch: int) -> LockState:
        with self.home.lock:
            p = self._owned(parcel)
            return p.set_lock(lockrules.release(p.lock(), epoch))

    async def break_lock(self, parcel: uuid.UUID, reason: str = "") -> LockState:
        with self.home.lock:
            p = self._owned(parcel)
            return p.set_lock(lockrules.break_lock(p.lock()))

    async def hand_over(self, parcel: uuid.UUID, epoch: int, holder: Holder) -> LockState:
        with self.home.lock:
            p = self._owned(parcel)
            return p.set_lock(lockrules.hand_over(
                p.lock(), p.name, epoch, Holder(holder.site, holder.host, self.user, time.time())))

    async def commit(self, parcel: uuid.UUID, req: CommitRequest) -> VersionInfo:
        header = parse_header(req.manifest)
        mhash = manifest_hash(req.manifest)
        v = req.parent + 1
        with self.home.lock:
            p = self._owned(parcel)
            done = p.versions.get(v)
            if done is not None and done[0].manifest_hash == mhash:
                return done[0]  # a retry of a commit that landed (its answer was lost)
            lockrules.check_commit(p.lock(), p.name, req.epoch, req.parent)
            if header.parcel != parcel or header.version != v:
                raise IntegrityError("the manifest is not the next version of this parcel")
            if header.parent != (p.versions[req.parent][0].manifest_hash if req.parent else NO_PARENT):
                raise IntegrityError("the manifest names a different parent version")
            # Check everything before changing anything: a refused commit leaves no trace.
            staged = [pid for pid in dict.fromkeys(req.packs) if not p.packs.get(pid, False)]
            unknown = [pid for pid in staged if pid not in p.packs]
            if unknown:
                raise NotFound(f"pack {unknown[0].hex()[:16]} was not uploaded", hint="upload it, then commit")
            named = {e.tag: e for pid in staged for e in self.home.packs[pid][1].entries}
            missing = [t for t in dict.fromkeys([*req.added, *req.memory]) if t not in p.index and t not in named]
            if missing:
                raise NotFound(
                    f"the new version references {len(missing)} chunk(s) the server does not have "
                    f"(first {missing[0].hex()[:16]})",
                    hint="upload the missing packs, then commit",
                )
            for pid in staged:
                p.packs[pid] = True
            for tag, entry in named.items():
                p.index.setdefault(tag, entry)
            site = req.site or (p.holder.site if p.holder else "")
            new_bytes = sum(self.home.packs[pid][1].size for pid in staged)
            vi = VersionInfo(v, time.time(), site, mhash, len(req.manifest), new_bytes)
            p.versions[v] = (vi, bytes(req.manifest))
            p.version = v
            if req.release:
                p.holder = None
            return vi

    async def close(self) -> None:
        pass


def _read_verified(path: Path, pack_id: bytes) -> tuple[bytes, PackInfo]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise os_error(e, f"pack {pack_id.hex()[:16]}") from e
    return data, verify_stream(io.BytesIO(data), pack_id)


def _h32(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=32).digest()

