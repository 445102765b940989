"""Helpers for the tests of tests/vm that drive the CLI (``from sitekit import ...``):
the guest's serial console (:class:`SerialConsole`), a site's environment and its
running resumes (:class:`SiteEnv`, :class:`ResumeProc`), and reading a command's
stderr and a site's local state. The fixtures in conftest.py make them; test
modules import from here, never from conftest (several conftest.py files share
one module name, and the last one loaded wins)."""

from __future__ import annotations

import contextlib
import json
import re
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

def connect_unix(path: Path, timeout: float, proc: subprocess.Popen | None, what: str) -> socket.socket:
    """Connect to one of QEMU's unix sockets, waiting for it to appear, unless QEMU exits first."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({proc.returncode}) before its {what} socket appeared") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} socket {path} did not appear") from None
            time.sleep(0.01)


class SerialConsole:
    """Line-oriented client of the guest's ttyS0 (a QEMU unix socket chardev server)."""

    def __init__(self, path: Path, connect_timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
        self.path = Path(path)
        self.proc = proc
        self.transcript: list[str] = []
        self._buf = b""
        self.sock = connect_unix(self.path, connect_timeout, proc, "serial")

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




_PROGRESS_LINE = re.compile(r"^[a-z][^:]*: (starting|[\d.]+ (B|KiB|MiB|GiB|TiB)( of [\d.]+ \w+ \(\d+%\))?(, .*)?)$")


def message_lines(stderr: str) -> list[str]:
    """The lines of a command's stderr that are not its plain progress lines (which
    long steps print when stderr is no terminal)."""
    return [ln for ln in stderr.strip().splitlines() if not _PROGRESS_LINE.match(ln)]


def isrsync_argv() -> list[str]:
    exe = Path(sys.executable).parent / "isrsync"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "isrsync.cli.main"]


class ResumeProc:
    """A running `isrsync resume --json`: its events (stdout lines) and stderr are
    read by threads, so waiting never blocks past a deadline."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(popen.stdout, self._lines.put), daemon=True),
            threading.Thread(target=self._pump, args=(popen.stderr, self._err.append), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, put: Callable[[Any], None]) -> None:
        for line in stream:
            put(line)
        put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def stderr(self) -> str:
        return "".join(x for x in self._err if x is not None)

    def next_event(self, deadline: float) -> dict[str, Any] | None:
        """The next event, or None when the process closed its stdout."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no event from resume in time; stderr: {self.stderr[-2000:]}") from None
            if line is None:
                self._lines.put(None)
                return None
            if line.strip():
                ev = json.loads(line)
                self.events.append(ev)
                return ev

    def finish(self, timeout: float = 120) -> tuple[int, list[dict[str, Any]], str]:
        """Wait for the process to end: (exit code, all its events, its stderr)."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"resume still running after {timeout}s; stderr: {self.stderr[-2000:]}") from None
        for t in self._threads:
            t.join(10)
        while self.next_event(time.monotonic() + 5) is not None:
            pass
        return rc, self.events, self.stderr

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)
        for t in self._threads:
            t.join(5)


class SiteEnv:
    """One site: its own cache, config and runtime dir, logged in as alice."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        self.cache = self.dir / "cache"
        # Runtime dirs hold unix sockets: keep their paths short.
        self.runtime = Path(tempfile.mkdtemp(prefix=f"isr-{name}-", dir="/tmp"))
        os.chmod(self.runtime, 0o700)
        self.env = {
            **os.environ,
            "ISRSYNC_CACHE": str(self.cache),
            "ISRSYNC_CONFIG": str(self.dir / "config.json"),
            "ISRSYNC_RUNTIME": str(self.runtime),
            "ISRSYNC_PASSPHRASE": "correct horse battery",
        }
        # A developer's desktop must not get a window per resume (`--display auto`):
        # the display tests set $DISPLAY to their own Xvfb.
        self.env.pop("DISPLAY", None)
        self.procs: list[subprocess.Popen] = []
        self.consoles: list[SerialConsole] = []

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [*isrsync_argv(), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and r.returncode != 0:
            raise AssertionError(f"isrsync {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r

    def json(self, *args: str, timeout: float = 300) -> Any:
        """Run a command with --json and return its parsed output (it must succeed)."""
        return json.loads(self.run(*args, "--json", timeout=timeout).stdout)

    @property
    def site_id(self) -> str:
        return json.loads((self.cache / "site.json").read_text())["site_id"]

    def lock(self, parcel: str) -> dict[str, Any]:
        """`isrsync lock status --json`: epoch, version, holder (None when free)."""
        return self.json("lock", "status", parcel)

    def parcel_id(self, parcel: str) -> str:
        (p,) = [p for p in self.json("ls") if p["name"] == parcel]
        return p["parcel"]

    def start_resume(self, parcel: str, *extra: str) -> ResumeProc:
        serial = self.runtime / "ser.sock"
        p = ResumeProc(subprocess.Popen(
            [*isrsync_argv(), "resume", parcel, "--json", "--serial", str(serial), *extra],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
        self.procs.append(p)
        return p

    def resume(self, parcel: str, *extra: str, timeout: float = 180) -> tuple[ResumeProc, dict[str, Any], SerialConsole]:
        """Start `isrsync resume --json` and wait for its ``resumed`` event."""
        p = self.start_resume(parcel, *extra)
        deadline = time.monotonic() + timeout
        while True:
            ev = p.next_event(deadline)
            if ev is None:
                rc, _, err = p.finish(30)
                raise AssertionError(f"resume exited ({rc}): {err[-2000:]}")
            if ev["event"] == "resumed":
                con = SerialConsole(self.runtime / "ser.sock")
                self.consoles.append(con)
                return p, ev, con

    def boot_and_suspend(self, parcel: str, *commands: str) -> int:
        """Cold-boot the parcel here, run guest commands (each must answer OK), suspend; the new version."""
        proc, _, con = self.resume(parcel)
        con.wait_for("GUEST: READY", 120)
        for c in commands:
            assert con.command(c) == "GUEST: OK", c
        con.close()
        version = self.json("suspend", parcel)["version"]
        self.ended(proc)
        return version

    def ended(self, p: ResumeProc, timeout: float = 120) -> dict[str, Any]:
        """Wait for a resume process to end well; return its ``ended`` event."""
        rc, events, err = p.finish(timeout)
        assert rc == 0, err[-2000:]
        assert events and events[-1]["event"] == "ended", events
        return events[-1]

    def qemu_pids(self) -> list[int]:
        """QEMUs started by resumes at this site (their QMP socket lies in our runtime dir)."""
        r = subprocess.run(
            ["pgrep", "-f", f"qemu-system.*{self.runtime}/run-"], capture_output=True, text=True, check=False
        )
        return [int(x) for x in r.stdout.split()]

    def cleanup(self) -> None:
        for c in self.consoles:
            with contextlib.suppress(OSError):
                c.close()
        for p in self.procs:
            p.kill()
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.runtime, ignore_errors=True)


def local_state(site: SiteEnv, parcel_id: str) -> dict[str, Any]:
    """What a site keeps of a parcel, read straight from its state.db: the meta (plain
    JSON), the number of dirty chunks and the names of the sealed blobs."""
    db = sqlite3.connect(site.cache / "parcels" / parcel_id / "state.db")
    try:
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        dirty = db.execute("SELECT COUNT(*) FROM dirty").fetchone()[0]
        blobs = {r[0] for r in db.execute("SELECT name FROM blobs")}
    finally:
        db.close()
    return {"meta": meta, "dirty": dirty, "blobs": blobs}
