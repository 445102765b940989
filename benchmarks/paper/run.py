"""The experiment: one parcel, a reference run on plain QEMU, then every policy at every rate.

Testbed (benchmarks/paper/testbed.py): the home server (``isrsync serve``),
site A, site B and a jukebox site J each in a network namespace of its own, on
one bridge; the server's link is shaped with ``tc tbf`` on both of its ends.
Sites A and B are this process, moved into their namespaces with setns (site A
makes the parcel, a fresh site B per run resumes it); J is ``isrsync`` run with
``ip netns exec``. netem is looked for and, when absent, the report says the
link has a rate and no added delay.

Jukebox (the paper's Table 12): right after ``init_parcel`` (version 1, the
state before the user's changes, as the DVD holds it) J logs in and hoards it
with the CLI, so J's cache holds the pre-change state. For a jukebox run J runs
``isrsync jukebox`` (mDNS + BitTorrent on the LAN) and B resumes with the swarm
on; every other run has the swarm off, so no LAN peer helps it.

Set-up (link unshaped): site A imports the guest's disk as version 1 (the
state a DVD would hold: ``dvd.img`` is that image, kept), cold-boots it, the
user's changes are made (``prepare``), and A suspends onto a USB medium
(directory formatted by sneakernet): version 2, with a memory image, is what
every run resumes. Its memory image and its disk, decoded from A's cache, are
the reference's input.

Reference: plain QEMU (isrsync's own command line, raw local disk) restores
version 2's memory image from a local file (the local restore floor) and runs
the workload: its operation times are the denominators of slowdown.

Per rate and policy a fresh site B resumes version 2 over the shaped link:
the resume latency is until the guest's agent answers; the workload's
operation times come from inside the guest. Then the link is unshaped and the
run suspends (the dirty residue and the suspend's time are recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import workload as wl
from .guest import MEMORY_MIB, build_debian_guest
from .testbed import tbf

RATES = {"100mbit": 100e6, "10mbit": 10e6, "1mbit": 1e6, "100kbit": 100e3}
POLICIES = ("baseline", "proactive", "demand", "usb", "dvd", "jukebox", "auto")
USER = "bench"
PASSPHRASE = "bench passphrase"


@dataclass
class Settings:
    rates: list[str]
    policies: list[str]
    flavour: str  # debian | busybox
    ops: int = 100
    think_ms: int = 500
    seed: int = 1
    max_seconds: float = 900.0  # a transfer estimated longer than this is not run
    disk_mib: int = 2048
    guest_cache: Path | None = None
    busybox_cache: Path | None = None
    repeat: int = 1
    once: list[str] = field(default_factory=list)  # policies run in the first repeat only
    memory_mib: int = MEMORY_MIB
    # The memory image of the full-size run this one is scaled down from (--full-size).
    full_memory_bytes: int | None = None


@dataclass
class Hooks:
    say: Callable[[str], None]
    stage: Callable[[str], None] = lambda s: None  # what runs now
    op: Callable[[wl.Op], None] = lambda o: None  # each workload operation
    done_run: Callable[[], None] = lambda: None


@dataclass
class Setup:
    acct: Any
    pid: Any
    version: int
    medium: Path
    dvd: Path
    state_bytes: int  # what baseline and proactive must move: disk, boot files and memory image
    memory_bytes: int
    disk_bytes: int
    guest: dict[str, Any]
    floor: dict[str, Any] = field(default_factory=dict)


def netem_present() -> bool:
    """Whether the kernel has sch_netem (built in, loaded or loadable)."""
    rel = os.uname().release
    for p in (Path(f"/lib/modules/{rel}/kernel/net/sched"),):
        if any(p.glob("sch_netem*")):
            return True
    with contextlib.suppress(OSError):
        if "sch_netem" in Path("/proc/modules").read_text():
            return True
    with contextlib.suppress(OSError):
        if "CONFIG_NET_SCH_NETEM=y" in Path(f"/boot/config-{rel}").read_text():
            return True
    return False


def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


async def _console(serial: Path, flavour: str) -> wl.Driver:
    con = await asyncio.to_thread(wl.Console, serial)
    return wl.driver(flavour, con)


async def make_guest(work: Path, s: Settings, hooks: Hooks) -> tuple[dict[str, Any], Path]:
    """The guest's boot files and its disk image (a sparse copy the parcel is made from)."""
    disk = work / "disk.img"
    if s.flavour == "debian":
        g = await asyncio.to_thread(build_debian_guest, s.guest_cache or Path("/var/cache/isrsync-eval"),
                                    s.disk_mib, hooks.say)
        await asyncio.to_thread(subprocess.run, ["cp", "--sparse=always", str(g.image), str(disk)], check=True)
        return {"flavour": "debian", "kernel": str(g.kernel), "initrd": str(g.initrd), "cmdline": g.cmdline,
                "disk_mib": g.disk_mib, "recipe": g.recipe, "build_seconds": g.build_seconds}, disk
    from isrsync.demo.guest import build_guest, make_disk_image

    g = await asyncio.to_thread(build_guest, s.busybox_cache, hooks.say)
    await asyncio.to_thread(make_disk_image, disk, s.disk_mib, wl.busybox_dataset())
    return {"flavour": "busybox", "kernel": str(g.kernel), "initrd": str(g.initrd), "cmdline": g.cmdline,
            "disk_mib": s.disk_mib}, disk


def _isr_env(work: Path, host: str, swarm: bool) -> dict[str, str]:
    d = work / f"site-{host}"
    d.mkdir(exist_ok=True)
    return {**os.environ, "ISRSYNC_CACHE": str(d / "cache"), "ISRSYNC_CONFIG": str(d / "config.json"),
            "ISRSYNC_RUNTIME": str(d / "run"), "ISRSYNC_PASSPHRASE": PASSPHRASE,
            "ISRSYNC_SWARM": "on" if swarm else "off"}


def _isr(bed, work: Path, host: str, *args: str, timeout: float = 1800) -> str:
    """``isrsync ARGS`` as site ``host`` in its namespace; its stdout, or one line why not."""
    from benchmarks.usb_resume import isrsync_cmd

    r = subprocess.run(bed.exec_argv(host, *isrsync_cmd(), *args), env=_isr_env(work, host, False),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"isrsync {' '.join(args)} at {host} failed: {r.stderr.strip()[-1500:]}")
    return r.stdout


async def jukebox_holds_version(work: Path, bed, server, token: str, hooks: Hooks) -> dict[str, Any]:
    """Site J logs in and hoards the parcel's latest version (version 1 when called): its cache then holds
    the state before the user's changes."""
    hooks.stage("set-up: jukebox site J hoards version 1")
    t0 = time.perf_counter()
    await asyncio.to_thread(_isr, bed, work, "J", "login", server.url, "--user", USER, "--token", token,
                            "--kdf-min", "--insecure")
    sent = server.pack_bytes_sent()
    await asyncio.to_thread(_isr, bed, work, "J", "hoard", "vm")
    return {"hoard_seconds": round(time.perf_counter() - t0, 1), "hoard_pack_bytes": server.pack_bytes_sent() - sent}


class Jukebox:
    """``isrsync jukebox`` at J for one run: started, waited for until it seeds, stopped."""

    def __init__(self, work: Path, bed) -> None:
        from benchmarks.usb_resume import isrsync_cmd

        self.log = work / "jukebox.log"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(bed.exec_argv("J", *isrsync_cmd(), "jukebox", "--json", "--round", "1",
                                                       "--interface", bed.addr["J"]),
                                         env=_isr_env(work, "J", True), stdout=subprocess.PIPE, stderr=err,
                                         text=True, start_new_session=True)

    def wait_seeding(self, timeout: float = 300) -> dict[str, Any]:
        """The first state line with packs being seeded."""
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not sel.select(max(0.0, end - time.monotonic())):
                break
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the jukebox ended (rc {self.proc.wait(30)}): {self.log.read_text()[-1500:]}")
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") == "state" and int(ev.get("packs", 0)) > 0:
                    return ev
        raise RuntimeError(f"the jukebox seeded nothing within {timeout:.0f}s: {self.log.read_text()[-1500:]}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def setup(work: Path, s: Settings, server, token: str, hooks: Hooks, made: tuple[dict[str, Any], Path],
                bed=None) -> Setup:
    """The account, the parcel made at site A from ``made`` (the guest and its disk), the media."""
    from isrsync.keys import KdfLimits
    from isrsync.site.account import Account, login
    from isrsync.site.cache import SiteCache
    from isrsync.site.create import init_parcel
    from isrsync.site.media import plugin
    from isrsync.site.parcel import open_site
    from isrsync.site.runtime import Runtime
    from sneakernet.medium import format_medium

    hooks.stage("set-up: account, guest, parcel")
    acct = Account(server.url, USER, token)
    await login(acct, PASSPHRASE, limits=KdfLimits.MIN)
    guest, disk = made
    dvd = work / "dvd.img"  # the state before the user's changes, as a read-only medium would hold it
    await asyncio.to_thread(subprocess.run, ["cp", "--sparse=always", str(disk), str(dvd)], check=True)
    medium = work / "medium"
    medium.mkdir()
    format_medium(medium, "bench")

    site_a = await open_site(SiteCache(work / "A"), acct)
    try:
        hooks.stage("set-up: init_parcel (chunking the disk)")
        pid, _ = await init_parcel(site_a, "vm", disk, memory_mib=s.memory_mib, kernel=Path(guest["kernel"]),
                                   initrd=Path(guest["initrd"]), append=guest["cmdline"])
        if bed is not None and "jukebox" in s.policies:
            guest["jukebox"] = await jukebox_holds_version(work, bed, server, token, hooks)
            hooks.say(f"jukebox site J holds version 1: hoarded {guest['jukebox']['hoard_pack_bytes'] / 1e6:.1f} MB "
                      f"in {guest['jukebox']['hoard_seconds']}s")
        hooks.stage("set-up: cold boot at site A")
        rt = Runtime(site_a, pid, serial=work / "serA", rundir=work / "runA")
        try:
            t0 = time.perf_counter()
            await rt.resume()
            drv = await _console(work / "serA", s.flavour)
            try:
                await asyncio.to_thread(drv.answer, 600)
                guest["cold_boot_seconds"] = round(time.perf_counter() - t0, 1)
                hooks.say(f"guest booted at site A in {guest['cold_boot_seconds']}s; making the user's changes")
                await asyncio.to_thread(drv.prepare)
            finally:
                drv.con.close()
            await asyncio.sleep(2)  # let the guest settle: the image is of an idle desktop
            hooks.stage("set-up: suspend at A onto the USB medium")
            res = await rt.suspend(medium=plugin().open_sink(medium))
            if not res.committed or res.medium is None or not res.medium.published:
                raise RuntimeError(f"the set-up suspend did not commit or did not reach the medium: {res}")
        finally:
            await rt.close()
        version = res.version
        assert version is not None
        floor = await floor_inputs(work, site_a, pid, version, guest)
    finally:
        await site_a.close()
    disk_bytes = floor.pop("disk_stored_bytes")
    st = Setup(acct, pid, version, medium, dvd, state_bytes=disk_bytes + res.memory_bytes,
               memory_bytes=res.memory_bytes, disk_bytes=disk_bytes, guest=guest, floor=floor)
    hooks.say(f"version {version}: memory image {res.memory_bytes / 1e6:.1f} MB, disk's stored chunks "
              f"{disk_bytes / 1e6:.1f} MB; the medium holds {_tree_bytes(medium) / 1e6:.1f} MB")
    return st


async def floor_inputs(work: Path, site, pid, version: int, guest: dict[str, Any]) -> dict[str, Any]:
    """Version ``version``'s memory as one migration stream and its disk as a raw file (benchmarks/vm.py)."""
    from benchmarks.vm import floor_from_version

    fdir = work / "floor"
    m, cfg, memfile, raw, _ = await floor_from_version(site, pid, version, fdir, guest["kernel"], guest["initrd"],
                                                       guest["cmdline"])
    # The disk's distinct stored chunks (all-zero ones are not stored): what a full fetch moves, before zstd.
    stored = len(m.keyring.tags()) * (128 << 10)
    return {"dir": str(fdir), "memfile": str(memfile), "raw": str(raw), "cfg": cfg, "accel": cfg.accel,
            "disk_stored_bytes": stored}


async def reference(work: Path, s: Settings, st: Setup, hooks: Hooks) -> dict[str, Any]:
    """Plain QEMU on a local raw disk, restored from the same memory image: the slowdown reference."""
    from benchmarks.vm import floor_qemu_class

    hooks.stage("reference: plain QEMU, local raw disk")
    fdir = Path(st.floor["dir"])
    q = floor_qemu_class()(st.floor["cfg"], fdir / "ref", Path(st.floor["raw"]), Path(st.floor["memfile"]),
                           fdir / "ser")
    try:
        t0 = time.perf_counter()
        await q.start()
        await q.wait_restored()
        if await q.status() == "paused":
            await q.cont()
        restored = time.perf_counter() - t0
        drv = await _console(fdir / "ser", s.flavour)
        try:
            await asyncio.to_thread(drv.answer, 120)
            answer = time.perf_counter() - t0
            hooks.stage("reference: workload")
            run = await asyncio.to_thread(drv.run, s.seed, s.ops, s.think_ms, 3600, hooks.op)
        finally:
            drv.con.close()
        await q.quit()
    finally:
        await q.close()
    hooks.done_run()
    return {"restore_seconds": restored, "answer_seconds": answer, **_run_json(run)}


def _run_json(run: wl.WorkloadRun) -> dict[str, Any]:
    return {"busy_seconds": run.busy_seconds, "wall_seconds": run.wall_seconds, "timed_in": run.timed_in,
            "ops": [dataclasses.asdict(o) for o in run.ops]}


def why_not(policy: str, rate: str, st: Setup, s: Settings) -> str | None:
    """Why a run cannot be made (printed in its place), or None."""
    if policy in ("baseline", "proactive"):
        est = st.state_bytes * 8 / RATES[rate]
        if est > s.max_seconds:
            return (f"not run: moving the whole state ({st.state_bytes / 1e6:.0f} MB) at {rate} takes about "
                    f"{est:.0f}s > --max-seconds {s.max_seconds:.0f}")
    return None


async def policy_run(work: Path, s: Settings, st: Setup, policy: str, rate: str, link, server, hooks: Hooks,
                     repeat: int = 0) -> dict[str, Any]:
    from isrsync.site.cache import SiteCache
    from isrsync.site.media import plugin
    from isrsync.site.parcel import hoard, open_site
    from isrsync.site.policy import MemoryMode, Policy
    from isrsync.site.runtime import Runtime

    tag = f"{rate}-{policy}-{repeat}"
    box = None
    if policy == "jukebox":  # before site B opens: the swarm setting is read when the resume starts
        hooks.stage(f"{rate} {policy}: starting the jukebox at J")
        box = Jukebox(work, link)
        first = await asyncio.to_thread(box.wait_seeding)
        os.environ["ISRSYNC_SWARM"] = "on"
    site = await open_site(SiteCache(work / f"B-{tag}"), st.acct)
    rt: Runtime | None = None
    out: dict[str, Any] = {"policy": policy, "rate": rate, "repeat": repeat}
    if box is not None:
        out["jukebox_state"] = first
    feeders = contextlib.AsyncExitStack()
    try:
        lookaside = []
        # Indexing a medium is not timed: it happens when it is plugged in, before a resume.
        if policy == "usb":
            lookaside = [await asyncio.to_thread(plugin().open_source, st.medium, site.cache.path)]
        elif policy == "dvd":
            from sneakernet.seed import open_seeds, seed_image

            await asyncio.to_thread(seed_image, st.dvd, site.cache.path, site.secret())
            lookaside = list(await asyncio.to_thread(open_seeds, site.cache.path, site.secret()))
        mode = {"baseline": Policy.BASELINE, "proactive": Policy.PROACTIVE, "demand": Policy.DEMAND,
                "usb": Policy.LOOKASIDE, "dvd": Policy.LOOKASIDE, "jukebox": Policy.LOOKASIDE,
                "auto": Policy.AUTO}[policy]
        sent0 = server.pack_bytes_sent()
        link.shape(RATES[rate])
        if policy == "proactive":  # t3: the hoard before the user arrives (not part of the resume latency)
            hooks.stage(f"{rate} {policy}: hoarding")
            t0 = time.perf_counter()
            await hoard(site, st.pid, st.version)
            out["hoard_seconds"] = time.perf_counter() - t0
            out["hoard_pack_bytes"] = server.pack_bytes_sent() - sent0
        serial = work / f"ser-{tag}"
        rt = Runtime(site, st.pid, policy=mode, memory=MemoryMode.LAZY, serial=serial, rundir=work / f"run-{tag}",
                     lookaside=lookaside)
        hooks.stage(f"{rate} {policy}: resuming")
        sent1 = server.pack_bytes_sent()
        t0 = time.perf_counter()
        if box is not None:
            # As `isrsync resume` does (site/run.py): the LAN source joins when discovery finds J.
            from isrsync.swarm.feed import swarm_feeder

            lan_events: list[str] = []
            out["lan_events"] = lan_events
            await feeders.enter_async_context(
                swarm_feeder(rt, st.pid, lambda kind, ev: lan_events.append(f"{kind}: {ev.get('message')}")))
        rep = await rt.resume(st.version)
        drv = await _console(serial, s.flavour)
        try:
            await asyncio.to_thread(drv.answer, s.max_seconds + 600)
            out["resume_seconds"] = time.perf_counter() - t0
            out["runs_seconds"] = rep.seconds["total"]
            out["resume_steps"] = dict(rep.seconds)
            out["resume_pack_bytes"] = server.pack_bytes_sent() - sent1
            out["at_answer"] = at_answer(rt)
            hooks.stage(f"{rate} {policy}: workload")
            run = await asyncio.to_thread(drv.run, s.seed, s.ops, s.think_ms, 4 * s.max_seconds + 3600, hooks.op)
        finally:
            drv.con.close()
        out.update(_run_json(run))
        out["pack_bytes"] = server.pack_bytes_sent() - sent0
        if rt.chain is not None:
            out["sources"] = [{k: v for k, v in dataclasses.asdict(i).items()
                               if isinstance(v, (int, float, str, bool, type(None)))} for i in rt.chain.infos()]
        link.unshape()
        # The dirty residue both ways, from one run: without trickle a suspend
        # uploads every chunk written since the resume (the disk's dirty set); with
        # it, only those the trickle has not staged yet, or that changed since.
        stat = rt.status()
        out["residue"] = {"without_trickle_chunks": stat.dirty_chunks, "with_trickle_chunks": stat.residue_chunks,
                          "trickled_chunks": stat.trickled_chunks}
        hooks.stage(f"{rate} {policy}: suspending (link unshaped)")
        susp = await rt.suspend()
        out["suspend"] = {"committed": susp.committed, "dirty_chunks": susp.dirty_chunks,
                          "dirty_bytes_max": susp.dirty_chunks * (128 << 10), "memory_bytes": susp.memory_bytes,
                          "seconds": susp.seconds}
        return out
    finally:
        link.unshape()
        if rt is not None:
            await rt.close()
        await feeders.aclose()
        await site.close()
        if box is not None:
            os.environ["ISRSYNC_SWARM"] = "off"
            box.stop()
        shutil.rmtree(work / f"B-{tag}", ignore_errors=True)
        hooks.done_run()


def at_answer(rt) -> dict[str, Any]:
    """What issue 15 measures up to the guest's first answer: fault service times and wasted bytes."""
    from isrsync.vm.postcopy import percentile

    st = rt.status()
    misses = [1000 * t for t in rt.disk.stats.miss_times]
    return {
        "memory": {k: st.memory.get(k) for k in ("requests", "requested_chunks", "pushed_chunks", "hot_chunks",
                                                 "fault_ms_median", "fault_ms_p99", "fault_ms_max")},
        "disk_misses": len(misses),
        "disk_miss_ms_median": round(percentile(misses, 0.5), 1) if misses else None,
        "disk_miss_ms_p99": round(percentile(misses, 0.99), 1) if misses else None,
        "disk_miss_ms_max": round(max(misses), 1) if misses else None,
        "fetched_bytes": sum(i.bytes for i in st.sources if i.kind != "cache"),
        "wasted_bytes": sum(i.wasted_bytes for i in st.sources),
        "late": sum(i.late for i in st.sources),
        "errors": sum(i.errors for i in st.sources if i.kind != "cache"),
    }


class _ServerHost:
    """What tests/shapedlink.py's NsServer.start_in needs: the namespace and the address to listen on."""

    def __init__(self, bed) -> None:
        self.ns, self.ns_ip = bed.ns["server"], bed.addr["server"]


async def experiment(work: Path, s: Settings, bed, servers: list, hooks: Hooks) -> dict[str, Any]:
    from benchmarks.usb_resume import NsServer, isrsync_cmd

    data = work / "server-data"
    # The user before the server starts (as benchmarks/usb_resume.py): add-user makes the data directory.
    out = (await asyncio.to_thread(subprocess.run, [*isrsync_cmd(), "server", "add-user", USER, "--data", str(data),
                                                   "--json"], check=True, capture_output=True, text=True)).stdout
    srv = NsServer(data)
    servers.append(srv)
    await asyncio.to_thread(srv.start_in, _ServerHost(bed))
    hooks.say(f"home server in namespace {bed.ns['server']} at {srv.url}; sites A, B and jukebox J in "
              f"{', '.join(bed.ns[h] for h in ('A', 'B', 'J'))}")
    # Built here, in this host's namespace: a build may download packages, and the
    # testbed's namespaces reach nothing but each other.
    hooks.stage("set-up: the guest")
    made = await make_guest(work, s, hooks)
    with bed.enter("A"):
        st = await setup(work, s, srv, json.loads(out)["token"], hooks, made, bed)
    ref = await reference(work, s, st, hooks)
    hooks.say(f"reference: restore {ref['restore_seconds']:.2f}s, answers {ref['answer_seconds']:.2f}s, "
              f"{len(ref['ops'])} operations in {ref['busy_seconds']:.1f}s ({ref['wall_seconds']:.1f}s wall)")
    runs: list[dict[str, Any]] = []
    for rep in range(s.repeat):
        for rate in s.rates:
            for policy in s.policies:
                if rep > 0 and policy in s.once:
                    hooks.done_run()
                    continue
                reason = why_not(policy, rate, st, s)
                if reason is not None:
                    if rep == 0:
                        runs.append({"policy": policy, "rate": rate, "repeat": rep, "not_run": reason})
                        hooks.say(f"{rate} {policy}: {reason}")
                    hooks.done_run()
                    continue
                with bed.enter("B"):
                    r = await policy_run(work, s, st, policy, rate, bed, srv, hooks, rep)
                runs.append(r)
                lan = next((x for x in r.get("sources", []) if x.get("name") == "lan"), None)
                hooks.say(f"{rate} {policy} #{rep + 1}: answers after {r['resume_seconds']:.2f}s; workload "
                          f"{r['busy_seconds']:.1f}s (reference {ref['busy_seconds']:.1f}s); server sent "
                          f"{r['pack_bytes'] / 1e6:.1f} MB" + (f"; from the LAN {lan['hits']} chunks, {lan['bytes'] / 1e6:.1f} MB" if lan else ""))
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()},
        "guest": st.guest, "version": st.version,
        "state": {"bytes": st.state_bytes, "memory_bytes": st.memory_bytes, "disk_bytes": st.disk_bytes,
                  "medium_bytes": _tree_bytes(st.medium)},
        "accel": st.floor["accel"],
        "link": {"netem": netem_present(), "tbf": {r: " ".join(tbf(RATES[r])) for r in s.rates},
                 "testbed": {"hosts": dict(bed.addr), "shaped": "the server's veth, both ends (its eth0 and its "
                             "bridge port); site-to-site (LAN) traffic unshaped"}},
        "reference": ref, "runs": runs,
    }
