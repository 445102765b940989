"""The pyudev watcher against a real systemd-udevd and real loop devices holding ext4.

Each test's watcher considers only the loop devices that test plugged (``accept``),
so media of other tests, or of the machine, are never touched.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pyudev
from udevkit import LoopKit, async_wait_for, loops, udevd, within  # noqa: F401 - fixtures

from sneakernet.attach import MediumDevice
from sneakernet.mounts import mounted_at, read_mountinfo
from sneakernet.watch import Watcher

# systemd-udevd is one per machine, and a loop device one test plugs is an event for
# every watcher: these tests run on their own, after the parallel part (scripts/test).
pytestmark = pytest.mark.serial

EVENT_TIMEOUT = 10.0  # udev's own processing; generous for a loaded CI machine
GONE_WITHIN = 2.0  # the promise: a yanked medium is withdrawn without a stall


@dataclass
class Recorder:
    """The callbacks, recording what they were told, in order."""

    events: list[tuple[str, MediumDevice]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_medium(self, device: MediumDevice) -> None:
        self.events.append(("medium", device))
        self.changed.set()

    async def on_gone(self, device: MediumDevice) -> None:
        self.events.append(("gone", device))
        self.changed.set()

    def of(self, kind: str, devnode: str | None = None) -> list[MediumDevice]:
        return [d for k, d in self.events if k == kind and (devnode is None or d.devnode == devnode)]

    async def wait(self, kind: str, devnode: str, count: int = 1, timeout: float = EVENT_TIMEOUT) -> MediumDevice:
        async def seen() -> MediumDevice:
            while len(self.of(kind, devnode)) < count:
                self.changed.clear()
                await self.changed.wait()
            return self.of(kind, devnode)[count - 1]

        return await within(seen(), timeout, f"{kind} #{count} for {devnode}")


def watcher(kit: LoopKit, rec: Recorder, tmp_path: Path, **kw: object) -> Watcher:
    mine = lambda fs: any(fs.devnode == loop.devnode for loop in kit.loops)
    return Watcher(tmp_path / "media", rec.on_medium, rec.on_gone, accept=mine, **kw)  # type: ignore[arg-type]


def is_mounted(path: Path) -> bool:
    return mounted_at(read_mountinfo(), path) is not None


async def test_a_plugged_medium_is_mounted_read_only_and_offered(loops: LoopKit, tmp_path: Path) -> None:
    image = loops.image("key", files={".isrsync/id": b"medium-1"})
    rec = Recorder()
    async with watcher(loops, rec, tmp_path) as w:
        loop = loops.plug(image)
        dev = await rec.wait("medium", loop.devnode)
        assert dev.mountpoint == tmp_path / "media" / loop.sys_name
        assert (dev.mounted_by_us, dev.read_only, dev.has_medium_dir) == (True, True, True)
        assert (dev.fs_type, dev.fs_label) == ("ext4", "key") and dev.fs_uuid
        assert (dev.mountpoint / ".isrsync" / "id").read_bytes() == b"medium-1"
        entry = mounted_at(read_mountinfo(), dev.mountpoint)
        assert entry is not None and {"ro", "nosuid", "nodev", "noexec"} <= entry.options
        assert w.media == [dev]
    # Closing the watcher withdraws what it offered and unmounts what it mounted.
    assert [k for k, _ in rec.events] == ["medium", "gone"]
    assert not is_mounted(dev.mountpoint)


async def test_an_existing_mount_is_used_and_left_alone(loops: LoopKit, tmp_path: Path) -> None:
    loop = loops.plug_and_settle(loops.image("desk"))
    desktop = loops.mount(loop)  # as udisks2 would, read-write
    rec = Recorder()
    async with watcher(loops, rec, tmp_path):
        dev = await rec.wait("medium", loop.devnode)
        assert (dev.mountpoint, dev.mounted_by_us, dev.read_only) == (desktop, False, False)
        assert not (tmp_path / "media" / loop.sys_name).exists()
    assert rec.of("gone", loop.devnode) == [dev]
    assert is_mounted(desktop), "the desktop's mount is not ours to undo"


async def test_a_filesystem_without_isrsync_is_ignored_unless_any_is_asked(loops: LoopKit, tmp_path: Path) -> None:
    rec = Recorder()
    async with watcher(loops, rec, tmp_path) as w:
        plain = loops.plug(loops.image("plain", medium=False))
        await async_wait_for(lambda: w.states.get(plain.devnode) == "ignored", EVENT_TIMEOUT,
                             "the watcher to look at the plain filesystem")
        assert rec.events == [] and w.media == []
        assert not is_mounted(tmp_path / "media" / plain.sys_name), "looked at, then unmounted again"

    rec_any = Recorder()
    async with watcher(loops, rec_any, tmp_path, offer_any=True):
        dev = await rec_any.wait("medium", plain.devnode)
        assert (dev.has_medium_dir, dev.mounted_by_us) == (False, True)


async def test_a_medium_yanked_mid_use_goes_at_once_and_its_mount_with_it(loops: LoopKit, tmp_path: Path) -> None:
    rec = Recorder()
    async with watcher(loops, rec, tmp_path):
        loop = loops.plug(loops.image("yank", files={".isrsync/index": b"x" * 4096}))
        dev = await rec.wait("medium", loop.devnode)
        with open(dev.mountpoint / ".isrsync" / "index", "rb") as reader:  # a read in flight
            t0 = time.monotonic()
            loops.yank(loop)
            gone = await rec.wait("gone", loop.devnode, timeout=GONE_WITHIN + 3)
            took = time.monotonic() - t0
            assert gone == dev and took < GONE_WITHIN, f"on_gone after {took:.2f} s"
            # Busy, so unmounted lazily: out of the mount table at once, released at close.
            await async_wait_for(lambda: not is_mounted(dev.mountpoint), GONE_WITHIN, "our mount to go")
            assert reader.read(4) == b"xxxx"
        # Nothing holds the loop device any more: the detach losetup deferred happens.
        await async_wait_for(lambda: not loop.attached(), EVENT_TIMEOUT, f"{loop.devnode} to detach")
    assert [k for k, _ in rec.events] == ["medium", "gone"]


async def test_a_change_that_drops_the_filesystem_withdraws_the_medium(loops: LoopKit, tmp_path: Path) -> None:
    rec = Recorder()
    async with watcher(loops, rec, tmp_path):
        loop = loops.plug(loops.image("wiped"))
        dev = await rec.wait("medium", loop.devnode)
        loops.wipe(loop)  # a reformatted card, say: udev sends "change" with no ID_FS_TYPE
        assert await rec.wait("gone", loop.devnode) == dev
        await async_wait_for(lambda: not is_mounted(dev.mountpoint), GONE_WITHIN, "our mount to go")


async def test_a_detached_loop_device_is_withdrawn(loops: LoopKit, tmp_path: Path) -> None:
    """A loop device sends "change" when detached; only an unused one really detaches."""
    rec = Recorder()
    async with watcher(loops, rec, tmp_path, mount=False) as w:
        loop = loops.plug(loops.image("desk"))
        await async_wait_for(lambda: w.states.get(loop.devnode) == "pending", EVENT_TIMEOUT,
                             "the watcher to wait for a mount")
        loops.detach(loop)
        await async_wait_for(lambda: loop.devnode not in w.states, EVENT_TIMEOUT, "the watcher to let it go")
    assert rec.events == []


async def test_without_mounting_it_follows_a_desktops_mounts(loops: LoopKit, tmp_path: Path) -> None:
    """A user who may not mount relies on udisks2, which mounts after udev's event."""
    rec = Recorder()
    async with watcher(loops, rec, tmp_path, mount=False) as w:
        loop = loops.plug(loops.image("desk"))
        await async_wait_for(lambda: w.states.get(loop.devnode) == "pending", EVENT_TIMEOUT,
                             "the watcher to wait for a mount")
        desktop = loops.mount(loop, read_only=True)
        dev = await rec.wait("medium", loop.devnode)
        assert (dev.mountpoint, dev.mounted_by_us, dev.read_only) == (desktop, False, True)
        loops.umount(desktop)  # the desktop's "eject"
        assert await rec.wait("gone", loop.devnode) == dev
        assert w.states.get(loop.devnode) in ("preparing", "pending")
        desktop = loops.mount(loop)
        again = await rec.wait("medium", loop.devnode, count=2)
        assert (again.mountpoint, again.read_only) == (desktop, False)
    assert [k for k, _ in rec.events] == ["medium", "gone", "medium", "gone"]
    assert is_mounted(desktop)


async def test_two_media_at_once(loops: LoopKit, tmp_path: Path) -> None:
    rec = Recorder()
    async with watcher(loops, rec, tmp_path) as w:
        a, b = loops.plug(loops.image("a")), loops.plug(loops.image("b"))
        da, db = await rec.wait("medium", a.devnode), await rec.wait("medium", b.devnode)
        assert da.mountpoint != db.mountpoint and {da.fs_label, db.fs_label} == {"a", "b"}
        assert sorted(w.media, key=lambda d: d.devnode) == sorted([da, db], key=lambda d: d.devnode)
        loops.yank(a)
        await rec.wait("gone", a.devnode)
        assert w.media == [db] and is_mounted(db.mountpoint)
        loops.yank(b)
        await rec.wait("gone", b.devnode)
        assert w.media == []


async def test_a_medium_plugged_before_the_watcher_starts_is_found(loops: LoopKit, tmp_path: Path) -> None:
    """Its event came and went with nobody listening: the start-up listing finds it."""
    loop = loops.plug_and_settle(loops.image("early"))
    rec = Recorder()
    async with watcher(loops, rec, tmp_path):
        dev = await rec.wait("medium", loop.devnode)
        assert dev.mounted_by_us


async def test_events_lost_to_a_monitor_error_are_recovered_by_a_listing(
    loops: LoopKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_poll = pyudev.Monitor.poll
    dropped: list[str] = []

    def overflowing_poll(self: pyudev.Monitor, timeout: float | None = None) -> pyudev.Device | None:
        dev = real_poll(self, timeout)
        if dev is not None and not dropped:
            dropped.append(dev.sys_name)  # this event is lost, as netlink loses them (ENOBUFS)
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return dev

    rec = Recorder()
    async with watcher(loops, rec, tmp_path):
        monkeypatch.setattr(pyudev.Monitor, "poll", overflowing_poll)
        loop = loops.plug(loops.image("lost"))
        dev = await rec.wait("medium", loop.devnode)
        assert dropped and dev.mounted_by_us


async def test_a_loop_device_reused_for_another_image_is_a_new_medium(loops: LoopKit, tmp_path: Path) -> None:
    """The device name stays, the medium changes (DISKSEQ and the fs uuid tell)."""
    rec = Recorder()
    first = loops.image("first")
    async with watcher(loops, rec, tmp_path):
        loop = loops.plug(first)
        d1 = await rec.wait("medium", loop.devnode)
        loops.yank(loop)
        await rec.wait("gone", loop.devnode)
        await async_wait_for(lambda: not loop.attached(), EVENT_TIMEOUT, "the detach")
        second = loops.plug(loops.image("second"), devnode=loop.devnode)
        d2 = await rec.wait("medium", second.devnode, count=2)
        assert d2.fs_label == "second" and d2.fs_uuid != d1.fs_uuid
