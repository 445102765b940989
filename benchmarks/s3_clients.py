"""obstore (isrsync's S3 client) against aiobotocore, the alternative issue 17 names.

Same S3 server (moto's standalone server on loopback, started here from the
project's venv), same bucket, same objects, interleaved repeats; medians and
the ratio aiobotocore / obstore (above 1: aiobotocore is faster).

    * put: ``--objects`` objects of ``--mib`` MiB each (a pack being placed);
    * get: the same objects read whole (check, compaction, export);
    * range: ``--ranges`` reads of 128 KiB at random offsets of one object,
      8 at a time (demand misses and web seeds).

obstore runs as isrsync runs it: its synchronous calls on worker threads
(``asyncio.to_thread``); its async API is measured too. aiobotocore is not a
dependency of isrsync: run this with a venv that has it, e.g.

    python3 -m venv /tmp/s3venv && /tmp/s3venv/bin/pip install aiobotocore obstore
    /tmp/s3venv/bin/python benchmarks/s3_clients.py [--json]

moto is a Python server, far slower than MinIO or AWS, so it bounds every
client; the ratios say which client costs less per request on top of that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PY = os.environ.get("ISRSYNC_PY", str(ROOT.parent / "main" / ".venv" / "bin" / "python"))
PIECE = 128 << 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    p = subprocess.Popen([PROJECT_PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return p, url
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise SystemExit(f"moto did not start with {PROJECT_PY}")


class Obstore:
    name = "obstore (sync, threads)"

    def __init__(self, endpoint: str, bucket: str) -> None:
        from obstore.store import S3Store

        self.s = S3Store(bucket, config={"endpoint": endpoint, "allow_http": True, "region": "us-east-1"})

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        await asyncio.to_thread(obstore.put, self.s, key, data)

    async def get(self, key: str) -> int:
        import obstore

        return await asyncio.to_thread(lambda: len(obstore.get(self.s, key).bytes()))

    async def range(self, key: str, off: int, n: int) -> int:
        import obstore

        return len(await asyncio.to_thread(obstore.get_range, self.s, key, start=off, length=n))

    async def close(self) -> None:
        pass


class ObstoreAsync(Obstore):
    name = "obstore (async)"

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        await obstore.put_async(self.s, key, data)

    async def get(self, key: str) -> int:
        import obstore

        return len(await (await obstore.get_async(self.s, key)).bytes_async())

    async def range(self, key: str, off: int, n: int) -> int:
        import obstore

        return len(await obstore.get_range_async(self.s, key, start=off, length=n))


class Aiobotocore:
    name = "aiobotocore"

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint, self.bucket = endpoint, bucket
        self.c = None

    async def open(self) -> None:
        from aiobotocore.session import get_session

        self._cm = get_session().create_client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        self.c = await self._cm.__aenter__()

    async def put(self, key: str, data: bytes) -> None:
        await self.c.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def get(self, key: str) -> int:
        r = await self.c.get_object(Bucket=self.bucket, Key=key)
        async with r["Body"] as body:
            return len(await body.read())

    async def range(self, key: str, off: int, n: int) -> int:
        r = await self.c.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")
        async with r["Body"] as body:
            return len(await body.read())

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)


async def one(client, tag: str, objects: int, mib: int, ranges: int, blob: bytes) -> dict:
    keys = [f"{tag}/obj{i}" for i in range(objects)]
    t = time.perf_counter()
    await asyncio.gather(*(client.put(k, blob) for k in keys))
    put_s = time.perf_counter() - t
    t = time.perf_counter()
    got = sum(await asyncio.gather(*(client.get(k) for k in keys)))
    get_s = time.perf_counter() - t
    assert got == objects * len(blob)
    rnd = random.Random(7)
    offs = [rnd.randrange(0, len(blob) - PIECE) for _ in range(ranges)]
    sem = asyncio.Semaphore(8)

    async def rd(o: int) -> float:
        async with sem:
            t0 = time.perf_counter()
            assert await client.range(keys[0], o, PIECE) == PIECE
            return time.perf_counter() - t0

    t = time.perf_counter()
    lat = await asyncio.gather(*(rd(o) for o in offs))
    range_s = time.perf_counter() - t
    total = objects * len(blob) / 1e6
    return {"put_MBps": total / put_s, "get_MBps": total / get_s, "range_per_s": ranges / range_s,
            "range_p50_ms": statistics.median(lat) * 1e3}


async def main_async(args) -> dict:
    moto, endpoint = start_moto()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        boto = Aiobotocore(endpoint, "bench")
        await boto.open()
        await boto.c.create_bucket(Bucket="bench")
        clients = [Obstore(endpoint, "bench"), ObstoreAsync(endpoint, "bench"), boto]
        blob = os.urandom(args.mib << 20)
        samples: dict[str, list[dict]] = {c.name: [] for c in clients}
        for r in range(args.repeat + 1):  # round 0 warms up
            for c in clients[r % 3:] + clients[: r % 3]:
                res = await one(c, f"r{r}-{c.name[:8]}", args.objects, args.mib, args.ranges, blob)
                if r:
                    samples[c.name].append(res)
        await boto.close()
    finally:
        moto.kill()
        moto.wait()
    rows = {}
    for name, s in samples.items():
        rows[name] = {k: statistics.median(x[k] for x in s) for k in s[0]}
    base = rows["obstore (sync, threads)"]
    ratios = {k: rows["aiobotocore"][k] / base[k] for k in base}
    return {"rows": rows, "aiobotocore_over_obstore": ratios,
            "meta": {"objects": args.objects, "mib": args.mib, "ranges": args.ranges, "repeat": args.repeat}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--ranges", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'client':26} {'put MB/s':>9} {'get MB/s':>9} {'ranges/s':>9} {'range p50':>10}")
    for name, r in res["rows"].items():
        print(f"{name:26} {r['put_MBps']:9.1f} {r['get_MBps']:9.1f} {r['range_per_s']:9.1f} "
              f"{r['range_p50_ms']:8.1f} ms")
    q = res["aiobotocore_over_obstore"]
    print(f"{'aiobotocore / obstore':26} {q['put_MBps']:9.2f} {q['get_MBps']:9.2f} {q['range_per_s']:9.2f} "
          f"{q['range_p50_ms']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
