"""NBD server throughput at QEMU's queue depth: is anything in the server holding QEMU back?

QEMU's NBD client keeps at most 16 requests in flight per connection
(``MAX_NBD_REQUESTS`` in QEMU's block/nbd.c). This script drives isrsync's
``NbdServer`` with QEMU's own NBD client, ``qemu-img bench``, at that depth and
at depth 1, so a bound on requests in flight or on queued reply bytes that
throttled a real guest would show here as a drop at depth 16.

Set-up
------
* A ``--mib`` MiB file of random bytes in a temporary directory (in the page
  cache after it is written), served by ``NbdServer(RawFileBackend(file))`` on
  a unix socket, in this process's event loop (as a resume serves the disk).
  The raw backend makes the NBD server itself the bottleneck.
* A second export of the same file through a backend that answers every read
  after ``--latency-ms`` (2 ms by default) on the loop (as a demand miss or a
  decode on a worker thread would): there the throughput is set by how many
  requests the server keeps in flight, which is what a cap could cut.

Tests (``qemu-img bench -f raw -c COUNT -s SIZE -d DEPTH [-w] nbd+unix:///disk?socket=SOCK``;
reads unless ``w``), per round in turns:

* ``r4k``:  4 KiB reads, QD 16 and QD 1;
* ``r64k``: 64 KiB reads, QD 16;
* ``r1m``:  1 MiB reads, QD 16;
* ``w64k``: 64 KiB writes, QD 16;
* ``lat-r64k``: 64 KiB reads at QD 16 and QD 1 from the latency export.

qemu-img bench walks the image sequentially (``-S`` = size), wrapping at its
end. Throughput is requests x size / qemu-img's own "Run completed in" time.
Figures are medians over ``--rounds`` rounds after one warm-up round.
MiB = 2**20 bytes. Exit status 0 whatever the figures: a measurement.

Run
---
    .venv/bin/python benchmarks/nbd_depth.py                  # ~1 min
    .venv/bin/python benchmarks/nbd_depth.py --rounds 7 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from isrsync.vm.nbd import NbdServer, RawFileBackend  # noqa: E402

QEMU_DEPTH = 16  # QEMU's MAX_NBD_REQUESTS
MIB = 1 << 20


class LatencyBackend(RawFileBackend):
    """A raw file whose reads take ``delay`` seconds without holding the loop."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.delay = delay

    async def read(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(self.delay)
        return await super().read(offset, length)


# (name, export, size, depth, count, write)
TESTS: list[tuple[str, str, int, int, int, bool]] = [
    ("r4k-qd16", "raw", 4096, QEMU_DEPTH, 40000, False),
    ("r4k-qd1", "raw", 4096, 1, 10000, False),
    ("r64k-qd16", "raw", 64 << 10, QEMU_DEPTH, 12000, False),
    ("r1m-qd16", "raw", MIB, QEMU_DEPTH, 1500, False),
    ("w64k-qd16", "raw", 64 << 10, QEMU_DEPTH, 8000, True),
    ("lat-r64k-qd16", "lat", 64 << 10, QEMU_DEPTH, 4000, False),
    ("lat-r64k-qd1", "lat", 64 << 10, 1, 400, False),
]


async def bench(sock: Path, size: int, depth: int, count: int, write: bool) -> float:
    """MiB/s of one qemu-img bench run (its own timing)."""
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", str(size)]
    if write:
        argv.append("-w")
    argv.append(f"nbd+unix:///disk?socket={sock}")
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"qemu-img bench failed ({p.returncode}): {err.decode(errors='replace')[-500:]}")
    m = re.search(rb"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"qemu-img bench said: {out.decode(errors='replace')[-300:]}")
    return count * size / float(m.group(1)) / MIB


async def amain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(MIB))
    backends = {"raw": RawFileBackend(raw), "lat": LatencyBackend(raw, args.latency_ms / 1000)}
    servers: dict[str, NbdServer] = {}
    socks: dict[str, Path] = {}
    try:
        for name, b in backends.items():
            servers[name] = NbdServer(b)
            socks[name] = work / f"{name}.sock"
            await servers[name].start_unix(socks[name])
        tests = [t for t in TESTS if not args.only or t[0] in args.only.split(",")]
        samples: dict[str, list[float]] = {t[0]: [] for t in tests}
        for rnd in range(args.rounds + 1):
            for name, export, size, depth, count, write in tests:
                mibs = await bench(socks[export], size, depth, count, write)
                if rnd:
                    samples[name].append(mibs)
            if not args.quiet:
                label = "warm-up" if not rnd else f"round {rnd}/{args.rounds}"
                print(f"{label}: " + "  ".join(f"{n} {s[-1]:.0f}" for n, s in samples.items() if rnd and s),
                      file=sys.stderr)
        return {
            "mib": args.mib, "latency_ms": args.latency_ms, "rounds": args.rounds,
            "requests_served": sum(s.requests for s in servers.values()),
            "tests": {n: {"median_mibps": statistics.median(s), "samples": s} for n, s in samples.items()},
        }
    finally:
        for s in servers.values():
            await s.close()
        for b in backends.values():
            b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="export size in MiB (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up (default 5)")
    ap.add_argument("--latency-ms", type=float, default=2.0, help="read latency of the second export (default 2)")
    ap.add_argument("--only", default="", help="comma-separated test names (default: all)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img is not installed (apt-get install qemu-utils)")
    with tempfile.TemporaryDirectory(prefix="isrsync-nbd-depth-") as d:
        t0 = time.perf_counter()
        res = asyncio.run(amain(args, Path(d)))
    print(f"NbdServer driven by qemu-img bench (QEMU's NBD client), medians of {args.rounds} rounds, "
          f"{args.mib} MiB export, {time.perf_counter() - t0:.0f} s in all")
    for n, t in res["tests"].items():
        print(f"  {n:<16} {t['median_mibps']:8.1f} MiB/s   (" + " ".join(f"{x:.0f}" for x in t["samples"]) + ")")
    if args.json:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
