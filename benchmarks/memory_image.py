"""Bytes of a memory image: free pages kept out (issue 15, part 4), and what zstd levels would buy.

For the test guest (256 MiB RAM, :mod:`isrsync.demo.guest`) under four set-ups,
each after the same workload:

* the kernel command line with or without ``init_on_free=1`` (the test guest
  has it: freed pages are zeroed, and a zero chunk is never stored or sent;
  a stock Debian kernel does not zero them);
* the parcel with or without free page reporting (``isrsync init
  --free-page-reporting``: a virtio-balloon the guest reports free 2 MiB blocks
  to; QEMU punches them out of the RAM memfd, so a save skips them).

Workload: boot, ``hog 96`` (96 MiB of random data in a tmpfs, then freed: free
memory that still holds data), wait ``--settle`` seconds (the guest reports
free pages in rounds about 2 s apart, a bounded number of blocks per round), read the guest's own ``free`` (used = MemTotal - MemAvailable), suspend.
Printed per set-up, medians of ``--repeat``: the image in use (device state +
non-zero RAM chunks, plaintext), the image encoded (zstd + AEAD: the bytes that
cross a link), the guest's own used memory, and the ratio encoded / used.

Then zstd levels over the RAM chunks of two of the images (without either help:
the most data; with init_on_free: the test guest as it is): bytes and single-core CPU seconds per level, and the link time each
saves against level 3 at 1 Mb/s and 10 Mb/s. The codec pins level 3 (a fixed
nonce is safe only while one plaintext always gives one ciphertext, see
docs/chunk.md), so a stronger level for memory would need a codec version of
its own; this shows whether it would pay.

Runs everything locally (a ``file://`` home, TCG if no KVM). Run:
    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_image.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vm import Serial, _home, _isolate  # noqa: E402

MIB = 1 << 20
HOG_MIB = 96
LEVELS = (1, 3, 9, 19)
RATES = {"1 Mb/s": 1e6, "10 Mb/s": 10e6}


# (label, init_on_free, free page reporting, more of the guest's command line)
SETUPS = (
    ("neither", False, False, ""),
    ("reporting", False, True, ""),
    # Reports free blocks from 128 KiB (one chunk) up, not only from 2 MiB (a pageblock).
    ("reporting, order 5", False, True, "page_reporting.page_reporting_order=5"),
    ("init_on_free", True, False, ""),
    ("both", True, True, ""),
)


async def one(work: Path, g, acct, tag: str, init_on_free: bool, fpr: bool, extra: str, settle: float,
              say) -> dict:
    from isrsync.site.cache import SiteCache
    from isrsync.site.create import init_parcel
    from isrsync.site.parcel import open_site
    from isrsync.site.runtime import Runtime
    from isrsync.demo.guest import make_disk_image

    cmdline = g.cmdline if init_on_free else g.cmdline.replace("init_on_free=1", "").strip()
    cmdline = f"{cmdline} {extra}".strip()
    img = work / f"{tag}.img"
    make_disk_image(img, 64, {"hello.txt": b"hello\n"})
    site = await open_site(SiteCache(work / f"site-{tag}"), acct)
    try:
        pid, _ = await init_parcel(site, tag, img, memory_mib=256, kernel=g.kernel, initrd=g.initrd,
                                   append=cmdline, free_page_reporting=fpr)
        ser = work / f"ser-{tag}"
        rt = Runtime(site, pid, serial=ser, rundir=work / f"run-{tag}")
        try:
            await rt.resume()

            def workload() -> int:
                s = Serial(ser)
                try:
                    s.wait("GUEST: READY", 180)
                    if s.cmd(f"hog {HOG_MIB}", 300) != "GUEST: OK":
                        raise RuntimeError("the guest could not run its workload")
                    time.sleep(settle)
                    return int(s.cmd("mem").split()[2]) * 1024
                finally:
                    s.close()

            used = await asyncio.to_thread(workload)
            res = await rt.suspend()
        finally:
            await rt.close()
        out = {"in_use": res.memory_bytes, "stored": res.memory_stored_bytes, "used": used, "pid": pid,
               "version": res.version}
        say(f"  {tag}: in use {res.memory_bytes / MIB:.1f} MiB, encoded {res.memory_stored_bytes / MIB:.1f} MiB, "
            f"guest used {used / MIB:.1f} MiB")
        if not fpr and not extra:
            out["plains"] = await ram_plains(site, pid, res.version)
        return out
    finally:
        await site.close()


async def ram_plains(site, pid, version: int) -> list[bytes]:
    """The RAM chunks of a saved image, decoded from the site cache (for the level sweep)."""
    from isrsync.chunk import chunk_length
    from isrsync.site.disk import decode_cached
    from isrsync.site.parcel import load_version

    m = await load_version(site, pid, version)
    assert m.memory is not None and m.memory.ram is not None
    ram = m.memory.ram
    out = []
    for i, r in enumerate(ram):
        if not r.is_zero:
            p = decode_cached(site.cache, r, chunk_length(ram.size, i))
            if p is not None:
                out.append(p)
    return out


def level_sweep(plains: list[bytes]) -> list[dict]:
    import zstandard

    rows = []
    for level in LEVELS:
        c = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
        t0 = time.process_time()
        n = 0
        for p in plains:
            f = c.compress(p)
            n += len(f) if len(f) <= len(p) - 4096 else len(p)  # what the codec keeps
        cpu = time.process_time() - t0
        rows.append({"level": level, "bytes": n, "cpu": cpu})
    return rows


async def bench(work: Path, args, say) -> dict:
    from isrsync.keys import KdfLimits
    from isrsync.site.account import Account, login
    from isrsync.demo.guest import build_guest

    g = build_guest(args.guest_cache, progress=say)
    acct = Account(f"file://{_home(work)}", "bench")
    await login(acct, "bench passphrase", limits=KdfLimits.MIN)
    runs: dict[str, list[dict]] = {label: [] for label, *_ in SETUPS}
    for r in range(args.repeat):
        for k, (label, iof, fpr, extra) in enumerate(SETUPS):
            runs[label].append(await one(work, g, acct, f"s{k}-{r}", iof, fpr, extra, args.settle, say))
    sweeps = {}
    for label in ("neither", "init_on_free"):
        plains = next(x.pop("plains") for x in runs[label] if "plains" in x)
        sweeps[label] = {"chunks": len(plains), "levels": level_sweep(plains)}
    for xs in runs.values():
        for x in xs:
            x.pop("plains", None)
    return {"runs": runs, "sweeps": sweeps}


def render(res: dict) -> str:
    out = [f"memory image of the test guest (256 MiB RAM) after `hog {HOG_MIB}` (96 MiB of data freed), median",
           "set-up               in use      encoded     guest used   encoded/used   vs. neither"]
    runs = res["runs"]
    base = statistics.median(x["stored"] for x in runs["neither"])
    for label, xs in runs.items():
        inuse = statistics.median(x["in_use"] for x in xs)
        stored = statistics.median(x["stored"] for x in xs)
        used = statistics.median(x["used"] for x in xs)
        out.append(f"{label:<19} {inuse / MIB:7.1f} MiB  "
                   f"{stored / MIB:7.1f} MiB  {used / MIB:7.1f} MiB  {stored / used:10.2f}x  "
                   f"{stored / base:9.2f}x")
    out.append("paper (Collective/ISR, 256 MiB guest): 41 MB compressed memory image")
    for label, sw in res["sweeps"].items():
        out.append("")
        out.append(f"zstd level over the {sw['chunks']} RAM chunks of the '{label}' image (the codec pins 3):")
        lv = {r["level"]: r for r in sw["levels"]}
        out.append("level   bytes        CPU (1 core)  " + "  ".join(f"link saved @ {k:<7}" for k in RATES)
                   + "  extra CPU s per link s saved @ 1 Mb/s")
        for level, r in lv.items():
            saved = {k: (lv[3]["bytes"] - r["bytes"]) * 8 / rate for k, rate in RATES.items()}
            extra_cpu = r["cpu"] - lv[3]["cpu"]
            per = f"{extra_cpu / saved['1 Mb/s']:.3f}" if saved["1 Mb/s"] > 0 else "-"
            out.append(f"{level:<7} {r['bytes'] / MIB:7.1f} MiB  {r['cpu']:8.2f} s    "
                       + "  ".join(f"{saved[k]:>14.1f} s  " for k in RATES) + f"  {per}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds between the workload and the suspend (the guest reports free pages in "
                    "rounds about 2 s apart)")
    ap.add_argument("--guest-cache", type=Path, default=Path(os.environ.get(
        "ISRSYNC_TEST_GUEST_CACHE", HERE.parent / ".pytest_cache" / "d" / "isrsync-guest")))
    args = ap.parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="memimage-") as tmp:
        work = Path(tmp)
        _isolate(work)
        res = asyncio.run(bench(work, args, say))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
