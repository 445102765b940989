"""Scale-out benchmark (issue 17): fronts over PostgreSQL and S3 beside the directory server.

What it measures, all in one run, on this machine
-------------------------------------------------
1. Front scaling. ``CLIENTS`` clients each own a parcel, hold its lock and
   commit small deltas (upload a 1-chunk pack, commit, read the manifest back)
   as fast as they can, spread round robin over the fronts; then the same
   clients download one ``--mib`` MiB pack over and over (whole, through
   ``HttpStore.get_pack``). Configurations: the single directory server
   (``--data``, SQLite, packs on disk: the embedded default and the rival) and
   1, 2 and 4 ``isrsync serve`` fronts sharing one PostgreSQL database and one
   S3 bucket (moto's standalone server on loopback), each front with a
   ``--data`` of its own. Each configuration runs ``--repeat`` times,
   interleaved; medians, and ratios to the directory server.

2. Commit latency against disk size on PostgreSQL and S3. benchmarks/server.py's
   fresh-disk parcels (real packs, 1/4/16 GiB, a fixed 82-chunk delta and a
   1 %-of-disk delta), through one front over PostgreSQL + S3 and through the
   directory server, both up at once. Each of ``--rounds`` rounds (after one
   warm-up round) takes the six (backend, disk) cells in a freshly shuffled
   order and commits one fixed delta in each, so the load the machine's other
   users bring falls on every cell alike; every ``PCT_EVERY`` rounds each cell
   also commits its 1 %-of-disk delta. The full keyring a client writes every
   ``DEFAULT_FULL_EVERY`` versions is committed untimed (its median is shown
   apart): it costs the disk by design. Per cell: p50 and min; per backend the
   16G/1G ratio of p50s with a 95 % bootstrap interval, and the ratio of mins.
   The target, as for the directory server: the fixed delta's p50 costs
   <= 1.3x more at 16 GiB than at 1 GiB.

3. A model of one organisation (``--users``, e.g. 1000,10000). That many users
   each with a parcel of one version live in the database; ``SITES`` simulated
   sites pick users at random and each does what a resume-then-suspend does to
   the server: acquire the lock, commit a new version (manifest only, as a
   suspend whose disk did not change), release; p50 and p99 of the acquire and
   the commit, through 2 fronts over PostgreSQL + S3, beside the directory
   server with the same population.

On 2 cores the clients, fronts, PostgreSQL and moto share the CPU: these
figures show cost per request and whether more fronts lose throughput, not
scaling across hosts. moto is a Python server and far slower than a real
object store; S3 download figures are a floor.

Run
---
    PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py                 # all three, defaults
    PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py --only fronts --seconds 8 --repeat 2
    PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py --only disk --rounds 60
    PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py --only org --users 1000,10000
    ... --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "pg"))
sys.path.insert(0, str(ROOT / "tests" / "server"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pgkit  # noqa: E402
from srvkit import Chain  # noqa: E402

from isrsync.server.repo import Repository  # noqa: E402
from isrsync.store.base import Holder  # noqa: E402
from isrsync.store.http import HttpStore  # noqa: E402

CLIENTS = 12
PER_CLIENT = 80
SITES = 32
COMMIT_TARGET = 1.3
FIXED = 82  # benchmarks/server.py's FIXED_DIRTY: 1 % of 1 GiB
PCT_EVERY = 4  # rounds between the 1 %-of-disk deltas (each is up to 1311 tags: slower)


class Deployment:
    """``n`` fronts: the directory server (n=1, no metadata) or fronts over PostgreSQL + S3."""

    def __init__(self, base: Path, label: str, n: int, shared: bool) -> None:
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.db = pgkit.FreshDb() if shared else None
        self.packs = pgkit.s3_url() if shared else None
        self.extra = ["--metadata", self.db.dsn, "--packs", self.packs] if self.db and self.packs else []
        self.datas = [base / f"{label}-front{i}" for i in range(n)]
        repo = Repository(self.datas[0], create=True, metadata=self.db.dsn if self.db else None,
                          packs=self.packs)
        self.repo = repo

    def add_users(self, names: list[str]) -> list[str]:
        return [self.repo.add_user(n) for n in names]

    def start(self) -> "Deployment":
        self.repo.close()
        for d in self.datas:
            p = subprocess.Popen([*pgkit.isrsync_cmd(), "serve", "--data", str(d), "--listen", "127.0.0.1:0",
                                  *self.extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            assert p.stdout is not None
            self.procs.append(p)
            self.urls.append(json.loads(p.stdout.readline())["listening"])
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        if self.db:
            self.db.close()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


# -- 1. front scaling ---------------------------------------------------------------------------------


async def fronts_once(base: Path, label: str, n: int, shared: bool, seconds: float, mib: int) -> dict:
    dep = Deployment(base, label, n, shared)
    (token,) = dep.add_users(["bench"])
    dep.start()
    stores = [HttpStore(dep.urls[i % n], token, retries=2, backoff=0.05, read_timeout=300) for i in range(CLIENTS)]
    work = base / f"{label}-work"
    try:
        pids, chains, locks = [], [], []
        for i, s in enumerate(stores):
            pid = uuid.uuid4()
            await s.create_parcel(pid, f"p{i}")
            pids.append(pid)
            chains.append(Chain(pid, disk_chunks=1024))
            locks.append(await s.acquire(pid, Holder(f"site-{i}", "h")))
        changes = [[chains[i].make_change(work / f"{i}-{k}", 1) for k in range(PER_CLIENT)] for i in range(CLIENTS)]
        commits = 0
        stop = time.monotonic() + seconds

        async def committer(i: int) -> None:
            nonlocal commits
            s, ch = stores[i], chains[i]
            for c in changes[i]:
                if time.monotonic() > stop:
                    return
                await s.put_pack(pids[i], c.pack_id, c.pack_path)
                req, _ = ch.request(c, locks[i].epoch, site=f"site-{i}")
                await s.commit(pids[i], req)
                (m,) = await s.get_manifests(pids[i], ch.version + 1, ch.version + 1)
                ch.landed(m)
                commits += 1

        t0 = time.monotonic()
        await asyncio.gather(*(committer(i) for i in range(CLIENTS)))
        commit_rate = commits / (time.monotonic() - t0)
        # One big pack (mib MiB of chunks), downloaded whole by every client, round robin over fronts.
        big = chains[0].make_change(work / "big", min(1024, mib * 8))
        await stores[0].put_pack(pids[0], big.pack_id, big.pack_path)
        req, _ = chains[0].request(big, locks[0].epoch, site="site-0")
        await stores[0].commit(pids[0], req)
        got = 0
        stop = time.monotonic() + seconds
        owner = stores[:1] + [HttpStore(dep.urls[i % n], token, retries=2, backoff=0.05, read_timeout=300)
                              for i in range(1, CLIENTS)]

        async def downloader(i: int) -> None:
            nonlocal got
            while time.monotonic() < stop:
                got += len(await owner[i].get_pack(pids[0], big.pack_id))

        t0 = time.monotonic()
        await asyncio.gather(*(downloader(i) for i in range(CLIENTS)))
        dl = got / (time.monotonic() - t0) / 1e6
        for s in owner[1:]:
            await s.close()
        return {"config": label, "fronts": n, "commits_per_s": commit_rate, "download_MBps": dl,
                "pack_MB": big.pack_size / 1e6}
    finally:
        for s in stores:
            await s.close()
        dep.stop()
        shutil.rmtree(work, ignore_errors=True)


async def bench_fronts(base: Path, seconds: float, repeat: int, mib: int, say) -> dict:
    configs = [("directory", 1, False), ("pg+s3 x1", 1, True), ("pg+s3 x2", 2, True), ("pg+s3 x4", 4, True)]
    samples: dict[str, list[dict]] = {c[0]: [] for c in configs}
    for r in range(repeat):
        for label, n, shared in configs[r % len(configs):] + configs[: r % len(configs)]:
            say(f"fronts: {label}, repeat {r + 1}/{repeat}")
            samples[label].append(await fronts_once(base / f"r{r}", label.replace(" ", "_").replace("+", ""),
                                                    n, shared, seconds, mib))
    med = statistics.median
    rows = []
    base_row = None
    for label, n, _ in configs:
        s = samples[label]
        row = {"config": label, "fronts": n, "commits_per_s": med(x["commits_per_s"] for x in s),
               "download_MBps": med(x["download_MBps"] for x in s), "runs": len(s)}
        base_row = base_row or row
        row["commits_ratio"] = row["commits_per_s"] / base_row["commits_per_s"]
        row["download_ratio"] = row["download_MBps"] / base_row["download_MBps"]
        rows.append(row)
    return {"rows": rows, "samples": samples}


# -- 2. commit latency against disk size --------------------------------------------------------------


def _ratio_interval(base: list[float], other: list[float], rng: random.Random, n: int = 2000) -> tuple[float, float]:
    """A 95 % bootstrap interval of median(other) / median(base): how far the ratio
    could move on this machine's noise alone (resample each size's samples)."""
    med = statistics.median
    rs = sorted(med(rng.choices(other, k=len(other))) / med(rng.choices(base, k=len(base))) for _ in range(n))
    return rs[int(0.025 * n)], rs[int(0.975 * n) - 1]


async def bench_disk(base: Path, rounds: int, say) -> dict:
    """Both backends up at once; every round, each (backend, disk) in a shuffled
    order commits one fixed delta, so a burst of load from the machine's other
    users falls on all six cells alike instead of on whichever ran then."""
    import server as dirbench  # benchmarks/server.py: its DiskParcel and experiment

    backends = (("directory", False), ("pg+s3", True))
    deps: list[Deployment] = []
    stores: list[HttpStore] = []
    cells: list[tuple[str, Any]] = []  # (backend, DiskParcel)
    fixed: dict[tuple[str, int], list[float]] = {}
    pct: dict[tuple[str, int], list[float]] = {}
    full: dict[tuple[str, int], list[float]] = {}
    try:
        for label, shared in backends:
            dep = Deployment(base, f"disk-{label.replace('+', '')}", 1, shared)
            deps.append(dep)
            (token,) = dep.add_users([dirbench.USER])
            dep.start()
            store = HttpStore(dep.urls[0], token, read_timeout=600)
            stores.append(store)
            rng = random.Random(2024)
            for size in dirbench.SIZES:
                say(f"disk {label}: preparing {size >> 30} GiB")
                d = dirbench.DiskParcel(store, size, base, rng, written=False)
                d.work = base / f"{label.replace('+', '')}-fresh-{size >> 30}g"
                await d.prepare()
                await d.commit_v1()
                cells.append((label, d))
                fixed[label, size], pct[label, size], full[label, size] = [], [], []
        order = random.Random(17)
        for r in range(rounds + 1):  # round 0 warms up (connections, caches) and is not counted
            if r % 10 == 0:
                say(f"disk: round {r}/{rounds}" + (" (warm-up)" if r == 0 else ""))
            order.shuffle(cells)
            for label, d in cells:
                if d.full_due():  # untimed here: the periodic full keyring is not the delta under test
                    full[label, d.size].append(await d.commit_full())
                dt, _ = await d.commit_delta(range(dirbench.FIXED_DIRTY))
                if r:
                    fixed[label, d.size].append(dt)
            if r and (r - 1) % PCT_EVERY == 0:
                for label, d in cells:
                    if d.full_due():
                        full[label, d.size].append(await d.commit_full())
                    dt, _ = await d.commit_delta(range(d.dirty))
                    pct[label, d.size].append(dt)
    finally:
        for st in stores:
            await st.close()
        for dep in deps:
            dep.stop()
    med = statistics.median
    boot = random.Random(5)
    out: dict[str, list[dict]] = {}
    for label, _ in backends:
        rows = []
        for size in dirbench.SIZES:
            f, p = fixed[label, size], pct[label, size]
            dirty = round(dirbench.chunk_count(size) * 0.01)
            rows.append({"disk_gib": size >> 30, "dirty_pct_chunks": dirty,
                         "fixed_ms": med(f) * 1e3, "fixed_min_ms": min(f) * 1e3, "n_fixed": len(f),
                         "pct_ms": med(p) * 1e3, "pct_us_per_dirty": med(p) * 1e6 / dirty, "n_pct": len(p),
                         "full_keyring_ms": med(full[label, size]) * 1e3 if full[label, size] else None,
                         "fixed_samples_ms": [x * 1e3 for x in f]})
        one = fixed[label, dirbench.SIZES[0]]
        for row, size in zip(rows, dirbench.SIZES):
            row["fixed_ratio_to_1g"] = row["fixed_ms"] / rows[0]["fixed_ms"]
            row["fixed_ratio_interval"] = _ratio_interval(one, fixed[label, size], boot)
            row["min_ratio_to_1g"] = row["fixed_min_ms"] / rows[0]["fixed_min_ms"]
            row["per_dirty_ratio_to_1g"] = row["pct_us_per_dirty"] / rows[0]["pct_us_per_dirty"]
        out[label] = rows
    for a, b in zip(out["pg+s3"], out["directory"]):
        a["fixed_vs_directory"] = a["fixed_ms"] / b["fixed_ms"]
    return out


# -- 3. a model of one organisation -------------------------------------------------------------------


async def org_once(base: Path, users: int, shared: bool, seconds: float, say) -> dict:
    label = f"org{users}-{'pgs3' if shared else 'dir'}"
    dep = Deployment(base, label, 2 if shared else 1, shared)
    say(f"org {users} users ({'pg+s3, 2 fronts' if shared else 'directory'}): creating the population")
    names = [f"u{i:05d}" for i in range(users)]
    tokens = dep.add_users(names)
    parcels = []
    for name in names:  # one parcel each, straight into the repository (no HTTP: setup, not measured)
        pid = uuid.uuid4()
        dep.repo.create_parcel(name, pid, "work", "")
        parcels.append(pid)
    dep.start()
    acq: list[float] = []
    com: list[float] = []
    rnd = random.Random(users)
    busy: set[int] = set()
    stop = time.monotonic() + seconds

    stores: dict[int, HttpStore] = {}
    chains: dict[int, Chain] = {}

    async def one_site(k: int) -> None:
        while time.monotonic() < stop:
            u = rnd.randrange(users)
            if u in busy:
                continue
            busy.add(u)
            try:
                s = stores.get(u) or stores.setdefault(u, HttpStore(dep.urls[u % len(dep.urls)], tokens[u],
                                                                    retries=2, backoff=0.05))
                ch = chains.setdefault(u, Chain(parcels[u], disk_chunks=8))
                t0 = time.perf_counter()
                lock = await s.acquire(parcels[u], Holder(f"site-{k}", "h"))
                t1 = time.perf_counter()
                req, _ = ch.request(None, lock.epoch, site=f"site-{k}", release=True)
                await s.commit(parcels[u], req)
                t2 = time.perf_counter()
                (m,) = await s.get_manifests(parcels[u], ch.version + 1, ch.version + 1)
                ch.landed(m)
                acq.append(t1 - t0)
                com.append(t2 - t1)
            finally:
                busy.discard(u)

    try:
        say(f"org {users} users: {SITES} sites for {seconds:.0f} s")
        t0 = time.monotonic()
        await asyncio.gather(*(one_site(k) for k in range(SITES)))
        elapsed = time.monotonic() - t0
    finally:
        for s in stores.values():
            await s.close()
        dep.stop()
    return {"users": users, "config": "pg+s3 x2" if shared else "directory", "cycles_per_s": len(com) / elapsed,
            "acquire_p50_ms": _pct(acq, .5) * 1e3, "acquire_p99_ms": _pct(acq, .99) * 1e3,
            "commit_p50_ms": _pct(com, .5) * 1e3, "commit_p99_ms": _pct(com, .99) * 1e3, "cycles": len(com)}


async def bench_org(base: Path, populations: list[int], seconds: float, say) -> list[dict]:
    rows = []
    for users in populations:
        for shared in (False, True):
            rows.append(await org_once(base, users, shared, seconds, say))
    return rows


# -- output -------------------------------------------------------------------------------------------


def print_tables(console: Console, res: dict[str, Any]) -> None:
    if "fronts" in res:
        t = Table(title="front scaling (medians; ratio = to the directory server)")
        for c in ("config", "fronts", "commits/s", "ratio", "download MB/s", "ratio"):
            t.add_column(c, justify="right")
        for r in res["fronts"]["rows"]:
            t.add_row(r["config"], str(r["fronts"]), f"{r['commits_per_s']:.1f}", f"{r['commits_ratio']:.2f}",
                      f"{r['download_MBps']:.0f}", f"{r['download_ratio']:.2f}")
        console.print(t)
    if "disk" in res:
        t = Table(title=f"commit latency against disk size, fresh disk (target: fixed-delta p50 16G/1G <= "
                        f"{COMMIT_TARGET}); sizes and backends interleaved, shuffled every round")
        for c in ("backend", "disk", "n", f"{FIXED}: p50 ms", "min ms", "p50/1G [95 %]", "min/1G",
                  "1 %: chunks", "p50 ms", "us/chunk", "vs dir"):
            t.add_column(c, justify="right")
        for label, rows in res["disk"].items():
            for r in rows:
                lo, hi = r["fixed_ratio_interval"]
                t.add_row(label, f"{r['disk_gib']} GiB", str(r["n_fixed"]), f"{r['fixed_ms']:.1f}",
                          f"{r['fixed_min_ms']:.1f}", f"{r['fixed_ratio_to_1g']:.2f} [{lo:.2f}-{hi:.2f}]",
                          f"{r['min_ratio_to_1g']:.2f}", str(r["dirty_pct_chunks"]), f"{r['pct_ms']:.1f}",
                          f"{r['pct_us_per_dirty']:.0f}",
                          f"{r['fixed_vs_directory']:.2f}" if "fixed_vs_directory" in r else "")
        console.print(t)
        for label, rows in res["disk"].items():
            r = rows[-1]
            lo, hi = r["fixed_ratio_interval"]
            verdict = ("met" if hi <= COMMIT_TARGET else "NOT met" if lo > COMMIT_TARGET
                       else "not decided at this noise (the interval straddles it)")
            console.print(f"{label}: fixed delta 16G/1G = {r['fixed_ratio_to_1g']:.2f} (p50; 95 % interval "
                          f"{lo:.2f}-{hi:.2f}; min {r['min_ratio_to_1g']:.2f}): target <= {COMMIT_TARGET} {verdict}")
        console.print("[dim]p50: the median commit (client encode + HTTP + server) of each cell. min: the "
                      "fastest, the cost with the least interference from the machine's other work (noise "
                      "here only ever adds time). The interval resamples each cell's commits: the range "
                      "the p50 ratio could take from this machine's noise alone.[/]")
    if "org" in res:
        t = Table(title=f"organisation model: {SITES} sites, acquire + commit + release cycles")
        for c in ("users", "config", "cycles/s", "acquire p50", "acquire p99", "commit p50", "commit p99"):
            t.add_column(c, justify="right")
        for r in res["org"]:
            t.add_row(str(r["users"]), r["config"], f"{r['cycles_per_s']:.1f}", f"{r['acquire_p50_ms']:.1f} ms",
                      f"{r['acquire_p99_ms']:.1f} ms", f"{r['commit_p50_ms']:.1f} ms", f"{r['commit_p99_ms']:.1f} ms")
        console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["fronts", "disk", "org"], action="append",
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each timed phase")
    ap.add_argument("--repeat", type=int, default=2, help="front-scaling repeats; medians are reported")
    ap.add_argument("--rounds", type=int, default=40,
                    help="commit-latency rounds: one fixed delta per disk and backend each, interleaved")
    ap.add_argument("--mib", type=int, default=32, help="size of the downloaded pack in MiB of chunks")
    ap.add_argument("--users", default="1000,10000", help="populations of the organisation model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    parts = args.only or ["fronts", "disk", "org"]
    console = Console(stderr=args.json, width=max(Console().width, 130))

    def say(msg: str) -> None:
        console.print(f"[dim]{msg}[/]")

    res: dict[str, Any] = {"meta": {"cpu_count": os.cpu_count(), "load_before": os.getloadavg()[0],
                                    "seconds": args.seconds, "repeat": args.repeat, "rounds": args.rounds}}
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="isrsync-scaleout-"))
    try:
        if "fronts" in parts:
            res["fronts"] = asyncio.run(bench_fronts(base, args.seconds, args.repeat, args.mib, say))
        if "disk" in parts:
            res["disk"] = asyncio.run(bench_disk(base, args.rounds, say))
        if "org" in parts:
            res["org"] = asyncio.run(bench_org(base, [int(x) for x in args.users.split(",")], args.seconds, say))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    res["meta"]["load_after"] = os.getloadavg()[0]
    if args.json:
        res.get("fronts", {}).pop("samples", None)
        print(json.dumps(res, indent=2))
    else:
        print_tables(console, res)
        console.print(f"[dim]elapsed {res['meta']['elapsed_s']} s, load {res['meta']['load_before']:.1f} → "
                      f"{res['meta']['load_after']:.1f}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
