"""Helpers for the Source conformance suite: chunks, packs, the backends' Held objects,
an honest fallback source and a counting wrapper (tests/sources/conftest.py wires them in).

tests/ is rootless, so this module is imported by its unique name (like tests/disk/diskkit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from isrsync import manifest
from isrsync.chunk import CHUNK_SIZE, ChunkRef, encode
from isrsync.keys import new_convergence_secret, new_master_key
from isrsync.manifest import Keyring
from isrsync.pack import PackEntry, PackInfo, PackWriter
from isrsync.site.cache import SiteCache
from isrsync.site.cachedir import CacheDirSource
from isrsync.site.serversource import ServerSource
from isrsync.site.sources import Source, SourceKind
from isrsync.store.base import CommitRequest, Holder, Store
from isrsync.store.http import HttpStore
from isrsync.store.memory import MemoryStore
from isrsync.vmspec import VmSpec
from sneakernet import format as medium_format
from sneakernet.indexer import index_tree
from sneakernet import seed as seeds
from sneakernet import seedfmt
from sneakernet.medium import format_medium, publish_index
from sneakernet.source import MediumSource

PACK_LIMIT = 1 << 20  # several packs per chunk set: ServerSource groups and merges ranges per pack


# -- chunks ---------------------------------------------------------------------------------


# The plaintext and secret of every chunk made here, by tag: a plaintext seed
# (an image file in the clear) can only hold chunks whose plaintext it has.
PLAINTEXTS: dict[bytes, tuple[bytes, bytes]] = {}


def make_chunks(n: int, *, size: int | None = None, secret: bytes | None = None) -> dict[bytes, bytes]:
    """``n`` encoded chunks of random plaintext (tag -> ciphertext), under a random
    convergence secret; random lengths from 1 byte to a full chunk unless ``size``."""
    secret = secret or new_convergence_secret()
    out: dict[bytes, bytes] = {}
    lengths = [CHUNK_SIZE, 1, *(int.from_bytes(os.urandom(3)) % CHUNK_SIZE + 1 for _ in range(n))]
    while len(out) < n:
        plain = os.urandom(size or lengths[len(out)])
        e = encode(plain, secret)
        if e.data:  # an all-zero plaintext (a 1-byte one may be) is never stored: draw again
            out[e.tag] = e.data
            PLAINTEXTS[e.tag] = (plain, secret)
    return out


def write_packs(chunks: dict[bytes, bytes], where: Path, limit: int = PACK_LIMIT) -> list[tuple[PackInfo, Path]]:
    """The chunks as real pack files of about ``limit`` bytes, each named by its id."""
    where.mkdir(parents=True, exist_ok=True)
    packs: list[tuple[PackInfo, Path]] = []
    items = list(chunks.items())
    while items:
        tmp = where / f".pack-{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            w = PackWriter(f)
            while items and (w.count == 0 or w.size + len(items[0][1]) <= limit):
                w.add(*items.pop(0))
            info = w.finish()
        path = where / info.pack_id.hex()
        os.replace(tmp, path)
        packs.append((info, path))
    return packs


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


# -- the honest fallback and a counting wrapper ---------------------------------------------


class DictSource:
    """An honest source holding ciphertexts in memory, asked last (high cost)."""

    kind = SourceKind.OTHER

    def __init__(self, chunks: dict[bytes, bytes], name: str = "fallback", cost: float = 1000.0) -> None:
        self.name = name
        self.chunks = dict(chunks)
        self._cost = cost
        self.asked: Counter[bytes] = Counter()

    def cost(self) -> float:
        return self._cost

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.asked.update(tags)
        return {t: self.chunks[t] for t in tags if t in self.chunks}

    async def close(self) -> None:
        pass


class CountingSource:
    """Another source, unchanged, counting how often each tag was asked of it."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = inner.name
        self.kind = inner.kind
        self.asked: Counter[bytes] = Counter()
        self.calls = 0

    def cost(self) -> float:
        return self.inner.cost()

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.calls += 1
        self.asked.update(tags)
        return await self.inner.get_many(tags)

    async def close(self) -> None:
        await self.inner.close()


# -- what a backend hands the suite ---------------------------------------------------------


class Held:
    """A Source holding exactly ``chunks``, and the hooks that break its backing."""

    source: Source
    chunks: dict[bytes, bytes]

    async def damage(self, tag: bytes) -> None:
        raise NotImplementedError

    async def truncate(self, tag: bytes) -> None:
        raise NotImplementedError

    async def vanish(self) -> None:
        raise NotImplementedError

    async def hang(self) -> None:
        raise NotImplementedError

    async def cleanup(self) -> None:
        # A test may have closed the source already; a second close failing is
        # reported by test_close_is_idempotent, not here.
        with contextlib.suppress(Exception):
            await self.source.close()


# -- server: ServerSource over MemoryStore or HttpStore --------------------------------------


async def commit_chunks(store: Store, chunks: dict[bytes, bytes], work: Path) -> tuple[uuid.UUID, list[PackInfo]]:
    """Version 1 of a new parcel whose packs hold exactly ``chunks`` (as `init` commits)."""
    pid = uuid.uuid4()
    await store.create_parcel(pid, f"src-{pid.hex[:12]}")
    packs = await asyncio.to_thread(write_packs, chunks, work / f"packs-{pid.hex[:8]}")
    for info, path in packs:
        await store.put_pack(pid, info.pack_id, path)
    lock = await store.acquire(pid, Holder("test-site", "test-host"))
    refs = [ChunkRef(t, bytes(32), 0) for t in chunks]  # the server never reads the keyring
    raw = manifest.encode(parcel=pid, version=1, master_key=new_master_key(), vm=VmSpec(memory_mib=64),
                          keyring=Keyring.from_refs(max(1, len(refs)) * CHUNK_SIZE, refs))
    await store.commit(pid, CommitRequest(
        epoch=lock.epoch, parent=0, manifest=raw, packs=[i.pack_id for i, _ in packs],
        added=sorted(chunks), release=True, site="test-site"))
    return pid, [i for i, _ in packs]


def _where(packs: list[PackInfo], tag: bytes) -> PackEntry:
    return next(e for i in packs for e in i.entries if e.tag == tag)


class MemoryServerHeld(Held):
    def __init__(self, store: MemoryStore, parcel: uuid.UUID, packs: list[PackInfo], chunks: dict[bytes, bytes]) -> None:
        self.store, self.parcel, self.packs, self.chunks = store, parcel, packs, chunks
        self.source = ServerSource(store, parcel)

    async def damage(self, tag: bytes) -> None:
        e = _where(self.packs, tag)
        home = self.store.home
        with home.lock:
            data, info = home.packs[e.pack_id]
            bad = bytearray(data)
            bad[e.offset + e.length // 2] ^= 0x5A
            home.packs[e.pack_id] = (bytes(bad), info)

    async def truncate(self, tag: bytes) -> None:
        e = _where(self.packs, tag)
        with self.store.home.lock:
            self.store.home.parcels[(self.store.user, self.parcel)].index[tag] = PackEntry(tag, e.pack_id, e.offset, e.length // 2)

    async def vanish(self) -> None:
        # The in-memory home goes away: its parcel and packs are forgotten.
        home = self.store.home
        with home.lock:
            home.parcels.pop((self.store.user, self.parcel), None)
            home.packs.clear()


class HttpHome:
    """One `isrsync serve` for a test module (restarted on its data directory if a test killed it)."""

    def __init__(self, server_cls: type, data: Path) -> None:
        self.server_cls = server_cls
        self.data = data
        self.server: Any = None
        self.token = ""
        self.paused = False

    def ensure(self) -> None:
        if self.paused:
            self.resume()
        if self.server is None or self.server.proc is None or self.server.proc.poll() is not None:
            if self.server is not None:
                self.server.kill()
            self.server = self.server_cls(self.data).start()
            if not self.token:
                self.token = self.server.add_user("alice")

    def store(self) -> HttpStore:
        self.ensure()
        return HttpStore(self.server.url, self.token, retries=2, backoff=0.05, connect_timeout=5)

    def pause(self) -> None:
        os.killpg(self.server.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.proc.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        self.resume()
        self.server.kill()

    def close(self) -> None:
        self.resume()
        if self.server is not None:
            self.server.kill()


class HttpServerHeld(Held):
    def __init__(self, home: HttpHome, store: HttpStore, parcel: uuid.UUID, packs: list[PackInfo],
                 chunks: dict[bytes, bytes]) -> None:
        self.home, self.store, self.parcel, self.packs, self.chunks = home, store, parcel, packs, chunks
        self.source = ServerSource(store, parcel)

    def _pack_path(self, pack_id: bytes) -> Path:
        h = pack_id.hex()
        return self.home.data / "packs" / h[:2] / h

    async def damage(self, tag: bytes) -> None:
        e = _where(self.packs, tag)
        flip(self._pack_path(e.pack_id), e.offset + e.length // 2)

    async def truncate(self, tag: bytes) -> None:
        # The server's pack index claims half the chunk (the server keeps running).
        e = _where(self.packs, tag)
        db = sqlite3.connect(self.home.data / "store.db", timeout=30)
        try:
            with db:
                db.execute("UPDATE pack_entries SET length=? WHERE pack=? AND tag=?", (e.length // 2, e.pack_id, tag))
        finally:
            db.close()

    async def vanish(self) -> None:
        await asyncio.to_thread(self.home.stop)

    async def hang(self) -> None:
        self.home.pause()

    async def cleanup(self) -> None:
        self.home.resume()
        await super().cleanup()
        await self.store.close()


# -- cache-dir: CacheDirSource over a SiteCache directory -------------------------------------


class CacheDirHeld(Held):
    def __init__(self, path: Path, chunks: dict[bytes, bytes]) -> None:
        self.path, self.chunks = path, chunks
        self.source = CacheDirSource(path, name=f"dir:{path.name}")
        self._fifos: list[Path] = []

    def _location(self, tag: bytes) -> tuple[Path, int, int]:
        db = sqlite3.connect(f"file:{self.path / 'index.db'}?mode=ro", uri=True)
        try:
            kind, name, off, n = db.execute(
                "SELECT f.kind, f.name, c.offset, c.length FROM chunks c JOIN files f ON f.id=c.file WHERE c.tag=?",
                (tag,)).fetchone()
        finally:
            db.close()
        return self.path / ("segments" if kind == "segment" else "packs") / name, off, n

    async def damage(self, tag: bytes) -> None:
        path, off, n = self._location(tag)
        flip(path, off + n // 2)

    async def truncate(self, tag: bytes) -> None:
        # The index (another site's, so only a hint) claims half the chunk.
        db = sqlite3.connect(self.path / "index.db", timeout=30)
        try:
            with db:
                db.execute("UPDATE chunks SET length=length/2 WHERE tag=?", (tag,))
        finally:
            db.close()

    async def vanish(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.path)

    async def hang(self) -> None:
        # Every data file becomes a FIFO with no writer: the source's worker
        # blocks in open(2) as it would on a hung network filesystem.
        for sub in ("segments", "packs"):
            for p in sorted((self.path / sub).iterdir()):
                p.unlink()
                os.mkfifo(p)
                self._fifos.append(p)

    async def cleanup(self) -> None:
        # Release a worker blocked on a FIFO (a writer opening lets its open
        # return; it then reads nothing), and make later opens fail instead.
        writers = []
        for p in self._fifos:
            with contextlib.suppress(OSError):  # ENXIO: nobody is waiting on it
                writers.append(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            with contextlib.suppress(OSError):
                p.unlink()
        for fd in writers:
            os.close(fd)
        self._fifos.clear()
        await super().cleanup()


def write_cache_dir(path: Path, chunks: dict[bytes, bytes], *, packs: bool) -> None:
    cache = SiteCache(path)
    try:
        if packs:
            for info, file in write_packs(chunks, path.parent / f"{path.name}-packs"):
                cache.add_pack(file, info.pack_id, info)
        else:
            cache.put_many(list(chunks.items()))
    finally:
        cache.close()




# -- medium: MediumSource over a formatted medium (on-medium index) or a read-only one -----


class MediumHeld(Held):
    """A medium written by MediumWriter, its index on the medium (``.isrsync/index``).

    ``data`` is where the bytes can be changed (the medium itself here; the
    writable tree behind a read-only mount for :class:`MediumBesideHeld`).
    """

    def __init__(self, root: Path, chunks: dict[bytes, bytes], *, data: Path | None = None,
                 index_dir: Path | None = None) -> None:
        self.root, self.chunks, self.index_dir = root, chunks, index_dir
        self.data = data or root
        self.source = MediumSource(root, index_dir=index_dir)
        self._fifos: list[Path] = []

    @property
    def index_file(self) -> Path:
        return (self.index_dir or self.data / medium_format.DIR) / medium_format.INDEX_FILE

    def _index(self) -> medium_format.Index:
        return medium_format.decode_index(self.index_file.read_bytes())

    async def damage(self, tag: bytes) -> None:
        idx = self._index()
        e = idx.find(tag)
        assert e is not None
        flip(self.data / idx.file_of(e).path, e.offset + e.length // 2)

    async def truncate(self, tag: bytes) -> None:
        # The index (only a hint) claims half the chunk; its checksum is redone,
        # so this is an index that lies, not a damaged one.
        idx = self._index()
        entries = [medium_format.IndexEntry(e.tag, e.file, e.offset, e.length // 2 if e.tag == tag else e.length)
                   for e in idx.entries]
        new = medium_format.Index(idx.medium_id, idx.generation + 1, idx.created_ns, idx.files,
                                  medium_format.EntryTable.build(entries))
        publish_index(self.data, self.index_file, new)

    async def vanish(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.data)

    async def hang(self) -> None:
        # Every data file becomes a FIFO with no writer: the source's worker
        # blocks in open(2), as on a dying key or a hung network mount.
        idx = self._index()
        for f in idx.files:
            if f.kind != medium_format.FileKind.OTHER:
                p = self.data / f.path
                p.unlink()
                os.mkfifo(p)
                self._fifos.append(p)

    async def cleanup(self) -> None:
        writers = []
        for p in self._fifos:
            with contextlib.suppress(OSError):  # ENXIO: nobody is waiting on it
                writers.append(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            with contextlib.suppress(OSError):
                p.unlink()
        for fd in writers:
            os.close(fd)
        self._fifos.clear()
        await super().cleanup()


class MediumBesideHeld(MediumHeld):
    """A formatted medium mounted read-only (a burnt DVD, a write-protected key), its
    index kept beside it in a site cache's ``media/<id>/``. Half the chunks are in
    packs, half are loose one-chunk files; both are found by :func:`index_tree`.
    ``vanish`` pulls it: the mount goes (lazily) and the tree behind it is removed."""

    def __init__(self, mount: Path, data: Path, index_dir: Path, chunks: dict[bytes, bytes]) -> None:
        self.mount = mount
        try:
            super().__init__(mount, chunks, data=data, index_dir=index_dir)
        except BaseException:
            _unmount(mount)
            raise

    async def vanish(self) -> None:
        await asyncio.to_thread(_run, "umount", "-l", str(self.mount))
        await asyncio.to_thread(shutil.rmtree, self.data)

    async def cleanup(self) -> None:
        await super().cleanup()
        await asyncio.to_thread(_unmount, self.mount)


def _run(*cmd: str) -> None:
    import subprocess

    subprocess.run(cmd, check=True, capture_output=True)


def _unmount(path: Path) -> None:
    import subprocess

    mounted = subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0
    if mounted and subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def write_medium(path: Path, chunks: dict[bytes, bytes]) -> None:
    """A formatted medium holding ``chunks`` in several packs, listed by the writer."""
    path.mkdir(parents=True)
    m = format_medium(path, "conformance")
    with m.writer(pack_limit=PACK_LIMIT) as w:
        w.add_chunks(chunks.items())
        w.publish()


def write_readonly_medium(data: Path, mount: Path, index_dir: Path, chunks: dict[bytes, bytes]) -> None:
    """A formatted medium whose chunks are half packs, half loose files, mounted read-only at
    ``mount`` and indexed into ``index_dir``."""
    data.mkdir(parents=True)
    format_medium(data, "dvd")
    items = list(chunks.items())
    half = len(items) // 2
    for i, (_, blob) in enumerate(items[:half]):
        sub = data / "chunks" / f"{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"c{i:04d}").write_bytes(blob)
    write_packs(dict(items[half:]), data / "packs")
    mount.mkdir(parents=True)
    _run("mount", "--bind", str(data), str(mount))
    try:
        _run("mount", "-o", "remount,bind,ro", str(mount))
        index_tree(mount, index_dir)
    except BaseException:
        _unmount(mount)
        raise


# -- seed: SeedSource over a raw image file in the clear --------------------------------------


def write_seed(image: Path, cache_dir: Path, chunks: dict[bytes, bytes]) -> seeds.SeedSource:
    """A raw image whose 128 KiB chunks are the plaintexts of ``chunks`` (full ones first,
    one short one last at most, as in any image), seeded into ``cache_dir``."""
    plains = [PLAINTEXTS[t] for t in chunks]
    (secret,) = {s for _, s in plains}
    full = [p for p, _ in plains if len(p) == CHUNK_SIZE]
    short = [p for p, _ in plains if len(p) != CHUNK_SIZE]
    assert len(short) <= 1, "an image has one short chunk at most: make full chunks for a seed"
    image.write_bytes(b"".join(full + short))
    # An mtime well before the seed: the index is not "racy" and is kept as made.
    old = time.time_ns() - 60_000_000_000
    os.utime(image, ns=(old, old))
    rep = seeds.seed_image(image, cache_dir, secret)
    assert rep.chunks == len(chunks), rep
    (src,) = seeds.open_seeds(cache_dir, secret)
    return src


class SeedHeld(Held):
    """A plaintext image file seeded into a site cache; the source encodes chunks as it reads them."""

    def __init__(self, image: Path, cache_dir: Path, chunks: dict[bytes, bytes]) -> None:
        self.image, self.cache_dir, self.chunks = image, cache_dir, chunks
        self.source = write_seed(image, cache_dir, chunks)
        self._fifo = False

    def _chunk_no(self, tag: bytes) -> int:
        no = self.source.index.chunk_of(tag)
        assert no is not None
        return no

    async def damage(self, tag: bytes) -> None:
        # Bit rot on a DVD: a byte changes, the file's size and mtime do not.
        st = os.stat(self.image)
        flip(self.image, self._chunk_no(tag) * CHUNK_SIZE + CHUNK_SIZE // 3)
        os.utime(self.image, ns=(st.st_atime_ns, st.st_mtime_ns))

    async def truncate(self, tag: bytes) -> None:
        # The index (a hint) claims the second half of the chunk is not in the file.
        f = seeds.index_file(self.cache_dir, self.image.resolve())
        ix = seedfmt.decode(f.read_bytes())
        start = self._chunk_no(tag) * CHUNK_SIZE + CHUNK_SIZE // 2
        end = start + CHUNK_SIZE // 2
        extents = [seedfmt.Extent(0, start, 0), seedfmt.Extent(start, end - start, seedfmt.ABSENT)]
        if end < ix.virtual_size:
            extents.append(seedfmt.Extent(end, ix.virtual_size - end, end))
        new = seedfmt.SeedIndex(ix.kind, ix.file_size, ix.mtime_ns, ix.virtual_size, ix.secret_fingerprint, ix.path,
                                tuple(extents), ix.tags, ix.chunk_nos, ix.created_ns)
        f.write_bytes(seedfmt.encode(new))

    async def vanish(self) -> None:
        self.image.unlink()

    async def hang(self) -> None:
        # The image becomes a FIFO with no writer: the worker blocks in open(2),
        # as it would reading from a hung network mount.
        self.image.unlink()
        os.mkfifo(self.image)
        self._fifo = True

    async def cleanup(self) -> None:
        if self._fifo:
            fd = None
            with contextlib.suppress(OSError):
                fd = os.open(self.image, os.O_WRONLY | os.O_NONBLOCK)
            with contextlib.suppress(OSError):
                self.image.unlink()
            if fd is not None:
                os.close(fd)
        await super().cleanup()
