"""`isrsync demo`: a complete local run on embedded defaults, no set-up needed.

An embedded home server on loopback, a user with a passphrase-sealed key
bundle, and two sites (two cache directories). Site A turns a generated disk
image into a parcel (version 1), changes 1 % of it and commits version 2 as a
keyring delta; site B unlocks the keys with the passphrase, takes the lock,
rebuilds the keyring from the manifests, fetches every chunk into its own cache
and checks the disk byte for byte. Site A, now fenced off, is refused.

The VM runtime (NBD + QEMU) joins this demo with the resume/suspend issue.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

from aiohttp import web

from .. import chunk, manifest
from ..chunk import CHUNK_SIZE
from ..errors import LockHeld
from ..keys import KdfLimits, KeyBundle
from ..server.app import make_app
from ..store.base import CommitRequest, Holder
from ..store.http import HttpStore
from ..store.repo import Repository
from .cache import SiteCache
from .packer import pack_stream

Advance = Callable[[int], None]


class DemoUI:
    """How the demo reports progress; the CLI supplies a rich implementation."""

    def step(self, title: str) -> ContextManager[None]:
        raise NotImplementedError

    def bar(self, title: str, total: int) -> ContextManager[Advance]:
        raise NotImplementedError

    def note(self, text: str) -> None:
        raise NotImplementedError


@dataclass
class DemoReport:
    server: str = ""
    disk_bytes: int = 0
    timings: list[tuple[str, float]] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    identical: bool = False
    refused: str = ""


def sample_image(size: int, seed: int = 7) -> bytes:
    """A disk-like image: zeros, text, binary, random, and repeated regions."""
    rnd = hashlib.shake_256(seed.to_bytes(4, "little"))
    text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60])
    quarter = size // 4
    parts = [
        bytes(quarter),  # never written
        (text * (quarter // max(1, len(text)) + 1))[:quarter],
        rnd.digest(quarter),
    ]
    parts.append(parts[1][: size - 3 * quarter])  # a copy: dedup finds it
    return b"".join(parts)[:size]


async def _embedded_server(data: Path) -> tuple[web.AppRunner, Repository, str]:
    repo = Repository(data)
    runner = web.AppRunner(make_app(repo), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, repo, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def run_demo(work: Path, ui: DemoUI, *, disk_mib: int = 64, passphrase: str = "correct horse") -> DemoReport:
    rep = DemoReport()
    t_all = time.perf_counter()

    def timed(title: str, t0: float) -> None:
        rep.timings.append((title, time.perf_counter() - t0))

    with ui.step("starting an embedded home server on loopback"):
        runner, repo, url = await _embedded_server(work / "home")
        token = repo.add_user("demo")
        rep.server = url
    store_a = HttpStore(url, token)
    store_b = HttpStore(url, token)
    try:
        # -- the user's keys, sealed under their passphrase, kept on the server.
        t0 = time.perf_counter()
        with ui.step("sealing the key bundle under the passphrase (Argon2id)"):
            bundle = KeyBundle.new()
            parcel = uuid.uuid4()
            bundle.parcels[str(parcel)] = os.urandom(32)
            sealed = await asyncio.to_thread(bundle.seal, passphrase, KdfLimits())
            await store_a.put_key_bundle(sealed, None)
            await store_a.create_parcel(parcel, "demo-vm")
        timed("seal keys + create parcel", t0)

        size = disk_mib << 20
        image = bytearray(sample_image(size))
        rep.disk_bytes = size
        cache_a = SiteCache(work / "site-a")
        cache_b = SiteCache(work / "site-b")
        holder_a = Holder(cache_a.site_id, "site-a")
        holder_b = Holder(cache_b.site_id, "site-b")
        secret = bundle.convergence_secret
        mkey = bundle.parcels[str(parcel)]

        # -- site A: version 1 from the image.
        t0 = time.perf_counter()
        with ui.bar("site A: encoding the disk into packs", size) as adv:
            packed = await asyncio.to_thread(
                pack_stream, io.BytesIO(bytes(image)), size, secret, work / "site-a", progress=adv,
                limit=16 << 20,
            )
        timed("encode disk (v1)", t0)
        t0 = time.perf_counter()
        with ui.bar("site A: uploading packs", sum(i.size for i, _ in packed.packs)) as adv:
            for info, path in packed.packs:
                await store_a.put_pack(parcel, info.pack_id, path)
                cache_a.add_pack(path, info.pack_id)
                adv(info.size)
        lock = await store_a.acquire(parcel, holder_a)
        raw1 = manifest.encode(parcel=parcel, version=1, master_key=mkey, vm={"memory_mib": 256},
                               keyring=packed.keyring, site=holder_a.host, time=time.time())
        await store_a.commit(parcel, CommitRequest(
            epoch=lock.epoch, parent=0, manifest=raw1, packs=[i.pack_id for i, _ in packed.packs],
            added=sorted(packed.keyring.tags()), release=False, site=holder_a.site))
        timed("upload + commit v1", t0)
        rep.facts += [
            ("disk", f"{size >> 20} MiB in {len(packed.keyring)} chunks of 128 KiB"),
            ("v1: zero chunks (never stored)", str(packed.zero_chunks)),
            ("v1: chunks deduplicated", str(packed.reused_chunks)),
            ("v1: bytes stored on the server", f"{packed.stored_bytes:,}"),
            ("v1: manifest (full keyring)", f"{len(raw1):,} bytes"),
        ]

        # -- site A: the guest writes 1 % of the disk; version 2 is a delta.
        t0 = time.perf_counter()
        v1 = manifest.decode(raw1, mkey, parcel)
        ring2 = v1.keyring.copy()
        n = len(ring2)
        dirty = sorted({(i * 7919) % n for i in range(max(1, n // 100))})
        for i in dirty:
            image[i * CHUNK_SIZE : i * CHUNK_SIZE + 64] = os.urandom(64)
        before = {ring2.tag_at(i) for i in dirty}
        encs = list(chunk.encode_many((bytes(image[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE]) for i in dirty), secret))
        for i, enc in zip(dirty, encs):
            ring2[i] = enc.ref
        sub = work / "site-a" / "v2"
        sub.mkdir()
        buf = b"".join(bytes(image[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE]) for i in dirty)
        packed2 = pack_stream(io.BytesIO(buf), len(buf), secret, sub)
        for info, path in packed2.packs:
            await store_a.put_pack(parcel, info.pack_id, path)
        raw2 = manifest.encode(parcel=parcel, version=2, master_key=mkey, vm=v1.vm, keyring=ring2,
                               parent=v1, dirty=dirty, site=holder_a.host, time=time.time())
        live2 = ring2.tags()
        await store_a.commit(parcel, CommitRequest(
            epoch=lock.epoch, parent=1, manifest=raw2, packs=[i.pack_id for i, _ in packed2.packs],
            added=sorted({e.tag for e in encs} - v1.keyring.tags()),
            removed=sorted(t for t in before if t not in live2), release=True, site=holder_a.site))
        timed("write 1% + commit v2 (delta)", t0)
        rep.facts.append(("v2: manifest (keyring delta)", f"{len(raw2):,} bytes for {len(dirty)} dirty chunks"))

        # -- site B: walk up with only the passphrase.
        t0 = time.perf_counter()
        with ui.step("site B: unlocking the key bundle with the passphrase"):
            got = await store_b.get_key_bundle()
            assert got is not None
            bundle_b = await asyncio.to_thread(KeyBundle.unseal, got, passphrase)
        lock_b = await store_b.acquire(parcel, holder_b)
        info = await store_b.parcel("demo-vm")
        raws = await store_b.get_manifests(parcel, 1, info.version)
        mkey_b = bundle_b.master_key(str(parcel))
        head = manifest.resolve([manifest.decode(r, mkey_b, parcel) for r in raws])
        timed("site B: keys + lock + manifests", t0)

        t0 = time.perf_counter()
        ring = head.keyring
        assert ring is not None
        want = sorted(ring.tags())
        where = await store_b.locate(parcel, want)
        by_pack: dict[bytes, list] = defaultdict(list)
        for e in where.values():
            by_pack[e.pack_id].append(e)
        with ui.bar("site B: fetching chunks from the home server", sum(e.length for e in where.values())) as adv:
            for pack_id, entries in by_pack.items():
                entries.sort(key=lambda e: e.offset)
                lo, hi = entries[0].offset, entries[-1].offset + entries[-1].length
                blob = await store_b.get_pack(parcel, pack_id, lo, hi - lo)
                cache_b.put_many((e.tag, blob[e.offset - lo : e.offset - lo + e.length]) for e in entries)
                adv(sum(e.length for e in entries))
        rebuilt = bytearray()
        for i in range(len(ring)):
            ref = ring[i]
            rebuilt += chunk.decode(ref, cache_b.get(ref.tag), chunk.chunk_length(size, i))
        rep.identical = bytes(rebuilt) == bytes(image)
        timed("site B: fetch + decode whole disk", t0)

        try:
            await store_a.acquire(parcel, holder_a)
        except LockHeld as e:
            rep.refused = e.message
        await store_b.release(parcel, lock_b.epoch)
        cache_a.close()
        cache_b.close()
    finally:
        await store_a.close()
        await store_b.close()
        await runner.cleanup()
        repo.close()
    rep.timings.append(("total", time.perf_counter() - t_all))
    return rep
