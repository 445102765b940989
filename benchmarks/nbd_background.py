"""NBD service under background work: does anything block the loop that serves the guest's disk?

A resumed parcel's disk is served over NBD by the same asyncio loop that, under
the ``auto`` policy, hoards the rest of the disk from the home server and
trickles the guest's settled writes up to it. This script measures the NBD
reads a guest would see, and the loop's own responsiveness, with and without
that background work running.

Set-up (once, in one process and one loop, wired as a resume wires them)
------------------------------------------------------------------------
* A real home server: ``isrsync server add-user`` (its token), then ``isrsync
  serve --listen 127.0.0.1:0`` as a subprocess (tests/conftest.py's
  ``LiveServer``), reached through ``HttpStore``: every background fetch and
  upload is real HTTP over loopback.
* A parcel, version 1, of ``--mib`` MiB of random data (chunks do not
  compress), packed by ``pack_stream`` and committed as ``init`` does.
* The site: ``SiteCache``, a ``SourceRegistry`` with the real ``ServerSource``,
  a ``ParcelState``, a ``ParcelDisk`` and an ``NbdServer`` on a unix socket.
* The disk is split, by chunk (128 KiB): ``rand`` (1/4) and ``seq`` (1/4) are
  read by the benchmark, ``write`` (1/8) is written by the guest in condition
  (c), ``cold`` (the rest) is fetched by the hoard. ``rand``, ``seq`` and
  ``write`` are brought into the site cache first (``ParcelDisk.prefetch``:
  ciphertext only, nothing decoded).

Conditions (run in turns, ``--rounds`` rounds after one warm-up round)
--------------------------------------------------------------------------
(a) idle: nothing else runs.
(b) hoard: the background hoard of ``TraceHoard``
    (isrsync/site/background.py): ``ParcelDisk.prefetch`` over the cold chunks in
    batches of 16 with a pause between batches (``--hoard-pause``, 0.05 s: the
    trace-order pace; the hoard of the rest uses 0.2 s), fetching from the
    server. When the cold region is all in, it is dropped from the cache index
    and the hoard starts over, so it is fetching for the whole window.
(c) hoard + trickle: (b), plus the guest writing (a second NBD client,
    ``qemu-io`` fed 64 KiB random writes at 4 KiB-aligned offsets in the write
    region, ``--write-mibps``, a flush every 10 writes), plus the trickle of
    ``Trickle``: dirty chunks unchanged for ``--settle`` s (30 s in a
    resume: shortened so that uploads happen inside the window) are uploaded
    by ``ParcelSession.upload_settled`` (isrsync/site/session.py), within the
    8 MiB/s cap.

In every condition the background starts, then after ``RAMP`` s one
``qemu-io`` process (a separate process, as QEMU is) reads, at queue depth 1:

* random 4 KiB: one read in each chunk of the rand region, in random order,
  at a random 4 KiB-aligned offset in it;
* sequential 1 MiB: the seq region, in order.

The disk's in-RAM cache of decoded chunks is emptied first, so every read
decodes from the site cache (the path that shares the codec threads and the
cache's lock with the background work). Latencies are qemu-io's own per-op
times (``read -C``). Throughput: random IOPS and sequential MiB/s at QD 1.

Loop stalls: a ticker re-arms ``loop.call_later(0.005)`` for the whole run;
a stall is how late each wake-up came (gap between wake-ups minus 5 ms),
taken over the background's window (``--window`` s, the reads inside it; the
same window for idle). A watchdog thread samples the loop thread's Python
stack whenever the ticker is more than ``--blocked-ms`` late, which names the
functions and lines the loop was in while blocked.

Figures are medians over the rounds; ratios are to idle. MiB = 2**20 bytes.
Exit status 0 whatever the figures: a measurement.

Run
---
    .venv/bin/python benchmarks/nbd_background.py                 # ~2.5 min
    .venv/bin/python benchmarks/nbd_background.py --rounds 3 --mib 128
    .venv/bin/python benchmarks/nbd_background.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# tests/conftest.py: how the tests start `isrsync serve` and find the CLI
from conftest import LiveServer, isrsync_cmd

from isrsync import manifest
from isrsync.chunk import CHUNK_SIZE
from isrsync.keys import new_convergence_secret, new_master_key
from isrsync.site.cache import SiteCache
from isrsync.site.disk import ParcelDisk
from isrsync.site.packer import pack_stream
from isrsync.site.parcel import Site
from isrsync.site.background import TraceHoard, Trickle
from isrsync.site.session import ParcelSession
from isrsync.site.serversource import ServerSource
from isrsync.site.registry import SourceRegistry
from isrsync.site.state import ParcelState
from isrsync.store.base import CommitRequest, Holder
from isrsync.store.http import HttpStore
from isrsync.vm.nbd import NbdServer
from isrsync.vmspec import VmSpec

CH = CHUNK_SIZE
MIB = 1 << 20
TICK = 0.005  # the ticker's period
RAMP = 1.5  # seconds of background before the reads start
HOARD_BATCH = TraceHoard.batch  # as the runtime's background hoard
TRICKLE_RATE = Trickle.rate  # the runtime default
WRITE_SIZE = 64 << 10
IDLE, HOARD, TRICKLE = "idle", "hoard", "hoard+trickle"
CONDITIONS = (IDLE, HOARD, TRICKLE)
USER = "bench"


# -- statistics ---------------------------------------------------------------------------


def pct(xs: list[float] | array, p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, -(-len(s) * p // 100) - 1))
    return s[int(k)]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the loop's pulse ---------------------------------------------------------------------


class Ticker:
    """Re-arms loop.call_later(TICK) for ever; records every wake-up and its gap."""

    def __init__(self) -> None:
        self.t = array("d")  # perf_counter of each wake-up
        self.gap = array("d")  # seconds since the previous wake-up
        self.last = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.last = time.perf_counter()
        self._handle = loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.t.append(now)
        self.gap.append(now - self.last)
        self.last = now
        assert self._loop is not None
        self._handle = self._loop.call_later(TICK, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def stalls(self, t0: float, t1: float) -> list[float]:
        """How late each wake-up in [t0, t1] came (gap minus the period), in seconds."""
        lo, hi = bisect_left(self.t, t0), bisect_right(self.t, t1)
        return [max(0.0, g - TICK) for g in self.gap[lo:hi]]


@dataclass
class Sample:
    t: float
    lag: float
    stack: list[traceback.FrameSummary]


class Watchdog(threading.Thread):
    """Samples the loop thread's stack whenever the ticker is late by more than ``threshold``."""

    def __init__(self, ticker: Ticker, threshold: float, every: float = 0.002) -> None:
        super().__init__(name="loop-watchdog", daemon=True)
        self.ticker = ticker
        self.threshold = threshold
        self.every = every
        self.loop_thread = threading.get_ident()
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            lag = time.perf_counter() - self.ticker.last
            if lag <= TICK + self.threshold:
                continue
            frame = sys._current_frames().get(self.loop_thread)
            if frame is not None:
                self.samples.append(Sample(time.perf_counter(), lag, traceback.extract_stack(frame)))
            del frame

    def halt(self) -> None:
        self._halt.set()
        self.join(2)


def _short(fs: traceback.FrameSummary) -> str:
    p = Path(fs.filename)
    try:
        name = str(p.relative_to(ROOT))
    except ValueError:
        parts = p.parts
        name = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else \
            "/".join(parts[-2:])
    return f"{name}:{fs.lineno} {fs.name}"


def where(stack: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(the innermost frame, the innermost frames of this repository's code, innermost first)."""
    ours = [fs for fs in stack if Path(fs.filename).is_relative_to(ROOT / "isrsync")
            or Path(fs.filename) == Path(__file__).resolve()]
    inner = _short(stack[-1]) if stack else "?"
    chain = " <- ".join(_short(fs) for fs in reversed(ours[-3:])) or "(no isrsync frame)"
    return inner, chain


# -- the parcel, the server and the site -----------------------------------------------------


class RandomImage:
    """``size`` bytes of random data, read as a stream (no 256 MiB buffer)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


@dataclass
class Layout:
    n: int  # chunks in the disk

    @property
    def rand(self) -> range:
        return range(self.n // 4)

    @property
    def seq(self) -> range:
        return range(self.n // 4, self.n // 2)

    @property
    def write(self) -> range:
        return range(self.n // 2, self.n // 2 + self.n // 8)

    @property
    def cold(self) -> range:
        return range(self.write.stop, self.n)


@dataclass
class Bench:
    work: Path
    server: LiveServer
    store: HttpStore
    parcel: uuid.UUID
    base: manifest.Manifest
    cache: SiteCache
    chain: SourceRegistry
    state: ParcelState
    disk: ParcelDisk
    nbd: NbdServer
    session: ParcelSession
    uri: str
    layout: Layout
    cold_tags: list[bytes]
    datafile: Path


async def make_parcel(store: HttpStore, work: Path, size: int) -> tuple[uuid.UUID, bytes, bytes, manifest.Manifest, int]:
    """Version 1 of a new parcel of random data, committed the way `init` does it (lock kept)."""
    pid = uuid.uuid4()
    mkey, secret = new_master_key(), new_convergence_secret()
    await store.create_parcel(pid, "nbd-background")
    out = work / "packs"
    out.mkdir()
    packed = await asyncio.to_thread(pack_stream, RandomImage(size), size, secret, out, limit=64 * MIB)
    for info, path in packed.packs:
        await store.put_pack(pid, info.pack_id, path)
        path.unlink()
    lock = await store.acquire(pid, Holder("bench-site", "bench-host"))
    raw = manifest.encode(parcel=pid, version=1, master_key=mkey, vm=VmSpec(memory_mib=64), keyring=packed.keyring)
    await store.commit(pid, CommitRequest(
        epoch=lock.epoch, parent=0, manifest=raw, packs=[i.pack_id for i, _ in packed.packs],
        added=sorted(packed.keyring.tags()), release=False, site="bench-site",
    ))
    # The site learns the keyring as a resume does: from the stored manifest.
    (stored,) = await store.get_manifests(pid, 1, 1)
    base = manifest.decode(stored, mkey, pid)
    assert base.keyring is not None and base.keyring == packed.keyring
    return pid, mkey, secret, base, lock.epoch


def add_user(data: Path) -> str:
    out = subprocess.run([*isrsync_cmd(), "server", "add-user", USER, "--data", str(data), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["token"]


async def set_up(work: Path, mib: int, say: Callable[[str], None], servers: list[LiveServer]) -> Bench:
    data = work / "server-data"
    token = await asyncio.to_thread(add_user, data)
    srv = LiveServer(data)
    servers.append(srv)
    await asyncio.to_thread(srv.start)
    store = HttpStore(srv.url, token)
    say(f"server at {srv.url}; packing and uploading a {mib} MiB parcel of random data...")
    t = time.perf_counter()
    pid, mkey, secret, base, epoch = await make_parcel(store, work, mib * MIB)
    say(f"  committed version 1 in {time.perf_counter() - t:.1f} s")
    assert base.keyring is not None
    cache = SiteCache(work / "cache")
    chain = SourceRegistry(cache)
    chain.add(ServerSource(store, pid))
    state = ParcelState(cache, pid, mkey)
    disk = ParcelDisk(base.keyring, secret, cache, chain, state)
    nbd = NbdServer(disk)
    sock = work / "nbd.sock"
    await nbd.start_unix(sock)
    site = Site(cache, store, acct=None, bundle=None, host="bench-host")  # type: ignore[arg-type]  # the trickle uses cache and store only
    session = ParcelSession(site, pid, state, base, epoch)
    layout = Layout(len(base.keyring))
    warm = [*layout.rand, *layout.seq, *layout.write]
    t = time.perf_counter()
    for k in range(0, len(warm), 64):
        await disk.prefetch(warm[k : k + 64])
    say(f"  {len(warm) * CH // MIB} MiB brought into the site cache in {time.perf_counter() - t:.1f} s")
    cold_tags = sorted({base.keyring[i].tag for i in layout.cold if not base.keyring[i].is_zero})
    datafile = work / "write.bin"
    datafile.write_bytes(os.urandom(WRITE_SIZE))
    uri = f"nbd+unix:///disk?socket={sock}"
    return Bench(work, srv, store, pid, base, cache, chain, state, disk, nbd, session, uri, layout, cold_tags, datafile)


async def tear_down(b: Bench | None) -> None:
    if b is None:
        return
    with contextlib.suppress(Exception):
        await b.nbd.close(timeout=5)
    with contextlib.suppress(Exception):
        await b.chain.close()
    with contextlib.suppress(Exception):
        await b.store.close()
    with contextlib.suppress(Exception):
        b.state.close()
    with contextlib.suppress(Exception):
        b.cache.close()


# -- the background work ------------------------------------------------------------------


@dataclass
class Activity:
    hoard_chunks: int = 0
    hoard_passes: int = 0
    guest_writes: int = 0
    uploads: int = 0
    uploaded_chunks: int = 0
    upload_seconds: list[float] = field(default_factory=list)


async def hoard(b: Bench, pause: float, stop: asyncio.Event, act: Activity) -> None:
    """The background hoard's loop (TraceHoard) over the cold region, started over whenever it is all in."""
    idxs = list(b.layout.cold)
    while not stop.is_set():
        for k in range(0, len(idxs), HOARD_BATCH):
            if stop.is_set():
                return
            act.hoard_chunks += await b.disk.prefetch(idxs[k : k + HOARD_BATCH])
            await asyncio.sleep(pause)
        act.hoard_passes += 1
        await forget_cold(b)  # so there is more to hoard


async def forget_cold(b: Bench) -> None:
    """Drop the cold region from the cache index, in small pieces: one long hold of the
    cache's lock would hold up the reads being measured (the benchmark's doing, not isrsync's)."""
    for k in range(0, len(b.cold_tags), 64):
        await asyncio.to_thread(b.cache.drop, b.cold_tags[k : k + 64])


async def trickle(b: Bench, settle: float, stop: asyncio.Event, act: Activity) -> None:
    """The runtime's Trickle (isrsync/site/background.py), its rounds timed; stops on ``stop``."""
    work = Trickle(b.disk, b.session, settle=settle, rate=TRICKLE_RATE)
    period = min(5.0, settle)
    cap = max(1, int(TRICKLE_RATE * period // CH))
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), period)
        if stop.is_set():
            return
        todo = work.settled(time.monotonic())
        if todo:
            t0 = time.perf_counter()
            before = len(b.session.staged_tags)
            await b.session.upload_settled(todo[:cap])
            act.upload_seconds.append(time.perf_counter() - t0)
            act.uploads += 1
            act.uploaded_chunks += len(b.session.staged_tags) - before


class Writer:
    """The guest writing: a qemu-io process (its own NBD connection) fed commands on stdin."""

    def __init__(self, b: Bench, mibps: float, seed: int) -> None:
        self.b = b
        self.every = WRITE_SIZE / (mibps * MIB)
        self.rng = random.Random(seed)
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task | None = None
        self.sent = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", self.b.uri, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        self.task = asyncio.create_task(self._feed())

    async def _feed(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        w = self.b.layout.write
        lo, hi = w.start * CH, w.stop * CH - WRITE_SIZE
        nxt = time.perf_counter()
        while True:
            off = self.rng.randrange(lo // 4096, hi // 4096) * 4096
            line = f"write -q -s {self.b.datafile} {off} {WRITE_SIZE}\n"
            self.sent += 1
            if self.sent % 10 == 0:
                line += "flush\n"
            self.proc.stdin.write(line.encode())
            await self.proc.stdin.drain()
            nxt += self.every
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.proc is None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), 30)
        except (TimeoutError, ConnectionError, BrokenPipeError):
            pass
        finally:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        err = (await self.proc.stderr.read()).decode(errors="replace") if self.proc.stderr else ""
        if self.proc.returncode not in (0, None) or "failed" in err:
            raise RuntimeError(f"the writing qemu-io failed (rc={self.proc.returncode}): {err[-1000:]}")


# -- the reads ----------------------------------------------------------------------------


async def read_run(b: Bench, rng: random.Random) -> tuple[list[float], list[float]]:
    """One qemu-io process: random 4 KiB reads over the rand region, then 1 MiB sequential over seq."""
    lay = b.layout
    chunks = list(lay.rand)
    rng.shuffle(chunks)
    cmds: list[str] = []
    for c in chunks:
        cmds += ["-c", f"read -C {c * CH + rng.randrange(CH // 4096) * 4096} 4096"]
    nrand = len(cmds) // 2
    for off in range(lay.seq.start * CH, lay.seq.stop * CH, MIB):
        cmds += ["-c", f"read -C {off} {MIB}"]
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", "-r", *cmds, b.uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 300)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    lat = []
    for line in out.decode().splitlines():
        f = line.split(",")
        if len(f) == 5 and f[1] == "1":
            lat.append(1.0 / float(f[4]))  # ops/sec of one op: its latency
    if proc.returncode or len(lat) != len(cmds) // 2:
        raise RuntimeError(f"qemu-io read failed (rc={proc.returncode}, {len(lat)} of {len(cmds) // 2} reads): "
                           f"{err.decode(errors='replace')[-1500:]}")
    return lat[:nrand], lat[nrand:]


# -- one condition --------------------------------------------------------------------------


@dataclass
class Run:
    condition: str
    rand: list[float]
    seq: list[float]
    stalls: list[float]
    window: tuple[float, float]
    act: Activity
    server_bytes: int
    seconds: float


async def run_condition(b: Bench, cond: str, args: argparse.Namespace, ticker: Ticker, rng: random.Random, seed: int) -> Run:
    stop = asyncio.Event()
    act = Activity()
    tasks: list[asyncio.Task] = []
    writer: Writer | None = None
    if cond != IDLE:
        await forget_cold(b)  # the hoard starts with everything to fetch
    # Every read decodes from the site cache (see the docstring). Nothing in the ramp
    # touches the read regions, so this may happen before the window opens.
    b.disk._hot.clear()
    server = b.chain.stats()["server"]
    bytes0, writes0 = server.bytes, b.disk.stats.writes
    t0 = time.perf_counter()
    try:
        if cond != IDLE:
            tasks.append(asyncio.create_task(hoard(b, args.hoard_pause, stop, act)))
        if cond == TRICKLE:
            writer = Writer(b, args.write_mibps, seed)
            await writer.start()
            tasks.append(asyncio.create_task(trickle(b, args.settle, stop, act)))
        await asyncio.sleep(RAMP)
        rand, seq = await read_run(b, rng)
        await asyncio.sleep(max(0.0, t0 + args.window - time.perf_counter()))
        t1 = time.perf_counter()
    finally:
        stop.set()
        if writer is not None:
            await writer.stop()
        for t in tasks:
            await t  # they stop at their next step; an error in one is an error here
    act.guest_writes = b.disk.stats.writes - writes0
    return Run(cond, rand, seq, ticker.stalls(t0, t1), (t0, t1), act, server.bytes - bytes0, t1 - t0)


# -- the report ---------------------------------------------------------------------------


METRICS = [
    # key, header, unit scale, better when higher
    ("r50", "4K p50 ms", 1e3, False),
    ("r99", "4K p99 ms", 1e3, False),
    ("iops", "4K IOPS", 1, True),
    ("s50", "1M p50 ms", 1e3, False),
    ("s99", "1M p99 ms", 1e3, False),
    ("mibps", "1M MiB/s", 1, True),
    ("st50", "stall p50 ms", 1e3, False),
    ("st99", "stall p99 ms", 1e3, False),
    ("stmax", "stall max ms", 1e3, False),
]


def figures(r: Run) -> dict[str, float]:
    return {
        "r50": pct(r.rand, 50), "r99": pct(r.rand, 99), "iops": len(r.rand) / sum(r.rand),
        "s50": pct(r.seq, 50), "s99": pct(r.seq, 99), "mibps": len(r.seq) / sum(r.seq),
        "st50": pct(r.stalls, 50), "st99": pct(r.stalls, 99), "stmax": max(r.stalls, default=float("nan")),
    }


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(cells))
    return "\n".join([line(headers), line(["-" * x for x in w]), *map(line, rows)])


def report(runs: list[Run], samples: list[Sample], args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    by: dict[str, list[Run]] = {c: [r for r in runs if r.condition == c] for c in CONDITIONS}
    figs = {c: {k: med([figures(r)[k] for r in rs]) for k, *_ in METRICS} for c, rs in by.items()}
    idle = figs[IDLE]
    n = len(by[IDLE])
    lay = b.layout
    print()
    print(f"NBD reads from a separate qemu-io process, QD 1, medians of {n} rounds; each round: "
          f"{len(lay.rand)} random 4 KiB reads (one per chunk) + {len(lay.seq) * CH // MIB} x 1 MiB sequential, "
          f"all from the site cache (RAM cache of decoded chunks emptied first).")
    print(f"Loop stall = lateness of a loop.call_later({TICK}) wake-up, over each {args.window:.0f} s window.")
    print()
    rows = []
    for c in CONDITIONS:
        rows.append([c, *(_fmt(figs[c][k] * scale) for k, _, scale, _ in METRICS)])
    for c in CONDITIONS[1:]:
        rows.append([f"{c} / idle", *(_fmt(figs[c][k] / idle[k]) if idle[k] else "-" for k, *_ in METRICS)])
    print(table(["condition", *(h for _, h, _, _ in METRICS)], rows))

    print()
    print("Background work in each window (medians per window):")
    brow = []
    for c in CONDITIONS:
        rs = by[c]
        brow.append([
            c,
            _fmt(med([r.server_bytes / MIB / r.seconds for r in rs])),
            _fmt(med([r.act.hoard_passes for r in rs])),
            _fmt(med([r.act.guest_writes * WRITE_SIZE / MIB / r.seconds for r in rs])),
            _fmt(med([r.act.uploads for r in rs])),
            _fmt(med([r.act.uploaded_chunks * CH / MIB for r in rs])),
            _fmt(med([max(r.act.upload_seconds, default=float("nan")) for r in rs]) * 1e3),
        ])
    print(table(["condition", "fetched MiB/s", "hoard passes", "guest writes MiB/s", "trickle uploads",
                 "uploaded MiB", "slowest upload ms"], brow))

    worst = {c: max((max(r.stalls, default=0.0) for r in by[c]), default=0.0) for c in CONDITIONS}
    print()
    print("Worst single stall in any round: " + ", ".join(f"{c} {worst[c] * 1e3:.1f} ms" for c in CONDITIONS))
    print()
    if not samples:
        print(f"Loop blocked > {args.blocked_ms:.0f} ms: never (the watchdog took no sample).")
    else:
        print(f"Where the loop thread was while blocked > {args.blocked_ms:.0f} ms "
              f"(watchdog samples every 2 ms; samples x 2 ms ~ time blocked there):")
        cond_of = lambda t: next((r.condition for r in runs if r.window[0] <= t <= r.window[1]), "between runs")
        count: Counter[tuple[str, str, str]] = Counter()
        for s in samples:
            inner, chain = where(s.stack)
            count[(cond_of(s.t), inner, chain)] += 1
        rows = [[str(k), cond, inner, chain] for (cond, inner, chain), k in count.most_common(args.top)]
        print(table(["samples", "condition", "innermost frame", "isrsync frames (innermost first)"], rows))
    return {
        "rounds": n, "mib": args.mib, "window_s": args.window, "blocked_threshold_ms": args.blocked_ms,
        "figures": figs,
        "ratios_to_idle": {c: {k: figs[c][k] / idle[k] if idle[k] else None for k, *_ in METRICS}
                           for c in CONDITIONS[1:]},
        "worst_stall_s": worst,
        "blocked_samples": [
            {"t": s.t, "lag_s": s.lag, "where": where(s.stack)} for s in samples
        ][:500],
    }


# -- main ---------------------------------------------------------------------------------


async def amain(args: argparse.Namespace, work: Path, servers: list[LiveServer]) -> dict[str, Any]:
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else (lambda s: None)
    loop = asyncio.get_running_loop()
    # SIGTERM (and SIGINT, which asyncio.run already handles) cancel the run: clean-up still happens.
    me = asyncio.current_task()
    assert me is not None
    loop.add_signal_handler(signal.SIGTERM, me.cancel)
    ticker = Ticker()
    ticker.start(loop)
    watchdog = Watchdog(ticker, args.blocked_ms / 1e3)
    b: Bench | None = None
    try:
        b = await set_up(work, args.mib, say, servers)
        watchdog.start()
        rng = random.Random(args.seed)
        runs: list[Run] = []
        t_start = time.perf_counter()
        for rnd in range(args.rounds + 1):
            order = CONDITIONS[rnd % 3:] + CONDITIONS[: rnd % 3]  # each condition goes first in turn
            for cond in order:
                r = await run_condition(b, cond, args, ticker, rng, seed=args.seed * 1000 + rnd)
                f = figures(r)
                say(f"{'warm-up' if rnd == 0 else f'round {rnd}/{args.rounds}'} {cond:>13}: "
                    f"4K p50 {f['r50'] * 1e3:.3f} ms, 1M {f['mibps']:.0f} MiB/s, "
                    f"stall p99 {f['st99'] * 1e3:.2f} max {f['stmax'] * 1e3:.1f} ms, "
                    f"fetched {r.server_bytes / MIB:.0f} MiB, writes {r.act.guest_writes}, "
                    f"uploads {r.act.uploads}")
                if rnd:
                    runs.append(r)
        say(f"measured in {time.perf_counter() - t_start:.0f} s")
        watchdog.halt()
        samples = [s for s in watchdog.samples if any(r.window[0] <= s.t <= r.window[1] for r in runs)]
        return report(runs, samples, args, b)
    finally:
        if watchdog.is_alive():
            watchdog.halt()
        ticker.stop()
        await tear_down(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="disk size in MiB (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up (default 5)")
    ap.add_argument("--window", type=float, default=4.0, help="seconds each condition's background runs (default 4)")
    ap.add_argument("--hoard-pause", type=float, default=0.05, help="pause between hoard batches (default 0.05 s)")
    ap.add_argument("--settle", type=float, default=1.0, help="trickle settle time (default 1 s; 30 s in a resume)")
    ap.add_argument("--write-mibps", type=float, default=3.0, help="guest write rate in condition (c) (default 3)")
    ap.add_argument("--blocked-ms", type=float, default=20.0, help="watchdog: sample the loop when this late (20)")
    ap.add_argument("--top", type=int, default=12, help="blocking sites listed (default 12)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args()
    for tool in ("qemu-io",):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required (apt-get install qemu-utils)")
    # A short path: the NBD socket's sun_path is 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="isr-nbdbg-", dir="/tmp"))
    servers: list[LiveServer] = []
    t = time.perf_counter()
    try:
        out = asyncio.run(amain(args, work, servers))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted")
    finally:
        for s in servers:
            s.stop()
            s.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n(total {time.perf_counter() - t:.0f} s)")
    if args.json:
        print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
