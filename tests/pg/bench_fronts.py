"""Front scaling, first figures: commits/s and lock round trips/s through 1, 2
and 3 `isrsync serve` fronts over one PostgreSQL database, beside one front
over SQLite (the embedded default), in the same run.

Not a test (no test_ prefix); run by hand:

    PYTHONPATH=. .venv/bin/python tests/pg/bench_fronts.py [SECONDS]

CLIENTS clients each own a parcel, hold its lock and commit small deltas (one
4-chunk pack each) as fast as they can, spread round robin over the fronts.
Packs are made before the clock starts, so the figure is the server's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
import pgkit  # noqa: E402
from srvkit import Chain  # noqa: E402

from isrsync.server.repo import Repository  # noqa: E402
from isrsync.store.base import Holder  # noqa: E402
from isrsync.store.http import HttpStore  # noqa: E402

CLIENTS = 12
PER_CLIENT = 40


def start_front(data: Path, metadata: str | None) -> tuple[subprocess.Popen, str]:
    extra = ["--metadata", metadata] if metadata else []
    p = subprocess.Popen([*pgkit.isrsync_cmd(), "serve", "--data", str(data), "--listen", "127.0.0.1:0", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert p.stdout is not None
    return p, json.loads(p.stdout.readline())["listening"]


async def run(label: str, urls: list[str], token: str, seconds: float, work: Path) -> dict:
    stores = [HttpStore(urls[i % len(urls)], token, retries=2, backoff=0.05) for i in range(CLIENTS)]
    chains, locks, pids = [], [], []
    for i, s in enumerate(stores):
        pid = uuid.uuid4()
        await s.create_parcel(pid, f"{label}-{i}")
        pids.append(pid)
        chains.append(Chain(pid, disk_chunks=64))
        locks.append(await s.acquire(pid, Holder(f"site-{i}", "h")))
    # Packs first (outside the clock).
    changes = [[chains[i].make_change(work / f"{label}-{i}-{k}", 4) for k in range(PER_CLIENT)]
               for i in range(CLIENTS)]
    commits = 0
    lat: list[float] = []
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal commits
        s, ch = stores[i], chains[i]
        for c in changes[i]:
            if time.monotonic() > stop:
                return
            t0 = time.perf_counter()
            await s.put_pack(pids[i], c.pack_id, c.pack_path)
            req, _ = ch.request(c, locks[i].epoch, site=f"site-{i}")
            await s.commit(pids[i], req)
            lat.append(time.perf_counter() - t0)
            (m,) = await s.get_manifests(pids[i], ch.version + 1, ch.version + 1)
            ch.landed(m)
            commits += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    elapsed = time.monotonic() - t0
    # Lock round trips: release + acquire pairs.
    rounds = 0
    stop2 = time.monotonic() + seconds / 2

    async def locker(i: int) -> None:
        nonlocal rounds
        st = locks[i]
        while time.monotonic() < stop2:
            await stores[i].release(pids[i], st.epoch)
            st = await stores[i].acquire(pids[i], Holder(f"site-{i}", "h"))
            rounds += 1

    t1 = time.monotonic()
    await asyncio.gather(*(locker(i) for i in range(CLIENTS)))
    lock_elapsed = time.monotonic() - t1
    for s in stores:
        await s.close()
    lat.sort()
    return {"backend": label, "fronts": len(urls), "commits_per_s": round(commits / elapsed, 1),
            "commit_p50_ms": round(lat[len(lat) // 2] * 1000, 1), "commit_p99_ms": round(lat[int(len(lat) * .99)] * 1000, 1),
            "lock_roundtrips_per_s": round(rounds / lock_elapsed, 1)}


async def main(seconds: float) -> None:
    results = []
    base = Path(tempfile.mkdtemp(prefix="isrsync-bench-"))
    configs = [("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3)]
    for label, n in configs:
        data = base / f"{label}-{n}"
        dsn = None
        db = None
        if label == "postgresql":
            db = pgkit.FreshDb()
            dsn = db.dsn
        repo = Repository(data, create=True, metadata=dsn)
        token = repo.add_user("bench")
        repo.close()
        procs = [start_front(data, dsn) for _ in range(n)]
        try:
            r = await run(f"{label}{n}", [u for _, u in procs], token, seconds, base / f"w-{label}-{n}")
        finally:
            for p, _ in procs:
                p.kill()
                p.wait()
            if db:
                db.close()
        print(json.dumps(r), flush=True)
        results.append(r)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0))
