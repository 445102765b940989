"""A parcel running at this site: resume, suspend, sync, and what runs meanwhile.

Resume: read the version (manifests are authenticated, the keyring rebuilt),
check this site can run the machine, take the lock, serve the disk over NBD,
start QEMU, restore memory, run the guest. Each step is timed for the latency
breakdown. Memory comes back lazily by default: the chunks the guest touched
first last time go into the memfd QEMU maps while QEMU builds its machine, the
device state goes in, the guest runs, and the rest of RAM follows by post-copy
(:mod:`isrsync.vm.postcopy`), faults first. Eagerly, all of RAM is decoded into
the memfd before the device state goes in. A restored guest gets no boot files:
if it reboots, QEMU (run with -no-reboot) ends and :meth:`Runtime.reboot` boots
it cold on the same disk.

While the guest runs: demand misses go through the source chain; under the
``auto`` policy the chunks the previous session touched are prefetched in the
order it touched them, then everything else is hoarded at low priority; the
trickle uploads dirty chunks that have settled, so a suspend sends only the
residue.

Suspend: (after a lazy resume, the rest of RAM first) stop, save the device
state through migration into the cache as it
streams and guest RAM from its memfd (chunks unchanged since the resume cost
one hash each), flush the disk, commit (uploading only what the server lacks) and
release the lock. If the server cannot be reached, everything stays in the
local state and the lock stays held: ``isrsync sync`` commits it later, and the
parcel can even be resumed again here while offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from ..chunk import CHUNK_SIZE
from ..errors import Conflict, IsrError, QemuError, Unreachable, UsageError
from ..manifest import Keyring, Manifest, MemoryImage
from ..vm import migstream
from ..vm.nbd import NbdServer
from ..vm.postcopy import PostcopySource
from ..vm.qemu import RAM_BLOCK, Qemu, VmConfig, accelerator, postcopy_usable
from .disk import ParcelDisk
from .memimage import Feeder, RamFetcher, ram_chunks, read_stream, save_ram, save_stream, write_all
from .parcel import (
    Site,
    blob_from,
    boot_tags,
    fetch_missing,
    hardware_problems,
    load_version,
    write_blob,
)
from .cachedir import CacheDirSource
from .policy import MemoryMode, Policy
from .results import PowerOffResult, ResumeReport, RunStatus, SuspendResult, SyncResult
from .session import ParcelSession
from .sources import Source, SourceInfo, SourceRegistry
from .state import LocalStatus
from .state import ParcelState

log = logging.getLogger("isrsync.runtime")

POLICIES = tuple(p.value for p in Policy)
MEMORY_MODES = tuple(m.value for m in MemoryMode)
# How much of a lazy restore's RAM goes in before the guest starts (32 MiB): what
# the guest touched first last time, decoded while QEMU builds its machine. More
# would hold the guest back; less leaves it faulting on its working set (each
# fault a round trip through QEMU).
HOT_CHUNKS = 256
Events = Callable[[str, dict[str, Any]], None]


class Runtime:
    """One resumed parcel: its disk, its QEMU, and the tasks that serve them."""

    def __init__(
        self,
        site: Site,
        parcel: uuid.UUID,
        *,
        policy: Policy | str = Policy.AUTO,
        display: str = "none",
        serial: Path | None = None,
        rundir: Path | None = None,
        events: Events | None = None,
        lookaside: Sequence[Source] = (),
        trickle_settle: float = 30.0,
        trickle_rate: float = 8 << 20,
        memory: MemoryMode | str = MemoryMode.LAZY,
    ) -> None:
        if policy not in POLICIES:
            raise UsageError(f"unknown policy {policy!r}", hint=f"use one of {', '.join(POLICIES)}")
        if memory not in MEMORY_MODES:
            raise UsageError(f"unknown memory mode {memory!r}", hint=f"use one of {', '.join(MEMORY_MODES)}")
        policy, memory = Policy(policy), MemoryMode(memory)
        self.site = site
        self.parcel = parcel
        self.policy = policy
        self.display = display
        self.serial = serial
        self.rundir = rundir or Path(tempfile.mkdtemp(prefix="isrsync-run-"))
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.events = events or (lambda kind, data: None)
        self.lookaside = list(lookaside)
        self.trickle_settle = trickle_settle
        self.trickle_rate = trickle_rate
        self.memory = memory
        self.postcopy: PostcopySource | None = None
        self.state: ParcelState | None = None
        self.disk: ParcelDisk | None = None
        self.nbd: NbdServer | None = None
        self.qemu: Qemu | None = None
        self.chain: SourceRegistry | None = None
        self.name: str | None = None
        self.session: ParcelSession | None = None  # the committed side: base, epoch, staged packs
        self.epoch = 0
        self._tasks: list[asyncio.Task] = []
        self._memfds: list[int] = []
        self._ram_prev = None  # the RAM keyring the guest was resumed or last saved from
        self._hot_prev: list[int] = []  # the hot RAM chunks of the image resumed
        self._dirty_since: dict[int, float] = {}
        self.report: ResumeReport | None = None
        self._fresh_lock = False
        self._closed = False

    # -- resume --------------------------------------------------------------------------

    async def resume(self, version: int | None = None) -> ResumeReport:
        t_all = time.perf_counter()
        marks: dict[str, float] = {}
        site, parcel = self.site, self.parcel
        self.state = state = site.state(parcel)
        here = state.info()
        self.name = here.name
        if here.status is LocalStatus.FENCED:
            state.start_running(0, 0, site.host)  # refused, with the one line that says why and what to do
        local = here.status.has_lock

        t0 = time.perf_counter()
        try:
            info = await site.store.parcel(parcel)
            online = True
        except Unreachable:
            if not local:
                raise
            online = False  # disconnected operation: resume our own local state
        if local:
            assert here.base is not None
            base_v = here.base
            if version is not None and version != base_v:
                raise Conflict(
                    f"this site has uncommitted changes on version {base_v}",
                    hint="`isrsync sync` them first, or `isrsync discard` them",
                )
        else:
            base_v = version or info.version
            if base_v < 1:
                raise UsageError(f"parcel {info.name} has no version yet")
        base = await load_version(site, parcel, base_v, state)
        head: Manifest | None = None
        marks["manifest"] = time.perf_counter() - t0
        accel = accelerator(base.vm.get("accel", "auto") if base.vm.get("accel") == "kvm" else "auto")
        problems = hardware_problems(base.vm, accel)
        if problems:
            raise UsageError(f"this site cannot run parcel {parcel}: " + "; ".join(problems))

        t0 = time.perf_counter()
        if online:
            lock = await site.store.acquire(parcel, site.holder())
            # Ours before this call only if our own local state was made under it.
            self._fresh_lock = not (local and lock.epoch == here.epoch)
            if local and lock.epoch != here.epoch:
                await site.store.release(parcel, lock.epoch)
                state.fenced()
                state.start_running(base_v, lock.epoch, site.host)  # refused: says fenced, and what to do
            self.epoch = lock.epoch
            if base_v != info.version:
                # An older version resumed: its next commit goes on top of the head.
                head = await load_version(site, parcel, info.version, state)
        else:
            assert here.epoch is not None
            self.epoch = here.epoch
        marks["lock"] = time.perf_counter() - t0
        try:
            staged, staged_tags = state.staged() if local else ([], set())
            self.session = ParcelSession(site, parcel, state, base, self.epoch, head, staged, staged_tags)
            return await self._start(base, base_v, memory_from_local=local, here=here.status, accel=accel,
                                     marks=marks, t_all=t_all, online=online)
        except BaseException:
            # Nothing runs: a lock this call took must not stay taken.
            if online and self._fresh_lock:
                with contextlib.suppress(IsrError):
                    await site.store.release(parcel, self.epoch)
            raise

    async def _start(self, base: Manifest, base_v: int, *, memory_from_local: bool, here: LocalStatus,
                     accel: str, marks: dict[str, float], t_all: float, online: bool) -> ResumeReport:
        site, parcel, state, local = self.site, self.parcel, self.state, memory_from_local
        assert state is not None
        if here is LocalStatus.SUSPENDED_LOCAL:
            memory = state.load_memory()
        elif here is LocalStatus.RUNNING and state.dirty():
            # A session that crashed: its disk changes survive, its memory did not
            # (an older image would not match the disk): the guest cold-boots.
            memory = None
        else:
            memory = base.memory

        # Lookaside sources count only under the policies that use them; the
        # others measure the server alone (paper section 6).
        self.chain = chain = site.registry(parcel, self.lookaside if self.policy.uses_lookaside else ())
        assert base.keyring is not None
        self.disk = disk = ParcelDisk(base.keyring, site.secret(), site.cache, chain, state)

        t0 = time.perf_counter()
        fetched = 0
        if self.policy.fetches_everything_first:
            fetched = await self._fetch_everything(memory)
            if self.policy is Policy.PROACTIVE and fetched:
                self.events("warning", {"message": f"the cache was not fully hoarded: fetched {fetched} chunk(s)"})
        marks["fetch_before_start"] = time.perf_counter() - t0

        t0 = t_start = time.perf_counter()
        self.nbd = NbdServer(disk)
        sock = self.rundir / "nbd.sock"
        await self.nbd.start_unix(sock)
        cfg, boot_files = self._vm_config(base, accel, boot=memory is None)
        ram = memory.ram if memory is not None else None
        self._ram_prev = ram
        self._hot_prev = list(memory.hot) if memory is not None else []
        lazy = ram is not None and self.memory is MemoryMode.LAZY and postcopy_usable()
        # An image from before RAM was kept apart is one big stream that QEMU
        # parses while it arrives; otherwise the stream is device state only
        # (a few hundred KiB), decoded whole.
        feeder = Feeder(memory, site.cache, chain) if memory is not None and ram is None else None
        stream_task = asyncio.create_task(read_stream(memory, site.cache, chain)) \
            if memory is not None and ram is not None else None
        ram_task: asyncio.Task | None = None
        source: PostcopySource | None = None

        async def ram_in() -> None:
            assert ram is not None and cfg.ram_fd is not None
            await write_blob(MemoryImage(ram.size, ram), cfg.ram_fd, site.cache, chain)
            marks["ram"] = time.perf_counter() - t_start

        async def machine() -> None:
            # QEMU starts up meanwhile; its board (which reads -kernel and
            # -initrd) is built once this returns. The boot files get all the
            # cores first (measured: sharing them with RAM from the start, or
            # decoding RAM niced, both end later); then an eager restore
            # decodes RAM while the board is built.
            nonlocal ram_task, source
            files = asyncio.ensure_future(boot_files) if boot_files is not None else None
            if lazy and stream_task is not None and memory is not None:
                source = self._lazy_source(await stream_task, memory, cfg.ram_fd)
                if source is not None:
                    source.warm()  # niced: the hot chunks decode beside the boot files and the board
            if files is not None:
                await files
                marks["boot_files"] = time.perf_counter() - t_start
            if ram is not None and source is None:
                ram_task = asyncio.create_task(ram_in())
            if feeder is not None:
                feeder.start()

        def cancel_all() -> None:
            for task in (boot, ram_task, stream_task, feeder and feeder.task):
                if task is not None and not task.done():
                    task.cancel()

        boot = asyncio.create_task(machine())
        self.qemu = q = Qemu(cfg, self.rundir, sock, serial=self.serial)
        try:
            await q.start(incoming=memory is not None, pass_fds=self._memfds, machine=boot)
        except BaseException:
            cancel_all()
            if source is not None:
                await source.close()
            raise
        # From the same start as boot_files, which ran inside it.
        marks["qemu_start"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            if feeder is not None:
                await q.load_memory(feeder.produce)
            elif stream_task is not None:
                assert ram is not None
                stream = await stream_task
                lazy = source is not None and await q.enable_postcopy()
                if lazy:
                    assert source is not None
                    self.postcopy = source
                    await q.load_memory_lazily(source)
                else:
                    if source is not None:
                        await source.close()
                    if ram_task is None:
                        ram_task = asyncio.create_task(ram_in())
                    # Device state refers to RAM (virtio rings): RAM goes in first.
                    await ram_task
                    await q.load_memory(lambda fd: write_all(fd, [stream]), without_ram=True)
            if memory is not None and await q.status() == "paused":
                await q.cont()
        finally:
            cancel_all()
        marks["memory_image"] = time.perf_counter() - t0
        marks["total"] = time.perf_counter() - t_all

        if local:
            # The running guest supersedes a locally saved image: never restore it twice.
            state.save_memory(None)
        await asyncio.to_thread(state.start_running, base_v, self.epoch, site.host)
        if self.policy.prefetches:
            self._tasks.append(asyncio.create_task(self._prefetch_and_hoard(base, memory)))
        if online:
            self._tasks.append(asyncio.create_task(self._trickle()))
        self.report = ResumeReport(
            str(parcel), base_v, self.policy.value, accel, memory is None, local, marks, fetched,
            memory="none" if memory is None else "lazy" if lazy else "eager",
        )
        if self.postcopy is not None:
            self._tasks.append(asyncio.create_task(self._memory_arrives(self.postcopy, t_all)))
        return self.report

    def _lazy_source(self, stream: bytes, memory: MemoryImage, ram_fd: int | None) -> PostcopySource | None:
        """What a lazy restore serves the guest from; None if this image cannot be restored lazily."""
        assert self.chain is not None and memory.ram is not None
        try:
            saved = migstream.parse(stream)
            return PostcopySource(
                saved, RAM_BLOCK, ram_chunks(memory.ram), RamFetcher(memory.ram, self.site.cache, self.chain),
                ram_fd=ram_fd, hot=memory.hot, say=lambda msg: self.events("warning", {"message": msg}))
        except migstream.StreamError as e:
            log.info("memory image restored eagerly: %s", e)
            return None

    async def _memory_arrives(self, source: PostcopySource, t_all: float) -> None:
        """While the guest runs: until all of its RAM is in (a suspend hurries it)."""
        try:
            stats = await source.finish(hurry=False, stall_timeout=None)
        except IsrError as e:
            self.events("error", {"message": f"restoring guest memory failed: {e}"})
            return
        at = stats.started + (stats.completed or 0.0) - t_all
        if self.report is not None:
            self.report.seconds["memory_complete"] = at
        self.events("memory", {"message": f"all of guest RAM is in, {at:.2f} s after the resume began",
                               "seconds": round(at, 3), **stats.summary()})

    def _vm_config(self, m: Manifest, accel: str, *, boot: bool) -> tuple[VmConfig, Awaitable[None] | None]:
        """QEMU's configuration, and the decoding of the boot files it names (if any).

        Boot files live in memfds: decoded in memory, handed to QEMU by fd,
        never written to disk in the clear. The memfds exist (empty) before
        QEMU is spawned; the returned awaitable fills them.

        Only a cold boot (``boot``) gets them. A restored guest has its kernel
        in RAM already; QEMU would read them only to boot again, and a reboot
        ends QEMU (-no-reboot) so that :meth:`reboot` starts a cold one. That
        keeps fetching and decoding 16 MB of boot files off every resume.
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
        if not boot:
            return cfg, None
        spec = vm.get("boot") or {}
        files: list[tuple[int, MemoryImage]] = []
        for key in ("kernel", "initrd"):
            if spec.get(key):
                fd = os.memfd_create(f"isrsync-{key}", 0)
                self._memfds.append(fd)
                files.append((fd, blob_from(spec[key])))
                setattr(cfg, key, f"/proc/self/fd/{fd}")
        cfg.cmdline = spec.get("cmdline") or None
        if not files:
            return cfg, None

        async def decode_all() -> None:
            assert self.chain is not None
            await asyncio.gather(*(write_blob(blob, fd, self.site.cache, self.chain) for fd, blob in files))

        return cfg, decode_all()

    async def _fetch_everything(self, memory: MemoryImage | None) -> int:
        assert self.session is not None and self.chain is not None
        base = self.session.base
        assert base.keyring is not None
        tags = set(base.keyring.tags()) | boot_tags(base.vm)
        if memory is not None:
            tags |= memory.tags()
        return await fetch_missing(self.site.cache, self.chain, tags)

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
                assert self.session is not None
                todo = [t for t in dict.fromkeys(settled) if t not in self.session.staged_tags]
                if todo:
                    await self.session.upload_settled(todo[: max(1, int(self.trickle_rate * 5 // (128 << 10)))])
        except asyncio.CancelledError:
            raise
        except IsrError as e:
            log.info("trickle paused: %s", e)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> RunStatus:
        d = self.disk
        assert d is not None and self.chain is not None
        assert self.session is not None
        staged = self.session.staged_tags
        residue = [r.tag for r in d.dirty.values() if not r.is_zero and r.tag not in staged]
        return RunStatus(
            parcel=str(self.parcel), name=self.name, base=self.session.base.version, policy=self.policy.value,
            dirty_chunks=len(d.dirty), trickled_chunks=len(staged), residue_chunks=len(set(residue)),
            reads=d.stats.reads, writes=d.stats.writes, misses=d.stats.misses, cache_hits=d.stats.cache_hits,
            qemu="running" if self.qemu and self.qemu.alive else "stopped", sources=self.chain.infos(),
            memory={"mode": self.report.memory if self.report else None,
                    **(self.postcopy.stats.summary() if self.postcopy is not None else {})},
            report=self.report,
        )

    # -- lookaside sources -------------------------------------------------------------------

    def sources(self) -> list[SourceInfo]:
        assert self.chain is not None
        return self.chain.infos()

    async def add_source(self, path: str) -> SourceInfo:
        """Offer another site's cache directory to the running parcel (read-only lookaside)."""
        assert self.chain is not None
        src = await asyncio.to_thread(CacheDirSource, path)
        if not self.policy.uses_lookaside:
            await src.close()
            raise UsageError(f"the {self.policy.value} policy asks no lookaside source",
                             hint="resume with --policy lookaside or auto")
        self.chain.add(src)
        return next(i for i in self.chain.infos() if i.name == src.name)

    async def withdraw_source(self, name: str) -> None:
        assert self.chain is not None
        if name in ("server", "cache"):
            raise UsageError(f"the {name} source cannot be withdrawn")
        await self.chain.withdraw(name)

    # -- suspend and sync ------------------------------------------------------------------

    async def suspend(self, keep_lock: bool = False) -> SuspendResult:
        """Save memory and disk, commit, release the lock (unless ``keep_lock``)."""
        q, disk, session = self.qemu, self.disk, self.session
        assert q is not None and disk is not None and session is not None
        t0 = time.perf_counter()
        memory, saved = await self._save_memory()
        t_mem = time.perf_counter() - t0
        await self._stop_tasks()
        await q.quit()
        assert self.nbd is not None
        await self.nbd.close()
        await session.save_locally(disk, memory)
        done = dict(memory_bytes=saved["bytes"], memory_seconds=round(t_mem, 3),
                    memory_new_chunks=saved["new_chunks"], memory_kept_chunks=saved["kept_chunks"],
                    dirty_chunks=len(disk.dirty))
        try:
            v = await session.commit(disk.current_keyring(), list(disk.dirty), memory, disk.stats.first_access,
                                     release=not keep_lock)
        except Unreachable as e:
            self.events("offline", {"message": "suspended locally; the server could not be reached"})
            return SuspendResult(committed=False, reason=e.message, **done)
        return SuspendResult(committed=True, version=v.version, seconds=round(time.perf_counter() - t0, 3),
                             kept_lock=keep_lock, **done)

    async def _save_memory(self) -> tuple[MemoryImage, dict[str, int]]:
        """Stop the guest; save its device state, then its RAM in place (the guest stays stopped).

        After a lazy resume, the rest of RAM comes in first (the guest still
        runs meanwhile; if it cannot all be had, nothing is stopped).
        """
        q = self.qemu
        assert q is not None and q.cfg.ram_fd is not None
        if self.postcopy is not None and not self.postcopy.done:
            await self.postcopy.finish()
        secret, cache = self.site.secret(), self.site.cache
        saved = []
        await q.save_memory(lambda fd: saved.append(save_stream(fd, secret, cache)), without_ram=True)
        size = q.cfg.memory_mib << 20
        ram = await asyncio.to_thread(save_ram, q.cfg.ram_fd, size, secret, cache, self._ram_prev)
        self._ram_prev = ram.ram
        stream = saved[0].memory
        memory = MemoryImage(stream.length, stream.refs, ram.ram, hot=self._next_hot(ram.ram))
        in_use = sum(CHUNK_SIZE for r in ram.ram if not r.is_zero)
        return memory, {"bytes": stream.length + in_use, "new_chunks": ram.new_chunks, "kept_chunks": ram.kept_chunks}

    def _next_hot(self, ram: Keyring) -> list[int]:
        """What the guest touched first since its resume, then what was hot before, a few MiB of it.

        Chunks all zeros in the image saved now are left out: there is nothing to put in place.
        """
        touched = self.postcopy.touched if self.postcopy is not None else []
        hot = (i for i in dict.fromkeys([*touched, *self._hot_prev]) if i < len(ram) and not ram[i].is_zero)
        return list(itertools.islice(hot, HOT_CHUNKS))

    async def sync(self) -> SyncResult:
        """Commit now and keep running: a brief pause while the memory image is saved."""
        q, disk, session = self.qemu, self.disk, self.session
        assert q is not None and disk is not None and session is not None
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
        # Chunks rewritten since the snapshot stay dirty for the next commit.
        covered = lambda: [i for i, r in snapshot.items() if disk.dirty.get(i) is r]  # noqa: E731
        v = await session.commit(ring, list(snapshot), memory, disk.stats.first_access, release=False,
                                 running=True, done=covered())
        base = await session.rebase(v.version)
        assert base.keyring is not None
        disk.keyring = base.keyring
        for i in covered():
            disk.dirty.pop(i, None)
        return SyncResult(version=v.version, paused_seconds=round(paused, 3),
                          seconds=round(time.perf_counter() - t0, 3))

    async def commit_after_poweroff(self) -> PowerOffResult:
        """The guest shut itself down: commit its disk (the next resume cold-boots)."""
        await self._stop_tasks()
        disk, session = self.disk, self.session
        assert self.nbd is not None and disk is not None and session is not None
        await self.nbd.close()
        await session.save_locally(disk, None)
        try:
            v = await session.commit(disk.current_keyring(), list(disk.dirty), None, disk.stats.first_access,
                                     release=True)
        except Unreachable as e:
            return PowerOffResult(committed=False, reason=e.message)
        return PowerOffResult(committed=True, version=v.version)

    async def wait_guest(self) -> int | None:
        assert self.qemu is not None
        return await self.qemu.wait()

    @property
    def guest_rebooted(self) -> bool:
        """QEMU ended because the guest rebooted (it runs with -no-reboot)."""
        return self.qemu is not None and not self.qemu.alive and self.qemu.shutdown_reason == "guest-reset"

    async def reboot(self) -> None:
        """Boot the guest again, cold, on the same disk, after it rebooted.

        QEMU runs with -no-reboot, so a reboot ends it; a resumed QEMU has no
        boot files to boot from anyway. Whatever was in RAM is gone (as on any
        reboot); the disk, its dirty chunks and the lock carry on.
        """
        assert self.session is not None and self.report is not None and self.qemu is not None
        if self.postcopy is not None:
            await self.postcopy.close()
            self.postcopy = None
        await self.qemu.close()
        self._close_memfds()
        self._ram_prev, self._hot_prev = None, []
        cfg, boot_files = self._vm_config(self.session.base, self.report.accel, boot=True)
        self.qemu = Qemu(cfg, self.rundir, self.rundir / "nbd.sock", serial=self.serial)
        await self.qemu.start(pass_fds=self._memfds, machine=boot_files)

    def _close_memfds(self) -> None:
        for fd in self._memfds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._memfds.clear()

    async def _stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    async def close(self) -> None:
        """Stop everything (after a suspend, or when QEMU died: the disk state is kept). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._stop_tasks()
        if self.postcopy is not None:
            await self.postcopy.close()
        if self.qemu is not None:
            await self.qemu.close()
        if self.nbd is not None:
            await self.nbd.close()
        if self.disk is not None:
            with contextlib.suppress(IsrError, QemuError, OSError):
                await self.disk.flush()
        if self.chain is not None:
            await self.chain.close()
        self._close_memfds()
        if self.state is not None:
            self.state.close()
            self.state = None
