"""A real systemd-udevd and real loop devices holding ext4 images, for the udev tests.

Import the fixtures into a test module (``from udevkit import loops, udevd  # noqa:
F401``); they are not in a conftest so that this directory's conftest stays free
for the medium tests.

* ``udevd`` (session): the running systemd-udevd, or one started here (and
  stopped at the end) when none answers ``udevadm control --ping``.
* ``loops`` (function): a :class:`LoopKit` that makes ext4 images (with or
  without ``.isrsync/``), plugs them as loop devices, mounts them as a desktop
  would, wipes or yanks them mid-use; at teardown every mount of them goes,
  every loop device is detached and the images are removed, whatever failed.

A loop device that is mounted cannot really be yanked: ``losetup -d`` only marks
it to detach when its last user lets go (autoclear), and the kernel says
nothing. A USB key pulled out sends ``remove`` at once, so :meth:`LoopKit.yank`
detaches and then makes udev send that ``remove``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import pyudev

from sneakernet.attach import has_filesystem
from sneakernet.mounts import read_mountinfo

T = TypeVar("T")

UDEVD_CANDIDATES = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")
TOOLS = ("udevadm", "losetup", "mkfs.ext4", "mount", "umount", "wipefs")


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "a condition") -> T:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


async def async_wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "a condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------
# systemd-udevd
# --------------------------------------------------------------------------


def _udevd_binary() -> str | None:
    for path in UDEVD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("systemd-udevd")


def udevd_answers() -> bool:
    return run("udevadm", "control", "--ping", "--timeout=2", check=False).returncode == 0


@dataclass
class UdevDaemon:
    """The udevd the tests talk to; ``proc`` is set only when these tests started it."""

    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def ensure(self) -> None:
        if udevd_answers():
            return
        if self.proc is not None and self.proc.poll() is None:
            self.stop()  # ours, but deaf: start it afresh
        binary = _udevd_binary()
        if binary is None:
            pytest.skip("systemd-udevd is not installed (Debian package udev)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        try:
            wait_for(udevd_answers, 10, "systemd-udevd to answer")
        except AssertionError:
            self.stop()
            raise AssertionError(f"systemd-udevd did not start: {self.log.read_text()[-2000:]}") from None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="session")
def udevd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UdevDaemon]:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (Debian packages udev, mount, e2fsprogs)")
    daemon = UdevDaemon(tmp_path_factory.mktemp("udevd") / "udevd.log")
    try:
        daemon.ensure()
        yield daemon
    finally:
        daemon.stop()


# --------------------------------------------------------------------------
# loop devices
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Loop:
    devnode: str
    image: Path

    @property
    def sys_name(self) -> str:
        return Path(self.devnode).name

    @property
    def sys_path(self) -> Path:
        return Path("/sys/class/block") / self.sys_name

    def backing_file(self) -> str | None:
        try:
            return (self.sys_path / "loop" / "backing_file").read_text().strip()
        except OSError:
            return None

    def attached(self) -> bool:
        """Whether this loop device still holds our image (it may be reused by others once not)."""
        return self.backing_file() == str(self.image)

    def mounts(self) -> list[Path]:
        st = os.stat(self.devnode)
        num = (os.major(st.st_rdev), os.minor(st.st_rdev))
        return [e.mountpoint for e in read_mountinfo() if e.devnum == num or e.source == self.devnode]

    def udev_sees_filesystem(self) -> bool:
        try:
            dev = pyudev.Devices.from_device_file(pyudev.Context(), self.devnode)
        except (pyudev.DeviceNotFoundError, OSError):
            return False
        return has_filesystem(dict(dev.properties))


@dataclass
class LoopKit:
    root: Path
    udevd: UdevDaemon
    loops: list[Loop] = field(default_factory=list)
    mountpoints: list[Path] = field(default_factory=list)

    def image(self, name: str, *, medium: bool = True, label: str | None = None,
              files: dict[str, bytes] | None = None, size_mib: int = 8) -> Path:
        """An ext4 image, with ``.isrsync/`` at its root when ``medium``; made without mounting."""
        seed = self.root / f"{name}.seed"
        seed.mkdir(parents=True)
        if medium:
            (seed / ".isrsync").mkdir()
        for rel, data in (files or {}).items():
            (seed / rel).parent.mkdir(parents=True, exist_ok=True)
            (seed / rel).write_bytes(data)
        image = self.root / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        run("mkfs.ext4", "-q", "-F", "-L", label or name[:16], "-d", str(seed), str(image))
        return image

    def plug(self, image: Path, devnode: str | None = None) -> Loop:
        """Attach ``image`` to ``devnode`` or a free loop device (the kernel then sends "change")."""
        where = [devnode] if devnode else ["--find"]
        devnode = run("losetup", "--show", *where, str(image)).stdout.strip()
        loop = Loop(devnode, image)
        self.loops.append(loop)
        return loop

    def plug_and_settle(self, image: Path, timeout: float = 10.0) -> Loop:
        """Plug, and wait until udev has recorded the filesystem (for listings, not events)."""
        loop = self.plug(image)
        wait_for(loop.udev_sees_filesystem, timeout, f"udev to see the filesystem on {loop.devnode}")
        return loop

    def mount(self, loop: Loop, *, read_only: bool = False) -> Path:
        """Mount as a desktop's udisks2 would, outside the watcher's media directory."""
        where = self.root / f"desktop-{loop.sys_name}"
        where.mkdir(exist_ok=True)
        run("mount", "-o", "ro" if read_only else "rw", loop.devnode, str(where))
        self.mountpoints.append(where)
        return where

    def umount(self, where: Path) -> None:
        run("umount", str(where))

    def wipe(self, loop: Loop) -> None:
        """Erase the filesystem's signature: udev's inotify watch then sends a "change" without it."""
        run("wipefs", "--all", "--force", "--quiet", loop.devnode)

    def yank(self, loop: Loop) -> None:
        """Pull the device out, as far as a loop device allows (see the module's docstring)."""
        run("losetup", "--detach", loop.devnode, check=False)
        if loop.attached():
            run("udevadm", "trigger", "--action=remove", str(loop.sys_path))

    def detach(self, loop: Loop) -> None:
        """Detach an unused loop device: the kernel sends "change" without the filesystem."""
        run("losetup", "--detach", loop.devnode)

    def cleanup(self) -> list[str]:
        """Unmount, detach and delete everything made here; what could not be undone."""
        problems: list[str] = []
        for loop in self.loops:
            if not loop.attached():
                continue
            for where in loop.mounts():
                if run("umount", str(where), check=False).returncode != 0:
                    run("umount", "--lazy", str(where), check=False)
            run("losetup", "--detach", loop.devnode, check=False)
        for loop in self.loops:
            try:
                wait_for(lambda loop=loop: not loop.attached(), 10, f"{loop.devnode} to detach")
            except AssertionError as e:
                problems.append(str(e))
        for where in self.mountpoints:
            if any(e.mountpoint == where for e in read_mountinfo()):
                run("umount", "--lazy", str(where), check=False)
        for loop in self.loops:
            loop.image.unlink(missing_ok=True)
        return problems


@pytest.fixture
def loops(udevd: UdevDaemon, tmp_path: Path) -> Iterator[LoopKit]:
    udevd.ensure()
    kit = LoopKit(tmp_path / "loops", udevd)
    kit.root.mkdir()
    try:
        yield kit
    finally:
        problems = kit.cleanup()
        # Let udev finish with our devices before the next test plugs one of the same name.
        run("udevadm", "settle", "--timeout=10", check=False)
        assert not problems, problems


async def within(aw: Awaitable[T], timeout: float, what: str) -> T:
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None
