"""The guest machine of a running parcel: QEMU, the memfds it maps, and its memory in and out.

Memory comes back lazily by default: the chunks the guest touched first last
time go into the memfd QEMU maps while QEMU builds its machine, the device
state goes in, the guest runs, and the rest of RAM follows by post-copy
(:mod:`isrsync.vm.postcopy`), faults first. Eagerly, all of RAM is decoded into
the memfd before the device state goes in. A restored guest gets no boot files:
if it reboots, QEMU (run with -no-reboot) ends and :meth:`Machine.reboot` boots
it cold on the same disk.

Saving is the reverse: after a lazy restore, the rest of RAM first; then the
device state through migration into the cache as it streams, and guest RAM
straight from its memfd (chunks unchanged since the resume cost one hash each).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..chunk import CHUNK_SIZE
from ..errors import QemuError
from ..manifest import Keyring, MemoryImage
from ..vm import migstream
from ..vm.postcopy import PostcopySource, PostcopyStats
from ..vm.qemu import RAM_BLOCK, Qemu, VmConfig, postcopy_usable
from ..vmspec import VmSpec
from .memimage import Feeder, RamFetcher, ram_chunks, read_stream, save_ram, save_stream, write_all
from .parcel import Site, blob_image, write_blob
from .policy import MemoryMode
from .registry import SourceRegistry

log = logging.getLogger("isrsync.machine")

# How much of a lazy restore's RAM goes in before the guest starts (32 MiB): what
# the guest touched first last time, decoded while QEMU builds its machine. More
# would hold the guest back; less leaves it faulting on its working set (each
# fault a round trip through QEMU).
HOT_CHUNKS = 256


@dataclass(frozen=True)
class SavedMemory:
    """A memory image just saved, and what saving it cost."""

    image: MemoryImage
    bytes: int  # device state plus the RAM chunks in use
    new_chunks: int  # RAM chunks encoded afresh
    kept_chunks: int  # RAM chunks unchanged since the resume (one hash each)
    stored_bytes: int = 0  # the image encoded (compressed, encrypted): what crosses a link


class Machine:
    """QEMU for one parcel, with guest RAM in a memfd that is ours as much as QEMU's.

    ``marks`` collects the restore's timings for the resume report (keys as in
    :class:`isrsync.site.results.ResumeReport`).
    """

    def __init__(self, site: Site, chain: SourceRegistry, rundir: Path, nbd_sock: Path, *,
                 display: str, serial: Path | None, memory_mode: MemoryMode,
                 say: Callable[[str], None], progress: Callable[[str, int, int | None], None] | None = None) -> None:
        self.site = site
        self.chain = chain
        self.rundir = rundir
        self.nbd_sock = nbd_sock
        self.display = display
        self.serial = serial
        self.memory_mode = memory_mode
        self.say = say
        # Streams "memory" (lazy: RAM coming in while the guest runs) and
        # "restore" (eager: RAM decoded before it runs), in bytes.
        self.progress = progress or (lambda stream, done, total: None)
        self.qemu: Qemu | None = None
        self.postcopy: PostcopySource | None = None
        self._memfds: list[int] = []
        self._ram_prev: Keyring | None = None  # the RAM keyring the guest was resumed or last saved from
        self._hot_prev: list[int] = []  # the hot RAM chunks of the image resumed

    # -- start -------------------------------------------------------------------------------

    async def start(self, spec: VmSpec, accel: str, memory: MemoryImage | None, marks: dict[str, float]) -> str:
        """Start QEMU and restore ``memory`` into it (or cold-boot when None).

        Returns how memory came back: "none", "lazy" or "eager".
        """
        t0 = t_start = time.perf_counter()
        site, chain = self.site, self.chain
        cfg, boot_files = self._config(spec, accel, boot=memory is None)
        ram = memory.ram if memory is not None else None
        self._ram_prev = ram
        self._hot_prev = list(memory.hot) if memory is not None else []
        lazy = ram is not None and self.memory_mode is MemoryMode.LAZY and postcopy_usable()
        # An image from before RAM was kept apart is one big stream that QEMU
        # parses while it arrives; otherwise the stream is device state only
        # (a few hundred KiB), decoded whole.
        feeder = Feeder(memory, site.cache, chain) if memory is not None and ram is None else None
        stream_task = asyncio.create_task(read_stream(memory, site.cache, chain)) \
            if memory is not None and ram is not None else None
        # The hot chunks start once the device state is in, beside QEMU's start-up: the
        # guest's start waits for them, and for QEMU, whichever is later. QEMU's board
        # waits for the device state, so it goes first: started together, its decode
        # queued behind the hot chunks' and QEMU built its board 50-90 ms later
        # (benchmarks/usb_resume.py, resuming from a USB key).
        fetcher = RamFetcher(ram, site.cache, chain, memory.hot) if lazy and memory is not None else None
        ram_task: asyncio.Task | None = None
        source: PostcopySource | None = None

        async def ram_in() -> None:
            assert ram is not None and cfg.ram_fd is not None
            await write_blob(MemoryImage(ram.size, ram), cfg.ram_fd, site.cache, chain,
                             progress=lambda done, total: self.progress("restore", done, total))
            marks["ram"] = time.perf_counter() - t_start

        async def board() -> None:
            # QEMU starts up meanwhile; its board (which reads -kernel and
            # -initrd) is built once this returns. The boot files get all the
            # cores first (measured: sharing them with RAM from the start, or
            # decoding RAM niced, both end later); then an eager restore
            # decodes RAM while the board is built.
            nonlocal ram_task, source
            files = asyncio.ensure_future(boot_files) if boot_files is not None else None
            if lazy and stream_task is not None and memory is not None:
                assert fetcher is not None
                stream = await stream_task
                fetcher.warm()
                source = self._lazy_source(stream, memory, cfg.ram_fd, fetcher)
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

        boot = asyncio.create_task(board())
        self.qemu = q = Qemu(cfg, self.rundir, self.nbd_sock, serial=self.serial)
        try:
            await q.start(incoming=memory is not None, pass_fds=self._memfds, machine=boot)
        except BaseException:
            cancel_all()
            if fetcher is not None:
                fetcher.forget()
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
                if source is not None and not lazy:
                    self.say("guest memory is restored eagerly (all of it before the guest runs): "
                             "QEMU refused post-copy here")
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
            if fetcher is not None and self.postcopy is None:
                fetcher.forget()
        marks["memory_image"] = time.perf_counter() - t0
        return "none" if memory is None else "lazy" if lazy else "eager"

    def _lazy_source(self, stream: bytes, memory: MemoryImage, ram_fd: int | None,
                     fetcher: RamFetcher) -> PostcopySource | None:
        """What a lazy restore serves the guest from; None if this image cannot be restored lazily."""
        assert memory.ram is not None
        try:
            saved = migstream.parse(stream)
            return PostcopySource(
                saved, RAM_BLOCK, ram_chunks(memory.ram), fetcher,
                ram_fd=ram_fd, hot=memory.hot, say=self.say,
                progress=lambda done, total: self.progress("memory", done * CHUNK_SIZE, total * CHUNK_SIZE))
        except migstream.StreamError as e:
            # Said, not only logged: the guest then starts only once all of RAM is in.
            self.say(f"guest memory is restored eagerly (all of it before the guest runs): "
                     f"its saved device state could not be taken apart for post-copy ({e})")
            return None

    async def memory_arrives(self) -> PostcopyStats | None:
        """While the guest runs: until all of its RAM is in (a suspend hurries it). None if not lazy."""
        if self.postcopy is None:
            return None
        return await self.postcopy.finish(hurry=False, stall_timeout=None)

    def _config(self, spec: VmSpec, accel: str, *, boot: bool) -> tuple[VmConfig, Awaitable[None] | None]:
        """QEMU's configuration, and the decoding of the boot files it names (if any).

        Boot files live in memfds: decoded in memory, handed to QEMU by fd,
        never written to disk in the clear. The memfds exist (empty) before
        QEMU is spawned; the returned awaitable fills them.

        Only a cold boot (``boot``) gets them. A restored guest has its kernel
        in RAM already; QEMU would read them only to boot again, and a reboot
        ends QEMU (-no-reboot) so that :meth:`reboot` starts a cold one. That
        keeps fetching and decoding 16 MB of boot files off every resume.
        """
        cfg = VmConfig(memory_mib=spec.memory_mib, cpus=spec.cpus, machine=spec.machine,
                       cpu_model=spec.cpu_model, accel=accel, display=self.display,
                       free_page_reporting=spec.free_page_reporting)
        cfg.ram_fd = os.memfd_create("isrsync-ram")
        self._memfds.append(cfg.ram_fd)
        os.ftruncate(cfg.ram_fd, cfg.memory_mib << 20)
        if not boot or spec.boot is None:
            return cfg, None
        files: list[tuple[int, MemoryImage]] = []
        for key, blob in spec.boot.blobs():
            fd = os.memfd_create(f"isrsync-{key}", 0)
            self._memfds.append(fd)
            files.append((fd, blob_image(blob)))
            setattr(cfg, key, f"/proc/self/fd/{fd}")
        cfg.cmdline = spec.boot.cmdline or None
        if not files:
            return cfg, None

        async def decode_all() -> None:
            await asyncio.gather(*(write_blob(blob, fd, self.site.cache, self.chain) for fd, blob in files))

        return cfg, decode_all()

    # -- save --------------------------------------------------------------------------------

    async def save(self) -> SavedMemory:
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
        image = MemoryImage(stream.length, stream.refs, ram.ram, hot=self._next_hot(ram.ram))
        in_use = sum(CHUNK_SIZE for r in ram.ram if not r.is_zero)
        stored = await asyncio.to_thread(cache.stored_bytes, image.tags())
        return SavedMemory(image, stream.length + in_use, ram.new_chunks, ram.kept_chunks, stored)

    def _next_hot(self, ram: Keyring) -> list[int]:
        """What the guest touched first since its resume, then what was hot before, a few MiB of it.

        Chunks all zeros in the image saved now are left out: there is nothing to put in place.
        """
        touched = self.postcopy.touched if self.postcopy is not None else []
        hot = (i for i in dict.fromkeys([*touched, *self._hot_prev]) if i < len(ram) and not ram[i].is_zero)
        return list(itertools.islice(hot, HOT_CHUNKS))

    async def resume_after_failed_save(self) -> None:
        """A save that failed (a full disk...) must not leave the guest frozen."""
        if self.qemu is not None and self.qemu.alive:
            with contextlib.suppress(QemuError):
                await self.qemu.cont()

    # -- reboot and close --------------------------------------------------------------------

    async def reboot(self, spec: VmSpec, accel: str) -> None:
        """Boot the guest again, cold, on the same disk, after it rebooted.

        QEMU runs with -no-reboot, so a reboot ends it; a resumed QEMU has no
        boot files to boot from anyway. Whatever was in RAM is gone (as on any
        reboot); the disk, its dirty chunks and the lock carry on.
        """
        if self.postcopy is not None:
            await self.postcopy.close()
            self.postcopy = None
        if self.qemu is not None:
            await self.qemu.close()
        self._close_memfds()
        self._ram_prev, self._hot_prev = None, []
        cfg, boot_files = self._config(spec, accel, boot=True)
        self.qemu = Qemu(cfg, self.rundir, self.nbd_sock, serial=self.serial)
        await self.qemu.start(pass_fds=self._memfds, machine=boot_files)

    @property
    def rebooted(self) -> bool:
        """QEMU ended because the guest rebooted (it runs with -no-reboot)."""
        return self.qemu is not None and not self.qemu.alive and self.qemu.shutdown_reason == "guest-reset"

    def _close_memfds(self) -> None:
        for fd in self._memfds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._memfds.clear()

    async def close(self) -> None:
        if self.postcopy is not None:
            await self.postcopy.close()
        if self.qemu is not None:
            await self.qemu.close()
        self._close_memfds()
