"""Home server benchmark: pack transfer over loopback, and commit latency against disk size.

What it measures
----------------
1. Pack transfer. One real pack (``pack_stream`` over ``--mib`` MiB of random data,
   so the server really verifies it) moves between this process and a real
   ``isrsync serve`` subprocess on 127.0.0.1, through ``HttpStore.put_pack`` and
   ``HttpStore.get_pack``. Side by side, in the same run and interleaved per
   repeat, a plain aiohttp server in another subprocess:

   * download: ``web.static`` serving the very same file, fetched by the same
     client code (``HttpStore._call``: same session, connector, timeouts, read);
     ratio = isrsync / static, target >= 0.8;
   * upload: a bare handler that appends the body to a file with no
     verification, fed by the same 64 MiB ``Content-Range`` pieces that
     ``put_pack`` sends (``HttpStore._call_once``); ratio = isrsync / bare shows
     what verifying the pack (and the resumable-upload bookkeeping) costs. A
     static server takes no uploads, hence the bare handler.

   Between upload repeats the staged pack is collected on the server
   (``collect_garbage`` with no grace), so every repeat uploads and verifies
   the full pack again. ``verify_stream`` alone on the local file is printed as
   the floor of the server's verification.

2. Commit latency for a 1 % dirty disk. For each disk size (1, 4, 16 GiB) a
   parcel whose dirty chunks are real: three disjoint sets of 1 %-of-disk random
   128 KiB plaintexts are encoded by ``pack_stream`` into real packs and uploaded,
   and each version moves the dirty indices to another set, so every version adds
   (and removes) exactly its dirty count of tags, which the server checks exist.
   Timed: the WHOLE client-side commit, ``manifest.encode`` of the delta (parent =
   the decoded previous version) + ``HttpStore.commit``; medians. Two deltas:

   * ``1 % of the disk``: 82 / 328 / 1311 dirty chunks (grows with the disk);
   * ``fixed 82``: 1 % of 1 GiB whatever the disk.

   The design's claim is that a commit costs what changed, not the disk: the
   fixed-82 ratios 4G/1G and 16G/1G should be ~1, and the 1 %-of-disk latency
   per dirty chunk should be flat. Version 1 (a full keyring, every tag
   ``added``) is measured once per size and reported as such. Two disks:

   * fresh: ``Keyring(size)`` (ZERO entries) with 1 % of the entries real, as
     the brief asks; the server then references only ~1 % of the disk;
   * written: every chunk written, as a used disk is: each a distinct real
     128 KiB plaintext (16 random bytes, then zeros, so 16 GiB packs into a few
     MB), all ``added`` by version 1, so the server references the whole disk.
     Its 1 %-of-disk delta is timed once (it can take seconds).

   ``PER_ROUND`` deltas of each kind per round, ``--repeat`` rounds after one
   warm-up round; sizes take turns going first.

MB = 10**6 bytes. Exit status is 0 whether or not a target is met: a measurement.

Run
---
    /tmp/venv/bin/python benchmarks/server.py                   # 256 MiB, 3 repeats
    /tmp/venv/bin/python benchmarks/server.py --mib 64 --repeat 5
    /tmp/venv/bin/python benchmarks/server.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# tests/conftest.py's LiveServer: how the tests start `isrsync serve`
from conftest import LiveServer

from isrsync import manifest
from isrsync.chunk import CHUNK_SIZE, ChunkRef, chunk_count
from isrsync.manifest import Keyring
from isrsync.pack import verify_stream
from isrsync.server.maint import collect_garbage
from isrsync.site.packer import pack_stream
from isrsync.store.base import CommitRequest, Holder
from isrsync.store.http import UPLOAD_PIECE, HttpStore
from isrsync.server.repo import Repository
from isrsync.vmspec import VmSpec

DOWNLOAD_TARGET = 0.8
GIB = 1 << 30
SIZES = (1 * GIB, 4 * GIB, 16 * GIB)
FIXED_DIRTY = round(chunk_count(GIB) * 0.01)  # 82
USER = "bench"

_STATIC_SERVER = r"""
import asyncio, json, sys
from pathlib import Path
from aiohttp import web

root = Path(sys.argv[1])

async def upload(request):
    start = 0
    cr = request.headers.get("Content-Range")
    if cr:
        start = int(cr.split()[1].split("-")[0])
    with open(root / "uploads" / request.match_info["name"], "ab" if start else "wb") as f:
        async for data in request.content.iter_chunked(1 << 20):
            f.write(data)
    return web.json_response({"complete": True}, status=201)

async def main():
    app = web.Application()
    app.router.add_static("/static", root / "static")
    app.router.add_put("/upload/{name}", upload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(json.dumps({"listening": f"http://127.0.0.1:{port}"}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class StaticServer:
    """A plain aiohttp server in a subprocess: web.static plus a bare upload handler."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "static").mkdir(parents=True, exist_ok=True)
        (root / "uploads").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _STATIC_SERVER, str(root)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(30):
            self.kill()
            raise RuntimeError("the static server did not start")
        self.url = json.loads(self.proc.stdout.readline())["listening"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


async def _clock(fn: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


def _purge_staged(data: Path) -> None:
    """Collect every staged pack on the server now (no grace): the next upload starts cold."""
    repo = Repository(data)
    try:
        collect_garbage(repo, grace=0.0, now=time.time() + 1)
    finally:
        repo.close()


async def _bare_put(client: HttpStore, name: str, path: Path) -> None:
    """The piece loop of HttpStore.put_pack, against the bare handler."""
    size = path.stat().st_size
    offset = 0
    while offset < size:
        end = min(size, offset + UPLOAD_PIECE) - 1
        with open(path, "rb") as f:  # noqa: ASYNC230 - as HttpStore.put_pack reads its pieces
            f.seek(offset)
            body = f.read(end - offset + 1)
        await client._call_once(
            "PUT", f"/upload/{name}", body,
            {"Content-Range": f"bytes {offset}-{end}/{size}", "Content-Type": "application/octet-stream"},
        )
        offset = end + 1


# -- 1. pack transfer ---------------------------------------------------------------------


async def bench_transfer(work: Path, mib: int, repeat: int, say: Callable[[str], None]) -> dict[str, Any]:
    say(f"making a {mib} MiB pack of random data...")
    src = work / "client"
    src.mkdir()
    img = os.urandom(mib << 20)
    packed = pack_stream(io.BytesIO(img), len(img), os.urandom(32), src, limit=1 << 40)
    del img
    (info, path), = packed.packs
    size = info.size
    t = time.perf_counter()
    with open(path, "rb") as f:  # noqa: ASYNC230 - timed on purpose, nothing else runs
        verify_stream(f, info.pack_id)
    verify_s = time.perf_counter() - t

    srv = LiveServer(work / "isrsync-data").start()
    static = StaticServer(work / "static-server")
    os.link(path, static.root / "static" / "pack")
    token = srv.add_user(USER)
    store = HttpStore(srv.url, token)
    plain = HttpStore(static.url, "unused")  # same client code against the static server
    try:
        parcel = uuid.uuid4()
        await store.create_parcel(parcel, "transfer")
        up, bare, down, sdown = [], [], [], []
        for r in range(repeat):
            say(f"transfer repeat {r + 1}/{repeat}")
            _purge_staged(srv.data)
            assert await store.pack_size(parcel, info.pack_id) is None
            up.append(await _clock(lambda: store.put_pack(parcel, info.pack_id, path)))
            assert await store.pack_size(parcel, info.pack_id) == size
            name = f"pack-{r}"
            bare.append(await _clock(lambda: _bare_put(plain, name, path)))  # noqa: B023 - awaited at once
            assert (static.root / "uploads" / f"pack-{r}").stat().st_size == size
            (static.root / "uploads" / f"pack-{r}").unlink()

            async def get_isrsync() -> None:
                assert len(await store.get_pack(parcel, info.pack_id)) == size

            async def get_static() -> None:
                _, raw, _ = await plain._call("GET", "/static/pack")
                assert len(raw) == size

            # alternate who goes first, so neither side always meets a warmer cache
            if r % 2:
                sdown.append(await _clock(get_static))
                down.append(await _clock(get_isrsync))
            else:
                down.append(await _clock(get_isrsync))
                sdown.append(await _clock(get_static))
        # the server really verifies: a pack whose bytes differ from its id is refused
        refused = False
        bad = work / "bad"
        data = bytearray(path.read_bytes()[: 1 << 20])
        data[100] ^= 1
        bad.write_bytes(data)
        try:
            await store.put_pack(parcel, os.urandom(32), bad)
        except Exception:  # noqa: BLE001 - IntegrityError/FormatError: what we want to see
            refused = True
    finally:
        await store.close()
        await plain.close()
        srv.stop()
        static.kill()
    med = statistics.median
    return {
        "pack_bytes": size,
        "chunks": len(info.entries),
        "download_isrsync_MBps": _mbps(size, med(down)),
        "download_static_MBps": _mbps(size, med(sdown)),
        "download_ratio": med([s / d for d, s in zip(down, sdown)]),
        "upload_isrsync_MBps": _mbps(size, med(up)),
        "upload_bare_MBps": _mbps(size, med(bare)),
        "upload_ratio": med([b / u for u, b in zip(up, bare)]),
        "local_verify_MBps": _mbps(size, verify_s),
        "damaged_pack_refused": refused,
        "samples_s": {"download_isrsync": down, "download_static": sdown, "upload_isrsync": up, "upload_bare": bare},
    }


# -- 2. commit latency ----------------------------------------------------------------------


class SparseImage(io.RawIOBase):
    """A fully written disk whose every chunk is a distinct real 128 KiB plaintext
    (16 random bytes, then zeros: it compresses, so a 16 GiB disk packs into MBs)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, CHUNK_SIZE if n < 0 else n)
        self.left -= n
        return os.urandom(min(16, n)) + bytes(max(0, n - 16))


class DiskParcel:
    """A parcel on the server whose dirty chunks cycle through three sets of real chunks.

    ``written=False``: a fresh disk (ZERO entries) with 1 % written; ``True``: every
    chunk written (all real, all ``added`` by version 1, so the server references
    them all, as it does for a real disk).
    """

    def __init__(self, store: HttpStore, size: int, work: Path, rng: random.Random, written: bool) -> None:
        self.store = store
        self.size = size
        self.written = written
        self.n = chunk_count(size)
        self.dirty = round(self.n * 0.01)
        self.parcel = uuid.uuid4()
        self.key = os.urandom(32)
        self.work = work / f"{'written' if written else 'fresh'}-{size >> 30}g"
        self.idx = sorted(rng.sample(range(self.n), self.dirty))
        self.ring = Keyring(size)
        self.sets: list[list[ChunkRef]] = []
        self.cur = [0] * self.dirty  # which set each dirty position holds now
        self.parent: manifest.Manifest | None = None
        self.epoch = 0
        self.version = 0
        self.packs: list[bytes] = []

    async def prepare(self) -> None:
        """Encode the chunk sets (and a written disk) into real packs and upload them."""
        self.work.mkdir()
        secret = os.urandom(32)
        k = self.dirty
        pools = 2 if self.written else 3
        img = os.urandom(pools * k * CHUNK_SIZE)  # random 128 KiB plaintexts, flags 0
        packed = pack_stream(io.BytesIO(img), len(img), secret, self.work)
        del img
        refs = [packed.keyring[i] for i in range(pools * k)]
        sets = [refs[s * k : (s + 1) * k] for s in range(pools)]
        allpacks = list(packed.packs)
        if self.written:
            disk = pack_stream(SparseImage(self.size), self.size, secret, self.work)
            self.ring = disk.keyring
            sets.insert(0, [self.ring[i] for i in self.idx])
            allpacks += disk.packs
        self.sets = sets
        await self.store.create_parcel(self.parcel, self.work.name)
        self.epoch = (await self.store.acquire(self.parcel, Holder("bench", "bench"))).epoch
        for info, path in allpacks:
            await self.store.put_pack(self.parcel, info.pack_id, path)
            path.unlink()
        self.packs = [info.pack_id for info, _ in allpacks]

    def _move(self, positions: range) -> tuple[list[int], list[bytes], list[bytes]]:
        dirty, added, removed = [], [], []
        for j in positions:
            i = self.idx[j]
            old = self.ring[i]
            if not old.is_zero:
                removed.append(old.tag)
            self.cur[j] = (self.cur[j] + 1) % 3
            new = self.sets[self.cur[j]][j]
            self.ring[i] = new
            added.append(new.tag)
            dirty.append(i)
        return dirty, added, removed

    async def commit_v1(self) -> tuple[float, int, int]:
        if not self.written:
            for j, i in enumerate(self.idx):
                self.ring[i] = self.sets[0][j]
        added = sorted(self.ring.tags())
        t = time.perf_counter()
        raw = manifest.encode(parcel=self.parcel, version=1, master_key=self.key, vm=VmSpec(), keyring=self.ring)
        await self.store.commit(self.parcel, CommitRequest(self.epoch, 0, raw, self.packs, added, [], [], release=False))
        dt = time.perf_counter() - t
        self._advance(raw)
        return dt, len(raw), len(added)

    async def commit_delta(self, positions: range) -> tuple[float, int]:
        dirty, added, removed = self._move(positions)
        v = self.version + 1
        t = time.perf_counter()
        raw = manifest.encode(
            parcel=self.parcel, version=v, master_key=self.key, vm=VmSpec(), keyring=self.ring,
            parent=self.parent, dirty=dirty,
        )
        await self.store.commit(
            self.parcel, CommitRequest(self.epoch, v - 1, raw, [], sorted(added), sorted(removed), [], release=False)
        )
        dt = time.perf_counter() - t
        if manifest.parse_header(raw).full_keyring:
            raise RuntimeError(f"version {v} was written as a full keyring; the delta was not measured")
        self._advance(raw)
        return dt, len(raw)

    def full_due(self) -> bool:
        """Whether the next version must carry a full keyring (every ``DEFAULT_FULL_EVERY``
        versions a client writes one; docs/manifest.md): that commit costs the disk by design."""
        assert self.parent is not None
        return self.version + 1 - self.parent.header.keyring_base >= manifest.DEFAULT_FULL_EVERY

    async def commit_full(self) -> float:
        """The periodic full keyring: the same disk, a new version whose keyring is whole."""
        v = self.version + 1
        t = time.perf_counter()
        raw = manifest.encode(parcel=self.parcel, version=v, master_key=self.key, vm=VmSpec(), keyring=self.ring,
                              parent=self.parent)
        await self.store.commit(self.parcel, CommitRequest(self.epoch, v - 1, raw, [], [], [], [], release=False))
        dt = time.perf_counter() - t
        self._advance(raw)
        return dt

    def _advance(self, raw: bytes) -> None:
        self.parent = manifest.decode(raw, self.key, self.parcel)
        self.version = self.parent.version


PER_ROUND = 3  # delta commits of each kind per round


async def bench_commits(
    work: Path, repeat: int, written: bool, say: Callable[[str], None], pct_rounds: int | None = None
) -> dict[str, Any]:
    """One server per experiment. ``pct_rounds``: rounds that also time the
    1 %-of-disk delta (None: all of them)."""
    kind = "written" if written else "fresh"
    srv = LiveServer(work / f"commit-{kind}-data").start()
    store = HttpStore(srv.url, srv.add_user(USER), read_timeout=600)
    rng = random.Random(2024)
    rows = []
    try:
        disks = []
        for size in SIZES:
            say(f"{kind} disk: preparing {size >> 30} GiB ({round(chunk_count(size) * 0.01)} dirty chunks x 3 sets)")
            d = DiskParcel(store, size, work, rng, written)
            await d.prepare()
            disks.append((d, await d.commit_v1()))
        samples = {d.size: {"pct": [], "fixed": []} for d, _ in disks}
        msize: dict[int, dict[str, int]] = {d.size: {} for d, _ in disks}
        rounds = repeat + 1  # round 0 warms up and is not counted
        for r in range(rounds):
            timing_pct = pct_rounds is None or r > rounds - 1 - pct_rounds
            say(f"{kind} disk: commit round {r}/{repeat}" + (" (warm-up)" if r == 0 else ""))
            order = disks[r % len(disks):] + disks[: r % len(disks)]  # rotate, so no size always goes first
            for d, _ in order:
                for _ in range(PER_ROUND):
                    dt, n = await d.commit_delta(range(FIXED_DIRTY))
                    msize[d.size]["fixed"] = n
                    if r:
                        samples[d.size]["fixed"].append(dt)
                if timing_pct and d.dirty != FIXED_DIRTY:
                    dt, n = await d.commit_delta(range(d.dirty))
                    msize[d.size]["pct"] = n
                    if r:
                        samples[d.size]["pct"].append(dt)
        med = statistics.median
        for d, (v1_s, v1_bytes, v1_added) in disks:
            s = samples[d.size]
            pct = s["pct"] if d.dirty != FIXED_DIRTY else s["fixed"]
            rows.append({
                "disk_gib": d.size >> 30,
                "entries": d.n,
                "v1_full_ms": v1_s * 1e3,
                "v1_full_bytes": v1_bytes,
                "v1_added": v1_added,
                "dirty_pct_chunks": d.dirty,
                "delta_pct_ms": med(pct) * 1e3,
                "delta_pct_n": len(pct),
                "delta_pct_bytes": msize[d.size].get("pct", msize[d.size]["fixed"]),
                "delta_pct_us_per_dirty": med(pct) * 1e6 / d.dirty,
                "dirty_fixed_chunks": FIXED_DIRTY,
                "delta_fixed_ms": med(s["fixed"]) * 1e3,
                "delta_fixed_n": len(s["fixed"]),
                "delta_fixed_bytes": msize[d.size]["fixed"],
                "samples_ms": {k: [x * 1e3 for x in v] for k, v in s.items()},
            })
    finally:
        await store.close()
        srv.stop()
    base = rows[0]
    ratios = {
        f"{r['disk_gib']}G/1G": {
            "delta_fixed": r["delta_fixed_ms"] / base["delta_fixed_ms"],
            "delta_pct": r["delta_pct_ms"] / base["delta_pct_ms"],
            "delta_pct_per_dirty": r["delta_pct_us_per_dirty"] / base["delta_pct_us_per_dirty"],
            "dirty_count": r["dirty_pct_chunks"] / base["dirty_pct_chunks"],
            "v1_full": r["v1_full_ms"] / base["v1_full_ms"],
        }
        for r in rows[1:]
    }
    return {"disk": kind, "rows": rows, "ratios": ratios}


# -- output -----------------------------------------------------------------------------------


def _kb(n: int) -> str:
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def _ms(x: float) -> str:
    return f"{x:,.1f} ms" if x < 1e4 else f"{x / 1e3:,.1f} s"


def print_tables(console: Console, tr: dict[str, Any], experiments: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    t = Table(title=f"pack transfer over loopback: {tr['pack_bytes'] / 2**20:.1f} MiB pack, "
                    f"{tr['chunks']} chunks, median of {meta['repeat']}")
    t.add_column("")
    t.add_column("isrsync serve", justify="right")
    t.add_column("plain aiohttp", justify="right")
    t.add_column("ratio isrsync/plain", justify="right")
    t.add_column("target", justify="right")
    ok = tr["download_ratio"] >= DOWNLOAD_TARGET
    t.add_row(
        "download (get_pack vs web.static)", f"{tr['download_isrsync_MBps']:,.0f} MB/s",
        f"{tr['download_static_MBps']:,.0f} MB/s",
        f"[{'green' if ok else 'red'}]{tr['download_ratio']:.2f}[/]", f">= {DOWNLOAD_TARGET}",
    )
    t.add_row(
        "upload (put_pack, verified, vs bare write)", f"{tr['upload_isrsync_MBps']:,.0f} MB/s",
        f"{tr['upload_bare_MBps']:,.0f} MB/s", f"{tr['upload_ratio']:.2f}", "(verification cost)",
    )
    t.add_row("verify_stream alone, local file", f"{tr['local_verify_MBps']:,.0f} MB/s", "", "", "")
    t.add_row("damaged pack refused by the server", "yes" if tr["damaged_pack_refused"] else "[red]NO[/]", "", "", "")
    console.print(t)

    titles = {
        "fresh": "fresh disk (ZERO entries), 1 % written",
        "written": "fully written disk (every chunk real and referenced by the server)",
    }
    for cm in experiments:
        c = Table(title=f"commit latency (manifest.encode + HttpStore.commit), {titles[cm['disk']]}; "
                        "medians, n = samples")
        for col in ("disk", "entries", "v1 full keyring (n=1)", "delta: 1 % of disk", "per dirty chunk",
                    f"delta: fixed {FIXED_DIRTY} chunks"):
            c.add_column(col, justify="right")
        for r in cm["rows"]:
            c.add_row(
                f"{r['disk_gib']} GiB", f"{r['entries']:,}",
                f"{_ms(r['v1_full_ms'])}\n{_kb(r['v1_full_bytes'])}, {r['v1_added']:,} added",
                f"{_ms(r['delta_pct_ms'])} (n={r['delta_pct_n']})\n{r['dirty_pct_chunks']} dirty, {_kb(r['delta_pct_bytes'])}",
                f"{r['delta_pct_us_per_dirty']:,.0f} us",
                f"{_ms(r['delta_fixed_ms'])} (n={r['delta_fixed_n']})\n{_kb(r['delta_fixed_bytes'])}",
            )
        console.print(c)
        q = Table(title=f"{cm['disk']} disk: does a commit grow with the disk? ratios to 1 GiB (~1 means no)")
        for col in ("", f"delta fixed {FIXED_DIRTY}", "delta 1 % of disk", "... per dirty chunk",
                    "dirty chunks (1 %)", "v1 full keyring"):
            q.add_column(col, justify="right")
        for name, r in cm["ratios"].items():
            good = r["delta_fixed"] < 1.5
            q.add_row(
                name, f"[{'green' if good else 'red'}]{r['delta_fixed']:.2f}[/]", f"{r['delta_pct']:.2f}",
                f"{r['delta_pct_per_dirty']:.2f}", f"{r['dirty_count']:.1f}", f"{r['v1_full']:.2f}",
            )
        console.print(q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="pack size in MiB of plaintext (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per measurement; medians are reported")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    if args.mib < 1 or args.repeat < 1:
        parser.error("--mib and --repeat must be >= 1")
    console = Console(stderr=args.json, width=max(Console().width, 130))

    def say(msg: str) -> None:
        console.print(f"[dim]{msg}[/]")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="isrsync-bench-") as tmp:
        work = Path(tmp)
        tr = asyncio.run(bench_transfer(work, args.mib, args.repeat, say))
        fresh = asyncio.run(bench_commits(work, args.repeat, False, say))
        # On a written disk a 1 %-of-disk delta can take many seconds: time it once.
        written = asyncio.run(bench_commits(work, args.repeat, True, say, pct_rounds=1))
    meta = {
        "mib": args.mib, "repeat": args.repeat, "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0], "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps({"meta": meta, "transfer": tr, "commit": [fresh, written],
                          "targets": {"download_ratio": DOWNLOAD_TARGET}}, indent=2))
    else:
        print_tables(console, tr, [fresh, written], meta)
        console.print(f"[dim]elapsed {meta['elapsed_s']} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
