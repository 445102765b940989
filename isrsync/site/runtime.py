"""A parcel running at this site: resume, then suspend, sync or power-off.

Resume: read the version (manifests are authenticated, the keyring rebuilt),
check this site can run the machine, take the lock, serve the disk over NBD,
start the machine and restore its memory (:mod:`.machine`), and start the
background work the policy asks for (:mod:`.background`). Each step is timed
for the latency breakdown. Demand misses go through the source registry
(:mod:`.sources`).

Suspend: stop the background work, save memory, stop QEMU, flush the disk,
commit (:mod:`.session`: uploading only what the server lacks) and release the
lock. If the server cannot be reached, everything stays in the local state and
the lock stays held: ``isrsync sync`` commits it later, and the parcel can even
be resumed again here while offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Sequence

from ..errors import Conflict, IsrError, QemuError, Unreachable, UsageError
from ..locktoken import CarriedKeys, LockToken
from ..manifest import LazyKeyring, Manifest, MemoryImage
from ..manifest import decode as manifest_decode
from ..store.base import Holder
from ..vm.nbd import NbdServer
from ..vm.postcopy import PostcopySource
from ..vm.qemu import Qemu, accelerator
from ..vmspec import Accel
from .background import Events, Tasks, background_for
from .disk import ParcelDisk
from .machine import Machine
from .media import MediumSink, manifests_from_media, open_lookaside
from .parcel import Site, boot_tags, fetch_missing, hardware_problems, load_version
from .policy import Display, MemoryMode, Policy
from .results import MediumCopyResult, PowerOffResult, ResumeReport, RunStatus, SuspendResult, SyncResult
from .segments import SegmentLoader
from .session import ParcelSession
from .sources import Source, SourceInfo
from .registry import SourceRegistry
from .state import LocalStatus, ParcelState
from .tomedium import MediumCopy, StreamProgress

log = logging.getLogger("isrsync.runtime")


class Runtime:
    """One resumed parcel: its disk, its QEMU, and the tasks that serve them."""

    def __init__(
        self,
        site: Site,
        parcel: uuid.UUID,
        *,
        policy: Policy = Policy.AUTO,
        display: Display = Display.NONE,
        serial: Path | None = None,
        rundir: Path | None = None,
        events: Events | None = None,
        lookaside: Sequence[Source] = (),
        trickle_settle: float = 30.0,
        trickle_rate: float = 8 << 20,
        memory: MemoryMode = MemoryMode.LAZY,
        progress: StreamProgress | None = None,
    ) -> None:
        self.site = site
        self.parcel = parcel
        self.policy = policy
        self.display = display
        self.serial = serial
        self.rundir = rundir or Path(tempfile.mkdtemp(prefix="isrsync-run-"))
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.events = events or (lambda kind, data: None)
        # Long steps before the guest runs (the baseline policy's fetch of everything).
        self.progress = progress or (lambda stream, done, total: None)
        self.lookaside = list(lookaside)
        self.trickle_settle = trickle_settle
        self.trickle_rate = trickle_rate
        self.memory = memory
        self.state: ParcelState | None = None
        self.disk: ParcelDisk | None = None
        self.nbd: NbdServer | None = None
        self.machine: Machine | None = None
        self.chain: SourceRegistry | None = None
        self.name: str | None = None
        self.session: ParcelSession | None = None  # the committed side: base, epoch, staged packs
        self.epoch = 0
        self.tasks = Tasks()
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
            if base_v == info.version and self.policy.uses_lookaside:
                carried = await manifests_from_media(self.lookaside, parcel, base_v, info.head_hash)
                if carried:
                    await asyncio.to_thread(state.put_manifests, carried)
        # Only what the start needs: a keyring held as segments comes as the guest asks.
        base = await load_version(site, parcel, base_v, state, lazy=True)
        head_version: int | None = None
        marks["manifest"] = time.perf_counter() - t0
        accel = accelerator("kvm" if base.vm.accel is Accel.KVM else "auto")
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
                # An older version resumed: its next commit goes on top of the head, whose
                # manifests that commit loads (ParcelSession._parent), not the guest's start.
                head_version = info.version
        else:
            assert here.epoch is not None
            self.epoch = here.epoch
        marks["lock"] = time.perf_counter() - t0
        try:
            staged, staged_tags = state.staged() if local else ([], set())
            self.session = ParcelSession(site, parcel, state, base, self.epoch, None, staged, staged_tags,
                                         head_version=head_version)
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
        chain.warn = lambda msg: self.events("warning", {"message": msg})
        assert base.keyring is not None
        lazy = isinstance(base.keyring, LazyKeyring) and not base.keyring.complete
        if lazy:
            SegmentLoader(base.keyring, chain)
        self.disk = disk = ParcelDisk(base.keyring, site.secret(), site.cache, chain, state)

        t0 = time.perf_counter()
        fetched = 0
        if self.policy.fetches_everything_first:
            fetched = await self._fetch_everything(memory)
            if self.policy is Policy.PROACTIVE and fetched:
                self.events("warning", {"message": f"the cache was not fully hoarded: fetched {fetched} chunk(s)"})
        marks["fetch_before_start"] = time.perf_counter() - t0

        self.nbd = NbdServer(disk)
        sock = self.rundir / "nbd.sock"
        await self.nbd.start_unix(sock)
        self.machine = machine = Machine(
            site, chain, self.rundir, sock, display=self.display.value, serial=self.serial, memory_mode=self.memory,
            say=lambda msg: self.events("warning", {"message": msg}), progress=self.progress)
        restored = await machine.start(base.vm, accel, memory, marks)
        marks["total"] = time.perf_counter() - t_all

        if local:
            # The running guest supersedes a locally saved image: never restore it twice.
            state.save_memory(None)
        await asyncio.to_thread(state.start_running, base_v, self.epoch, site.host)
        assert self.session is not None
        work = background_for(self.policy, online=online, disk=disk, session=self.session, events=self.events,
                              trickle_settle=self.trickle_settle, trickle_rate=self.trickle_rate)
        self.tasks.start(*(w.run() for w in work))
        self.report = ResumeReport(
            str(parcel), base_v, self.policy.value, accel, memory is None, local, marks, fetched, memory=restored,
        )
        if machine.postcopy is not None:
            self.tasks.start(self._memory_arrives(t_all))
        if lazy:
            self.tasks.start(self._keyring_arrives(t_all))
        return self.report

    async def _keyring_arrives(self, t_all: float) -> None:
        """While the guest runs: the rest of the keyring (a commit needs all of it)."""
        assert self.disk is not None
        try:
            await self.disk.whole_keyring(group=2)
        except IsrError as e:
            log.info("the rest of the keyring did not come yet: %s", e)  # a commit asks again
            return
        at = time.perf_counter() - t_all
        if self.report is not None:
            self.report.seconds["keyring_complete"] = at
        self.events("keyring", {"message": f"the whole keyring is in, {at:.2f} s after the resume began",
                                "seconds": round(at, 3)})

    async def _memory_arrives(self, t_all: float) -> None:
        """While the guest runs: until all of its RAM is in (a suspend hurries it)."""
        assert self.machine is not None
        try:
            stats = await self.machine.memory_arrives()
        except IsrError as e:
            self.events("error", {"message": f"restoring guest memory failed: {e}"})
            return
        if stats is None:
            return
        at = stats.started + (stats.completed or 0.0) - t_all
        if self.report is not None:
            self.report.seconds["memory_complete"] = at
        self.events("memory", {"message": f"all of guest RAM is in, {at:.2f} s after the resume began",
                               "seconds": round(at, 3), **stats.summary()})

    async def _fetch_everything(self, memory: MemoryImage | None) -> int:
        assert self.session is not None and self.chain is not None
        base = self.session.base
        assert base.keyring is not None and self.disk is not None
        await self.disk.whole_keyring()
        tags = set(base.keyring.tags()) | boot_tags(base.vm)
        if memory is not None:
            tags |= memory.tags()
        return await fetch_missing(self.site.cache, self.chain, tags, lambda d, t: self.progress("fetch", d, t))

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
            qemu="running" if self.qemu is not None and self.qemu.alive else "stopped", sources=self.chain.infos(),
            memory={"mode": self.report.memory if self.report else None,
                    **(self.postcopy.stats.summary() if self.postcopy is not None else {})},
            report=self.report,
            damaged_from_server=len(self.chain.server_damaged),
            damaged_packs=sorted({p.hex() for p in self.chain.server_damaged.values() if p is not None}),
        )

    # -- lookaside sources -------------------------------------------------------------------

    def sources(self) -> list[SourceInfo]:
        assert self.chain is not None
        return self.chain.infos()

    def offer(self, src: Source) -> None:
        """A feeder's source (a medium plugged in): into the registry, or, before the resume
        has built it, among the lookaside sources it will start with."""
        if self.chain is None:
            self.lookaside = [s for s in self.lookaside if s.name != src.name] + [src]
        else:
            self.chain.add(src)

    async def add_source(self, path: str) -> SourceInfo:
        """Offer a medium or another site's cache directory to the running parcel (read-only lookaside)."""
        assert self.chain is not None
        src = await asyncio.to_thread(open_lookaside, path, self.site.cache.path)
        if not self.policy.uses_lookaside:
            await src.close()
            raise UsageError(f"the {self.policy.value} policy asks no lookaside source",
                             hint="resume with --policy lookaside or auto")
        self.chain.add(src)
        return next(i for i in self.chain.infos() if i.name == src.name)

    async def withdraw_source(self, name: str) -> None:
        if name in ("server", "cache"):
            raise UsageError(f"the {name} source cannot be withdrawn")
        if self.chain is not None:
            await self.chain.withdraw(name)
            return
        # Offered before the resume built its registry (see offer): not asked yet, only closed.
        for src in [s for s in self.lookaside if s.name == name]:
            self.lookaside.remove(src)
            await src.close()

    # -- suspend and sync ------------------------------------------------------------------

    async def suspend(self, keep_lock: bool = False, *, medium: MediumSink | None = None, full: bool = False,
                      carry_lock: bool = False, progress: StreamProgress | None = None) -> SuspendResult:
        """Save memory and disk, commit, release the lock (unless ``keep_lock``).

        With ``medium`` (`--to-usb`), the memory image and the written chunks
        (``full``: the whole parcel) go to it while the upload runs, then the
        new version's manifests; the suspend never waits on a failing medium.
        """
        machine, disk, session = self.machine, self.disk, self.session
        assert machine is not None and machine.qemu is not None and disk is not None and session is not None
        say = progress or (lambda stream, done, total: None)
        t0 = time.perf_counter()
        saved = await machine.save()
        t_mem = time.perf_counter() - t0
        await self.tasks.stop()
        await machine.qemu.quit()
        assert self.nbd is not None
        await self.nbd.close()
        await session.save_locally(disk, saved.image)
        done = dict(memory_bytes=saved.bytes, memory_seconds=round(t_mem, 3), memory_new_chunks=saved.new_chunks,
                    memory_kept_chunks=saved.kept_chunks, dirty_chunks=len(disk.dirty),
                    memory_stored_bytes=saved.stored_bytes)
        if carry_lock and (medium is None or keep_lock):
            raise UsageError("--carry-lock hands the lock to a medium", hint="use it with --to-usb, without --keep-lock")
        copy = MediumCopy(medium, self.site.cache, say) if medium is not None else None
        copying = asyncio.create_task(self._to_medium(copy, saved.image, full)) if copy is not None else None
        try:
            v = await session.commit(await disk.current_keyring(), list(disk.dirty), saved.image,
                                     disk.stats.first_access, release=not (keep_lock or carry_lock),
                                     progress=lambda n, total: say("upload", n, total))
        except Unreachable as e:
            self.events("offline", {"message": "suspended locally; the server could not be reached"})
            copied = await self._finish_medium(copy, copying, None)
            return SuspendResult(committed=False, reason=e.message, medium=copied, **done)
        except BaseException:
            if copying is not None:
                copying.cancel()
                assert copy is not None
                await copy.drop("the suspend failed")
            raise
        copied = await self._finish_medium(copy, copying, v.version, carry=carry_lock, full=full)
        return SuspendResult(committed=True, version=v.version, seconds=round(time.perf_counter() - t0, 3),
                             kept_lock=keep_lock, medium=copied, **done)

    async def _to_medium(self, copy: MediumCopy, memory: MemoryImage, full: bool) -> None:
        disk, session = self.disk, self.session
        assert disk is not None and session is not None and self.chain is not None
        tags = [*memory.tags(), *(r.tag for r in disk.dirty.values() if not r.is_zero)]
        if full:
            ring = await disk.current_keyring()
            base_tags = [t for t in ring.tags() if t not in set(tags)] + sorted(boot_tags(session.base.vm))
            # Everything the parcel is, so a site with no link can run it: fetch what is not cached yet.
            await fetch_missing(self.site.cache, self.chain, set(base_tags))
            tags += base_tags
        await copy.chunks(tags)

    async def _finish_medium(self, copy: MediumCopy | None, copying: asyncio.Task | None,
                             version: int | None, carry: bool = False, full: bool = False) -> MediumCopyResult | None:
        if copy is None or copying is None:
            return None
        try:
            await copying
        except IsrError as e:  # a chunk the full copy could not fetch
            copy.problem = copy.problem or str(e)
        manifests: list[bytes] = []
        bundle = None
        if version is not None and copy.problem is None:
            try:
                manifests = await self.session.chain(version) if self.session is not None else []
                if full and manifests:
                    # A site with no link names the disk through the keyring base's segments.
                    mk = self.site.master_key(self.parcel)
                    base = await asyncio.to_thread(manifest_decode, manifests[0], mk, self.parcel)
                    segs = [r.tag for r in base.segments or () if not r.is_zero]
                    if segs:
                        await fetch_missing(self.site.cache, self.chain, set(segs))
                        await copy.chunks(segs)
                sealed = await self.site.store.get_key_bundle()
                if sealed is not None:
                    bundle = CarriedKeys(self.site.acct.server, self.site.acct.user, sealed).encode()
            except IsrError as e:
                log.info("the medium gets no manifests: %s", e)
        token = None
        if carry and version is not None:
            # The token names the epoch the hand-over will give the medium (one
            # past ours): it is on the medium, durable, before the server moves the lock.
            tok = LockToken(self.parcel, version, self.epoch + 1, str(copy.sink.medium_id))
            token = (self.parcel, tok.seal(self.site.master_key(self.parcel)))
        result = await copy.finish(manifests, bundle, token)
        if result.problem is not None:
            self.events("warning", {"message": f"the copy to {result.medium} was dropped: {result.problem}"})
        if carry and version is not None:
            result = await self._hand_over(copy, result)
        return result

    async def _hand_over(self, copy: MediumCopy, result: MediumCopyResult) -> MediumCopyResult:
        """After a committed `--carry-lock` suspend: the lock to the medium, or released if it cannot be."""
        assert self.state is not None
        carried = False
        if result.published:
            try:
                await self.site.store.hand_over(self.parcel, self.epoch,
                                                Holder.for_medium(str(copy.sink.medium_id), copy.sink.label))
                carried = True
            except IsrError as e:
                self.events("warning", {"message": f"the lock could not go to the medium ({e}); it is released"})
        if not carried:
            with contextlib.suppress(IsrError):
                await self.site.store.release(self.parcel, self.epoch)
        await asyncio.to_thread(self.state.handed_over)
        return dataclasses.replace(result, carries_lock=carried)

    async def sync(self, progress: StreamProgress | None = None) -> SyncResult:
        """Commit now and keep running: a brief pause while the memory image is saved."""
        machine, disk, session = self.machine, self.disk, self.session
        assert machine is not None and machine.qemu is not None and disk is not None and session is not None
        # Before the pause: the commit needs the whole keyring, not the guest's time.
        await disk.whole_keyring()
        t0 = time.perf_counter()
        try:
            saved = await machine.save()
        except BaseException:
            await machine.resume_after_failed_save()
            raise
        await disk.flush()
        snapshot = dict(disk.dirty)
        ring = await disk.current_keyring()
        await machine.qemu.cont()  # the guest runs on; later writes stay dirty for the next commit
        paused = time.perf_counter() - t0
        # Chunks rewritten since the snapshot stay dirty for the next commit.
        covered = lambda: [i for i, r in snapshot.items() if disk.dirty.get(i) is r]  # noqa: E731
        say = progress or (lambda stream, done, total: None)
        v = await session.commit(ring, list(snapshot), saved.image, disk.stats.first_access, release=False,
                                 running=True, done=covered(), progress=lambda d, t: say("upload", d, t))
        base = await session.rebase(v.version)
        assert base.keyring is not None
        disk.keyring = base.keyring
        for i in covered():
            disk.dirty.pop(i, None)
        return SyncResult(version=v.version, paused_seconds=round(paused, 3),
                          seconds=round(time.perf_counter() - t0, 3))

    async def commit_after_poweroff(self) -> PowerOffResult:
        """The guest shut itself down: commit its disk (the next resume cold-boots)."""
        await self.tasks.stop()
        disk, session = self.disk, self.session
        assert self.nbd is not None and disk is not None and session is not None
        await self.nbd.close()
        await session.save_locally(disk, None)
        try:
            v = await session.commit(await disk.current_keyring(), list(disk.dirty), None, disk.stats.first_access,
                                     release=True)
        except Unreachable as e:
            return PowerOffResult(committed=False, reason=e.message)
        return PowerOffResult(committed=True, version=v.version)

    # -- the guest ---------------------------------------------------------------------------

    @property
    def qemu(self) -> Qemu | None:
        return self.machine.qemu if self.machine is not None else None

    @property
    def postcopy(self) -> PostcopySource | None:
        return self.machine.postcopy if self.machine is not None else None

    async def wait_guest(self) -> int | None:
        assert self.qemu is not None
        return await self.qemu.wait()

    @property
    def guest_rebooted(self) -> bool:
        """QEMU ended because the guest rebooted (it runs with -no-reboot)."""
        return self.machine is not None and self.machine.rebooted

    async def reboot(self) -> None:
        """Boot the guest again, cold, on the same disk, after it rebooted (see :meth:`Machine.reboot`)."""
        assert self.session is not None and self.report is not None and self.machine is not None
        await self.machine.reboot(self.session.base.vm, self.report.accel)

    async def close(self) -> None:
        """Stop everything (after a suspend, or when QEMU died: the disk state is kept). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.tasks.stop()
        if self.machine is not None:
            await self.machine.close()
        if self.nbd is not None:
            await self.nbd.close()
        if self.disk is not None:
            with contextlib.suppress(IsrError, QemuError, OSError):
                await self.disk.flush()
        if self.chain is not None:
            await self.chain.close()
        if self.state is not None:
            self.state.close()
            self.state = None
