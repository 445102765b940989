"""isrsync's own QEMU control (isrsync.vm.qemu.Qemu) under real QEMU: start-up held in
--preconfig while the boot files are still being written, failures at every step, and
the memory image moved out and back in through pipes, noticed by QEMU's events."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from isrsync.errors import QemuError
from qemukit import Harness, boot_with_ram_memfd, collect, counter, feed, memfd_copy, serial_line

pytestmark = pytest.mark.slow


async def test_board_waits_for_boot_files_written_after_spawn(hx: Harness) -> None:
    cfg = hx.config(boot_in_memfds=True)
    kfd, ifd = hx.fds
    q = hx.qemu(cfg, "a")
    seen: dict[str, object] = {}

    async def machine() -> None:
        # QMP is up, the board is not built: QEMU has not read the (still empty) files.
        seen["status"] = await q.cmd("query-status")
        await asyncio.sleep(0.2)
        for fd, path in ((kfd, hx.guest.kernel), (ifd, hx.guest.initrd)):
            os.write(fd, path.read_bytes())
        seen["written"] = True

    await q.start(pass_fds=hx.fds, machine=machine())
    assert seen["status"]["status"] == "prelaunch"  # type: ignore[index]
    assert seen["written"] is True
    assert await q.status() == "running"
    # The guest boots from the kernel and initrd written after QEMU was spawned.
    await asyncio.to_thread(serial_line, hx.root / "a.ser", "GUEST: READY")
    await q.quit(30)
    assert not q.alive


async def test_a_failing_machine_step_leaves_no_qemu(hx: Harness) -> None:
    q = hx.qemu(hx.config(boot_in_memfds=True), "b")

    async def machine() -> None:
        raise QemuError("the boot files could not be fetched")

    with pytest.raises(QemuError, match="boot files could not be fetched"):
        await q.start(pass_fds=hx.fds, machine=machine())
    assert q.proc is not None and q.proc.poll() is not None


async def test_qemu_that_exits_at_start_is_reported_with_its_reason(hx: Harness) -> None:
    cfg = hx.config()
    cfg.extra = ["-device", "no-such-device-model"]
    q = hx.qemu(cfg, "c")
    t0 = time.monotonic()
    with pytest.raises(QemuError, match=r"QEMU exited at start .*no-such-device-model"):
        await q.start()
    assert time.monotonic() - t0 < 20  # noticed by the QMP socket closing, not a timeout


async def test_memory_out_and_back_in_by_events(hx: Harness) -> None:
    """Save through a pipe to a byte string, restore it into a new QEMU, and the guest runs on."""
    q = hx.qemu(hx.config(), "d")
    await q.start()
    await asyncio.to_thread(serial_line, hx.root / "d.ser", "GUEST: READY")
    image = bytearray()

    def consume(fd: int) -> None:
        while chunk := os.read(fd, 1 << 20):
            image.extend(chunk)

    await q.save_memory(consume)
    assert await q.status() in ("paused", "postmigrate")
    assert bytes(image[:4]) == b"QEVM" and len(image) > 1 << 20
    await q.quit(30)

    r = hx.qemu(hx.config(), "e")
    await r.start(incoming=True)
    assert await r.status() == "inmigrate"

    def produce(fd: int) -> None:
        view = memoryview(bytes(image))
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]

    await r.load_memory(produce)
    assert await r.status() == "paused"  # it was stopped when saved
    await r.cont()
    assert await r.status() == "running"
    await r.quit(30)


async def test_a_refused_memory_image_names_qemus_reason(hx: Harness) -> None:
    r = hx.qemu(hx.config(), "f")
    await r.start(incoming=True)

    def produce(fd: int) -> None:
        os.write(fd, b"QEVM\x00\x00\x00\x03" + b"\xff" * 4096)  # right magic, garbage after

    with pytest.raises(QemuError, match="QEMU exited while restoring memory|restoring the memory image failed") as e:
        await r.load_memory(produce)
    assert "load of migration failed" in str(e.value)  # QEMU's own words, from its log


async def test_ram_in_a_memfd_is_left_out_of_the_stream_and_restored_in_place(hx: Harness) -> None:
    """Guest RAM in our memfd: the stream holds device state only, and a QEMU given a
    copy of the memfd and that stream runs the same guest on."""
    q, ram = await boot_with_ram_memfd(hx, "g")
    before = await asyncio.to_thread(counter, hx.root / "g.ser")
    state = bytearray()
    await q.save_memory(collect(state), without_ram=True)
    size = q.cfg.memory_mib << 20
    # A booted guest has tens of MiB in RAM; none of it is in the stream.
    from isrsync.site.memimage import data_chunks
    assert len(data_chunks(ram, size)) * (128 << 10) > 16 << 20
    assert bytes(state[:4]) == b"QEVM" and len(state) < 2 << 20
    copy = memfd_copy(ram, size)
    hx.fds.append(copy)
    await q.quit(30)

    cfg = hx.config()
    cfg.ram_fd = copy
    r = hx.qemu(cfg, "h")
    await r.start(incoming=True, pass_fds=[copy])
    await r.load_memory(feed(bytes(state)), without_ram=True)
    await r.cont()
    after = await asyncio.to_thread(counter, hx.root / "h.ser")
    assert after >= before  # the counter's process, in RAM, carried on from where it was
    await r.quit(30)


async def test_a_whole_stream_from_a_memfd_guest_restores_into_plain_qemu(hx: Harness) -> None:
    """Without ``without_ram`` the stream carries RAM too, under QEMU's usual block name:
    a QEMU that keeps RAM to itself restores it (images from before RAM was kept apart,
    and the benchmark's floor, rely on this)."""
    q, _ = await boot_with_ram_memfd(hx, "i")
    before = await asyncio.to_thread(counter, hx.root / "i.ser")
    image = bytearray()
    await q.save_memory(collect(image))
    assert len(image) > 16 << 20
    await q.quit(30)

    r = hx.qemu(hx.config(), "j")
    await r.start(incoming=True)
    await r.load_memory(feed(bytes(image)))
    await r.cont()
    assert await asyncio.to_thread(counter, hx.root / "j.ser") >= before
    await r.quit(30)
