"""Plaintext seed coverage (the paper's DVD lookaside, section 7 / Table 11): how much of a
real parcel a base image the user already has serves, and how much less the home server sends.

Set-up, in a throw-away directory:

* a base image: an ext4 filesystem (``--image-mib``, default 512 MiB) holding a real
  tree of files (``--tree``, default this machine's ``/usr/lib/python3.11``), made
  with ``mkfs.ext4 -d``: the organisation's "base image on a DVD";
* a parcel made from it (``init_parcel`` at site A, a directory home), the test
  guest of :mod:`isrsync.demo.guest` (256 MiB RAM) cold-booted at A, where the user
  works (``--new-mib`` MiB of new data and a note), then suspended: version 2;
* the base image as a raw seed, and converted by ``qemu-img`` to a qcow2 seed.

Measured: a hoard of version 2 (every chunk the parcel names: disk, boot files and
memory image) at a fresh site with no seed, with the raw seed and with the qcow2
seed, ``--repeat`` times each; the bytes each source served (from the hoard's own
per-source counts), the seconds, and the time ``sneakernet seed`` took. Coverage is
the share of the parcel's disk bytes, and of everything the hoard needed, that the
seed served.

The paper's Table 11 figures are not printed beside ours: its values were not at
hand when this was written (say so rather than guess). Exit status 0: this is a
measurement.

    .venv/bin/python benchmarks/seed_coverage.py
    .venv/bin/python benchmarks/seed_coverage.py --repeat 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from vm import MEMORY_MIB, Serial, _home, _isolate  # noqa: E402


def make_base(path: Path, mib: int, tree: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-L", "base", "-E", "root_owner=0:0", "-d", str(tree), str(path)],
                   check=True, capture_output=True)


async def hoard_at(work: Path, acct, pid, name: str, seeds: list[Path]) -> dict[str, Any]:
    from isrsync.site.cache import SiteCache
    from isrsync.site.media import open_seeds
    from isrsync.site.parcel import hoard, open_site
    from sneakernet.seed import seed_image

    site = await open_site(SiteCache(work / name), acct)
    try:
        seeded = 0.0
        for s in seeds:
            t0 = time.perf_counter()
            await asyncio.to_thread(seed_image, s, site.cache.path, site.secret(), None, force=True)
            seeded += time.perf_counter() - t0
        sources = await asyncio.to_thread(open_seeds, site.cache.path, site.secret())
        t0 = time.perf_counter()
        res = await hoard(site, pid, lookaside=sources)
        took = time.perf_counter() - t0
        by_kind: dict[str, int] = {}
        for s in res.sources:
            by_kind[s.kind] = by_kind.get(s.kind, 0) + s.bytes
        return {"seconds": took, "seed_seconds": seeded, "chunks": res.chunks, "fetched": res.fetched,
                "bytes": by_kind}
    finally:
        await site.close()
        shutil.rmtree(work / name, ignore_errors=True)


async def bench(work: Path, args: argparse.Namespace, say) -> dict[str, Any]:
    from isrsync.demo.guest import build_guest
    from isrsync.keys import KdfLimits
    from isrsync.site.account import Account, login
    from isrsync.site.cache import SiteCache
    from isrsync.site.create import init_parcel
    from isrsync.site.parcel import load_version, open_site
    from isrsync.site.runtime import Runtime

    base = work / "base.img"
    make_base(base, args.image_mib, args.tree)
    qcow = work / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), str(qcow)], check=True,
                   capture_output=True)
    say(f"base image: {args.image_mib} MiB ext4 holding {args.tree}; qcow2 copy {qcow.stat().st_size / 1e6:.0f} MB")

    acct = Account(f"file://{_home(work)}", "bench")
    await login(acct, "bench passphrase", limits=KdfLimits.MIN)
    g = build_guest(args.guest_cache, progress=say)
    site_a = await open_site(SiteCache(work / "A"), acct)
    try:
        pid, _ = await init_parcel(site_a, "vm", base, memory_mib=MEMORY_MIB, kernel=g.kernel, initrd=g.initrd,
                                   append=g.cmdline)
        rt = Runtime(site_a, pid, serial=work / "serA", rundir=work / "runA")
        try:
            await rt.resume()

            def work_in_guest() -> None:
                s = Serial(work / "serA")
                try:
                    s.wait("GUEST: READY", 180)
                    for c in ("write note changed-since-the-base", f"fill new.bin {args.new_mib}"):
                        if s.cmd(c, 300) != "GUEST: OK":
                            raise RuntimeError(f"the guest could not {c!r}")
                finally:
                    s.close()

            await asyncio.to_thread(work_in_guest)
            res = await rt.suspend()
            if not res.committed:
                raise RuntimeError(f"the set-up suspend did not commit: {res}")
        finally:
            await rt.close()
        state = site_a.state(pid)
        try:
            m = await load_version(site_a, pid, res.version, state)
        finally:
            state.close()
        assert m.keyring is not None
        disk_tags = m.keyring.tags()
    finally:
        await site_a.close()
    say(f"parcel version {res.version}: the guest wrote {args.new_mib} MiB and a note since the base")

    runs: dict[str, list[dict[str, Any]]] = {"none": [], "raw": [], "qcow2": []}
    for i in range(args.repeat):
        for name, seeds in (("none", []), ("raw", [base]), ("qcow2", [qcow])):
            r = await hoard_at(work, acct, pid, f"{name}-{i}", seeds)
            runs[name].append(r)
            say(f"{i + 1}/{args.repeat} {name:5s}: hoard {r['seconds']:.2f}s, {r['fetched']} chunks; "
                + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(r["bytes"].items()))
                + (f"; seeding took {r['seed_seconds']:.1f}s" if seeds else ""))
    med = statistics.median
    from sneakernet.seed import load_index, seed_image

    covered = {}
    for name, img in (("raw", base), ("qcow2", qcow)):
        probe = work / f"probe-{name}"
        rep = await asyncio.to_thread(seed_image, img, probe, await _secret(acct), None)
        ix = load_index(rep.index_file)
        covered[name] = sum(1 for t in disk_tags if t in ix)
        shutil.rmtree(probe, ignore_errors=True)
    out: dict[str, Any] = {"image_mib": args.image_mib, "tree": str(args.tree), "new_mib": args.new_mib,
                           "disk_chunks": len(disk_tags), "disk_chunks_in_seed": covered, "repeat": args.repeat, "runs": runs, "summary": {}}
    total = med([sum(r["bytes"].values()) for r in runs["none"]])
    for name in ("none", "raw", "qcow2"):
        rs = runs[name]
        seed = med([r["bytes"].get("seed", 0) for r in rs])
        server = med([r["bytes"].get("server", 0) for r in rs])
        out["summary"][name] = {"hoard_seconds": med([r["seconds"] for r in rs]), "seed_bytes": seed,
                                "server_bytes": server, "share_of_all": seed / total if total else 0.0,
                                "server_ratio": server / total if total else 0.0,
                                "seed_seconds": med([r["seed_seconds"] for r in rs])}
    return out


async def _secret(acct) -> bytes:
    from isrsync.site.account import session_keys

    return session_keys(acct)[0].convergence_secret


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    n, inseed = res["disk_chunks"], res["disk_chunks_in_seed"]
    lines = [f"seed coverage: base image {res['image_mib']} MiB ext4 of {res['tree']}; the user then wrote "
             f"{res['new_mib']} MiB; medians of {res['repeat']}",
             f"the version's disk has {n} stored (non-zero) chunks; the seed holds "
             + ", ".join(f"{v} ({v / n:.0%}) as {k}" for k, v in inseed.items()),
             "seed  | hoard s | from seed MB | from server MB | server / no seed | seed's share | seeding s",
             "------+---------+--------------+----------------+------------------+--------------+----------"]
    for name in ("none", "raw", "qcow2"):
        r = s[name]
        lines.append(f"{name:5s} | {r['hoard_seconds']:7.2f} | {r['seed_bytes'] / 1e6:12.1f} | "
                     f"{r['server_bytes'] / 1e6:14.1f} | {r['server_ratio']:16.2f} | {r['share_of_all']:12.0%} | "
                     f"{r['seed_seconds']:8.1f}")
    lines.append("share = bytes the seed served / bytes a hoard with no seed takes from the server (disk, boot "
                 "files and memory image); the paper's Table 11 figures are not printed (not at hand)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-mib", type=int, default=512, help="size of the base image (default 512)")
    ap.add_argument("--tree", type=Path, default=Path("/usr/lib/python3.11"), help="what the base image holds")
    ap.add_argument("--new-mib", type=int, default=16, help="MiB the user writes after the base (default 16)")
    ap.add_argument("--repeat", type=int, default=3, help="hoards per variant; medians are reported")
    ap.add_argument("--guest-cache", type=Path, default=REPO / ".pytest_cache" / "d" / "isrsync-guest")
    ap.add_argument("--json", action="store_true", help="print JSON (progress on stderr)")
    args = ap.parse_args(argv)
    if not args.tree.is_dir():
        ap.error(f"{args.tree} is not a directory; name a tree with --tree")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    work = Path(tempfile.mkdtemp(prefix="isr-seed-", dir="/tmp"))
    _isolate(work)
    try:
        res = asyncio.run(bench(work, args, say))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2, default=str) if args.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
