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

Test modules never import this file (several conftest.py files share one
module name, and the last one loaded wins): the helpers they need are in
sitekit.py; ``Vm`` and ``Qmp`` are reachable as ``type(vm)``, ``type(vm.qmp)``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
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

from sitekit import SerialConsole, SiteEnv, connect_unix, local_state


class Qmp:
    """A minimal synchronous QMP client over a unix socket (plain JSON lines)."""

    def __init__(self, path: Path, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
        self.sock = connect_unix(path, timeout, proc, "QMP")
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
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
