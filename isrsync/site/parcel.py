"""Parcel operations that need no running VM: version lookup, boot files, commit,
hoard, discard, rollback (making a parcel is :mod:`isrsync.site.create`).

A commit sends only what the server lacks: the tags the new version adds (disk
chunks the guest wrote, the memory image) are looked up on the server, the
missing ones are packed from the site cache and uploaded (several packs in
parallel), and the commit names those packs plus any the trickle already
staged. Its cost grows with what changed, never with the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .. import manifest
from ..chunk import BATCH, CHUNK_SIZE, VerifiedChunk, chunk_length, decode, default_pool
from ..errors import AuthError, IntegrityError, NotFound, Unreachable, WrongPassphrase
from ..keys import KeyBundle, SealKey
from ..manifest import Keyring, LazyKeyring, Manifest, MemoryImage
from ..pack import PackInfo
from ..store.base import CommitRequest, Holder, Store, VersionInfo
from ..vmspec import Accel, BootBlob, VmSpec
from .account import Account, open_store, remember, session_keys
from .cache import SiteCache
from .identity import site_name
from .disk import decode_cached
from .packer import pack_cached
from .results import HoardResult
from .upload import upload_packs
from .segments import whole
from .serversource import ServerSource
from .sources import Source
from .registry import SourceRegistry
from .state import ParcelState, local_summaries

Progress = Callable[[int], None]
log = logging.getLogger("isrsync.parcel")


@dataclass
class Site:
    """This site as seen by one user: cache, home store, account and keys."""

    cache: SiteCache
    store: Store
    acct: Account
    bundle: KeyBundle
    host: str
    seal: SealKey | None = None  # the session's derived key: reopens a newer bundle without asking

    @property
    def site_id(self) -> str:
        return self.cache.site_id

    async def ensure_key(self, parcel: uuid.UUID) -> None:
        """Make sure the bundle has ``parcel``'s key, fetching the current one if it is missing.

        A parcel created at another site after this site's login is in the
        server's bundle, not in the one this session unlocked; it is opened
        with the session's key, no passphrase asked. Offline, or when the
        server's bundle lacks it too, the error says which.
        """
        if str(parcel) in self.bundle.parcels or self.seal is None:
            return
        try:
            sealed = await self.store.get_key_bundle()
        except Unreachable:
            return  # master_key says the bundle has no key; with no server, nothing newer is known
        if sealed is None:
            return
        try:
            fresh = await asyncio.to_thread(KeyBundle.unseal_with, sealed, self.seal)
        except WrongPassphrase:
            raise AuthError("the key bundle was re-sealed under another passphrase since this login",
                            hint="run `isrsync login` again") from None
        self.bundle = fresh
        remember(self.acct, fresh, self.seal)
        if str(parcel) not in fresh.parcels:
            raise IntegrityError(f"no key for parcel {parcel} in your key bundle, even as the server has it now",
                                 hint="the parcel belongs to another user, or was made with keys since lost")

    async def resolve(self, ref: str) -> uuid.UUID:
        """A parcel named by name or id, its key in this site's bundle (refreshed if missing).

        A parcel this site holds local state for (running, kept, suspended here)
        is named without the server: offline, a suspend or a sync used to wait
        out the client's retries (about 6 s) before it could even start.
        """
        mine = [s for s in await asyncio.to_thread(local_summaries, self.cache.path)
                if ref in (s.parcel, s.name) and s.parcel in self.bundle.parcels]
        if len(mine) == 1:
            return uuid.UUID(mine[0].parcel)
        try:
            pid = (await self.store.parcel(ref)).parcel
        except Unreachable:
            # Offline: a parcel this site has any local state for can still be named.
            for d in (self.cache.path / "parcels").glob("*"):
                with contextlib.suppress(ValueError):
                    pid = uuid.UUID(d.name)
                    if str(pid) in self.bundle.parcels:
                        st = ParcelState(self.cache, pid, self.master_key(pid))
                        name = st.info().name
                        st.close()
                        if ref in (str(pid), name):
                            return pid
            raise
        await self.ensure_key(pid)
        return pid

    def holder(self) -> Holder:
        return Holder(self.site_id, self.host, self.acct.user)

    def secret(self) -> bytes:
        return self.bundle.convergence_secret

    def master_key(self, parcel: uuid.UUID) -> bytes:
        return self.bundle.master_key(str(parcel))

    def state(self, parcel: uuid.UUID) -> ParcelState:
        return ParcelState(self.cache, parcel, self.master_key(parcel))

    def registry(self, parcel: uuid.UUID, lookaside: Iterable[Source] = ()) -> SourceRegistry:
        """The sources a resume or hoard of ``parcel`` asks: the home server and ``lookaside``."""
        reg = SourceRegistry(self.cache)
        reg.add(ServerSource(self.store, parcel))
        for src in lookaside:
            reg.add(src)
        return reg

    async def close(self) -> None:
        await self.store.close()
        self.cache.close()


async def open_site(cache: SiteCache, acct: Account) -> Site:
    bundle, seal = session_keys(acct)
    return Site(cache, open_store(acct), acct, bundle, site_name(cache.path), seal)


# -- versions ------------------------------------------------------------------------


async def load_version(site: Site, parcel: uuid.UUID, version: int, state: ParcelState | None = None, *,
                       lazy: bool = False) -> Manifest:
    """Fetch, authenticate and resolve a version (keyring rebuilt from its base).

    Manifests are kept in the parcel's local state, so a site that has seen a
    version can open it again while the server is unreachable. A keyring held
    as segments is fetched whole (from the cache or the server), unless
    ``lazy``: then the version's keyring is a LazyKeyring whose segments the
    caller fetches as it needs them (a resume: see :mod:`.segments`).
    """
    mk = site.master_key(parcel)

    def local(first: int) -> list[bytes] | None:
        return state.manifests(first, version) if state else None

    # A sync rebases while this loop serves the guest's disk: the local state's
    # SQLite and the decryption of a big disk's keyring stay off it.
    raws = await asyncio.to_thread(local, version)
    if raws is None:
        raws = await site.store.get_manifests(parcel, version, version)
    head = await asyncio.to_thread(manifest.decode, raws[0], mk, parcel)
    base = head.header.keyring_base
    chain_raw = await asyncio.to_thread(local, base) or await site.store.get_manifests(parcel, base, version)

    def resolve() -> Manifest:
        if state is not None:
            state.put_manifests({base + i: r for i, r in enumerate(chain_raw)})
        return manifest.resolve([manifest.decode(r, mk, parcel) for r in chain_raw])

    m = await asyncio.to_thread(resolve)
    if not lazy and isinstance(m.keyring, LazyKeyring):
        reg = site.registry(parcel)
        try:
            m.keyring = (await whole(m.keyring, reg)).copy()
        finally:
            await reg.close()
    return m


# -- boot files kept inside the parcel ------------------------------------------------


def blob_image(blob: BootBlob) -> MemoryImage:
    """A boot file as an object to decode (the same shape as a memory image)."""
    return MemoryImage(blob.length, Keyring.from_bytes(blob.length, blob.refs))


def boot_tags(vm: VmSpec) -> set[bytes]:
    out: set[bytes] = set()
    for _, blob in vm.boot.blobs() if vm.boot is not None else ():
        out |= blob_image(blob).refs.tags()
    return out


async def write_blob(
    blob: MemoryImage, fd: int, cache: SiteCache, chain: SourceRegistry, pool: Executor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Decode an object (a kernel, an initrd, guest RAM) into ``fd``, fetching as needed.

    Every chunk goes straight to its offset from the codec's threads, which
    also read the cache: no joined copy, and the event loop stays free for
    the QEMU starting meanwhile. Zero chunks stay holes. A chunk the cache
    lost or holds damaged since it was counted is fetched again.
    """
    os.ftruncate(fd, blob.length)
    todo = [i for i, r in enumerate(blob.refs) if not r.is_zero]
    missing = await asyncio.to_thread(cache.missing, [blob.refs[i].tag for i in todo])
    if missing:
        await chain.fetch_patiently(missing)

    def put(i: int, plain: bytes) -> None:
        view = memoryview(plain)
        off = i * CHUNK_SIZE
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n

    def batch(idxs: list[int]) -> list[int]:
        lost = []
        for i in idxs:
            plain = decode_cached(cache, blob.refs[i], chunk_length(blob.length, i))
            if plain is None:
                lost.append(i)
            else:
                put(i, plain)
        return lost

    loop = asyncio.get_running_loop()
    pool = pool or default_pool()
    total, done = len(todo) * CHUNK_SIZE, 0
    lost: list[int] = []
    for fut in asyncio.as_completed([loop.run_in_executor(pool, batch, todo[k : k + BATCH])
                                     for k in range(0, len(todo), BATCH)]):
        part = await fut
        lost += part
        done += min(BATCH, len(todo)) * CHUNK_SIZE
        if progress is not None:
            progress(min(done, total), total)
    # What the sources just fetched into the cache is theirs, not the cache's; the
    # bytes are each chunk's own length (the last one of an object is short).
    fetched, again = set(missing), set(lost)
    served = [i for i in todo if i not in again and blob.refs[i].tag not in fetched]
    chain.note_cache_hits(len(served), sum(chunk_length(blob.length, i) for i in served))
    if lost:
        got = await chain.fetch_patiently([blob.refs[i].tag for i in lost])

        def refetched() -> None:
            for i in lost:
                ref = blob.refs[i]
                put(i, decode(ref, got[ref.tag], chunk_length(blob.length, i), check_tag=False))  # checked by the registry

        await loop.run_in_executor(pool, refetched)


# -- commit ------------------------------------------------------------------------


async def commit_version(
    site: Site,
    parcel: uuid.UUID,
    *,
    epoch: int,
    parent: Manifest,
    keyring: Keyring,
    dirty: Iterable[int],
    memory: MemoryImage | None,
    trace: list[int],
    release: bool,
    staged: Iterable[bytes] = (),
    staged_tags: Iterable[bytes] = (),
    progress: Callable[[int, int], None] | None = None,
) -> VersionInfo:
    """Upload what the server lacks and commit ``parent.version + 1``.

    A full keyring is sealed as segments (chunks like any other): the new ones
    go up with the commit, and the server counts them as the version's until a
    later full keyring replaces them.
    """
    assert parent.keyring is not None
    if isinstance(parent.keyring, LazyKeyring) and not parent.keyring.complete:
        reg = site.registry(parcel)
        try:
            await whole(parent.keyring, reg)
        finally:
            await reg.close()
    dirty = sorted(set(dirty))
    # Encrypting a big disk's keyring takes a while; a sync does it while the
    # guest runs and keeps extending its trace, hence the copy.
    sealed = await asyncio.to_thread(
        manifest.seal,
        parcel=parcel, version=parent.version + 1, master_key=site.master_key(parcel), vm=parent.vm,
        keyring=keyring, parent=parent, dirty=dirty, memory=memory, trace=list(trace),
        site=site.host, time=time.time(),
    )
    seg_added, seg_removed = segment_refs(parent, sealed)
    if sealed.segments:
        await asyncio.to_thread(site.cache.put_verified, [VerifiedChunk(e.tag, e.data) for e in sealed.segments
                                                           if e.data])
    old_tags = parent.keyring.tags()
    new_tags = keyring.tags()
    written = {keyring[i].tag for i in dirty if i < len(keyring) and not keyring[i].is_zero}
    added = sorted(written - old_tags)
    replaced = {parent.keyring[i].tag for i in dirty if i < len(parent.keyring) and not parent.keyring[i].is_zero}
    if keyring.size < parent.keyring.size:
        replaced |= {parent.keyring[i].tag for i in range(len(keyring), len(parent.keyring))}
    removed = sorted((replaced - new_tags) | seg_removed)
    added = sorted(set(added) | seg_added)
    mem_tags = sorted(memory.tags()) if memory is not None else []
    needed = set(added) | set(mem_tags)
    known = set(staged_tags)
    ask = sorted(needed - known)
    located = await site.store.locate(parcel, ask) if ask else {}
    missing = [t for t in ask if t not in located]
    uploaded = await upload_cached(site, parcel, missing, strict=True, progress=progress)
    return await site.store.commit(parcel, CommitRequest(
        epoch=epoch, parent=parent.version, manifest=sealed.raw,
        packs=[*staged, *(i.pack_id for i in uploaded)],
        added=added, removed=removed, memory=mem_tags, release=release, site=site.site_id,
    ))


def segment_refs(parent: Manifest, sealed: manifest.Sealed) -> tuple[set[bytes], set[bytes]]:
    """The segment tags a commit adds and removes: a full keyring's segments replace
    those of the parent's keyring base; a delta keeps them."""
    if not manifest.parse_header(sealed.raw).full_keyring:
        return set(), set()
    old = {r.tag for r in parent.segments or () if not r.is_zero}
    new = {e.tag for e in sealed.segments if e.data}
    return new - old, old - new


async def upload_cached(site: Site, parcel: uuid.UUID, tags: Iterable[bytes], *, strict: bool,
                        progress: Callable[[int, int], None] | None = None) -> list[PackInfo]:
    """Pack cached chunks into new packs and upload them (staged on the server).

    ``strict``: a chunk missing from the cache is an error (a commit needs it);
    otherwise it is skipped (the trickle will catch it at suspend).
    ``progress(bytes sent, bytes in all)`` follows the upload.
    """
    # The trickle runs on the loop that serves the guest's disk, and packing
    # reads, hashes, writes and fsyncs: all of it on worker threads.
    packs_dir = site.cache.path / "packs"
    staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".upload-", dir=packs_dir))
    try:
        done = await asyncio.to_thread(pack_cached, site.cache, staging, list(tags), strict=strict)
        total, sent = sum(info.size for info, _ in done), 0

        def up(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None:
                progress(sent, total)

        await upload_packs(site.store, parcel, done, progress=up)
        return [info for info, _ in done]
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)


# -- hoard, discard, rollback --------------------------------------------------------------


async def hoard(site: Site, parcel: uuid.UUID, version: int | None = None,
                progress: Callable[[int, int], None] | None = None,
                lookaside: Iterable[Source] = ()) -> HoardResult:
    """Fetch every chunk of a version into the cache (fully proactive policy).

    Lookaside sources are asked before the server. Restartable: what is
    already cached is skipped.
    """
    info = await site.store.parcel(parcel)
    v = version or info.version
    if v < 1:
        raise NotFound(f"parcel {info.name} has no version yet")
    state = site.state(parcel)
    try:
        m = await load_version(site, parcel, v, state)
    finally:
        state.close()
    assert m.keyring is not None
    tags = set(m.keyring.tags()) | boot_tags(m.vm)
    if m.memory is not None:
        tags |= m.memory.tags()
    reg = site.registry(parcel, lookaside)
    from ..swarm.join import join  # LAN peers, asked before the server (issue 12)

    lan = await join(site.cache.path, uuid.UUID(site.cache.site_id), site.store, [parcel], log.warning,
                     cache=site.cache)
    if lan is not None:
        reg.add(lan.sources[parcel])
    try:
        # 4 s: a site hoarding at the same moment registers its announcement in ~2 s, and
        # both must see each other to agree on who fetches which pack (swarm/bulk.py).
        if lan is not None and await lan.settle(parcel, 4.0, once_announced=True):
            # Other sites hoard or hold it: whole packs through the swarm, one copy over the WAN.
            from ..swarm.bulk import hoard_prefetch

            await hoard_prefetch(lan, site.cache, parcel, tags, progress)
        fetched = await fetch_missing(site.cache, reg, tags, progress)
        served = [s for s in reg.infos() if s.hits or s.bad or s.errors]
    finally:
        await reg.close()
        if lan is not None:
            await lan.close()
    return HoardResult(v, fetched, len(tags), served)


async def fetch_missing(cache: SiteCache, reg: SourceRegistry, tags: Iterable[bytes],
                        progress: Callable[[int, int], None] | None = None) -> int:
    """Bring every tag the cache lacks into it; returns how many were fetched.

    ``progress(bytes fetched, bytes expected in all)`` follows it.

    The one fetch-everything loop: hoard, and the baseline and proactive
    resume policies.
    """
    missing = await asyncio.to_thread(cache.missing, sorted(set(tags)))
    done = got = 0
    for i in range(0, len(missing), 64):
        batch = missing[i : i + 64]
        got += sum(map(len, (await reg.fetch_patiently(batch)).values()))
        done += len(batch)
        if progress:
            # In bytes, for a rate and a time left: the sizes of chunks not yet
            # fetched are unknown, so the total is estimated from those that were.
            progress(got, got if done == len(missing) else got * len(missing) // done)
    return len(missing)


@dataclass(frozen=True)
class DiscardResult:
    dirty_chunks_dropped: int
    released_lock: bool
    base: int | None


async def discard(site: Site, parcel: uuid.UUID) -> DiscardResult:
    """Forget this site's uncommitted changes and give up the lock if we hold it."""
    state = site.state(parcel)
    try:
        base = state.info().base
        n = state.discarded()
    finally:
        state.close()
    lock = await site.store.lock_status(parcel)
    released = False
    if lock.holder is not None and lock.holder.site == site.site_id:
        await site.store.release(parcel, lock.epoch)
        released = True
    return DiscardResult(dirty_chunks_dropped=n, released_lock=released, base=base)


async def rollback(site: Site, parcel: uuid.UUID, target: int) -> VersionInfo:
    """Commit a new version equal to version ``target`` (history is kept)."""
    info = await site.store.parcel(parcel)
    if not 1 <= target <= info.version:
        raise NotFound(f"parcel {info.name} has no version {target}")
    lock = await site.store.acquire(parcel, site.holder())
    try:
        state = site.state(parcel)
        try:
            head = await load_version(site, parcel, info.version, state)
            old = await load_version(site, parcel, target, state)
        finally:
            state.close()
        assert old.keyring is not None and head.keyring is not None
        ring = old.keyring.copy()
        dirty = manifest.dirty_since(head.keyring, ring) if ring.size == head.keyring.size else list(range(len(ring)))
        return await commit_version(
            site, parcel, epoch=lock.epoch, parent=head, keyring=ring, dirty=dirty, memory=old.memory,
            trace=list(old.trace), release=True,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await site.store.release(parcel, lock.epoch)
        raise


def hardware_problems(vm: VmSpec, accel: str) -> list[str]:
    """Why this site cannot run the parcel's machine (paper section 8.3)."""
    problems = []
    need = vm.memory_mib << 20
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = need
    if need + (256 << 20) > avail:
        problems.append(f"it needs {need >> 20} MiB of memory and this site has {avail >> 20} MiB free")
    if vm.accel is Accel.KVM and accel != "kvm":
        problems.append("it requires KVM, which this site cannot run")
    if vm.cpus > (os.cpu_count() or 1) * 4:
        problems.append(f"it has {vm.cpus} CPUs, too many for this site's {os.cpu_count()} cores")
    return problems
