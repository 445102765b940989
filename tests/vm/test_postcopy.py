"""Lazy memory restore (isrsync.vm.postcopy) against real QEMU: a real guest's saved
device state taken apart, the guest started before its RAM is in, every page placed
exactly once and byte for byte, faults served while the rest is pushed, a chunk that
cannot be had for a while, and QEMU dying in the middle."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from qemukit import Harness, boot_with_ram_memfd, collect, counter, memfd_copy

from isrsync.chunk import CHUNK_SIZE
from isrsync.errors import ChunkUnavailable, QemuError
from isrsync.site.memimage import data_chunks
from isrsync.vm import migstream, postcopy
from isrsync.vm.postcopy import PostcopySource
from isrsync.vm.qemu import RAM_BLOCK

pytestmark = pytest.mark.slow


class RamCopy:
    """Chunks of a saved RAM memfd, as a lazy restore's fetch sees them (with knobs)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.chunks = data_chunks(fd, size)
        self.delay = 0.0  # seconds per background chunk
        self.failing: set[int] = set()
        self.broken: dict[int, int] = {}  # chunk -> how many more reads raise a plain OSError
        self.asked: list[tuple[int, bool]] = []
        self.at: list[float] = []  # monotonic time of each ask

    async def __call__(self, index: int, urgent: bool) -> bytes | None:
        self.asked.append((index, urgent))
        self.at.append(time.monotonic())
        if index in self.failing:
            raise ChunkUnavailable(f"no source has chunk {index}")
        if self.broken.get(index):
            self.broken[index] -= 1
            raise OSError(5, "Input/output error")  # not an IsrError: a bug or a disk, say
        if not urgent and self.delay:
            await asyncio.sleep(self.delay)
        plain = os.pread(self.fd, CHUNK_SIZE, index * CHUNK_SIZE)
        return plain if any(plain) else None


def same_ram(a: int, b: int, size: int) -> list[int]:
    """Chunk indices where two RAM memfds differ (holes read as zeros)."""
    return [i for i in range(size // CHUNK_SIZE)
            if os.pread(a, CHUNK_SIZE, i * CHUNK_SIZE) != os.pread(b, CHUNK_SIZE, i * CHUNK_SIZE)]


async def saved_guest(hx: Harness, name: str) -> tuple[bytes, int, int, int]:
    """A booted guest saved the way isrsync saves it: (device state, RAM copy, size, counter)."""
    q, ram = await boot_with_ram_memfd(hx, name)
    before = await asyncio.to_thread(counter, hx.root / f"{name}.ser")
    state = bytearray()
    await q.save_memory(collect(state), without_ram=True)
    size = q.cfg.memory_mib << 20
    copy = memfd_copy(ram, size)
    hx.fds.append(copy)
    await q.quit(30)
    return bytes(state), copy, size, before


async def lazy_qemu(hx: Harness, name: str, size: int, *, paused: bool = False):
    cfg = hx.config()
    cfg.ram_fd = os.memfd_create("test-ram-lazy")
    hx.fds.append(cfg.ram_fd)
    os.ftruncate(cfg.ram_fd, size)
    if paused:
        cfg.extra = ["-S"]  # no autostart: post-copy's RUN leaves the guest paused
    q = hx.qemu(cfg, name)
    await q.start(incoming=True, pass_fds=[cfg.ram_fd])
    assert await q.enable_postcopy()
    return q, cfg.ram_fd


async def test_a_real_saved_stream_is_taken_apart(hx: Harness) -> None:
    state, _, size, _ = await saved_guest(hx, "a")
    st = migstream.parse(state)
    names = [b.name for b in st.blocks]
    assert names[0] == RAM_BLOCK and st.block(RAM_BLOCK).length == size
    assert "pc.bios" in names and st.capabilities == ["x-ignore-shared"]
    assert RAM_BLOCK not in st.pages  # guest RAM is kept apart: not one page of it in the stream
    assert st.pages["pc.bios"] and st.devices[:1] == bytes([migstream.S_FULL])
    assert len(st.devices) < len(state) < 2 << 20


async def test_every_page_is_placed_once_and_exactly(hx: Harness) -> None:
    state, copy, size, before = await saved_guest(hx, "b")
    ram = RamCopy(copy, size)
    q, dst = await lazy_qemu(hx, "c", size, paused=True)
    src = PostcopySource(migstream.parse(state), RAM_BLOCK, ram.chunks, ram)
    try:
        await q.load_memory_lazily(src)
        assert await q.status() == "paused"
        stats = await src.finish()
        assert src.done and stats.completed is not None
        # Nothing ran meanwhile: what QEMU has is exactly what was saved, holes included.
        assert same_ram(dst, copy, size) == []
        assert stats.pushed_chunks + stats.requested_chunks == len(ram.chunks)
        assert stats.requests >= 1  # loading the devices alone reads guest RAM
        await q.cont()
        assert await asyncio.to_thread(counter, hx.root / "c.ser") >= before
        migration = await q.cmd("query-migrate")
        assert migration.get("status") == "completed"
    finally:
        await src.close()


async def test_the_guest_runs_and_faults_before_its_ram_is_in(hx: Harness) -> None:
    state, copy, size, before = await saved_guest(hx, "d")
    ram = RamCopy(copy, size)
    ram.delay = 0.05  # ~460 chunks: the background push alone would take about 20 s
    q, _ = await lazy_qemu(hx, "e", size)
    src = PostcopySource(migstream.parse(state), RAM_BLOCK, ram.chunks, ram, window=1)
    try:
        t0 = time.monotonic()
        await q.load_memory_lazily(src)
        assert await q.status() == "running"
        n = await asyncio.to_thread(counter, hx.root / "e.ser")
        answered = time.monotonic() - t0
        assert n >= before
        assert not src.done and src.stats.resident is None  # RAM is still coming in
        assert answered < 10
        assert src.stats.requested_chunks > 0 and any(urgent for _, urgent in ram.asked)
        stats = await src.finish()  # hurries: the rest at full speed
        assert src.done and stats.completed is not None and stats.completed < 20
        assert await asyncio.to_thread(counter, hx.root / "e.ser") >= n
    finally:
        await src.close()


async def test_the_push_leaves_the_guests_first_moments_to_it_and_a_hurry_ends_the_wait(
        hx: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postcopy, "_START_GRACE", 1.0)
    state, copy, size, before = await saved_guest(hx, "m")
    ram = RamCopy(copy, size)
    q, _ = await lazy_qemu(hx, "n", size)
    src = PostcopySource(migstream.parse(state), RAM_BLOCK, ram.chunks, ram)
    try:
        await q.load_memory_lazily(src)
        assert await asyncio.to_thread(counter, hx.root / "n.ser") >= before
        started = src.stats.started
        await asyncio.sleep(1.5)
        bulk = [at - started for at, (_, urgent) in zip(ram.at, ram.asked) if not urgent]
        faults = [at - started for at, (_, urgent) in zip(ram.at, ram.asked) if urgent]
        # The guest ran and faulted its pages in during the grace; the push began after it.
        assert faults and min(faults) < 0.9, faults
        assert bulk and min(bulk) >= 0.95, min(bulk)
        await src.finish()
    finally:
        await src.close()

    # A suspend does not wait out the grace: finish() hurries the push at once.
    monkeypatch.setattr(postcopy, "_START_GRACE", 60.0)
    ram = RamCopy(copy, size)
    q, dst = await lazy_qemu(hx, "o", size, paused=True)
    src = PostcopySource(migstream.parse(state), RAM_BLOCK, ram.chunks, ram)
    try:
        await q.load_memory_lazily(src)
        await asyncio.wait_for(src.finish(), 30)
        assert src.done and same_ram(dst, copy, size) == []
    finally:
        await src.close()


async def test_a_chunk_that_cannot_be_had_stalls_and_is_said_then_recovers(
        hx: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postcopy, "_STALL_NOTE", 0.3)
    state, copy, size, _ = await saved_guest(hx, "f")
    ram = RamCopy(copy, size)
    ram.failing = {ram.chunks[-1]}
    said: list[str] = []
    q, dst = await lazy_qemu(hx, "g", size, paused=True)
    src = PostcopySource(migstream.parse(state), RAM_BLOCK, ram.chunks, ram, say=said.append)
    try:
        await q.load_memory_lazily(src)
        with pytest.raises(ChunkUnavailable, match="stopped coming in"):
            await src.finish(stall_timeout=1.5)
        assert not src.done
        # One line for what the guest waits for (the chunk RamCopy fails is one no source has).
        assert len(said) == 1 and "no source has 1 chunk(s) of guest memory yet" in said[0], said
        ram.failing.clear()
        await src.finish()
        assert len(said) == 2 and said[1].startswith("the chunk(s) of guest memory the guest waited for arrived"), said
        assert same_ram(dst, copy, size) == []
    finally:
        await src.close()


async def test_an_unexpected_error_reading_a_chunk_is_retried_not_a_frozen_guest(hx: Harness) -> None:
    state, copy, size, _ = await saved_guest(hx, "k")
    ram = RamCopy(copy, size)
    # A few chunks' first reads fail; before, the task fetching such a chunk ended with
    # the error, and a guest faulting on it waited for ever.
    ram.broken = {ram.chunks[0]: 2, ram.chunks[len(ram.chunks) // 2]: 1, ram.chunks[-1]: 2}
    q, dst = await lazy_qemu(hx, "l", size, paused=True)
    src = PostcopySource(migstream.parse(state), RAM_BLOCK, ram.chunks, ram, say=lambda line: None)
    try:
        await q.load_memory_lazily(src)
        await src.finish(stall_timeout=20)
        assert same_ram(dst, copy, size) == []
        assert not any(ram.broken.values())
    finally:
        await src.close()


async def test_qemu_dying_in_the_middle_is_reported(hx: Harness) -> None:
    state, copy, size, _ = await saved_guest(hx, "h")
    ram = RamCopy(copy, size)
    ram.delay = 0.05
    q, _ = await lazy_qemu(hx, "i", size)
    src = PostcopySource(migstream.parse(state), RAM_BLOCK, ram.chunks, ram, window=1)
    try:
        await q.load_memory_lazily(src)
        q.kill()
        with pytest.raises(QemuError):
            await asyncio.wait_for(src.finish(), 60)
        assert not src.done
    finally:
        await src.close()
