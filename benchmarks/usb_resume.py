"""USB resume benchmark (the paper's Table 10): resume latency with the memory image on a medium vs without.

A real home server (``isrsync serve``) runs in a network namespace this
benchmark creates; the site (this process, its QEMUs) reaches it only over a
veth pair whose two ends are shaped with ``tc qdisc ... tbf`` at the link rate
under test (100 Mb/s, 10 Mb/s, 1 Mb/s, 100 Kb/s). netem is not available on
this kernel (no sch_netem), so the link has a rate but no added delay: the
printed output says so. The namespace, the veth pair and the server are torn
down at the end, on error too.

What it measures
----------------
Set-up (once, link unshaped): ``isrsync server add-user``, the server in the
namespace, an ``http://10.x`` account logged in with the minimum KDF limits,
the test guest of :mod:`isrsync.demo.guest` (256 MiB RAM, 64 MiB ext4 disk),
``init_parcel`` at site A, a cold boot at A, then ``Runtime.suspend(medium=sink)``
onto a directory made a medium with ``sneakernet.medium.format_medium`` (what
``isrsync suspend --to-usb`` does): the medium holds that version's memory
image, the chunks A wrote and the manifest chain. Every later run suspends
onto the medium too (untimed), so each resume restores the head and the
medium always carries it, as a user's key does.

Floor: plain QEMU restoring the same memory image (RAM + device state as one
migration stream) from a local file, with isrsync's own QEMU command line
(benchmarks/vm.py's ``floor_image``/``floor_run``: best of 3 restores per
repeat), ``--repeat`` times at the start of the run ("upfront"); and, per
rate, one plain restore beside each run with the key, the two taking turns
going first ("paired"). The target compares each rate's runs with the key to
its paired restores: over the benchmark's minutes this shared machine drifts
(the upfront floor's median answer ranged 0.21-0.49 s between runs), and
drift then falls on both sides alike. The ratio to the upfront floor is
printed beside it.

Per rate, per repeat, with the link shaped to the rate, a FRESH site B (empty
cache) resumes the head with ``Policy.LOOKASIDE`` and lazy memory (the
default), (a) with the medium as a lookaside source
(``plugin().open_source(medium, B's cache dir)``), (b) without; a and b take
turns going first. Timed: ``report.seconds["total"]`` (until the guest runs),
the guest's first answer on its serial console, and ``memory_complete`` (all
of RAM in: post-copy has pulled the rest). Bytes the server sent are read
from its access log. Then the link is unshaped, the guest suspended (commits
on top of the head, untimed) and the runtime closed.

The latency a user sees is when the guest answers: the target compares the
guest's first answer on its console with the paired floor's (both from the
start of the resume), and must hold at every rate, so it also says the latency with
the key is flat. "Guest runs" and "all RAM in" are printed beside it.

At a slow rate, a run without the medium whose estimated transfer
(bytes of the memory image on the medium * 8 / rate) exceeds ``--max-seconds``
is skipped with a printed note (the estimate is printed instead). No state is
scaled: every figure is at full size, as the paper's are.

Run
---
    .venv/bin/python benchmarks/usb_resume.py                             # all four rates, 3 repeats
    .venv/bin/python benchmarks/usb_resume.py --rates 100mbit,1mbit --repeat 1
    .venv/bin/python benchmarks/usb_resume.py --json

Needs root (ip netns, tc), qemu-system-x86_64, mkfs.ext4. Exit status 0
whether or not the target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from conftest import isrsync_cmd
from shapedlink import Link, NsServer
from vm import (
    DISK_MIB,
    MEMORY_MIB,
    RESUME_TARGET,
    Serial,
    _isolate,
    floor_from_version,
    floor_qemu_class,
    floor_restore,
    floor_run,
    med,
)

from isrsync.errors import QemuError

RATES = {"100mbit": 100e6, "10mbit": 10e6, "1mbit": 1e6, "100kbit": 100e3}
PAPER_WITH = {"100mbit": 13, "10mbit": 12, "1mbit": 12, "100kbit": 12}
PAPER_WITHOUT = {"100mbit": 14, "10mbit": 39, "1mbit": 317, "100kbit": 4301}
USER = "bench"


def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- one resume at site B


async def resume_once(work: Path, acct, pid, tag: str, medium: Path | None, key: Path, link: Link, rate: str,
                      server: NsServer, run_seconds: float, max_seconds: float) -> dict[str, Any]:
    from isrsync.site.cache import SiteCache
    from isrsync.site.media import plugin
    from isrsync.site.parcel import open_site
    from isrsync.site.policy import MemoryMode, Policy
    from isrsync.site.runtime import Runtime

    site = await open_site(SiteCache(work / f"B-{tag}"), acct)
    rt: Runtime | None = None
    try:
        lookaside = []
        if medium is not None:  # indexing the medium is not timed (a udev hook does it when the key is plugged)
            lookaside = [await asyncio.to_thread(plugin().open_source, medium, site.cache.path)]
        ser = work / f"ser-{tag}"
        rt = Runtime(site, pid, policy=Policy.LOOKASIDE, memory=MemoryMode.LAZY, serial=ser,
                     rundir=work / f"run-{tag}", lookaside=lookaside)
        sent0 = server.pack_bytes_sent()
        link.shape(RATES[rate])
        t0 = time.perf_counter()
        rep = await rt.resume()
        # The guest's first answer needs the pages it touches: at a slow rate
        # without the key that is many chunks, each a second or more.
        n = await guest_answer(ser, max_seconds)
        answer = time.perf_counter() - t0
        complete = rep.seconds["total"] if rep.memory != "lazy" else None
        deadline = t0 + max_seconds
        while complete is None and time.perf_counter() < deadline:
            complete = rep.seconds.get("memory_complete")
            if complete is None:
                await asyncio.sleep(0.05)
        link.unshape()
        sent = server.pack_bytes_sent() - sent0
        out = {"total": rep.seconds["total"], "answer": answer, "memory_complete": complete, "memory": rep.memory,
               "counter": n, "server_pack_bytes": sent, "steps": dict(rep.seconds),
               "timed_out": complete is None}
        if rt.postcopy is not None:
            out.update(rt.postcopy.stats.summary())
        if medium is not None and rt.chain is not None:
            out["sources"] = [dataclasses_asdict(i) for i in rt.chain.infos()]
        await asyncio.sleep(run_seconds)
        # Onto the key as well (untimed, link unshaped): the next run resumes the
        # head, and the key carries it, whether or not this run used the key.
        susp = await rt.suspend(medium=await asyncio.to_thread(plugin().open_sink, key))
        if not susp.committed or susp.medium is None or not susp.medium.published:
            raise RuntimeError(f"the suspend after the resume did not commit: {susp}")
        return out
    finally:
        link.unshape()
        if rt is not None:
            await rt.close()
        await site.close()
        shutil.rmtree(work / f"B-{tag}", ignore_errors=True)


async def guest_answer(path: Path, timeout: float) -> int:
    def go() -> int:
        s = Serial(path)
        try:
            reply = s.cmd("counter", timeout)
        finally:
            s.close()
        if not reply.startswith("GUEST: COUNTER "):
            raise RuntimeError(f"unexpected guest reply {reply!r}")
        return int(reply.split()[-1])

    return await asyncio.to_thread(go)


def dataclasses_asdict(x: Any) -> Any:
    import dataclasses

    try:
        return {k: v for k, v in dataclasses.asdict(x).items() if isinstance(v, (int, float, str, bool, type(None)))}
    except TypeError:
        return str(x)


# --------------------------------------------------------------------------- the benchmark


async def paired_floor(make_q, serial: Path, say) -> dict[str, float]:
    """One plain restore beside a run with the key.

    About one plain QEMU in a hundred, started with ``-incoming exec:cat``,
    fails its QMP capabilities negotiation (the reply is not a return); that
    is no measurement of the floor, so it is said and tried again, once.
    """
    try:
        return await _floor_once(make_q(0), serial)
    except QemuError as e:
        say(f"floor restore failed, tried again: {e}")
    return await _floor_once(make_q(1), serial)


async def _floor_once(q, serial: Path) -> dict[str, float]:
    try:
        fr = await floor_restore(q, serial)
        await q.quit()
        return fr
    finally:
        await q.close()


async def bench(work: Path, args: argparse.Namespace, link: Link, servers: list[NsServer], say) -> dict[str, Any]:
    from isrsync.demo.guest import build_guest, make_disk_image
    from isrsync.keys import KdfLimits
    from isrsync.site.account import Account, login
    from isrsync.site.cache import SiteCache
    from isrsync.site.media import plugin
    from isrsync.site.create import init_parcel
    from isrsync.site.parcel import open_site
    from isrsync.site.runtime import Runtime
    from sneakernet.medium import format_medium

    data = work / "server-data"
    out = (await asyncio.to_thread(subprocess.run, [*isrsync_cmd(), "server", "add-user", USER, "--data", str(data),
                                                   "--json"], check=True, capture_output=True, text=True)).stdout
    token = json.loads(out)["token"]
    srv = NsServer(data)
    servers.append(srv)
    await asyncio.to_thread(srv.start_in, link)
    say(f"server in the namespace at {srv.url}")
    acct = Account(srv.url, USER, token)
    await login(acct, "bench passphrase", limits=KdfLimits.MIN)

    g = build_guest(args.guest_cache, progress=say)
    make_disk_image(work / "disk.img", DISK_MIB, {"hello.txt": b"hello from the benchmark\n"})
    medium = work / "medium"
    medium.mkdir()
    format_medium(medium, "bench")

    say("set-up (link unshaped): init at site A, cold boot, suspend --to-usb onto the medium")
    site_a = await open_site(SiteCache(work / "A"), acct)
    try:
        pid, _ = await init_parcel(site_a, "vm", work / "disk.img", memory_mib=MEMORY_MIB,
                                   kernel=g.kernel, initrd=g.initrd, append=g.cmdline)
        rt = Runtime(site_a, pid, serial=work / "serA", rundir=work / "runA")
        try:
            await rt.resume()

            def boot() -> None:
                s = Serial(work / "serA")
                try:
                    s.wait("GUEST: READY", 180)
                    if s.cmd("write note suspended-at-A") != "GUEST: OK":
                        raise RuntimeError("the guest could not write its disk")
                finally:
                    s.close()

            await asyncio.to_thread(boot)
            await asyncio.sleep(args.run_seconds)
            sink = plugin().open_sink(medium)
            res = await rt.suspend(medium=sink)
            if not res.committed or res.medium is None or not res.medium.published:
                raise RuntimeError(f"the set-up suspend did not commit or did not reach the medium: {res}")
        finally:
            await rt.close()
        version = res.version
        assert version is not None
        copied = {"chunks": res.medium.chunks, "bytes": res.medium.bytes, "seconds": res.medium.seconds,
                  "memory_bytes": res.memory_bytes}
        say(f"  version {version}: {res.medium.chunks} chunks, {res.medium.bytes / 1e6:.1f} MB on the medium")

        # The floor's inputs, from A's cache: version V's memory as one migration stream, its disk raw.
        fdir = work / "floor"
        _, cfg, memfile, raw, _ = await floor_from_version(site_a, pid, version, fdir, str(g.kernel), str(g.initrd),
                                                           g.cmdline)
        FloorQemu = floor_qemu_class()
    finally:
        await site_a.close()
    medium_bytes = _tree_bytes(medium / ".isrsync")

    floors = []
    for i in range(args.repeat):
        fr, _ = await floor_run(lambda name, i=i: FloorQemu(cfg, fdir / f"{name}{i}", raw, memfile, fdir / "ser"),
                                fdir, args.run_seconds)
        floors.append(fr)
        (fdir / "saved.bin").unlink(missing_ok=True)
        say(f"floor {i + 1}/{args.repeat}: {fr['total']:.3f}s (tries {[round(t, 3) for t in fr['tries']]})")
    floor_total = med([f["total"] for f in floors])
    # Every try, not the best of each repeat: the runs with the key are medians too.
    floor_answer = med([a for f in floors for a in f["answers"]])

    rows: dict[str, Any] = {}
    k = 0
    for rate in args.rates:
        rate_bps = RATES[rate]
        est = medium_bytes * 8 / rate_bps
        skip_without = est > args.max_seconds
        row: dict[str, Any] = {"rate_bps": rate_bps, "tc": link.shape(RATES[rate]), "with": [], "without": [], "floor": [],
                               "scale": 1.0, "est_without_seconds": round(est, 1)}
        link.unshape()
        if skip_without:
            row["skipped_without"] = (f"without the medium skipped: about {medium_bytes / 1e6:.1f} MB over "
                                      f"{rate} needs ~{est:.0f}s > --max-seconds {args.max_seconds:.0f}")
            say(row["skipped_without"])
        for i in range(max(args.repeat, args.with_repeat)):
            variants = ([("with", medium)] if i < args.with_repeat else []) + \
                ([] if skip_without or i >= args.repeat else [("without", None)])
            if i < args.with_repeat:
                variants.append(("floor", None))
            if i % 2:
                variants.reverse()
            for name, med_path in variants:
                if name == "floor":
                    fr = await paired_floor(lambda k, i=i: FloorQemu(cfg, fdir / f"{rate}-p{i}-{k}", raw, memfile,
                                                                     fdir / "ser"), fdir / "ser", say)
                    row["floor"].append(fr)
                    say(f"{rate} floor   {i + 1}: guest answers {fr['answer']:.3f}s")
                    continue
                r = await resume_once(work, acct, pid, f"{rate}-{name}-{i}", med_path, medium, link, rate, srv,
                                      args.run_seconds, args.max_seconds)
                row[name].append(r)
                k += 1
                mc = r["memory_complete"]
                say(f"{rate} {name:7s} {i + 1}: guest runs {r['total']:.3f}s, answers "
                    f"{r['answer']:.3f}s, all RAM in {'-' if mc is None else f'{mc:.3f}s'} "
                    f"({r['memory']}); server sent {r['server_pack_bytes'] / 1e6:.2f} MB of packs")
        for name in ("with", "without"):
            rs = row[name]
            if not rs:
                continue
            done = [r["memory_complete"] for r in rs if r["memory_complete"] is not None]
            row[f"{name}_median"] = {
                "total": med([r["total"] for r in rs]), "answer": med([r["answer"] for r in rs]),
                "memory_complete": med(done) if len(done) == len(rs) else None,
                "server_pack_bytes": med([r["server_pack_bytes"] for r in rs]),
            }
        w = row.get("with_median")
        if w:
            row["ratio_total"] = w["total"] / floor_total
            # Against the plain restores that took turns with these runs: drift of this
            # shared machine over the benchmark's minutes falls on both sides alike.
            row["floor_answer"] = med([f["answer"] for f in row["floor"]])
            row["ratio_answer"] = w["answer"] / row["floor_answer"]
            row["ratio_answer_upfront"] = w["answer"] / floor_answer
            row["ratio_complete"] = w["memory_complete"] / floor_total if w["memory_complete"] else None
        rows[rate] = row
    return {"floor": {"total": floor_total, "answer": floor_answer, "samples": floors},
            "medium": {"bytes_on_medium": medium_bytes, **copied}, "version": version, "rates": rows,
            "guest": {"memory_mib": MEMORY_MIB, "disk_mib": DISK_MIB}, "netem": "absent (no sch_netem): tbf only, no added delay",
            "target_max": RESUME_TARGET}


def render(res: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    def trio(m: dict[str, Any] | None) -> str:
        return f"{f(m['total'])} / {f(m['answer'])} / {f(m['memory_complete'])}" if m else "skipped"

    lines = []
    fl = res["floor"]
    lines.append(f"Table 10 (isrsync): resume of a {res['guest']['memory_mib']} MiB guest, site <-> home server over a "
                 f"veth shaped with tc tbf; netem {res['netem']}")
    lines.append(f"floor (plain QEMU restoring the same memory image from a local file): runs {fl['total']:.3f}s "
                 f"(best of 3 tries), first answer {fl['answer']:.3f}s (median of every try); the key holds {res['medium']['bytes_on_medium'] / 1e6:.1f} MB")
    hdr = ["rate", "with key: runs / answers / all RAM (s)", "floor answers (s)", "answers / floor (upfront)",
           "paper with key",
           "without: runs / answers / all RAM (s)", "paper without", "server MB (with / without)"]
    table = [hdr]
    ok_all = True
    answers, ratios = [], []
    for rate, r in res["rates"].items():
        w, wo = r.get("with_median"), r.get("without_median")
        ra = r.get("ratio_answer")
        ok = ra is not None and ra <= res["target_max"]
        ok_all &= ok
        if w:
            answers.append(w["answer"])
        if ra is not None:
            ratios.append(ra)
        table.append([
            rate, trio(w), f(r.get("floor_answer")),
            f"{f(ra)} {'ok' if ok else 'MISS'} ({f(r.get('ratio_answer_upfront'))})", f"{PAPER_WITH[rate]}", trio(wo),
            f"{PAPER_WITHOUT[rate]}",
            (f"{w['server_pack_bytes'] / 1e6:.2f} / " + (f"{wo['server_pack_bytes'] / 1e6:.2f}" if wo else "-"))
            if w else "-",
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for j, row in enumerate(table):
        lines.append(" | ".join(c.ljust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            lines.append("-+-".join("-" * w for w in widths))
    for rate, r in res["rates"].items():
        if r.get("skipped_without"):
            lines.append(f"note {rate}: {r['skipped_without']}")
        if any(x.get("timed_out") for x in r["with"] + r["without"]):
            lines.append(f"note {rate}: some runs did not have all RAM in within --max-seconds")
        lines.append(f"tc {rate}: {r['tc'][0]}  (same on the namespace's end)")
    flat = (max(answers) / min(answers)) if len(answers) > 1 else 1.0
    flat_ratio = (max(ratios) / min(ratios)) if len(ratios) > 1 else 1.0
    lines.append(f"target: with the key, the guest's first answer within {res['target_max']}x of the paired floor's at "
                 f"every rate: {'holds' if ok_all else 'does NOT hold'}; spread across rates (max/min) of the answers "
                 f"{flat:.2f}, of answers / paired floor {flat_ratio:.2f}")
    lines.append("runs: QEMU resumed the guest (lazy memory: the rest of RAM follows); answers: the guest answered on "
                 "its console; all RAM: post-copy has every page. The paper's ISR resumed after the whole image was "
                 "in; its figures are full size, as ours (no state scaling).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default=",".join(RATES), help=f"comma-separated subset of {','.join(RATES)}")
    ap.add_argument("--repeat", type=int, default=3, help="repeats per rate and variant; medians are reported")
    ap.add_argument("--with-repeat", type=int, default=None,
                    help="repeats of the runs with the key (under a second each; default: 3x --repeat)")
    ap.add_argument("--max-seconds", type=float, default=600.0,
                    help="skip a run without the medium whose estimated transfer exceeds this (default 600)")
    ap.add_argument("--run-seconds", type=float, default=1.0, help="how long each resumed guest runs (default 1)")
    default_guest = REPO / ".pytest_cache" / "d" / "isrsync-guest"
    if not default_guest.exists() and Path("/work/main/.pytest_cache/d/isrsync-guest").exists():
        default_guest = Path("/work/main/.pytest_cache/d/isrsync-guest")
    ap.add_argument("--guest-cache", type=Path, default=default_guest, help="where the test guest is built or reused")
    ap.add_argument("--json", action="store_true", help="print JSON (progress on stderr)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    args.with_repeat = args.with_repeat or 3 * args.repeat
    bad = [r for r in args.rates if r not in RATES]
    if bad or args.repeat < 1:
        ap.error(f"unknown rate(s) {bad}; pick from {','.join(RATES)}" if bad else "--repeat must be >= 1")
    if os.geteuid() != 0:
        ap.error("needs root: it creates a network namespace and shapes a veth with tc")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    say("note: netem is absent on this kernel (no sch_netem): the link is shaped with tc tbf only, no added delay")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="isr-usb-", dir="/tmp"))  # short: unix socket paths
    _isolate(work)
    link = Link(say, prefix="isrsync-usb")
    servers: list[NsServer] = []
    try:
        link.up()
        res = asyncio.run(bench(work, args, link, servers, say))
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()
                s.kill()
        link.unshape()
        link.down()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(render(res))
        say(f"benchmark ran in {res['seconds']:.0f}s on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
