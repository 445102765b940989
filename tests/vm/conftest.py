"""Real-QEMU fixtures for tests/vm: the test guest, its serial console, QMP, launching.

Fixtures:

- ``guest`` (session): the guest from :func:`isrsync.demo.guest.build_guest`, built
  once into ``$ISRSYNC_TEST_GUEST_CACHE`` or else into pytest's cache directory
  (``.pytest_cache/d/isrsync-guest``, kept between runs), or a session temp dir
  when the cache provider is off.
- ``vm_factory`` (function): ``vm_factory(disk=IMG, memory_mib=256, extra=[...])``
  starts a QEMU (TCG, or KVM where it works) with a serial console socket and a
  QMP socket, returns a :class:`Vm` whose ``.serial`` is a connected
  :class:`SerialConsole`; every QEMU it started is killed (with its whole process
  group, so ``exec:`` migration helpers too) when the test ends, pass or fail.
- ``sites`` (function): ``sites(name)`` makes a :class:`SiteEnv` logged in to the
  ``live_server`` as alice: its own cache, config and runtime dir; ``run``,
  ``json``, ``resume`` (waits for the ``resumed`` event, returns the process, the
  event and a connected :class:`SerialConsole`), ``ended``. At teardown every
  resume it started and every QEMU started from its runtime dir is killed.
- ``parcel`` (function): ``(site_a, "vm")``, a parcel created at site A from a
  64 MiB ext4 image holding hello.txt ("made at init"), 256 MiB of memory.
- ``state_of`` (function): ``state_of(site, parcel_id)`` reads a site's local
  state of a parcel (meta, number of dirty chunks, sealed blob names).
- ``hx`` (function): a :class:`qemukit.Harness` for tests of isrsync's own QEMU
  control: a 64 MiB disk on isrsync's NBD server, short socket paths, and every
  QEMU and memfd it made gone at teardown.
- ``api_parcel`` (function): the Python API instead of the CLI: an
  :class:`ApiParcel` with a site logged in to the ``live_server`` (as bob), version
  1 of a guest parcel on a 64 MiB disk, and ``runtime(**kw)``, a
  :class:`~isrsync.site.runtime.Runtime` for it (serial console at
  ``short / "ser"``); runtimes, site and the short run dir go at teardown.

Test modules should use the fixtures rather than import this file (several
conftest.py files share one module name); the classes are reachable as
``type(vm)``, ``type(vm.serial)``, ``type(vm.qmp)`` if needed.
"""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from isrsync.demo.guest import (
    QEMU_SYSTEM,
    Guest,
    build_guest,
    make_disk_image,
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


# -- the whole ISR cycle through the real CLI: sites, parcels --------------------------------
#
# ``sites(name)`` makes a logged-in site (its own cache, config and runtime dir) against the
# ``live_server`` (tests/conftest.py); ``parcel`` is ``(site_a, "vm")``: a parcel made at
# site A from a small ext4 image holding hello.txt, with the test guest's kernel and initrd.
# Every `isrsync resume` a site started is killed at teardown, and so is every QEMU still
# running from that site's runtime directory (resume starts QEMU in its own session, so
# killing the resume process alone can leave it behind).


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


@pytest.fixture
def sites(tmp_path: Path, live_server) -> Iterator[Callable[[str], SiteEnv]]:
    token = live_server.add_user("alice")
    made: list[SiteEnv] = []

    def make(name: str) -> SiteEnv:
        s = SiteEnv(tmp_path, name)
        made.append(s)
        s.run("login", live_server.url, "--user", "alice", "--token", token, "--kdf-min")
        return s

    try:
        yield make
    finally:
        for s in made:
            s.cleanup()


@pytest.fixture
def state_of() -> Callable[[SiteEnv, str], dict[str, Any]]:
    """``state_of(site, parcel_id)``: see :func:`local_state`."""
    return local_state


@dataclass
class ApiParcel:
    site: Any
    pid: Any
    short: Path  # short enough for unix socket paths
    runtimes: list[Any] = field(default_factory=list)

    def runtime(self, **kw: Any) -> Any:
        from isrsync.site.runtime import Runtime

        rt = Runtime(self.site, self.pid, serial=self.short / "ser", rundir=self.short / "run", **kw)
        self.runtimes.append(rt)
        return rt


@pytest.fixture
async def api_parcel(guest: Guest, live_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from isrsync.keys import KdfLimits
    from isrsync.site import account
    from isrsync.site.cache import SiteCache
    from isrsync.site.create import init_parcel
    from isrsync.site.parcel import open_site

    short = Path(tempfile.mkdtemp(prefix="isr-api-", dir="/tmp"))
    monkeypatch.setenv(account.ENV_CONFIG, str(tmp_path / "config.json"))
    monkeypatch.setenv(account.ENV_RUNTIME, str(short))
    acct = account.Account(live_server.url, "bob", live_server.add_user("bob"))
    await account.login(acct, "pw", limits=KdfLimits.MIN)
    site = await open_site(SiteCache(tmp_path / "api-site"), acct)
    api = None
    try:
        img = tmp_path / "disk.img"
        make_disk_image(img, 64)
        pid, _ = await init_parcel(site, "vm", img, kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline)
        api = ApiParcel(site, pid, short)
        yield api
    finally:
        for rt in api.runtimes if api is not None else ():
            await rt.close()
        await site.close()
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def parcel(sites, guest: Guest, tmp_path: Path) -> tuple[SiteEnv, str]:
    a = sites("a")
    img = tmp_path / "disk.img"
    make_disk_image(img, 64, {"hello.txt": b"made at init"})
    a.run("init", "vm", "--image", str(img), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline)
    return a, "vm"


@pytest.fixture
async def hx(guest: Guest, accel: str, tmp_path: Path):
    from qemukit import harness

    async for h in harness(guest, accel, tmp_path):
        yield h
