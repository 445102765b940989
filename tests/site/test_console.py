"""site/console.py without a guest: the hub between QEMU's one-client serial socket
(here a plain unix server standing in for QEMU) and any number of console clients.
The real guest's console is exercised in tests/vm/test_isr_console.py."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from isrsync.site.console import ConsoleHub


class FakeSerial:
    """QEMU's serial chardev as the hub sees it: a unix socket that takes one client."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received = bytearray()
        self.got = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        while data := await reader.read(4096):
            self.received += data
            self.got.set()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        if self.writer is not None:
            self.writer.close()


@contextlib.asynccontextmanager
async def _hub(*names: str) -> AsyncIterator[tuple[Path, list[Path]]]:
    """A running hub in a fresh directory: QEMU's socket path, and the hub's own sockets."""
    with tempfile.TemporaryDirectory() as d:
        qemu, listen = Path(d) / "qemu.sock", [Path(d) / n for n in names]
        hub = ConsoleHub(qemu, listen)
        await hub.start()
        try:
            yield qemu, listen
        finally:
            await hub.close()


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_line_typed_before_the_hub_reaches_qemu_is_delivered_when_it_does() -> None:
    """A run says `resumed` once QEMU runs; a script's first line can beat the hub to
    QEMU's socket. It used to be dropped, and the script then waited forever."""

    async def main() -> None:
        async with _hub("console.sock") as (qemu, [sock]):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b"read note\n")
            await writer.drain()
            await asyncio.sleep(0.2)  # the hub has the line and nowhere yet to send it
            serial = FakeSerial(qemu)
            await serial.start()
            await _until(lambda: bytes(serial.received) == b"read note\n")
            assert serial.writer is not None
            serial.writer.write(b"GUEST: DATA x\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"GUEST: DATA x\r\n"
            writer.close()
            await serial.close()

    asyncio.run(main())


def test_output_reaches_every_client_and_input_from_each_reaches_the_guest() -> None:
    async def main() -> None:
        async with _hub("a.sock", "b.sock") as (qemu, [a_path, b_path]):
            serial = FakeSerial(qemu)
            await serial.start()
            await _until(lambda: serial.writer is not None)
            ra, wa = await asyncio.open_unix_connection(str(a_path))
            rb, wb = await asyncio.open_unix_connection(str(b_path))
            await asyncio.sleep(0.05)  # both clients registered with the hub
            wa.write(b"one\n")
            await _until(lambda: bytes(serial.received) == b"one\n")
            wb.write(b"two\n")
            await _until(lambda: bytes(serial.received) == b"one\ntwo\n")
            assert serial.writer is not None
            serial.writer.write(b"hello\n")
            assert await asyncio.wait_for(ra.readline(), 5) == b"hello\n"
            assert await asyncio.wait_for(rb.readline(), 5) == b"hello\n"
            wa.close()
            wb.close()
            await serial.close()

    asyncio.run(main())


def test_held_input_is_bounded() -> None:
    """Nobody reaches the guest for a long time: what is held stays bounded, and the
    earliest input (what a script typed first) is what gets through."""

    async def main() -> None:
        async with _hub("console.sock") as (qemu, [sock]):
            _, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b"first\n")
            block = b"x" * 4095 + b"\n"
            for _ in range(64):  # 256 KiB: far beyond what the hub holds
                writer.write(block)
            await writer.drain()
            await asyncio.sleep(0.3)
            serial = FakeSerial(qemu)
            await serial.start()
            await _until(lambda: len(serial.received) > 0)
            await asyncio.sleep(0.2)
            got = bytes(serial.received)
            assert got.startswith(b"first\n")
            assert len(got) <= 64 << 10
            writer.close()
            await serial.close()

    asyncio.run(main())
