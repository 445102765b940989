"""Helpers for tests/disk: a committed parcel, a site serving it over NBD, and test Sources.

The NBD client helpers live in tests/nbd/nbdtestkit.py; this module loads that
file by path (both test directories are rootless, so neither is importable from
the other) and re-exports it as ``kit``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import sys
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from isrsync import manifest
from isrsync.chunk import CHUNK_SIZE, chunk_length, decode
from isrsync.errors import IsrError
from isrsync.keys import new_convergence_secret, new_master_key
from isrsync.manifest import Keyring
from isrsync.pack import PackInfo, PackReader
from isrsync.site.cache import SiteCache
from isrsync.site.disk import ParcelDisk
from isrsync.site.packer import pack_stream
from isrsync.site.serversource import ServerSource
from isrsync.site.registry import SourceRegistry
from isrsync.site.state import ParcelState
from isrsync.store.base import CommitRequest, Holder, Store
from isrsync.vmspec import VmSpec


def _load_kit():
    if "nbdtestkit" in sys.modules:
        return sys.modules["nbdtestkit"]
    path = Path(__file__).resolve().parents[1] / "nbd" / "nbdtestkit.py"
    spec = importlib.util.spec_from_file_location("nbdtestkit", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nbdtestkit"] = mod
    spec.loader.exec_module(mod)
    return mod


kit = _load_kit()
CH = CHUNK_SIZE


# -- a committed parcel ------------------------------------------------------------------


@dataclass
class Parcel:
    store: Store
    id: uuid.UUID
    master_key: bytes
    secret: bytes
    keyring: Keyring
    image: bytes
    blobs: dict[bytes, bytes]  # tag -> ciphertext of every stored chunk

    @property
    def size(self) -> int:
        return len(self.image)

    def chunk(self, i: int) -> bytes:
        return self.image[i * CH : i * CH + chunk_length(self.size, i)]

    def nonzero(self) -> list[int]:
        return [i for i in range(len(self.keyring)) if not self.keyring[i].is_zero]

    def zero(self) -> list[int]:
        return [i for i in range(len(self.keyring)) if self.keyring[i].is_zero]


def _read_pack(path: Path, info: PackInfo) -> dict[bytes, bytes]:
    with open(path, "rb") as f:
        return dict(PackReader(f, info.size, info.pack_id))


async def make_parcel(store: Store, workdir: Path, image: bytes, *, pack_limit: int = 256 << 10) -> Parcel:
    """Version 1 of a new parcel made from ``image``, committed the way `init` does it."""
    pid = uuid.uuid4()
    mkey, secret = new_master_key(), new_convergence_secret()
    await store.create_parcel(pid, f"parcel-{pid.hex[:8]}")
    out = workdir / f"packs-{pid.hex[:8]}"
    out.mkdir(parents=True)
    packed = await asyncio.to_thread(pack_stream, io.BytesIO(image), len(image), secret, out, limit=pack_limit)
    assert len(image) < 32 * CHUNK_SIZE or len(packed.packs) >= 3, "the image should span several packs"
    blobs: dict[bytes, bytes] = {}
    for info, path in packed.packs:
        blobs.update(await asyncio.to_thread(_read_pack, path, info))
        await store.put_pack(pid, info.pack_id, path)
    lock = await store.acquire(pid, Holder("test-site", "test-host"))
    raw = manifest.encode(parcel=pid, version=1, master_key=mkey, vm=VmSpec(memory_mib=64), keyring=packed.keyring)
    await store.commit(pid, CommitRequest(
        epoch=lock.epoch, parent=0, manifest=raw, packs=[i.pack_id for i, _ in packed.packs],
        added=sorted(packed.keyring.tags()), release=False, site="test-site",
    ))
    # The site learns the keyring as a resume would: from the stored manifest.
    (stored,) = await store.get_manifests(pid, 1, 1)
    keyring = manifest.decode(stored, mkey, pid).keyring
    assert keyring is not None and keyring == packed.keyring
    assert set(blobs) == keyring.tags()
    return Parcel(store, pid, mkey, secret, keyring, image, blobs)


# -- test sources ------------------------------------------------------------------------


class RecordingServerSource(ServerSource):
    """The real ServerSource (name "server"), recording what it was asked for."""

    def __init__(self, store: Store, parcel: uuid.UUID) -> None:
        super().__init__(store, parcel)
        self.calls = 0
        self.asked: list[bytes] = []

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.calls += 1
        self.asked.extend(tags)
        return await super().get_many(tags)


class DictSource:
    """A cheap, honest source holding ciphertexts in memory (a USB key, a LAN peer)."""

    def __init__(self, name: str, blobs: dict[bytes, bytes], cost: float = 0.0) -> None:
        self.name = name
        self._blobs = blobs
        self._cost = cost
        self.calls = 0
        self.asked: list[bytes] = []

    def cost(self) -> float:
        return self._cost

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.calls += 1
        self.asked.extend(tags)
        return {t: self._blobs[t] for t in tags if t in self._blobs}


class LyingSource:
    """Answers every tag, always wrongly: a flipped bit, another chunk's ciphertext,
    a truncation or noise. Never the right bytes."""

    def __init__(self, name: str, blobs: dict[bytes, bytes], cost: float = 0.0) -> None:
        self.name = name
        self._blobs = blobs
        self._others = list(blobs.values())
        self._cost = cost
        self.calls = 0
        self.answered = 0

    def cost(self) -> float:
        return self._cost

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.calls += 1
        out = {}
        for k, t in enumerate(tags):
            real = self._blobs.get(t, os.urandom(1000))
            how = (self.answered + k) % 4
            if how == 0:
                bad = bytearray(real)
                bad[len(bad) // 2] ^= 0x01
                bad = bytes(bad)
            elif how == 1:
                bad = next((o for o in self._others if o != real), os.urandom(len(real)))
            elif how == 2:
                bad = real[:-1]
            else:
                bad = os.urandom(len(real))
            assert bad != real
            out[t] = bad
        self.answered += len(tags)
        return out


class FailingSource:
    """A source that fails as a whole on every request (a yanked medium)."""

    def __init__(self, name: str, exc: BaseException, cost: float = 0.0) -> None:
        self.name = name
        self._exc = exc
        self._cost = cost
        self.calls = 0

    def cost(self) -> float:
        return self._cost

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.calls += 1
        raise self._exc


class SlowSource:
    """Wraps a source and answers only after ``delay`` seconds (or never, with None)."""

    def __init__(self, inner, delay: float | None, name: str | None = None, cost: float | None = None) -> None:
        self.inner = inner
        self.delay = delay
        self.name = name or f"slow-{inner.name}"
        self._cost = cost
        self.calls = 0
        self.asked: list[bytes] = []

    def cost(self) -> float:
        return self._cost if self._cost is not None else self.inner.cost()

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.calls += 1
        self.asked.extend(tags)
        if self.delay is None:
            await asyncio.Event().wait()  # hangs: a peer that accepted and went silent
        await asyncio.sleep(self.delay)
        return await self.inner.get_many(tags)


# -- a site serving the parcel -------------------------------------------------------------


@dataclass
class Site:
    parcel: Parcel
    cache: SiteCache
    chain: SourceRegistry
    state: ParcelState
    disk: ParcelDisk
    served: kit.Served
    server: RecordingServerSource | None
    closed: bool = False
    extra: list = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.served.uri

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.served.close()
        self.state.close()
        self.cache.close()


async def open_site(
    parcel: Parcel,
    cache_dir: Path,
    *,
    store: Store | None = None,
    server: bool = True,
    sources: Sequence = (),
    fetch_timeout: float = 30.0,
    keyring: Keyring | None = None,
    pool: Executor | None = None,
) -> Site:
    cache = SiteCache(cache_dir)
    chain = SourceRegistry(cache)
    srv = None
    if server:
        srv = RecordingServerSource(store or parcel.store, parcel.id)
        chain.add(srv)
    for s in sources:
        chain.add(s)
    state = ParcelState(cache, parcel.id, parcel.master_key)
    disk = ParcelDisk(keyring or parcel.keyring, parcel.secret, cache, chain, state, fetch_timeout=fetch_timeout, pool=pool)
    served = await kit.Served(disk).start()
    return Site(parcel, cache, chain, state, disk, served, srv)


def check_dirty_chunks(site: Site, model: bytes) -> None:
    """Every dirty ref's ciphertext is in the cache and decodes to the model's chunk."""
    size = site.parcel.size
    for i, ref in site.disk.dirty.items():
        want = model[i * CH : i * CH + chunk_length(size, i)]
        if ref.is_zero:
            assert want == bytes(len(want)), f"chunk {i} is dirty ZERO but the model has data"
            continue
        data = site.cache.get(ref.tag)
        assert data is not None, f"dirty chunk {i} is not in the cache"
        try:
            plain = decode(ref, data, len(want))
        except IsrError as e:  # pragma: no cover - a failure message, not a path
            raise AssertionError(f"dirty chunk {i} does not decode: {e}") from None
        assert plain == want, f"dirty chunk {i} decodes to other bytes than the model"
