"""Fixtures shared by every test package: the real CLI and a real home server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import accesslog
import pytest

# Resumes and hoards join the LAN swarm by default (mDNS on every interface).
# Tests send traffic only to loopback or namespaces they make: the swarm is off
# unless a test turns it on inside its own network namespaces (tests/lan).
os.environ.setdefault("ISRSYNC_SWARM", "off")
# Nor does a resume watch udev for media unless its test plugs one: suites run
# side by side (pytest-xdist), and another test's loop device is not this one's key.
os.environ.setdefault("ISRSYNC_WATCH_MEDIA", "off")
# pytest-xdist's workers start with COLUMNS=80 and LINES=24 set; the CLIs the
# tests run would then draw their tables 80 columns wide, as on a small terminal,
# where a script piping them gets the full width.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


def isrsync_cmd() -> list[str]:
    """The installed console script, or the module when run from a bare checkout."""
    exe = shutil.which("isrsync", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "isrsync.cli.main"]


def listening_url(proc: subprocess.Popen, log: Path, timeout: float, kill: Callable[[], object]) -> str:
    """The URL in the ``{"listening": ...}`` line a starting `isrsync serve` prints;
    ``kill`` and one line with the log's tail if it never comes."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        kill()
        raise RuntimeError(f"server did not start; log: {log.read_text()[-2000:]}")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"server exited; log: {log.read_text()[-2000:]}")
    return json.loads(line)["listening"]


@dataclass
class LiveServer:
    """An `isrsync serve` subprocess on a random loopback port."""

    data: Path
    url: str = ""
    proc: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)
    log: Path | None = None

    def start(self, timeout: float = 30.0) -> "LiveServer":
        self.log = self.data.parent / f"{self.data.name}-server.log"
        errf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*isrsync_cmd(), "serve", "--data", str(self.data), "--listen", "127.0.0.1:0", *self.extra],
            stdout=subprocess.PIPE, stderr=errf, start_new_session=True,
        )
        errf.close()
        self.url = listening_url(self.proc, self.log, timeout, self.kill)
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def add_user(self, name: str) -> str:
        from isrsync.server.repo import Repository

        repo = Repository(self.data)
        try:
            return repo.add_user(name)
        finally:
            repo.close()

    def pack_bytes_sent(self) -> int:
        """Bytes of pack data the server has sent so far (GETs of packs, from its access log)."""
        assert self.log is not None
        return accesslog.pack_bytes_sent(self.log)

    def requests(self, method: str, path_part: str) -> int:
        """How many requests of ``method`` to a path containing ``path_part`` the access log holds."""
        assert self.log is not None
        return accesslog.requests(self.log, method, path_part)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path / "server-data").start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="session")
def shared_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Servers kept for the whole run, one per key: ``get(key, extra)``.

    For suites whose tests each need a fresh home but not a fresh process
    (the Store conformance suite): a test there is a fresh user of the shared
    server, and starting a server per test cost about 200 s of the run.
    """
    made: dict[str, LiveServer] = {}

    def get(key: str, extra: list[str] | None = None) -> LiveServer:
        if key not in made:
            made[key] = LiveServer(tmp_path_factory.mktemp(f"shared-{key}") / "server-data", extra=extra or []).start()
        return made[key]

    yield get
    for s in made.values():
        s.kill()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Start servers with extra arguments (TLS, say); all are killed at teardown."""
    made: list[LiveServer] = []

    def make(data: Path | None = None, extra: list[str] | None = None) -> LiveServer:
        srv = LiveServer(data or tmp_path / f"server-data-{len(made)}", extra=extra or []).start()
        made.append(srv)
        return srv

    yield make
    for s in made:
        s.kill()
