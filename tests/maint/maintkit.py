"""A real parcel for the maintenance tests: real packs, real manifests, real commits.

:class:`Client` plays a site: it writes chunks (plaintext kept in memory as the
ground truth), packs the new ones with :func:`isrsync.site.packer.pack_stream`,
seals delta manifests with :func:`isrsync.manifest.encode` and commits through a
Store, computing ``added``/``removed`` from the keyrings exactly as the site
does (tags of the new keyring not in the parent's, and the reverse).

:func:`read_version` plays a resuming site: it fetches the keyring chain from
the store, resolves it, locates every chunk and reads it back by range,
verifying and decrypting each one against the plaintext the client wrote.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from isrsync import chunk, manifest
from isrsync.chunk import CHUNK_SIZE, ChunkRef
from isrsync.errors import NotFound
from isrsync.manifest import Keyring, MemoryImage
from isrsync.pack import PackInfo, PackReader
from isrsync.site.packer import pack_stream
from isrsync.store.base import CommitRequest, Holder, VersionInfo
from isrsync.vmspec import VmSpec

USER = "alice"
ZERO = bytes(CHUNK_SIZE)


def isrsync_cmd() -> list[str]:
    """The installed console script (as tests/conftest.py finds it)."""
    exe = shutil.which("isrsync", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "isrsync.cli.main"]


@dataclass
class Version:
    number: int
    keyring: Keyring
    plain: dict[int, bytes]  # chunk index -> plaintext (every index; zero chunks too)
    memory: MemoryImage | None
    memory_plain: list[bytes]
    raw: bytes

    def tags(self) -> set[bytes]:
        """Every tag this version references (disk and memory)."""
        t = self.keyring.tags()
        if self.memory is not None:
            t |= self.memory.refs.tags()
        return t


@dataclass
class Pack:
    info: PackInfo
    path: Path  # the client's copy (what it would upload again)

    @property
    def id(self) -> bytes:
        return self.info.pack_id

    @property
    def tags(self) -> set[bytes]:
        return {e.tag for e in self.info.entries}


@dataclass
class Client:
    """One site holding the lock of one parcel, committing through ``store``."""

    store: object
    workdir: Path
    chunks: int
    full_every: int = 4
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    parcel: uuid.UUID = field(default_factory=uuid.uuid4)
    key: bytes = field(default_factory=lambda: os.urandom(32))
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    versions: dict[int, Version] = field(default_factory=dict)
    packs: dict[bytes, Pack] = field(default_factory=dict)
    # plaintext of every chunk this client ever encoded, by tag
    plain_of: dict[bytes, bytes] = field(default_factory=dict)
    epoch: int = 0
    head: manifest.Manifest | None = None
    refusals: int = 0  # commits refused with NotFound (then repaired)

    @property
    def size(self) -> int:
        return self.chunks * CHUNK_SIZE

    @property
    def version(self) -> int:
        return max(self.versions, default=0)

    async def start(self, name: str = "p") -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.store.create_parcel(self.parcel, name)
        self.epoch = (await self.store.acquire(self.parcel, Holder("site-a", "host-a"))).epoch

    def random_plain(self) -> bytes:
        return self.rng.randbytes(CHUNK_SIZE)

    def sparse_plain(self) -> bytes:
        """A distinct 128 KiB chunk that compresses to almost nothing (cheap to make many)."""
        return self.rng.randbytes(16) + bytes(CHUNK_SIZE - 16)

    def pack(self, plains: list[bytes]) -> tuple[list[ChunkRef], list[Pack]]:
        """Encode plaintexts into one new pack (zero ones become ZERO refs)."""
        img = b"".join(plains)
        packed = pack_stream(io.BytesIO(img), len(img), self.secret, self.workdir, limit=1 << 40)
        refs = [packed.keyring[i] for i in range(len(plains))]
        out = []
        for info, path in packed.packs:
            p = Pack(info, path)
            self.packs[info.pack_id] = p
            out.append(p)
        for r, pl in zip(refs, plains):
            if not r.is_zero:
                self.plain_of[r.tag] = pl
        return refs, out

    def repack(self, tags: list[bytes]) -> Pack:
        """A new pack of chunks this client encoded before (its local copies)."""
        return self.pack([self.plain_of[t] for t in tags])[1][0]

    async def upload(self, packs: list[Pack]) -> None:
        for p in packs:
            await self.store.put_pack(self.parcel, p.id, p.path)

    def build(
        self,
        writes: dict[int, bytes],
        memory_chunks: int = 0,
    ) -> tuple[Version, list[Pack], CommitRequest]:
        """The next version: ``writes`` (index -> plaintext) over the head.

        Plaintexts the client encoded before are re-referenced without being
        packed again (the client believes the server has them), like a site
        that reverts a chunk, or dedups against history.
        """
        v = self.version + 1
        parent = self.versions.get(v - 1)
        ring = parent.keyring.copy() if parent else Keyring(self.size)
        plain = dict(parent.plain) if parent else {i: ZERO for i in range(self.chunks)}
        fresh = [i for i, p in writes.items() if p != ZERO and chunk.encode(p, self.secret).tag not in self.plain_of]
        new_packs: list[Pack] = []
        if fresh:
            refs, new_packs = self.pack([writes[i] for i in fresh])
            for i, r in zip(fresh, refs):
                ring[i] = r
        for i, p in writes.items():
            if i not in fresh:
                ring[i] = chunk.encode(p, self.secret).ref
            plain[i] = p
        mem = None
        mem_plain: list[bytes] = []
        if memory_chunks:
            mem_plain = [self.random_plain() for _ in range(memory_chunks)]
            refs, mp = self.pack(mem_plain)
            new_packs += mp
            mem = MemoryImage.from_refs(memory_chunks * CHUNK_SIZE, refs)
        raw = manifest.encode(
            parcel=self.parcel, version=v, master_key=self.key, vm=VmSpec(memory_mib=64), keyring=ring,
            parent=self.head, dirty=sorted(writes) if parent else None, memory=mem,
            full_every=self.full_every,
        )
        old = parent.keyring.tags() if parent else set()
        new = ring.tags()
        req = CommitRequest(
            epoch=self.epoch, parent=v - 1, manifest=raw, packs=[p.id for p in new_packs],
            added=sorted(new - old), removed=sorted(old - new),
            memory=sorted(mem.refs.tags()) if mem else [], release=False,
        )
        return Version(v, ring, plain, mem, mem_plain, raw), new_packs, req

    async def commit(self, writes: dict[int, bytes], memory_chunks: int = 0, repair: bool = False) -> VersionInfo:
        """Build, upload and commit the next version.

        With ``repair``, a commit refused with NotFound (a chunk the client
        thought the server had was pruned meanwhile) is repaired the way a site
        repairs it: ask the server which of the added tags it has, upload a
        new pack of the missing ones, and commit again.
        """
        ver, packs, req = self.build(writes, memory_chunks)
        await self.upload(packs)
        for attempt in range(50):
            try:
                info = await self.store.commit(self.parcel, req)
                break
            except NotFound:
                if not repair:
                    raise
                self.refusals += 1
                want = list(dict.fromkeys([*req.added, *req.memory]))
                have = await self.store.locate(self.parcel, want)
                missing = [t for t in want if t not in have]
                if missing:
                    fix = self.repack(missing)
                    await self.upload([fix])
                    req.packs.append(fix.id)
        else:  # pragma: no cover - a livelock is itself a failure
            raise AssertionError("commit kept being refused")
        assert info.version == ver.number
        self.versions[ver.number] = ver
        self.head = manifest.decode(ver.raw, self.key, self.parcel)
        return info


async def read_version(store: object, client: Client, v: int, *, retries: int = 0) -> int:
    """Rebuild version ``v`` from the store alone and read every chunk of it.

    Returns how many chunks were read; raises AssertionError on any chunk that
    cannot be located, fetched, verified or that differs from what was written.
    ``retries``: re-locate a chunk whose pack vanished under a concurrent
    compaction (a live chunk is always somewhere; a pack may move).
    """
    want = client.versions[v]
    raw = (await store.get_manifests(client.parcel, v, v))[0]
    base = manifest.parse_header(raw).keyring_base
    chain = [manifest.decode(r, client.key, client.parcel) for r in await store.get_manifests(client.parcel, base, v)]
    m = manifest.resolve(chain)
    assert m.keyring == want.keyring, f"version {v}: resolved keyring differs from the one committed"
    items: list[tuple[ChunkRef, int, bytes]] = []
    for i in range(len(m.keyring)):
        items.append((m.keyring[i], chunk.chunk_length(m.disk_size, i), want.plain[i]))
    if m.memory is not None:
        assert want.memory is not None
        for i in range(len(m.memory.refs)):
            items.append((m.memory.refs[i], chunk.chunk_length(m.memory.length, i), want.memory_plain[i]))
    stored = [it for it in items if not it[0].is_zero]
    for ref, n, plain in items:
        if ref.is_zero:
            assert plain[:n] == bytes(n), f"version {v}: a ZERO entry stands for non-zero data"
    for attempt in range(retries + 1):
        where = await store.locate(client.parcel, [r.tag for r, _, _ in stored])
        lost = [r.tag.hex()[:16] for r, _, _ in stored if r.tag not in where]
        assert not lost, f"version {v}: {len(lost)} chunk(s) in no live pack, e.g. {lost[:3]}"
        try:
            for ref, n, plain in stored:
                e = where[ref.tag]
                data = await store.get_pack(client.parcel, e.pack_id, e.offset, e.length)
                assert chunk.decode(ref, data, n) == plain, f"version {v}: chunk {ref.tag.hex()[:16]} differs"
            return len(stored)
        except NotFound:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def pack_tags(path: Path) -> set[bytes]:
    with open(path, "rb") as f:
        return {e.tag for e in PackReader(f, path.stat().st_size).entries}


def client_factory(store, root: Path):
    """``make(chunks, seed, full_every)``: a new Client of ``store`` each call, in its own directory under ``root``."""
    n = 0

    def make(chunks: int, seed: int = 1, full_every: int = 4) -> Client:
        nonlocal n
        n += 1
        return Client(store, root / f"client-{n}", chunks, full_every=full_every, rng=random.Random(seed))

    return make
