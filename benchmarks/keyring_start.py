"""Time to start against disk size: the whole keyring in the manifest vs keyring segments.

Issue 15, part 3. A resume cannot start before it can name the chunks the guest
touches first. With the keyring inline in the manifest (every parcel before
segments, and still every disk up to 252 MiB), that is the whole keyring: 65
bytes per 128 KiB of disk, 8.5 MB for 16 GiB. With segments, it is the manifest
(segment refs, deltas, and the entries of the trace the last session recorded),
and a segment only for a chunk none of those name.

For each disk size (1, 4, 16 GiB) a parcel is committed twice to a real home
server (`isrsync serve`) in a network namespace behind a veth pair shaped with
`tc tbf` at 1 Mb/s both ways (as benchmarks/usb_resume.py does): once with the
keyring inline (the old format, still written by `manifest.encode`), once with
segments (`manifest.seal`, what a commit writes now). The client then does what
a resume does before the guest can start, from an empty cache:

* inline: fetch and authenticate the manifest and rebuild the keyring;
* segments: fetch and authenticate the manifest, resolve it (a LazyKeyring), and
  make the entries of the hot set readable (`SegmentLoader.ensure`): the trace's
  are in the manifest; the first chunk outside it costs one segment.

"start" is that time (the device state and hot RAM are the same bytes either
way and not counted here). Also printed: the whole keyring through segments
(what the background fetches while the guest runs), bytes on the wire, and the
ratio inline / segments. The disk is "sparse" in the host's sense (nothing of
it is stored but the keyring), and ``--fill`` is the share of its chunks that
hold data: a ZERO entry compresses to almost nothing in an inline keyring and
makes a whole ZERO segment free, so 1.0 is the worst case for the old format.

Needs root (ip netns, tc). Run:
    sudo PYTHONPATH=$PWD .venv/bin/python benchmarks/keyring_start.py [--reps 3] [--fill 1.0 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from usb_resume import Link, NsServer  # noqa: E402

from isrsync import manifest  # noqa: E402
from isrsync.keyring import Keyring, LazyKeyring  # noqa: E402
from isrsync.server.local import LocalStore  # noqa: E402
from isrsync.server.repo import Repository  # noqa: E402
from isrsync.site.cache import SiteCache  # noqa: E402
from isrsync.site.packer import PackSink  # noqa: E402
from isrsync.site.segments import SegmentLoader  # noqa: E402
from isrsync.site.serversource import ServerSource  # noqa: E402
from isrsync.site.registry import SourceRegistry  # noqa: E402
from isrsync.site.upload import upload_packs  # noqa: E402
from isrsync.store.base import CommitRequest, Holder  # noqa: E402
from isrsync.store.http import HttpStore  # noqa: E402
from isrsync.vmspec import VmSpec  # noqa: E402

GIB = 1 << 30
SIZES = (1, 4, 16)
RATE = "1mbit"
HOT = 600  # chunks a boot touches first (a Debian boot reads about 75 MiB)
USER = "bench"


def keyring(size: int, fill: float, seed: int) -> Keyring:
    rng = random.Random(seed)
    ring = Keyring(size)
    raw = bytearray(ring.to_bytes())
    for i in range(len(ring)):
        if rng.random() < fill:  # a chunk holding data: a tag and key of 32 random bytes each
            raw[i * 65 : i * 65 + 65] = rng.randbytes(64) + b"\x00"
    return Keyring(size, raw)


def hot_set(n: int, seed: int) -> list[int]:
    """Most of a boot's reads near the start of the disk, the rest over its block groups."""
    rng = random.Random(seed)
    head = rng.sample(range(min(n, 4096)), min(HOT * 2 // 3, n))
    spread = rng.sample(range(n), HOT - len(head))
    return list(dict.fromkeys(head + spread))


async def make_parcels(data: Path, fill: float, work: Path, say) -> dict[tuple[int, str], tuple[uuid.UUID, bytes, list[int]]]:
    store = LocalStore.open(data, USER, create=False, create_user=False)
    out = {}
    try:
        for gib in SIZES:
            size = gib * GIB
            ring = keyring(size, fill, gib)
            hot = hot_set(len(ring), gib)
            for form in ("inline", "segments"):
                pid, mk = uuid.uuid4(), os.urandom(32)
                await store.create_parcel(pid, f"{form}-{gib}g")
                lock = await store.acquire(pid, Holder("bench", "bench", USER))
                sealed = manifest.seal(parcel=pid, version=1, master_key=mk, vm=VmSpec(), keyring=ring,
                                       trace=hot, segmented=form == "segments")
                packs = []
                if sealed.segments:
                    sink = PackSink(Path(tempfile.mkdtemp(dir=work)))
                    for e in sealed.segments:
                        if e.data:
                            sink.add(e.tag, e.data)
                    sink.flush()
                    packs = sink.done
                    await upload_packs(store, pid, packs)
                await store.commit(pid, CommitRequest(
                    epoch=lock.epoch, parent=0, manifest=sealed.raw, packs=[i.pack_id for i, _ in packs],
                    added=sorted(e.tag for e in sealed.segments if e.data), release=True, site="bench"))
                say(f"  {form} {gib} GiB: manifest {len(sealed.raw) / 1e6:.2f} MB, "
                    f"{sum(1 for e in sealed.segments if e.data)} segment chunk(s)")
                out[(gib, form)] = (pid, mk, hot)
    finally:
        await store.close()
    return out


async def start_once(url: str, token: str, pid: uuid.UUID, mk: bytes, hot: list[int], form: str, cache_dir: Path,
                     whole: bool) -> dict[str, float]:
    store = HttpStore(url, token, read_timeout=600)
    cache = SiteCache(cache_dir)
    reg = SourceRegistry(cache)
    reg.add(ServerSource(store, pid))
    res: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        (raw,) = await store.get_manifests(pid, 1, 1)
        m = await asyncio.to_thread(lambda: manifest.resolve([manifest.decode(raw, mk, pid)]))
        res["manifest_bytes"] = len(raw)
        ring = m.keyring
        if isinstance(ring, LazyKeyring):
            loader = SegmentLoader(ring, reg)
            await loader.ensure(hot)
            res["segments_for_hot"] = loader.fetched
            res["start"] = time.perf_counter() - t0
            # The guest's first read outside the trace: one segment.
            outside = next(i for i in range(len(ring)) if not ring.known(i))
            t1 = time.perf_counter()
            await loader.ensure([outside])
            res["first_miss"] = time.perf_counter() - t1
            if whole:
                await loader.load_all()
                res["whole"] = time.perf_counter() - t0
        else:
            assert ring is not None
            _ = [ring[i] for i in hot]
            res["start"] = time.perf_counter() - t0
    finally:
        await reg.close()
        await store.close()
        cache.close()
    return res


async def bench(args, link: Link, say) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="keyring-start-") as tmp:
        work = Path(tmp)
        for fill in args.fill:
            data = work / f"home-{fill}"
            Repository(data, create=True).close()
            srv = NsServer(data)
            token = srv.add_user(USER)
            say(f"fill {fill}: committing parcels")
            parcels = await make_parcels(data, fill, work, say)
            srv.start_in(link)
            try:
                link.shape(RATE)
                for gib in SIZES:
                    row = {"fill": fill, "gib": gib}
                    for form in ("inline", "segments"):
                        pid, mk, hot = parcels[(gib, form)]
                        runs = []
                        for r in range(args.reps):
                            cdir = work / f"cache-{fill}-{gib}-{form}-{r}"
                            runs.append(await start_once(srv.url, token, pid, mk, hot, form, cdir,
                                                         whole=form == "segments" and r == 0))
                        row[form] = {
                            "start": statistics.median(x["start"] for x in runs),
                            "manifest_bytes": runs[0]["manifest_bytes"],
                            **({"first_miss": statistics.median(x["first_miss"] for x in runs),
                                "whole": runs[0]["whole"], "segments_for_hot": runs[0]["segments_for_hot"]}
                               if form == "segments" else {}),
                        }
                        say(f"  {gib:>2} GiB {form:>8}: start {row[form]['start']:.2f} s (median of {args.reps})")
                    rows.append(row)
            finally:
                link.unshape()
                srv.stop()
    return rows


def render(rows: list[dict]) -> str:
    out = [f"time to start at {RATE} (tc tbf, netns), median; start = manifest + the keyring entries of a "
           f"{HOT}-chunk hot set",
           "fill  disk    inline start  (manifest)   segments start  (manifest)  ratio   first miss  whole keyring"]
    for r in rows:
        i, s = r["inline"], r["segments"]
        out.append(f"{r['fill']:<5} {r['gib']:>2} GiB  {i['start']:>10.2f} s  ({i['manifest_bytes'] / 1e6:6.2f} MB)"
                   f"  {s['start']:>12.2f} s  ({s['manifest_bytes'] / 1e6:6.3f} MB)  {i['start'] / s['start']:5.1f}x"
                   f"  {s['first_miss']:>8.2f} s  {s['whole']:>10.2f} s")
    out.append("issue 15's figure: the keyring of a 2 GiB disk took 8-15 s before anything else could start")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill", type=float, nargs="+", default=[1.0, 0.1])
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root: it creates a network namespace and shapes a veth with tc")
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    link = Link(say)
    try:
        link.up()
        rows = asyncio.run(bench(args, link, say))
    finally:
        link.down()
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
