"""The host's side of the workload: talk to the guest's console, run the operations, collect their times.

Two guests speak it:

* ``debian`` (:mod:`benchmarks.paper.guest`): the agent in the guest runs the
  CDA-like operations and times each one itself (``AGENT: OP ...`` lines);
* ``busybox`` (the test guest of :mod:`isrsync.demo.guest`, for the CI smoke
  test): its /init knows only a few commands, so the operations are reads
  (``sha``) and writes (``write``) of the data files, timed from the host
  around each command. Those times include the console's round trip, and the
  report says so.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    seconds: float
    detail: str


@dataclass(frozen=True)
class WorkloadRun:
    ops: list[Op]
    busy_seconds: float  # the operations alone, think time excluded
    wall_seconds: float
    timed_in: str  # "guest" or "host"


class Console:
    """A line client of the guest's ttyS0 socket (blocking: call from a thread)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        end = time.monotonic() + timeout
        while True:
            try:
                self.s.connect(str(path))
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)
        self.buf = b""

    def send(self, line: str) -> None:
        # line() leaves its last, possibly tiny, receive timeout on the socket;
        # a send must not inherit it (a stalled guest drains its UART slowly).
        self.s.settimeout(60)
        self.s.sendall(line.encode() + b"\n")

    def line(self, timeout: float) -> str | None:
        """The next non-empty line, or None when ``timeout`` passed first."""
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                ln, self.buf = self.buf.split(b"\n", 1)
                text = ln.decode(errors="replace").strip()
                if text:
                    return text
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                d = self.s.recv(4096)
            except TimeoutError:
                return None
            if not d:
                raise EOFError("the guest's serial console closed")
            self.buf += d

    def expect(self, prefix: str, timeout: float, skip: str | None = None) -> str:
        """The next line with ``prefix`` (from there on), lines that start with ``skip`` passed over."""
        end = time.monotonic() + timeout
        while True:
            ln = self.line(max(0.0, end - time.monotonic()))
            if ln is None:
                raise TimeoutError(f"the guest did not say {prefix!r} within {timeout:.0f}s")
            # A line may start after console noise (the kernel's escape codes).
            k = ln.find(prefix)
            if k >= 0 and not (skip and ln[k:].startswith(skip)):
                return ln[k:]

    def close(self) -> None:
        self.s.close()


class Driver:
    """What the harness asks of a guest's workload side."""

    flavour = ""

    def __init__(self, con: Console) -> None:
        self.con = con

    def answer(self, timeout: float) -> None:
        """Until the guest answers, probing again (input sent while it starts is lost) less and less
        often: a guest stalled on post-copy takes no input, and probes pile up in the socket."""
        raise NotImplementedError

    def prepare(self) -> None:
        raise NotImplementedError

    def run(self, seed: int, n: int, think_ms: int, timeout: float, on_op: Callable[[Op], None]) -> WorkloadRun:
        raise NotImplementedError


# Answers to readiness probes: more than one probe may be answered (a guest
# slow to answer gets probed again), so later replies pass over the extra ones.
PONG = "AGENT: PONG"
PROBE = "GUEST: ECHO probe"


class AgentDriver(Driver):
    flavour = "debian"

    def answer(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        wait = 2.0
        while True:
            try:
                self.con.send("ping")
                self.con.expect(PONG, min(wait, max(0.1, end - time.monotonic())))
                return
            except TimeoutError:
                wait = min(wait * 1.5, 30.0)
                if time.monotonic() > end:
                    raise TimeoutError(f"the guest's agent did not answer within {timeout:.0f}s") from None

    def prepare(self) -> None:
        self.con.send("prepare")
        if self.con.expect("AGENT: ", 300, skip=PONG) != "AGENT: OK":
            raise RuntimeError("the agent could not prepare the user's changes")

    def run(self, seed: int, n: int, think_ms: int, timeout: float, on_op: Callable[[Op], None]) -> WorkloadRun:
        self.con.send(f"run {seed} {n} {think_ms}")
        ops: list[Op] = []
        end = time.monotonic() + timeout
        while True:
            ln = self.con.expect("AGENT: ", max(0.0, end - time.monotonic()), skip=PONG)
            w = ln.split()
            if w[1] == "OP":
                op = Op(int(w[2]), w[3], float(w[4]), " ".join(w[5:]))
                ops.append(op)
                on_op(op)
            elif w[1] == "DONE":
                return WorkloadRun(ops, float(w[3]), float(w[4]), "guest")
            elif w[1] == "ERR":
                raise RuntimeError(f"the workload failed in the guest: {ln}")


BUSYBOX_FILES = 8
BUSYBOX_FILE_KIB = 512


def busybox_dataset() -> dict[str, bytes]:
    """The small guest's data set: files of incompressible bytes (the same on every run)."""
    rnd = random.Random(2005)
    return {f"data{i}.bin": rnd.randbytes(BUSYBOX_FILE_KIB * 1024) for i in range(BUSYBOX_FILES)}


class BusyboxDriver(Driver):
    flavour = "busybox"

    def answer(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        wait = 2.0
        while True:
            try:
                self.con.send("echo probe")
                self.con.expect(PROBE, min(wait, max(0.1, end - time.monotonic())))
                return
            except TimeoutError:
                wait = min(wait * 1.5, 30.0)
                if time.monotonic() > end:
                    raise TimeoutError(f"the test guest did not answer within {timeout:.0f}s") from None

    def _cmd(self, c: str, timeout: float) -> str:
        self.con.send(c)
        return self.con.expect("GUEST: ", timeout, skip=PROBE)

    def prepare(self) -> None:
        if self._cmd("write note changed-before-suspend", 60) != "GUEST: OK":
            raise RuntimeError("the test guest could not write its disk")

    def run(self, seed: int, n: int, think_ms: int, timeout: float, on_op: Callable[[Op], None]) -> WorkloadRun:
        rnd = random.Random(seed)
        ops: list[Op] = []
        w0 = time.monotonic()
        for i in range(n):
            if rnd.random() < 0.7:
                kind, c = "read", f"sha data{rnd.randrange(BUSYBOX_FILES)}.bin"
            else:
                kind, c = "edit", f"write edit{i % 4} edited-{seed}-{i}"
            t0 = time.monotonic()
            reply = self._cmd(c, timeout)
            dt = time.monotonic() - t0
            if not reply.startswith(("GUEST: SHA", "GUEST: OK")):
                raise RuntimeError(f"the test guest failed {c!r}: {reply}")
            op = Op(i, kind, dt, c.split()[1])
            ops.append(op)
            on_op(op)
            time.sleep(think_ms / 1000)
        return WorkloadRun(ops, sum(o.seconds for o in ops), time.monotonic() - w0, "host")


def driver(flavour: str, con: Console) -> Driver:
    return {"debian": AgentDriver, "busybox": BusyboxDriver}[flavour](con)
