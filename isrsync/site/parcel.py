"""Parcel operations that need no running VM: init, version lookup, commit, hoard,
discard, rollback.

A commit sends only what the server lacks: the tags the new version adds (disk
chunks the guest wrote, the memory image) are looked up on the server, the
missing ones are packed from the site cache and uploaded (several packs in
parallel), and the commit names those packs plus any the trickle already
staged. Its cost grows with what changed, never with the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import Executor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .. import manifest
from ..chunk import BATCH, CHUNK_SIZE, chunk_length, decode, default_pool
from ..errors import AuthError, IntegrityError, NotFound, Unreachable, UsageError, WrongPassphrase
from ..keys import KeyBundle, SealKey, new_master_key
from ..manifest import Keyring, Manifest, MemoryImage
from ..pack import PackInfo
from ..store.base import CommitRequest, Holder, Store, VersionInfo
from ..vmspec import Accel, BootBlob, BootSpec, VmSpec
from .account import Account, add_parcel_key, open_store, remember, session_keys
from .cache import SiteCache
from .identity import site_name
from .disk import decode_cached
from .packer import DEFAULT_PACK_LIMIT, pack_cached, pack_stream
from .results import HoardResult
from .sources import ServerSource, Source, SourceRegistry
from .state import ParcelState

Progress = Callable[[int], None]


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


async def load_version(site: Site, parcel: uuid.UUID, version: int, state: ParcelState | None = None) -> Manifest:
    """Fetch, authenticate and resolve a version (keyring rebuilt from its base).

    Manifests are kept in the parcel's local state, so a site that has seen a
    version can open it again while the server is unreachable.
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

    return await asyncio.to_thread(resolve)


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
    blob: MemoryImage, fd: int, cache: SiteCache, chain: SourceRegistry, pool: Executor | None = None
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
        await chain.fetch_many(missing)

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
    lost = [i for part in await asyncio.gather(*(
        loop.run_in_executor(pool, batch, todo[k : k + BATCH]) for k in range(0, len(todo), BATCH)
    )) for i in part]
    if lost:
        got = await chain.fetch_many([blob.refs[i].tag for i in lost])

        def refetched() -> None:
            for i in lost:
                ref = blob.refs[i]
                put(i, decode(ref, got[ref.tag], chunk_length(blob.length, i)))

        await loop.run_in_executor(pool, refetched)


# -- init ----------------------------------------------------------------------------


def image_format(path: Path) -> tuple[str, int]:
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except FileNotFoundError:
        raise UsageError("qemu-img is not installed", hint="run scripts/setup") from None
    except subprocess.CalledProcessError as e:
        raise UsageError(f"cannot read the image {path}: {e.stderr.strip()[:200]}") from None
    info = json.loads(out)
    fmt = info["format"]
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"the image {path} is {fmt}; isrsync takes raw or qcow2")
    return fmt, int(info["virtual-size"])


@contextlib.contextmanager
def raw_stream(path: Path, fmt: str):
    """A readable raw stream of an image; qcow2 is served by qemu-nbd and copied
    by nbdcopy into a pipe, so its plaintext never lands in a temporary file."""
    if fmt == "raw":
        with open(path, "rb") as f:
            yield f
        return
    tmp = Path(tempfile.mkdtemp(prefix="isrsync-img-"))
    sock = tmp / "nbd.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "--read-only", "--format", fmt, "--socket", str(sock), "--shared", "1", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    copy = None
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        copy = subprocess.Popen(["nbdcopy", f"nbd+unix:///?socket={sock}", "-"], stdout=subprocess.PIPE)
        assert copy.stdout is not None
        yield copy.stdout
    finally:
        if copy is not None:
            copy.kill()
            copy.wait()
        server.kill()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def upload_packs(store: Store, parcel: uuid.UUID, packs: list[tuple[PackInfo, Path]], *, parallel: int = 3,
                       progress: Progress | None = None) -> None:
    sem = asyncio.Semaphore(parallel)

    async def one(info: PackInfo, path: Path) -> None:
        async with sem:
            await store.put_pack(parcel, info.pack_id, path)
            if progress:
                progress(info.size)

    await asyncio.gather(*(one(i, p) for i, p in packs))


async def init_parcel(
    site: Site,
    name: str,
    image: Path,
    *,
    memory_mib: int = 256,
    cpus: int = 1,
    machine: str = "q35",
    cpu_model: str = "max",
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    encode_progress: Callable[[int, int], None] | None = None,
    upload_progress: Callable[[int, int], None] | None = None,
) -> tuple[uuid.UUID, VersionInfo]:
    """Turn an image into a parcel at version 1 (no memory image: it cold-boots)."""
    fmt, size = image_format(image)
    parcel = uuid.uuid4()
    vm = VmSpec(memory_mib=memory_mib, cpus=cpus, machine=machine, cpu_model=cpu_model)
    # The key is stored (sealed) on the server before anything uses it: a parcel
    # can never exist whose key was lost.
    site.bundle = await add_parcel_key(site.store, site.acct, str(parcel), new_master_key())
    await site.store.create_parcel(parcel, name, vm.hardware_tag)
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=site.cache.path / "packs"))
    try:
        done = [0]

        def adv(n: int) -> None:
            done[0] += n
            if encode_progress:
                encode_progress(done[0], size)

        with raw_stream(image, fmt) as src:
            packed = await asyncio.to_thread(
                pack_stream, src, size, site.secret(), staging, progress=adv, limit=DEFAULT_PACK_LIMIT
            )
        packs = list(packed.packs)
        added = set(packed.keyring.tags())
        boot: dict[str, BootBlob] = {}
        for key, path in (("kernel", kernel), ("initrd", initrd)):
            if path is not None:
                blob_size = path.stat().st_size
                with open(path, "rb") as f:
                    bp = await asyncio.to_thread(pack_stream, f, blob_size, site.secret(), staging)
                packs += bp.packs
                added |= bp.keyring.tags()
                boot[key] = BootBlob(blob_size, bp.keyring.to_bytes())
        if boot:
            vm = dataclasses.replace(vm, boot=BootSpec(**boot, cmdline=append or ""))
        total = sum(i.size for i, _ in packs)
        sent = [0]

        def up(n: int) -> None:
            sent[0] += n
            if upload_progress:
                upload_progress(sent[0], total)

        await upload_packs(site.store, parcel, packs, progress=up)
        for info, path in packs:  # the creating site starts fully hoarded
            await asyncio.to_thread(site.cache.add_pack, path, info.pack_id)
        lock = await site.store.acquire(parcel, site.holder())
        raw = manifest.encode(
            parcel=parcel, version=1, master_key=site.master_key(parcel), vm=vm, keyring=packed.keyring,
            site=site.host, time=time.time(),
        )
        v = await site.store.commit(parcel, CommitRequest(
            epoch=lock.epoch, parent=0, manifest=raw, packs=[i.pack_id for i, _ in packs],
            added=sorted(added), release=True, site=site.site_id,
        ))
        return parcel, v
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    """Upload what the server lacks and commit ``parent.version + 1``."""
    assert parent.keyring is not None
    dirty = sorted(set(dirty))
    old_tags = parent.keyring.tags()
    new_tags = keyring.tags()
    written = {keyring[i].tag for i in dirty if i < len(keyring) and not keyring[i].is_zero}
    added = sorted(written - old_tags)
    replaced = {parent.keyring[i].tag for i in dirty if i < len(parent.keyring) and not parent.keyring[i].is_zero}
    if keyring.size < parent.keyring.size:
        replaced |= {parent.keyring[i].tag for i in range(len(keyring), len(parent.keyring))}
    removed = sorted(replaced - new_tags)
    mem_tags = sorted(memory.tags()) if memory is not None else []
    needed = set(added) | set(mem_tags)
    known = set(staged_tags)
    ask = sorted(needed - known)
    located = await site.store.locate(parcel, ask) if ask else {}
    missing = [t for t in ask if t not in located]
    uploaded = await upload_cached(site, parcel, missing, strict=True, progress=progress)
    # Encrypting a big disk's keyring takes a while; a sync does it while the
    # guest runs and keeps extending its trace, hence the copy.
    raw = await asyncio.to_thread(
        manifest.encode,
        parcel=parcel, version=parent.version + 1, master_key=site.master_key(parcel), vm=parent.vm,
        keyring=keyring, parent=parent, dirty=dirty, memory=memory, trace=list(trace),
        site=site.host, time=time.time(),
    )
    return await site.store.commit(parcel, CommitRequest(
        epoch=epoch, parent=parent.version, manifest=raw,
        packs=[*staged, *(i.pack_id for i in uploaded)],
        added=added, removed=removed, memory=mem_tags, release=release, site=site.site_id,
    ))


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
    try:
        fetched = await fetch_missing(site.cache, reg, tags, progress)
        served = [s for s in reg.infos() if s.hits or s.bad or s.errors]
    finally:
        await reg.close()
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
        got += sum(map(len, (await reg.fetch_many(batch)).values()))
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
