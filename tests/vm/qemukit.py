"""Helpers for the tests of isrsync's own QEMU control (``from qemukit import ...``):
a disk served by isrsync's NBD server with short socket paths for QEMU
(:class:`Harness`, made by the ``hx`` fixture of conftest.py), the guest's serial
console, and guest RAM in memfds."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from isrsync.demo.guest import Guest, make_disk_image
from isrsync.vm.nbd import NbdServer, RawFileBackend
from isrsync.vm.qemu import Qemu, VmConfig


class Harness:
    """A disk served by isrsync's NBD server, and short socket paths for QEMU."""

    def __init__(self, guest: Guest, accel: str, root: Path, disk: Path) -> None:
        self.guest, self.accel, self.root = guest, accel, root
        self.disk = disk
        self.nbd: NbdServer | None = None
        self.qemus: list[Qemu] = []
        self.fds: list[int] = []

    async def serve(self) -> None:
        self.nbd = NbdServer(RawFileBackend(self.disk))
        await self.nbd.start_unix(self.root / "nbd")

    def config(self, *, boot_in_memfds: bool = False) -> VmConfig:
        cfg = VmConfig(memory_mib=256, cpu_model="max", accel=self.accel, cmdline=self.guest.cmdline)
        if boot_in_memfds:
            for key in ("kernel", "initrd"):
                fd = os.memfd_create(f"test-{key}", 0)
                self.fds.append(fd)
                setattr(cfg, key, f"/proc/self/fd/{fd}")
        else:
            cfg.kernel, cfg.initrd = str(self.guest.kernel), str(self.guest.initrd)
        return cfg

    def qemu(self, cfg: VmConfig, name: str) -> Qemu:
        q = Qemu(cfg, self.root / name, self.root / "nbd", serial=self.root / f"{name}.ser")
        self.qemus.append(q)
        return q

    async def close(self) -> None:
        for q in self.qemus:
            await q.close()
        if self.nbd is not None:
            await self.nbd.close()
        for fd in self.fds:
            os.close(fd)


async def harness(guest: Guest, accel: str, tmp_path: Path) -> AsyncIterator[Harness]:
    disk = tmp_path / "disk.img"
    make_disk_image(disk, 64, {"hello.txt": b"hi\n"})
    root = Path(tempfile.mkdtemp(prefix="isrq-", dir="/tmp"))  # unix socket paths stay short
    h = Harness(guest, accel, root, disk)
    await h.serve()
    try:
        yield h
    finally:
        await h.close()
        for p in sorted(root.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        root.rmdir()


def serial_line(path: Path, text: str, timeout: float = 120.0) -> float:
    """Connect to the guest's serial socket and read until a line holds ``text``."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            s.connect(str(path))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no serial socket at {path}") from None
            time.sleep(0.01)
    buf = b""
    with s:
        while text.encode() not in buf:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = s.recv(65536)
            if not data:
                raise EOFError(f"serial closed before {text!r}; got {buf[-400:]!r}")
            buf += data
    return time.monotonic()


def serial_command(path: Path, command: str, timeout: float = 60.0) -> str:
    """Send one guest command on its serial console; its ``GUEST: ...`` reply."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        buf = b""
        while True:
            for line in buf.split(b"\n")[:-1]:
                if line.startswith(b"GUEST: ") and not line.startswith((b"GUEST: READY", b"GUEST: NODISK")):
                    return line.decode().strip()
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = s.recv(65536)
            if not data:
                raise EOFError(f"serial closed; got {buf[-400:]!r}")
            buf += data


def counter(path: Path) -> int:
    reply = serial_command(path, "counter")
    assert reply.startswith("GUEST: COUNTER "), reply
    return int(reply.split()[-1])


def memfd_copy(src: int, size: int) -> int:
    """A new memfd with ``src``'s first ``size`` bytes, holes kept as holes."""
    from isrsync.chunk import CHUNK_SIZE
    from isrsync.site.memimage import data_chunks

    dst = os.memfd_create("test-ram-copy")
    os.ftruncate(dst, size)
    for i in data_chunks(src, size):
        os.pwrite(dst, os.pread(src, CHUNK_SIZE, i * CHUNK_SIZE), i * CHUNK_SIZE)
    return dst


async def boot_with_ram_memfd(hx: Harness, name: str) -> tuple[Qemu, int]:
    cfg = hx.config()
    cfg.ram_fd = os.memfd_create("test-ram")
    hx.fds.append(cfg.ram_fd)
    os.ftruncate(cfg.ram_fd, cfg.memory_mib << 20)
    q = hx.qemu(cfg, name)
    await q.start(pass_fds=[cfg.ram_fd])
    await asyncio.to_thread(serial_line, hx.root / f"{name}.ser", "GUEST: READY")
    return q, cfg.ram_fd


def collect(image: bytearray):
    def consume(fd: int) -> None:
        while chunk := os.read(fd, 1 << 20):
            image.extend(chunk)

    return consume


def feed(image: bytes):
    def produce(fd: int) -> None:
        view = memoryview(image)
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]

    return produce
