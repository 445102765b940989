"""Real-QEMU fixtures for tests/vm: the test guest, its serial console, QMP, launching.

Fixtures:

- ``guest`` (session): the guest from :func:`isrsync.vm.guest.build_guest`, built
  once into ``$ISRSYNC_TEST_GUEST_CACHE`` or else into pytest's cache directory
  (``.pytest_cache/d/isrsync-guest``, kept between runs), or a session temp dir
  when the cache provider is off.
- ``vm_factory`` (function): ``vm_factory(disk=IMG, memory_mib=256, extra=[...])``
  starts a QEMU (TCG, or KVM where it works) with a serial console socket and a
  QMP socket, returns a :class:`Vm` whose ``.serial`` is a connected
  :class:`SerialConsole`; every QEMU it started is killed (with its whole process
  group, so ``exec:`` migration helpers too) when the test ends, pass or fail.

Test modules should use the fixtures rather than import this file (several
conftest.py files share one module name); the classes are reachable as
``type(vm)``, ``type(vm.serial)``, ``type(vm.qmp)`` if needed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from isrsync.vm.guest import (
    QEMU_SYSTEM,
    Guest,
    build_guest,
    qemu_accel,
    qemu_base_args,
    serial_args,
)


class SerialConsole:
    """Line-oriented client of the guest's ttyS0 (a QEMU unix socket chardev server)."""

    def __init__(self, path: Path, connect_timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
        self.path = Path(path)
        self.proc = proc
        self.transcript: list[str] = []
        self._buf = b""
        deadline = time.monotonic() + connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                break
            except OSError:
                s.close()
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"QEMU exited ({proc.returncode}) before its serial socket appeared")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"serial socket {self.path} did not appear")
                time.sleep(0.01)
        self.sock = s

    def close(self) -> None:
        self.sock.close()

    def _readline(self, deadline: float) -> str:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete line from the guest in time")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise EOFError(f"QEMU exited ({self.proc.returncode})") from None
                continue
            if not data:
                raise EOFError("serial console closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode(errors="replace").strip("\r")
        self.transcript.append(text)
        return text

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Read lines until one contains ``text``; return it (earlier lines are consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._readline(deadline)
            except (TimeoutError, EOFError) as e:
                tail = "\n".join(self.transcript[-20:])
                raise type(e)(f"waiting for {text!r}: {e}; last lines:\n{tail}") from None
            if text in line:
                return line

    def drain(self) -> None:
        """Drop whatever has arrived but was not read (unsolicited output)."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self._buf += data
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.transcript.append(line.decode(errors="replace").strip("\r"))

    def command(self, cmd: str, timeout: float = 60.0) -> str:
        """Send one command line; return its reply line (``GUEST: ...``, without CR/LF)."""
        self.drain()
        self.sock.sendall(cmd.encode() + b"\n")
        line = self.wait_for("GUEST: ", timeout)
        return line[line.index("GUEST: "):]


class Qmp:
    """A minimal synchronous QMP client over a unix socket (plain JSON lines)."""

    def __init__(self, path: Path, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                break
            except OSError:
                s.close()
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"QEMU exited ({proc.returncode}) before its QMP socket appeared")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QMP socket {path} did not appear")
                time.sleep(0.01)
        self.sock = s
        self.sock.settimeout(timeout)
        self.file = s.makefile("rb")
        self.events: list[dict] = []
        greeting = self._recv()
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def _recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            return reply.get("return")

    def status(self) -> str:
        return self.execute("query-status")["status"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Vm:
    """One QEMU process running the test guest."""

    def __init__(self, argv: list[str], workdir: Path, name: str) -> None:
        self.argv = argv
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.serial: SerialConsole | None = None
        self.qmp: Qmp | None = None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"QEMU still running after {timeout}s; log: {self.log_text()}") from None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        for c in (self.serial, self.qmp):
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="session")
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    env = os.environ.get("ISRSYNC_TEST_GUEST_CACHE")
    if env:
        cache = Path(env)
    elif getattr(request.config, "cache", None) is not None:
        cache = request.config.cache.mkdir("isrsync-guest")
    else:
        cache = tmp_path_factory.mktemp("isrsync-guest")
    return build_guest(cache)


@pytest.fixture(scope="session")
def accel() -> str:
    return qemu_accel()


@pytest.fixture
def vm_factory(guest: Guest, accel: str, tmp_path: Path) -> Iterator[Callable[..., Vm]]:
    made: list[Vm] = []
    # Unix socket paths must stay short (108 bytes): pytest's tmp_path can be long.
    sockdir = Path(tempfile.mkdtemp(prefix="isrvm-", dir="/tmp"))

    def make(
        disk: Path | None = None,
        memory_mib: int = 256,
        extra: list[str] | None = None,
        qmp: bool = True,
        connect_serial: bool = True,
    ) -> Vm:
        n = len(made)
        ser = sockdir / f"s{n}"
        argv = [QEMU_SYSTEM, *qemu_base_args(guest, memory_mib, accel), *serial_args(ser)]
        if qmp:
            argv += ["-qmp", f"unix:{sockdir / f'q{n}'},server=on,wait=off"]
        if disk is not None:
            argv += ["-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0"]
        argv += extra or []
        vm = Vm(argv, tmp_path, f"qemu{n}")
        made.append(vm)
        if connect_serial:
            vm.serial = SerialConsole(ser, proc=vm.proc)
        if qmp:
            vm.qmp = Qmp(sockdir / f"q{n}", proc=vm.proc)
        return vm

    try:
        yield make
    finally:
        for vm in made:
            vm.kill()
        for p in sockdir.iterdir():
            p.unlink()
        sockdir.rmdir()
