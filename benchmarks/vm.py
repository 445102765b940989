"""VM benchmark: resume latency, NBD throughput and suspend time against plain QEMU.

Everything runs in one process, in the same run, against its floor (what plain
QEMU or qemu-nbd does with a local file), and medians of ``--repeat`` repeats are
printed with the ratios. TCG is used when KVM is absent (it is on the reference
machine: 2 cores, QEMU 7.2), so guest-side times are those of an emulated CPU.

What it measures
----------------
Set-up (once): a throw-away home (``file://`` directory), an account logged in
with the minimum KDF limits, the test guest of :mod:`isrsync.demo.guest` (256 MiB
RAM, a 64 MiB ext4 disk), ``init_parcel`` at site A, a cold boot at A, a file
written from inside the guest, and a suspend at A: version 2 has a memory image.

1. RESUME LATENCY (proactive policy) vs the local floor. Per repeat, a fresh
   site B_i hoards the head version (``isrsync.site.parcel.hoard``: every disk,
   boot and memory chunk in B_i's cache), then:

   * isrsync: ``Runtime(policy=Policy.PROACTIVE, memory=--memory).resume()`` at
     B_i; reported is ``report.seconds["total"]`` (until the guest runs) and its
     breakdown (manifest, lock, fetch_before_start, qemu_start, memory_image).
     With ``--memory lazy`` (the default) the guest runs before all of its RAM
     is in: ``memory_complete`` is when the rest had arrived, and the page
     faults it took on the way are counted. A resumed guest gets no boot files
     (it reboots through a fresh QEMU). The guest's counter is read over the
     serial console to prove it runs, it runs for ``--run-seconds``, then
     ``suspend()`` (measurement 3) makes the next version for B_{i+1}; that
     version carries the chunks this run faulted on first, which the next lazy
     resume puts in place before its guest starts (so repeat 1, resuming the
     set-up's cold boot, has none).
   * floor: the SAME guest state, as plain QEMU saves and restores it: one
     migration stream in a local file, RAM included. isrsync keeps RAM apart
     (by address, in a memfd); so, untimed, :func:`floor_image` decodes the
     version's RAM and device state from B_i's cache into a QEMU and has it
     save everything to the file. The same version's disk is decoded into a raw file. QEMU is started with
     exactly the arguments isrsync's :class:`~isrsync.vm.qemu.Qemu` builds
     (machine, CPU, memory, kernel/initrd/append, serial, display), except that
     the disk is the raw file (``-blockdev driver=raw,...,file.filename=RAW``,
     same node name, same virtio-blk device) and ``-incoming "exec:cat FILE"``.
     Timed from before the exec to ``cont`` returned, with the same QMP
     connection (:meth:`Qemu.start`: a socketpair, no socket file to poll) and
     the same wait for the end of the restore (:meth:`Qemu.wait_restored`:
     QEMU's MIGRATION events, no polling) as isrsync. The floor QEMU is not
     held in ``--preconfig`` (it has no boot files to wait for). The floor is
     restored FLOOR_TRIES times per repeat and the fastest counts (see
     :func:`floor_run`: it keeps this machine's noise out of the floor, which
     only makes the target harder). The restored guest's counter is read too
     (the floor really restored), it runs for ``--run-seconds``, then it is
     saved (measurement 3).

   Ratio isrsync total / floor total, target <= 1.2. Because a lazy guest
   runs before its RAM is in, both sides are also timed to the guest's FIRST
   ANSWER on its serial console (``counter``, sent as soon as the resume or
   restore returned; ratio printed too): the time a user waits for the guest
   to respond, faults and all. Floor and isrsync take
   turns going first. Also the CPU each side burnt during its resume (this
   process's ``time.process_time()``, QEMU's threads' schedstat; the floor's
   ``cat`` is not counted): divided by the cores, a bound the wall time
   cannot beat, which shows whether a resume waits on something or is simply
   CPU-bound.

2. NBD THROUGHPUT from a warm cache vs qemu-nbd. A 256 MiB raw image of mixed
   content in 1 MiB stripes (a shuffled quarter each of zeros, random bytes,
   Python stdlib source text and slices of the qemu-system-x86_64 binary) is
   made a parcel (``init_parcel``), and a fresh site hoards it. Served side by
   side in the same run:

   * isrsync: ``NbdServer(ParcelDisk(keyring, secret, cache, chain, state,
     read_only=True))`` on a unix socket (in this process, like a real resume);
   * qemu-nbd: ``qemu-nbd -f raw -k SOCK --persistent -r -x disk`` on the
     original raw file (in the page cache after it was written);
   * py-raw (diagnostic, not a target): isrsync's ``NbdServer`` over a
     ``RawFileBackend`` of the same raw file: what the Python NBD server costs
     alone, so a miss can be put on the server or on the parcel disk.

   One full sequential pass over each server first (warm-up; it leaves
   ParcelDisk's hot-chunk RAM cache (HOT_BYTES, 256 MiB by default, ISRSYNC_HOT_MIB)
   holding what was read last, which is its realistic state). Then per repeat, servers taking
   turns going first:

   * sequential: ``nbdcopy --connections=1 --no-extents URI null:`` (a full
     256 MiB pass; one connection and no block-status because isrsync offers
     neither multi-conn nor meta contexts, while qemu-nbd offers both, and
     extents would let nbdcopy skip qemu-nbd's zero holes without reading them);
     nbdcopy's defaults otherwise (256 KiB requests, 64 in flight);
   * random 4 KiB and 64 KiB reads: ``fio --ioengine=nbd --rw=randread
     --iodepth=16`` (aligned, over the whole export, ``--fio-seconds`` each,
     fio's fixed random seed so every server gets the same offsets). 16 in
     flight is what QEMU's own NBD client allows (MAX_NBD_REQUESTS).

   MB/s (MB = 10**6 bytes) and ratio isrsync / qemu-nbd, target >= 0.5. For
   isrsync also the chunk decodes per NBD read (a 4 KiB read that misses the
   hot-chunk cache decodes a whole 128 KiB chunk).

3. SUSPEND TIME vs saving the same memory to a local file. isrsync:
   ``Runtime.suspend()``'s ``memory_seconds`` (stop + migrate the device
   state into the encoder + guest RAM from its memfd, a chunk unchanged since
   the resume costing one hash + packs in the cache) and ``seconds`` (everything, commit to the
   home included). Floor: on the floor guest of measurement 1 (restored from
   the same image, run for the same time, so same memory size and state),
   ``stop`` + ``migrate-set-parameters max-bandwidth`` (as isrsync sets it) +
   ``migrate "exec:cat > FILE"`` until its MIGRATION event says completed
   (:meth:`Qemu.migrate_out`, as isrsync). isrsync's packs are fsynced, so the fsync of the floor's
   file is timed separately and shown as floor+fsync. Ratios memory_seconds /
   floor and seconds / floor.

Run
---
    .venv/bin/python benchmarks/vm.py                     # 3 repeats, tables
    .venv/bin/python benchmarks/vm.py --repeat 5 --json   # same numbers as JSON
    .venv/bin/python benchmarks/vm.py --only nbd          # one part only
    .venv/bin/python benchmarks/vm.py --only vm --memory eager   # RAM in before the guest runs

Needs qemu-system-x86_64, qemu-img, qemu-nbd, nbdcopy (libnbd-bin), fio (with
its nbd engine, as Debian's is: ``apt-get install fio``) and mkfs.ext4. The guest
is built (or reused) in ``--guest-cache``, by default the tests' cache. Exit
status is 0 whether or not a target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shlex
import shutil
import socket
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
MEMORY_MIB = 256
DISK_MIB = 64
NBD_MIB = 256
RESUME_TARGET = 1.2  # isrsync / floor, at most
NBD_TARGET = 0.5  # isrsync / qemu-nbd, at least
FIO_DEPTH = 16  # QEMU's NBD client keeps at most 16 requests in flight

Say = Callable[[str], None]


def _isolate(work: Path) -> None:
    """Config, unlocked keys and default cache all inside the work directory."""
    os.environ["ISRSYNC_CONFIG"] = str(work / "cfg.json")
    os.environ["ISRSYNC_RUNTIME"] = str(work / "rt")
    os.environ["ISRSYNC_CACHE"] = str(work / "default-cache")


def _home(work: Path) -> Path:
    """The benchmark's throw-away home directory, made on first use (login never makes one)."""
    from isrsync.server.repo import Repository

    home = work / "home"
    Repository(home, create=True).close()
    return home


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- guest I/O


class Serial:
    """The guest's ttyS0 (a unix socket QEMU listens on); blocking, use from a thread."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""

    def line(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("the guest did not answer on its serial console")
            self.s.settimeout(left)
            d = self.s.recv(4096)
            if not d:
                raise EOFError("the guest's serial console closed")
            self.buf += d
        ln, self.buf = self.buf.split(b"\n", 1)
        return ln.decode(errors="replace").strip()

    def wait(self, prefix: str, timeout: float = 120.0) -> str:
        end = time.monotonic() + timeout
        while True:
            ln = self.line(max(0.1, end - time.monotonic()))
            if ln.startswith(prefix):
                return ln

    def cmd(self, c: str, timeout: float = 60.0) -> str:
        self.s.sendall(c.encode() + b"\n")
        return self.wait("GUEST:", timeout)

    def close(self) -> None:
        self.s.close()


async def guest_counter(path: Path) -> int:
    def go() -> int:
        s = Serial(path)
        try:
            reply = s.cmd("counter")
        finally:
            s.close()
        if not reply.startswith("GUEST: COUNTER "):
            raise RuntimeError(f"unexpected guest reply {reply!r}")
        return int(reply.split()[-1])

    return await asyncio.to_thread(go)


# --------------------------------------------------------------------------- the floor VM


def floor_qemu_class():
    from isrsync.vm.qemu import Qemu

    class FloorQemu(Qemu):
        """isrsync's own QEMU command line, with a raw disk file and ``-incoming exec:cat``."""

        def __init__(self, cfg, rundir: Path, raw: Path, memfile: Path | None, serial: Path) -> None:
            super().__init__(cfg, rundir, rundir / "unused-nbd.sock", serial=serial)
            self.raw = raw
            self.memfile = memfile

        def args(self, incoming: bool, **kw) -> list[str]:
            a = super().args(False, **kw)
            k = a.index("-blockdev") + 1
            assert a[k].startswith("driver=nbd,node-name=disk0,"), a[k]
            a[k] = f"driver=raw,node-name=disk0,file.driver=file,file.filename={self.raw}"
            if self.memfile is None:  # fed over QMP (load_memory)
                return a + ["-incoming", "defer"]
            return a + ["-incoming", f"exec:cat {shlex.quote(str(self.memfile))}"]

    return FloorQemu


async def floor_save(q, out: Path) -> dict[str, float]:
    """``stop`` + ``migrate exec:cat > FILE`` to completion, then the file's fsync."""
    t0 = time.perf_counter()
    await q.stop()
    await q.migrate_out(f"exec:cat > {shlex.quote(str(out))}")
    t_save = time.perf_counter() - t0
    t1 = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"save": t_save, "fsync": time.perf_counter() - t1, "bytes": out.stat().st_size}


async def floor_files(m, cache, chain, fdir: Path, kernel: str, initrd: str, cmdline: str):
    """The floor of version ``m``: its device state and raw disk written into ``fdir``, and the
    plain QEMU's configuration, with the same devices as the saved state names (the balloon of
    free page reporting too). Returns (cfg, memfile, raw, devfile); :func:`floor_image` fills memfile."""
    from isrsync.manifest import MemoryImage
    from isrsync.site.parcel import write_blob
    from isrsync.vm.qemu import VmConfig, accelerator

    memfile, raw, devfile = fdir / "mem.bin", fdir / "disk.raw", fdir / "device-state.bin"
    for blob, path in ((m.memory, devfile), (MemoryImage(m.keyring.size, m.keyring), raw)):
        with open(path, "wb") as f:  # noqa: ASYNC230  (written once, untimed)
            await write_blob(blob, f.fileno(), cache, chain)
    cfg = VmConfig(memory_mib=m.vm.memory_mib, cpus=m.vm.cpus, machine=m.vm.machine, cpu_model=m.vm.cpu_model,
                   accel=accelerator("auto"), display="none", kernel=kernel, initrd=initrd, cmdline=cmdline,
                   free_page_reporting=m.vm.free_page_reporting)
    return cfg, memfile, raw, devfile


async def floor_from_version(site, pid, version: int, fdir: Path, kernel: str, initrd: str, cmdline: str):
    """Version ``version`` of a parcel, from ``site``'s cache, made into the floor's inputs
    (:func:`floor_files`, then :func:`floor_image`): ``(manifest, cfg, memfile, raw, devfile)``."""
    from isrsync.site.parcel import load_version

    state = site.state(pid)
    try:
        m = await load_version(site, pid, version, state)
    finally:
        state.close()
    assert m.memory is not None and m.keyring is not None
    chain = site.registry(pid)
    fdir.mkdir()
    try:
        cfg, memfile, raw, devfile = await floor_files(m, site.cache, chain, fdir, kernel, initrd, cmdline)
        await floor_image(floor_qemu_class(), cfg, m.memory, site.cache, chain, fdir, raw, devfile, memfile)
    finally:
        await chain.close()
    return m, cfg, memfile, raw, devfile


async def floor_image(FloorQemu, cfg, memory, cache, chain, fdir: Path, raw: Path, devfile: Path,
                      memfile: Path) -> None:
    """The floor's input: this version's memory as ONE plain QEMU migration stream.

    isrsync keeps RAM apart from the device state; plain QEMU restores both from
    a single stream. So (untimed) a QEMU gets the version's RAM in a memfd and
    its device state, and saves everything, RAM included, to ``memfile``: the
    same guest state, in the form plain QEMU restores from a local file.
    """
    from isrsync.site.parcel import write_blob
    from isrsync.manifest import MemoryImage

    ram_fd = os.memfd_create("floor-ram")
    try:
        if memory.ram is not None:
            await write_blob(MemoryImage(memory.ram.size, memory.ram), ram_fd, cache, chain)
        else:
            os.ftruncate(ram_fd, cfg.memory_mib << 20)
        q = FloorQemu(dataclasses.replace(cfg, ram_fd=ram_fd), fdir / "mk", raw, None, fdir / "mk.ser")
        state = devfile.read_bytes()

        def produce(fd: int) -> None:
            view = memoryview(state)
            while view:
                view = view[os.write(fd, view[: 1 << 20]) :]

        try:
            await q.start(incoming=True, pass_fds=(ram_fd,))
            await q.load_memory(produce, without_ram=memory.ram is not None)
            await q.ignore_shared(False)
            await q.migrate_out(f"exec:cat > {shlex.quote(str(memfile))}")
            await q.quit()
        finally:
            await q.close()
    finally:
        os.close(ram_fd)


# --------------------------------------------------------------------------- 1 + 3: resume, suspend


def qemu_cpu(pid: int) -> float:
    """CPU seconds a QEMU has used so far: the sum over its threads (schedstat, ns)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return total / 1e9


FLOOR_TRIES = 3


async def floor_restore(q, serial: Path) -> dict[str, float]:
    """One timed floor restore, to ``cont`` returned, then to the guest's first answer; QEMU is left running."""
    t0 = time.perf_counter()
    await q.start()
    t1 = time.perf_counter()
    await q.wait_restored()
    t2 = time.perf_counter()
    if await q.status() == "paused":
        await q.cont()
    t3 = time.perf_counter()
    cpu = qemu_cpu(q.proc.pid)
    counter = await guest_counter(serial)
    return {"qemu_start": t1 - t0, "restore": t2 - t1, "cont": t3 - t2, "total": t3 - t0,
            "cpu_qemu": cpu, "cpu": cpu, "answer": time.perf_counter() - t0, "counter": counter}


async def floor_run(make_q, fdir: Path, run_seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """Restore the floor VM from its file (best of FLOOR_TRIES), prove it runs, let it run, save it.

    On this shared machine about one plain restore in three burns 0.1-0.2 s more
    CPU with the same page faults (noise from outside the guest, not the
    restore's work); the best of a few tries keeps that out of the floor, which
    only makes the target harder for isrsync.
    """
    tries = []
    for k in range(FLOOR_TRIES - 1):
        q = make_q(f"try{k}")
        try:
            tries.append(await floor_restore(q, fdir / "ser"))
            await q.quit()
        finally:
            await q.close()
    q = make_q("run")
    try:
        tries.append(await floor_restore(q, fdir / "ser"))
        res = {**min(tries, key=lambda r: r["total"]), "tries": [r["total"] for r in tries],
               "answer": min(r["answer"] for r in tries), "answers": [r["answer"] for r in tries], "counter": tries[-1]["counter"]}
        await asyncio.sleep(run_seconds)
        saved = await floor_save(q, fdir / "saved.bin")
        await q.quit()
        return res, saved
    finally:
        await q.close()


async def isrsync_run(rt, serial: Path, run_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resume (timed by the Runtime itself), prove the guest runs, let it run, suspend."""
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        rep = await rt.resume()
        cpu_self, cpu_qemu = time.process_time() - c0, qemu_cpu(rt.qemu.proc.pid)
        n = await guest_counter(serial)
        answer = time.perf_counter() - t0
        res = {"answer": answer, **rep.seconds, "fetched_before_start": rep.fetched_before_start, "counter": n,
               "cpu_self": cpu_self, "cpu_qemu": cpu_qemu, "cpu": cpu_self + cpu_qemu, "memory": rep.memory}
        await asyncio.sleep(run_seconds)
        if rt.postcopy is not None:
            res.update(rt.postcopy.stats.summary())
        # Eager: all of RAM was in when the guest started. Lazy: when the rest arrived (None: not yet).
        res["memory_complete"] = rep.seconds.get("memory_complete") if rep.memory == "lazy" else res["total"]
        susp = await rt.suspend()
        if not susp.committed:
            raise RuntimeError(f"the suspend did not commit: {susp}")
        return res, susp
    finally:
        await rt.close()


async def bench_vm(work: Path, repeat: int, run_seconds: float, guest_cache: Path, say: Say,
                   memory: str = "lazy") -> dict[str, Any]:
    from isrsync.keys import KdfLimits
    from isrsync.site.account import Account, login
    from isrsync.site.cache import SiteCache
    from isrsync.site.create import init_parcel
    from isrsync.site.parcel import (
        hoard,
        load_version,
        open_site,
    )
    from isrsync.site.policy import MemoryMode, Policy
    from isrsync.site.runtime import Runtime
    from isrsync.demo.guest import build_guest, make_disk_image

    FloorQemu = floor_qemu_class()
    g = build_guest(guest_cache, progress=say)
    make_disk_image(work / "disk.img", DISK_MIB, {"hello.txt": b"hello from the benchmark\n"})
    acct = Account(f"file://{_home(work)}", "bench")
    await login(acct, "bench passphrase", limits=KdfLimits.MIN)

    say("set-up: init at site A, cold boot, suspend -> version 2")
    site_a = await open_site(SiteCache(work / "A"), acct)
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
        await asyncio.sleep(run_seconds)
        res = await rt.suspend()
        if not res.committed:
            raise RuntimeError(f"the set-up suspend did not commit: {res}")
    finally:
        await rt.close()
        await site_a.close()

    resume: list[dict[str, float]] = []
    floor: list[dict[str, float]] = []
    suspend: list[dict[str, Any]] = []
    floor_susp: list[dict[str, float]] = []
    hoarded: list[int] = []
    for i in range(repeat):
        site = await open_site(SiteCache(work / f"B{i}"), acct)
        try:
            t0 = time.perf_counter()
            h = await hoard(site, pid)
            fetched, total = h.fetched, h.chunks
            hoarded.append(fetched)
            say(f"repeat {i + 1}/{repeat}: hoarded {fetched}/{total} chunks at site B{i} "
                f"in {time.perf_counter() - t0:.1f}s")

            # The floor's inputs: this very version's memory image and disk, decoded.
            info = await site.store.parcel(pid)
            state = site.state(pid)
            try:
                m = await load_version(site, pid, info.version, state)
            finally:
                state.close()
            assert m.memory is not None and m.keyring is not None
            chain = site.chain(pid)
            fdir = work / f"floor{i}"
            fdir.mkdir()
            cfg, memfile, raw, devfile = await floor_files(m, site.cache, chain, fdir, str(g.kernel), str(g.initrd),
                                                           g.cmdline)
            await floor_image(FloorQemu, cfg, m.memory, site.cache, chain, fdir, raw, devfile, memfile)
            run_floor = floor_run(lambda name: FloorQemu(cfg, fdir / name, raw, memfile, fdir / "ser"), fdir,
                                  run_seconds)
            run_isrsync = isrsync_run(Runtime(site, pid, policy=Policy.PROACTIVE, memory=MemoryMode(memory), serial=work / f"serB{i}",
                                              rundir=work / f"runB{i}"), work / f"serB{i}", run_seconds)
            steps = [run_floor, run_isrsync] if i % 2 == 0 else [run_isrsync, run_floor]
            outs = {}
            try:
                for step in steps:
                    outs[step is run_floor] = await step
            finally:
                for step in steps:
                    step.close()  # a step never started when the other failed
            (r_res, r_susp), (f_res, f_susp) = outs[False], outs[True]
            resume.append(r_res)
            suspend.append(r_susp)
            floor.append(f_res)
            floor_susp.append(f_susp)
            say(f"  resume isrsync {resume[-1]['total']:.3f}s  floor {floor[-1]['total']:.3f}s;  "
                f"suspend isrsync mem {suspend[-1]['memory_seconds']:.3f}s total {suspend[-1]['seconds']:.3f}s  "
                f"floor {floor_susp[-1]['save']:.3f}s")
            shutil.rmtree(fdir, ignore_errors=True)
        finally:
            await site.close()

    keys = ["manifest", "lock", "fetch_before_start", "boot_files", "ram", "qemu_start", "memory_image", "total",
            "answer", "memory_complete", "cpu_self", "cpu_qemu", "cpu", "requests", "requested_chunks",
            "pushed_chunks", "fault_ms_median", "fault_ms_max"]
    # A step a mode does not have (RAM decoded before the start, in a lazy restore) is left out.
    r_med = {k: med([r[k] for r in resume if r.get(k) is not None]) for k in keys}
    f_med = {k: med([f[k] for f in floor]) for k in ("qemu_start", "restore", "cont", "total", "answer", "cpu_qemu",
                                                      "cpu")}
    ratios = [r["total"] / f["total"] for r, f in zip(resume, floor)]
    answer_ratios = [r["answer"] / f["answer"] for r, f in zip(resume, floor)]
    s_mem = [s["memory_seconds"] for s in suspend]
    s_tot = [s["seconds"] for s in suspend]
    fs = [f["save"] for f in floor_susp]
    fsf = [f["save"] + f["fsync"] for f in floor_susp]
    return {
        "resume": {
            "isrsync": r_med, "floor": f_med,
            "ratio": med(ratios), "ratios": ratios, "target_max": RESUME_TARGET,
            "answer_ratio": med(answer_ratios), "answer_ratios": answer_ratios,
            "memory": sorted({r["memory"] for r in resume}),
            "samples": {"isrsync": resume, "floor": floor}, "fetched_after_hoard": hoarded,
        },
        "suspend": {
            "isrsync": {"memory_seconds": med(s_mem), "seconds": med(s_tot),
                        "memory_bytes": med([s["memory_bytes"] for s in suspend]),
                        "new_chunks": med([s["memory_new_chunks"] for s in suspend]),
                        "kept_chunks": med([s["memory_kept_chunks"] for s in suspend])},
            "floor": {"save": med(fs), "fsync": med([f["fsync"] for f in floor_susp]), "save_fsync": med(fsf),
                      "bytes": med([f["bytes"] for f in floor_susp])},
            "ratio_memory": med([a / b for a, b in zip(s_mem, fs)]),
            "ratio_total": med([a / b for a, b in zip(s_tot, fs)]),
            "ratio_memory_vs_fsync": med([a / b for a, b in zip(s_mem, fsf)]),
            "samples": {"isrsync": suspend, "floor": floor_susp},
        },
    }


# --------------------------------------------------------------------------- 2: NBD throughput


def mixed_image(path: Path, mib: int, seed: int = 1) -> dict[str, int]:
    """``mib`` MiB in 1 MiB stripes: a shuffled quarter each of zeros, random, text, binary."""
    rng = random.Random(seed)
    kinds = (["zeros", "random", "text", "binary"] * ((mib + 3) // 4))[:mib]
    rng.shuffle(kinds)
    text = bytearray()
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += p.read_bytes()
        if len(text) >= 8 * MIB:
            break
    exe = shutil.which("qemu-system-x86_64") or sys.executable
    binary = Path(exe).read_bytes()
    with open(path, "wb") as f:
        for k in kinds:
            if k == "zeros":
                f.write(bytes(MIB))
            elif k == "random":
                f.write(rng.randbytes(MIB))
            else:
                src = text if k == "text" else binary
                off = rng.randrange(0, max(1, len(src) - MIB))
                piece = bytes(src[off : off + MIB])
                f.write(piece + bytes(MIB - len(piece)))
    return {k: kinds.count(k) for k in ("zeros", "random", "text", "binary")}


async def _run(argv: list[str]) -> tuple[float, str]:
    """Run a client without blocking the loop (the isrsync servers live in it)."""
    t0 = time.perf_counter()
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({p.returncode}): {err.decode(errors='replace')[-600:]}")
    return dt, out.decode(errors="replace")


def _uri(sock: Path) -> str:
    return f"nbd+unix:///disk?socket={sock}"


async def seq_read(sock: Path, size: int) -> float:
    dt, _ = await _run(["nbdcopy", "--connections=1", "--no-extents", _uri(sock), "null:"])
    return size / dt / 1e6


async def fio_randread(sock: Path, size: int, bs: str, seconds: float) -> float:
    _, out = await _run([
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={_uri(sock)}", "--rw=randread", f"--bs={bs}",
        f"--iodepth={FIO_DEPTH}", f"--size={size}", "--time_based", f"--runtime={seconds}",
        "--output-format=json",
    ])
    doc = json.loads(out[out.index("{"):])  # the nbd engine prints a line before the JSON
    job = doc["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio reported error {job['error']}")
    return job["read"]["bw_bytes"] / 1e6


async def bench_nbd(work: Path, repeat: int, fio_seconds: float, say: Say) -> dict[str, Any]:
    from isrsync.keys import KdfLimits
    from isrsync.site.account import Account, login
    from isrsync.site.cache import SiteCache
    from isrsync.site.disk import ParcelDisk
    from isrsync.site.create import init_parcel
    from isrsync.site.parcel import hoard, load_version, open_site
    from isrsync.vm.nbd import NbdServer, RawFileBackend

    for tool in ("qemu-nbd", "nbdcopy", "fio"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install qemu-utils libnbd-bin fio)")
    raw = work / "nbd.raw"
    mix = mixed_image(raw, NBD_MIB)
    size = raw.stat().st_size
    acct = Account(f"file://{_home(work)}", "bench")
    await login(acct, "bench passphrase", limits=KdfLimits.MIN)  # unlocks, or creates the key bundle
    site_c = await open_site(SiteCache(work / "C"), acct)
    try:
        t0 = time.perf_counter()
        pid, _ = await init_parcel(site_c, "nbd", raw)
        say(f"nbd: init of the {NBD_MIB} MiB mixed image in {time.perf_counter() - t0:.1f}s")
    finally:
        await site_c.close()
    site = await open_site(SiteCache(work / "D"), acct)
    qnbd: asyncio.subprocess.Process | None = None
    servers: dict[str, NbdServer] = {}
    state = None
    try:
        h = await hoard(site, pid)
        fetched, total = h.fetched, h.chunks
        say(f"nbd: hoarded {fetched}/{total} chunks at site D")
        state = site.state(pid)
        m = await load_version(site, pid, 1, state)
        assert m.keyring is not None
        disk = ParcelDisk(m.keyring, site.secret(), site.cache, site.chain(pid), state, read_only=True)
        socks = {"isrsync": work / "isr.sock", "qemu-nbd": work / "qnbd.sock", "py-raw": work / "pyraw.sock"}
        servers["isrsync"] = NbdServer(disk)
        await servers["isrsync"].start_unix(socks["isrsync"])
        rawb = RawFileBackend(raw, read_only=True)
        servers["py-raw"] = NbdServer(rawb)
        await servers["py-raw"].start_unix(socks["py-raw"])
        qnbd = await asyncio.create_subprocess_exec(
            "qemu-nbd", "-f", "raw", "-k", str(socks["qemu-nbd"]), "--persistent", "-r", "-x", "disk", str(raw),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(500):
            if socks["qemu-nbd"].exists() or qnbd.returncode is not None:
                break
            await asyncio.sleep(0.01)
        if qnbd.returncode is not None or not socks["qemu-nbd"].exists():
            assert qnbd.stderr is not None
            raise RuntimeError(f"qemu-nbd did not start: {(await qnbd.stderr.read()).decode(errors='replace')[-400:]}")

        names = list(socks)
        for n in names:  # warm-up pass (leaves the hot-chunk cache as a real run would)
            mbs = await seq_read(socks[n], size)
            say(f"nbd: warm-up sequential pass {n}: {mbs:.0f} MB/s")
        tests = [("seq", None), ("rand4k", "4k"), ("rand64k", "64k")]
        samples: dict[str, dict[str, list[float]]] = {t: {n: [] for n in names} for t, _ in tests}
        decodes: dict[str, list[float]] = {t: [] for t, _ in tests}
        for i in range(repeat):
            order = names[i % len(names):] + names[: i % len(names)]
            for t, bs in tests:
                for n in order:
                    before = (disk.stats.reads, disk.stats.cache_hits)
                    if t == "seq":
                        mbs = await seq_read(socks[n], size)
                    else:
                        mbs = await fio_randread(socks[n], size, bs, fio_seconds)
                    samples[t][n].append(mbs)
                    if n == "isrsync":
                        reads = disk.stats.reads - before[0]
                        decodes[t].append((disk.stats.cache_hits - before[1]) / reads if reads else 0.0)
            say(f"nbd: repeat {i + 1}/{repeat}: " + "  ".join(
                f"{t} " + "/".join(f"{samples[t][n][-1]:.0f}" for n in names) for t, _ in tests
            ) + f" MB/s ({'/'.join(names)})")
        rawb.close()
        out: dict[str, Any] = {"image": {"mib": NBD_MIB, "stripes": mix}, "fio_iodepth": FIO_DEPTH,
                               "hot_chunks": ParcelDisk.HOT_BYTES // (128 << 10), "tests": {}}
        for t, _ in tests:
            s = samples[t]
            ratios = [a / b for a, b in zip(s["isrsync"], s["qemu-nbd"])]
            out["tests"][t] = {
                **{n: med(s[n]) for n in names},
                "ratio": med(ratios), "ratios": ratios, "target_min": NBD_TARGET,
                "decodes_per_read": med(decodes[t]), "samples": s,
            }
        return out
    finally:
        for srv in servers.values():
            await srv.close()
        if qnbd is not None and qnbd.returncode is None:
            qnbd.terminate()
            try:
                await asyncio.wait_for(qnbd.wait(), 10)
            except TimeoutError:
                qnbd.kill()
                await qnbd.wait()
        if state is not None:
            state.close()
        await site.close()


# --------------------------------------------------------------------------- output


def _mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]miss[/]"


def render(console, res: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.table import Table

    if "resume" in res:
        r = res["resume"]
        t = Table(title=f"1. Resume latency, proactive policy, {MEMORY_MIB} MiB guest, memory "
                        f"{'/'.join(r['memory'])} (median of {args.repeat}, seconds)")
        t.add_column("step")
        t.add_column("isrsync", justify="right")
        t.add_column("floor: qemu -incoming exec:cat", justify="right")
        rows = [("manifest", "manifest", None), ("lock", "lock", None),
                ("fetch_before_start", "fetch_before_start", None),
                ("  boot_files (decoded during qemu_start)", "boot_files", None),
                ("  RAM into its memfd (eager: done at, from qemu_start's start)", "ram", None),
                ("qemu_start (exec, QMP, board built)", "qemu_start", "qemu_start"),
                ("memory_image (eager: restore, cont; lazy: device state, guest runs)", "memory_image", None),
                ("  restore to paused", None, "restore"), ("  cont", None, "cont"),
                ("[bold]total: the guest runs[/]", "total", "total")]
        for label, a, b in rows:
            va = r["isrsync"].get(a) if a else None
            t.add_row(label, "" if va is None or va != va else f"{va:.3f}", f"{r['floor'][b]:.3f}" if b else "")
        ok = r["ratio"] <= RESUME_TARGET
        t.add_row("[bold]ratio isrsync / floor[/]", f"{r['ratio']:.2f}",
                  f"target <= {RESUME_TARGET} {_mark(ok)}")
        t.add_section()
        t.add_row("first answer on the guest's console (from the start)", f"{r['isrsync']['answer']:.3f}",
                  f"{r['floor']['answer']:.3f}")
        t.add_row("ratio isrsync / floor", f"{r['answer_ratio']:.2f}", "")
        if "lazy" in r["memory"]:
            i = r["isrsync"]
            t.add_row("lazy: all of RAM in (from the start)", f"{i['memory_complete']:.3f}", "")
            t.add_row("lazy: page requests / chunks they pulled / chunks pushed",
                      f"{i['requests']:.0f} / {i['requested_chunks']:.0f} / {i['pushed_chunks']:.0f}", "")
            t.add_row("lazy: fault served, median / max (ms)", f"{i['fault_ms_median']:.2f} / {i['fault_ms_max']:.1f}",
                      "")
        t.add_section()
        cores = os.cpu_count() or 1
        t.add_row("CPU: this process (decode, NBD, QMP)", f"{r['isrsync']['cpu_self']:.3f}", "")
        t.add_row("CPU: QEMU", f"{r['isrsync']['cpu_qemu']:.3f}", f"{r['floor']['cpu_qemu']:.3f} (+ cat)")
        t.add_row(f"CPU / {cores} cores: the wall-time bound", f"{r['isrsync']['cpu'] / cores:.3f}",
                  f"{r['floor']['cpu'] / cores:.3f}")
        console.print(t)
        fetched = [s["fetched_before_start"] for s in r["samples"]["isrsync"]]
        if any(fetched):
            console.print(f"[yellow]note: the hoarded cache still missed chunks at resume: {fetched}[/]")
        console.print(f"[dim]chunks hoarded per repeat: {r['fetched_after_hoard']}; guest counter read after "
                      f"restore (proves both guests run on): isrsync "
                      f"{[s['counter'] for s in r['samples']['isrsync']]}, floor "
                      f"{[s['counter'] for s in r['samples']['floor']]}[/]")

        s = res["suspend"]
        t = Table(title=f"3. Suspend time, {MEMORY_MIB} MiB guest (median of {args.repeat})")
        t.add_column("")
        t.add_column("seconds", justify="right")
        t.add_column("memory MB", justify="right")
        t.add_column("ratio to floor", justify="right")
        t.add_row("floor: stop + migrate exec:cat > file", f"{s['floor']['save']:.3f}",
                  f"{s['floor']['bytes'] / 1e6:.1f}", "1.00")
        t.add_row("floor + fsync of the file", f"{s['floor']['save_fsync']:.3f}", "", "")
        t.add_row("isrsync suspend: memory_seconds", f"{s['isrsync']['memory_seconds']:.3f}",
                  f"{s['isrsync']['memory_bytes'] / 1e6:.1f}",
                  f"{s['ratio_memory']:.2f} ({s['ratio_memory_vs_fsync']:.2f} vs floor+fsync)")
        t.add_row("isrsync suspend: seconds (with commit)", f"{s['isrsync']['seconds']:.3f}", "",
                  f"{s['ratio_total']:.2f}")
        t.add_row("  RAM chunks encoded new / kept unchanged",
                  f"{s['isrsync']['new_chunks']:.0f} / {s['isrsync']['kept_chunks']:.0f}", "", "")
        console.print(t)

    if "nbd" in res:
        n = res["nbd"]
        t = Table(title=f"2. NBD read throughput from a warm cache, {NBD_MIB} MiB mixed image "
                        f"(MB/s, median of {args.repeat})")
        t.add_column("test")
        t.add_column("isrsync ParcelDisk", justify="right")
        t.add_column("qemu-nbd -r", justify="right")
        t.add_column("py-raw (diag)", justify="right")
        t.add_column("isrsync/qemu-nbd", justify="right")
        t.add_column("chunks decoded/read", justify="right")
        labels = {"seq": "sequential (nbdcopy)", "rand4k": f"random 4K (fio qd{FIO_DEPTH})",
                  "rand64k": f"random 64K (fio qd{FIO_DEPTH})"}
        for k, row in n["tests"].items():
            ok = row["ratio"] >= NBD_TARGET
            t.add_row(labels[k], f"{row['isrsync']:.1f}", f"{row['qemu-nbd']:.1f}", f"{row['py-raw']:.1f}",
                      f"{row['ratio']:.2f} {_mark(ok)}", f"{row['decodes_per_read']:.2f}")
        console.print(t)
        console.print(f"[dim]image stripes (MiB): {n['image']['stripes']}; target isrsync/qemu-nbd >= "
                      f"{NBD_TARGET}; hot-chunk cache {n['hot_chunks']} chunks; chunks decoded / read = chunks "
                      f"ParcelDisk took from the site cache (decoded, or zero-filled) per NBD read, i.e. "
                      f"not from its hot-chunk RAM cache[/]")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repeats per measurement; medians are reported")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--only", choices=("vm", "nbd"), help="run only resume+suspend (vm) or NBD (nbd)")
    parser.add_argument("--run-seconds", type=float, default=1.0,
                        help="how long each resumed guest runs before it is suspended (default 1)")
    parser.add_argument("--memory", choices=("lazy", "eager"), default="lazy",
                        help="how isrsync restores guest RAM: lazy (post-copy, the default) or eager")
    parser.add_argument("--fio-seconds", type=float, default=3.0, help="runtime of each fio test (default 3)")
    parser.add_argument("--guest-cache", type=Path, default=REPO / ".pytest_cache" / "d" / "isrsync-guest",
                        help="where the test guest is built or reused")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    console = Console(stderr=args.json, width=max(Console().width, 120))

    def say(msg: str) -> None:
        console.print(f"[dim]{msg}[/]")

    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="isrsync-bench-vm-"))
    _isolate(work)
    res: dict[str, Any] = {}
    try:
        if args.only in (None, "vm"):
            res.update(asyncio.run(bench_vm(work, args.repeat, args.run_seconds, args.guest_cache, say,
                                            args.memory)))
        if args.only in (None, "nbd"):
            res["nbd"] = asyncio.run(bench_nbd(work, args.repeat, args.fio_seconds, say))
    finally:
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - started, 1)
    res["loadavg_before_after"] = [load0, os.getloadavg()[0]]
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        render(console, res, args)
        say(f"benchmark ran in {res['seconds']:.0f}s on {os.cpu_count()} cores; 1-minute load average "
            f"{res['loadavg_before_after'][0]:.2f} before, {res['loadavg_before_after'][1]:.2f} after "
            f"(other work on the machine shows up as noise in every number)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
