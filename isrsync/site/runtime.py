"""A parcel running at this site: resume, suspend, sync, and what runs meanwhile.

Resume: read the version (manifests are authenticated, the keyring rebuilt),
check this site can run the machine, take the lock, serve the disk over NBD,
start QEMU while guest RAM is decoded into the memfd QEMU maps, stream the
device state into it, continue the guest. Each step is timed for the latency
breakdown.

While the guest runs: demand misses go through the source chain; under the
``auto`` policy the chunks the previous session touched are prefetched in the
order it touched them, then everything else is hoarded at low priority; the
trickle uploads dirty chunks that have settled, so a suspend sends only the
residue.

Suspend: stop, save the device state through migration into the cache as it
streams and guest RAM from its memfd (chunks unchanged since the resume cost
one hash each), flush the disk, commit (uploading only what the server lacks) and
release the lock. If the server cannot be reached, everything stays in the
local state and the lock stays held: ``isrsync sync`` commits it later, and the
parcel can even be resumed again here while offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..chunk import CHUNK_SIZE
from ..errors import Conflict, IsrError, QemuError, Unreachable, UsageError
from ..manifest import Manifest, MemoryImage, dirty_since
from ..vm.nbd import NbdServer
from ..vm.qemu import Qemu, VmConfig, accelerator
from .disk import ParcelDisk
from .memimage import Feeder, save_ram, save_stream
from .parcel import (
    Site,
    blob_from,
    boot_tags,
    commit_version,
    hardware_problems,
    load_version,
    upload_cached,
    write_blob,
)
from .sources import SourceChain
from .state import ParcelState

log = logging.getLogger("isrsync.runtime")

POLICIES = ("auto", "demand", "lookaside", "proactive", "baseline")
Events = Callable[[str, dict[str, Any]], None]


@dataclass
class ResumeReport:
    parcel: str
    version: int
    policy: str
    accel: str
    cold_boot: bool
    local_changes: bool
    seconds: dict[str, float] = field(default_factory=dict)
    fetched_before_start: int = 0


class Runtime:
    """One resumed parcel: its disk, its QEMU, and the tasks that serve them."""

    def __init__(
        self,
        site: Site,
        parcel: uuid.UUID,
        *,
        policy: str = "auto",
        display: str = "none",
        serial: Path | None = None,
        rundir: Path | None = None,
        events: Events | None = None,
        lookaside: list | None = None,
        trickle_settle: float = 30.0,
        trickle_rate: float = 8 << 20,
    ) -> None:
        if policy not in POLICIES:
            raise UsageError(f"unknown policy {policy!r}", hint=f"use one of {', '.join(POLICIES)}")
        self.site = site
        self.parcel = parcel
        self.policy = policy
        self.display = display
        self.serial = serial
        self.rundir = rundir or Path(tempfile.mkdtemp(prefix="isrsync-run-"))
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.events = events or (lambda kind, data: None)
        self.lookaside = lookaside or []
        self.trickle_settle = trickle_settle
        self.trickle_rate = trickle_rate
        self.state: ParcelState | None = None
        self.disk: ParcelDisk | None = None
        self.nbd: NbdServer | None = None
        self.qemu: Qemu | None = None
        self.chain: SourceChain | None = None
        self.base: Manifest | None = None
        self.head: Manifest | None = None  # set when an older version was resumed
        self.epoch = 0
        self._tasks: list[asyncio.Task] = []
        self._memfds: list[int] = []
        self._ram_prev = None  # the RAM keyring the guest was resumed or last saved from
        self._dirty_since: dict[int, float] = {}
        self.staged: list[bytes] = []
        self.staged_tags: set[bytes] = set()
        self.report: ResumeReport | None = None
        self._fresh_lock = False

    # -- resume --------------------------------------------------------------------------

    async def resume(self, version: int | None = None) -> ResumeReport:
        t_all = time.perf_counter()
        marks: dict[str, float] = {}
        site, parcel = self.site, self.parcel
        self.state = state = site.state(parcel)
        meta = state.get_meta()
        local = meta.get("status") in ("running", "suspended-local")

        t0 = time.perf_counter()
        try:
            info = await site.store.parcel(parcel)
            online = True
        except Unreachable:
            if not local:
                raise
            online = False  # disconnected operation: resume our own local state
        if local:
            base_v = int(meta["base"])
            if version is not None and version != base_v:
                raise Conflict(
                    f"this site has uncommitted changes on version {base_v}",
                    hint="`isrsync sync` them first, or `isrsync discard` them",
                )
        else:
            base_v = version or info.version
            if base_v < 1:
                raise UsageError(f"parcel {info.name} has no version yet")
        self.base = base = await load_version(site, parcel, base_v, state)
        marks["manifest"] = time.perf_counter() - t0
        accel = accelerator(base.vm.get("accel", "auto") if base.vm.get("accel") == "kvm" else "auto")
        problems = hardware_problems(base.vm, accel)
        if problems:
            raise UsageError(f"this site cannot run parcel {parcel}: " + "; ".join(problems))

        t0 = time.perf_counter()
        if online:
            lock = await site.store.acquire(parcel, site.holder())
            # Ours before this call only if our own local state was made under it.
            self._fresh_lock = not (local and lock.epoch == meta.get("epoch"))
            if local and lock.epoch != meta.get("epoch"):
                await site.store.release(parcel, lock.epoch)
                raise Conflict(
                    f"this site's uncommitted changes on version {base_v} were fenced off (the lock was broken "
                    f"or taken elsewhere since)",
                    hint="they are kept here; `isrsync discard` drops them so the parcel can be resumed",
                )
            self.epoch = lock.epoch
            if base_v != info.version:
                # An older version resumed: its next commit goes on top of the head.
                self.head = await load_version(site, parcel, info.version, state)
        else:
            self.epoch = int(meta["epoch"])
        marks["lock"] = time.perf_counter() - t0
        try:
            return await self._start(base, base_v, memory_from_local=local, meta=meta, accel=accel,
                                     marks=marks, t_all=t_all, online=online)
        except BaseException:
            # Nothing runs: a lock this call took must not stay taken.
            if online and self._fresh_lock:
                with contextlib.suppress(IsrError):
                    await site.store.release(parcel, self.epoch)
            raise

    async def _start(self, base: Manifest, base_v: int, *, memory_from_local: bool, meta: dict[str, Any],
                     accel: str, marks: dict[str, float], t_all: float, online: bool) -> ResumeReport:
        site, parcel, state, local = self.site, self.parcel, self.state, memory_from_local
        assert state is not None
        self.staged = [bytes.fromhex(x) for x in meta.get("staged", [])] if local else []
        self.staged_tags = {bytes.fromhex(x) for x in meta.get("staged_tags", [])} if local else set()
        status = meta.get("status")
        if status == "suspended-local":
            memory = state.load_memory()
        elif status == "running" and state.dirty():
            # A session that crashed: its disk changes survive, its memory did not
            # (an older image would not match the disk): the guest cold-boots.
            memory = None
        else:
            memory = base.memory

        self.chain = chain = site.chain(parcel)
        if self.policy in ("lookaside", "auto"):
            for src in self.lookaside:
                chain.add(src)
        assert base.keyring is not None
        self.disk = disk = ParcelDisk(base.keyring, site.secret(), site.cache, chain, state)

        t0 = time.perf_counter()
        fetched = 0
        if self.policy in ("baseline", "proactive"):
            fetched = await self._fetch_everything(memory)
            if self.policy == "proactive" and fetched:
                self.events("warning", {"message": f"the cache was not fully hoarded: fetched {fetched} chunk(s)"})
        marks["fetch_before_start"] = time.perf_counter() - t0

        t0 = t_start = time.perf_counter()
        self.nbd = NbdServer(disk)
        sock = self.rundir / "nbd.sock"
        await self.nbd.start_unix(sock)
        cfg, boot_files = self._vm_config(base, accel)
        feeder = Feeder(memory, site.cache, chain) if memory is not None else None
        ram = memory.ram if memory is not None else None
        self._ram_prev = ram
        ram_task: asyncio.Task | None = None

        async def ram_in() -> None:
            assert ram is not None and cfg.ram_fd is not None
            await write_blob(MemoryImage(ram.size, ram), cfg.ram_fd, site.cache, chain)
            marks["ram"] = time.perf_counter() - t_start

        async def machine() -> None:
            # QEMU starts up meanwhile; its board (which reads -kernel and
            # -initrd) is built once this returns. The boot files get all the
            # cores first (measured: sharing them with RAM from the start, or
            # decoding RAM niced, both end later); then RAM and the device
            # state decode while the board is built.
            nonlocal ram_task
            if boot_files is not None:
                await boot_files
                marks["boot_files"] = time.perf_counter() - t_start
            if ram is not None:
                ram_task = asyncio.create_task(ram_in())
            if feeder is not None:
                feeder.start()

        boot = asyncio.create_task(machine())
        self.qemu = q = Qemu(cfg, self.rundir, sock, serial=self.serial)
        try:
            await q.start(incoming=memory is not None, pass_fds=self._memfds, machine=boot)
        except BaseException:
            for task in (boot, ram_task, feeder and feeder.task):
                if task is not None:
                    task.cancel()
            raise
        # From the same start as boot_files, which ran inside it.
        marks["qemu_start"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if feeder is not None:
            try:
                if ram_task is not None:
                    # Device state refers to RAM (virtio rings): RAM goes in first.
                    await ram_task
                await q.load_memory(feeder.produce, without_ram=ram is not None)
            finally:
                for task in (ram_task, feeder.task):
                    if task is not None and not task.done():
                        task.cancel()
            if await q.status() == "paused":
                await q.cont()
        marks["memory_image"] = time.perf_counter() - t0
        marks["total"] = time.perf_counter() - t_all

        if local:
            # The running guest supersedes a locally saved image: never restore it twice.
            state.save_memory(None)
        state.set_meta(status="running", base=base_v, epoch=self.epoch, host=site.host,
                       staged=[p.hex() for p in self.staged], staged_tags=sorted(t.hex() for t in self.staged_tags))
        if self.policy == "auto":
            self._tasks.append(asyncio.create_task(self._prefetch_and_hoard(base, memory)))
        if online:
            self._tasks.append(asyncio.create_task(self._trickle()))
        self.report = ResumeReport(
            str(parcel), base_v, self.policy, accel, memory is None, local, marks, fetched
        )
        return self.report

    def _vm_config(self, m: Manifest, accel: str) -> tuple[VmConfig, Awaitable[None] | None]:
        """QEMU's configuration, and the decoding of the boot files it names (if any).

        Boot files live in memfds: decoded in memory, handed to QEMU by fd,
        never written to disk in the clear. The memfds exist (empty) before
        QEMU is spawned; the returned awaitable fills them.
        """
        vm = m.vm
        cfg = VmConfig(
            memory_mib=int(vm.get("memory_mib", 256)), cpus=int(vm.get("cpus", 1)),
            machine=str(vm.get("machine", "q35")), cpu_model=str(vm.get("cpu_model", "max")),
            accel=accel, display=self.display,
        )
        # Guest RAM: ours as much as QEMU's, so it is saved and restored in place.
        cfg.ram_fd = os.memfd_create("isrsync-ram")
        self._memfds.append(cfg.ram_fd)
        os.ftruncate(cfg.ram_fd, cfg.memory_mib << 20)
        boot = vm.get("boot") or {}
        files: list[tuple[int, MemoryImage]] = []
        for key in ("kernel", "initrd"):
            if boot.get(key):
                fd = os.memfd_create(f"isrsync-{key}", 0)
                self._memfds.append(fd)
                files.append((fd, blob_from(boot[key])))
                setattr(cfg, key, f"/proc/self/fd/{fd}")
        cfg.cmdline = boot.get("cmdline") or None
        if not files:
            return cfg, None

        async def decode_all() -> None:
            assert self.chain is not None
            await asyncio.gather(*(write_blob(blob, fd, self.site.cache, self.chain) for fd, blob in files))

        return cfg, decode_all()

    async def _fetch_everything(self, memory: MemoryImage | None) -> int:
        assert self.base is not None and self.base.keyring is not None and self.chain is not None
        tags = set(self.base.keyring.tags()) | boot_tags(self.base.vm)
        if memory is not None:
            tags |= memory.tags()
        missing = await asyncio.to_thread(self.site.cache.missing, sorted(tags))
        for i in range(0, len(missing), 64):
            await self.chain.fetch_many(missing[i : i + 64])
        return len(missing)

    async def _prefetch_and_hoard(self, base: Manifest, memory: MemoryImage | None) -> None:
        """Trace order first (what the last session touched), then the rest slowly."""
        assert self.disk is not None and base.keyring is not None
        try:
            order = list(dict.fromkeys(base.trace))
            seen = set(order)
            order += [i for i in range(len(base.keyring)) if i not in seen]
            for k in range(0, len(order), 16):
                await self.disk.prefetch(order[k : k + 16])
                # Low priority: yield to demand misses, and slow down while they happen.
                await asyncio.sleep(0.05 if k < len(base.trace) else 0.2)
            self.events("hoarded", {"chunks": len(order)})
        except asyncio.CancelledError:
            raise
        except IsrError as e:
            log.info("background hoard stopped: %s", e)

    async def _trickle(self) -> None:
        """Upload dirty chunks that have not changed for a while, within a rate cap."""
        assert self.disk is not None
        seen: dict[int, object] = {}
        try:
            while True:
                await asyncio.sleep(min(5.0, self.trickle_settle))
                now = time.monotonic()
                for i, r in list(self.disk.dirty.items()):
                    if seen.get(i) is not r:
                        seen[i] = r
                        self._dirty_since[i] = now
                settled = [
                    self.disk.dirty[i].tag for i, t in self._dirty_since.items()
                    if now - t >= self.trickle_settle and i in self.disk.dirty and not self.disk.dirty[i].is_zero
                ]
                todo = [t for t in dict.fromkeys(settled) if t not in self.staged_tags]
                if todo:
                    await self._upload_tags(todo[: max(1, int(self.trickle_rate * 5 // (128 << 10)))])
        except asyncio.CancelledError:
            raise
        except IsrError as e:
            log.info("trickle paused: %s", e)

    async def _upload_tags(self, tags: list[bytes]) -> None:
        for info in await upload_cached(self.site, self.parcel, tags, strict=False):
            self.staged.append(info.pack_id)
            self.staged_tags |= {e.tag for e in info.entries}
        assert self.state is not None
        self.state.set_meta(staged=[p.hex() for p in self.staged],
                            staged_tags=sorted(t.hex() for t in self.staged_tags))

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        d = self.disk
        assert d is not None and self.chain is not None
        residue = [r.tag for r in d.dirty.values() if not r.is_zero and r.tag not in self.staged_tags]
        return {
            "parcel": str(self.parcel), "base": self.base.version if self.base else None, "policy": self.policy,
            "dirty_chunks": len(d.dirty), "trickled_chunks": len(self.staged_tags),
            "residue_chunks": len(set(residue)), "reads": d.stats.reads, "writes": d.stats.writes,
            "misses": d.stats.misses, "cache_hits": d.stats.cache_hits,
            "sources": {n: {"hits": s.hits, "bytes": s.bytes, "bad": s.bad, "errors": s.errors,
                            "mean_latency_ms": round(s.mean_latency * 1000, 2)}
                        for n, s in self.chain.stats().items()},
            "qemu": "running" if self.qemu and self.qemu.alive else "stopped",
            "report": self.report.__dict__ if self.report else None,
        }

    # -- suspend and sync ------------------------------------------------------------------

    async def suspend(self, keep_lock: bool = False) -> dict[str, Any]:
        """Save memory and disk, commit, release the lock (unless ``keep_lock``)."""
        q, disk, state = self.qemu, self.disk, self.state
        assert q is not None and disk is not None and state is not None and self.base is not None
        t0 = time.perf_counter()
        memory, saved = await self._save_memory()
        t_mem = time.perf_counter() - t0
        await self._stop_tasks()
        await q.quit()
        assert self.nbd is not None
        await self.nbd.close()
        await disk.flush()
        state.save_memory(memory)
        state.save_trace(disk.stats.first_access)
        state.set_meta(status="suspended-local")
        out: dict[str, Any] = {"memory_bytes": saved["bytes"], "memory_seconds": round(t_mem, 3),
                               "memory_new_chunks": saved["new_chunks"], "memory_kept_chunks": saved["kept_chunks"],
                               "dirty_chunks": len(disk.dirty)}
        try:
            v = await self._commit(memory, release=not keep_lock)
        except Unreachable as e:
            out.update(committed=False, reason=e.message)
            self.events("offline", {"message": "suspended locally; the server could not be reached"})
            return out
        out.update(committed=True, version=v.version, seconds=round(time.perf_counter() - t0, 3),
                   kept_lock=keep_lock)
        return out

    async def _save_memory(self) -> tuple[MemoryImage, dict[str, int]]:
        """Stop the guest; save its device state, then its RAM in place (the guest stays stopped)."""
        q = self.qemu
        assert q is not None and q.cfg.ram_fd is not None
        secret, cache = self.site.secret(), self.site.cache
        saved = []
        await q.save_memory(lambda fd: saved.append(save_stream(fd, secret, cache)), without_ram=True)
        size = q.cfg.memory_mib << 20
        ram = await asyncio.to_thread(save_ram, q.cfg.ram_fd, size, secret, cache, self._ram_prev)
        self._ram_prev = ram.ram
        stream = saved[0].memory
        memory = MemoryImage(stream.length, stream.refs, ram.ram)
        in_use = sum(CHUNK_SIZE for r in ram.ram if not r.is_zero)
        return memory, {"bytes": stream.length + in_use, "new_chunks": ram.new_chunks, "kept_chunks": ram.kept_chunks}

    async def _commit(self, memory: MemoryImage | None, release: bool) -> Any:
        disk, state = self.disk, self.state
        assert disk is not None and state is not None and self.base is not None
        ring = disk.current_keyring()
        parent, dirty = self.base, list(disk.dirty)
        if self.head is not None:
            assert self.head.keyring is not None
            parent = self.head
            dirty = dirty_since(self.head.keyring, ring) if ring.size == self.head.keyring.size else list(range(len(ring)))
        v = await commit_version(
            self.site, self.parcel, epoch=self.epoch, parent=parent, keyring=ring, dirty=dirty,
            memory=memory, trace=disk.stats.first_access, release=release,
            staged=self.staged, staged_tags=self.staged_tags,
        )
        self.head = None
        state.clear_dirty()
        state.save_memory(None)
        self.staged, self.staged_tags = [], set()
        state.set_meta(status="idle" if release else "running", base=v.version, epoch=self.epoch,
                       staged=[], staged_tags=[])
        return v

    async def sync(self) -> dict[str, Any]:
        """Commit now and keep running: a brief pause while the memory image is saved."""
        q, disk = self.qemu, self.disk
        assert q is not None and disk is not None and self.base is not None
        t0 = time.perf_counter()
        try:
            memory, _ = await self._save_memory()
        except BaseException:
            # A sync that could not save (a full disk...) must not leave the guest frozen.
            if q.alive:
                with contextlib.suppress(QemuError):
                    await q.cont()
            raise
        await disk.flush()
        snapshot = dict(disk.dirty)
        ring = disk.current_keyring()
        await q.cont()  # the guest runs on; later writes stay dirty for the next commit
        paused = time.perf_counter() - t0
        v = await commit_version(
            self.site, self.parcel, epoch=self.epoch, parent=self.base, keyring=ring, dirty=list(snapshot),
            memory=memory, trace=disk.stats.first_access, release=False,
            staged=self.staged, staged_tags=self.staged_tags,
        )
        # The new version is the base now; chunks rewritten since the snapshot stay dirty.
        self.base = await load_version(self.site, self.parcel, v.version, self.state)
        assert self.base.keyring is not None and self.state is not None
        disk.keyring = self.base.keyring
        done = [i for i, r in snapshot.items() if disk.dirty.get(i) is r]
        for i in done:
            disk.dirty.pop(i, None)
        self.state.drop_dirty(done)
        self.staged, self.staged_tags = [], set()
        self.state.set_meta(base=v.version, staged=[], staged_tags=[])
        return {"version": v.version, "paused_seconds": round(paused, 3), "seconds": round(time.perf_counter() - t0, 3)}

    async def commit_after_poweroff(self) -> dict[str, Any]:
        """The guest shut itself down: commit its disk (the next resume cold-boots)."""
        await self._stop_tasks()
        assert self.nbd is not None and self.disk is not None and self.state is not None
        await self.nbd.close()
        await self.disk.flush()
        self.state.save_memory(None)
        self.state.save_trace(self.disk.stats.first_access)
        self.state.set_meta(status="suspended-local")
        try:
            v = await self._commit(None, release=True)
        except Unreachable as e:
            return {"committed": False, "reason": e.message}
        return {"committed": True, "version": v.version}

    async def wait_guest(self) -> int | None:
        assert self.qemu is not None
        return await self.qemu.wait()

    async def _stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    async def close(self) -> None:
        """Stop everything (after a suspend, or when QEMU died: the disk state is kept)."""
        await self._stop_tasks()
        if self.qemu is not None and self.qemu.alive:
            self.qemu.kill()
        if self.nbd is not None:
            await self.nbd.close()
        if self.disk is not None:
            with contextlib.suppress(IsrError, QemuError, OSError):
                await self.disk.flush()
        for fd in self._memfds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._memfds.clear()
        if self.state is not None:
            self.state.close()
            self.state = None


async def sync_offline(site: Site, parcel: uuid.UUID) -> dict[str, Any]:
    """Commit a suspend that could not reach the server (no VM running)."""
    state = site.state(parcel)
    try:
        meta = state.get_meta()
        if meta.get("status") != "suspended-local":
            raise UsageError(f"parcel {parcel} has nothing to sync at this site")
        base = await load_version(site, parcel, int(meta["base"]), state)
        assert base.keyring is not None
        ring = base.keyring.copy()
        dirty = state.dirty()
        for i, r in dirty.items():
            if i < len(ring):
                ring[i] = r
        memory = state.load_memory()
        v = await commit_version(
            site, parcel, epoch=int(meta["epoch"]), parent=base, keyring=ring, dirty=list(dirty), memory=memory,
            trace=state.load_trace(), release=True,
            staged=[bytes.fromhex(x) for x in meta.get("staged", [])],
            staged_tags=[bytes.fromhex(x) for x in meta.get("staged_tags", [])],
        )
        state.clear_dirty()
        state.save_memory(None)
        state.set_meta(status="idle", base=v.version, staged=[], staged_tags=[])
        return {"version": v.version, "committed": True}
    finally:
        state.close()


async def run_parcel(
    site: Site,
    parcel: uuid.UUID,
    *,
    policy: str = "auto",
    version: int | None = None,
    display: str = "none",
    serial: Path | None = None,
    events: Events | None = None,
    lookaside: list | None = None,
) -> dict[str, Any]:
    """Resume a parcel and serve it until it is suspended or the guest powers off.

    Control requests (status, sync, suspend) arrive on the run's control
    socket; SIGINT and SIGTERM suspend too. Returns how the run ended.
    """
    import signal

    from .control import ControlServer, run_dir

    say = events or (lambda kind, data: None)
    rundir = run_dir(site.site_id, parcel)
    rt = Runtime(site, parcel, policy=policy, display=display, serial=serial, rundir=rundir, events=say,
                 lookaside=lookaside)
    ended: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    busy = asyncio.Lock()  # one control operation at a time

    async def handle(req: dict[str, Any]) -> Any:
        cmd = req.get("cmd")
        if cmd == "status":
            return rt.status()
        async with busy:
            if ended.done():
                raise UsageError("the parcel is already suspended")
            if cmd == "sync":
                return await rt.sync()
            if cmd == "suspend":
                try:
                    res = await rt.suspend(bool(req.get("keep_lock")))
                except BaseException as e:
                    if rt.qemu is None or not rt.qemu.alive:
                        # The guest is saved locally but the commit was refused
                        # (fenced): end the run with that error, keep the state.
                        ended.set_exception(e)
                        ended.exception()
                    raise
                ended.set_result({"how": "suspended", **res})
                return res
        raise UsageError(f"unknown control command {cmd!r}")

    ctl = ControlServer(rundir / "control.sock", handle)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        report = await rt.resume(version)
        await ctl.start()
        say("resumed", report.__dict__)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        guest = asyncio.create_task(rt.wait_guest())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([guest, stopper, ended], return_when=asyncio.FIRST_COMPLETED)
        if not ended.done():
            async with busy:
                if not ended.done() and stop.is_set() and rt.qemu is not None and rt.qemu.alive:
                    res = await rt.suspend()
                    ended.set_result({"how": "suspended", **res})
                elif not ended.done():
                    # The guest powered off (or QEMU died): keep its disk, no memory image.
                    code = rt.qemu.proc.returncode if rt.qemu and rt.qemu.proc else None
                    how = "powered-off" if code == 0 else "qemu-died"
                    if how == "qemu-died" and rt.qemu is not None:
                        say("error", {"message": f"QEMU exited with status {code}: {rt.qemu.log_tail(300)}"})
                    res = await rt.commit_after_poweroff()
                    ended.set_result({"how": how, "qemu_status": code, **res})
        stopper.cancel()
        return ended.result()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await ctl.close()
        await rt.close()

