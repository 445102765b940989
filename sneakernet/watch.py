"""The pyudev watcher: media appear and go while a resume runs.

A :class:`Watcher` follows udev's block devices and hands every filesystem that
carries ``.isrsync/`` to ``on_medium``, and the same :class:`MediumDevice` to
``on_gone`` when it goes. It only feeds: what a medium is used for is the
callbacks' business (DESIGN.md: the udev watcher, like the mDNS browser, only
adds and withdraws sources).

udev's facts it relies on (DESIGN.md, "Sharp edges"): a USB key arrives as
``add``, a loop device as ``change``, so both mean "look at it"; a ``remove``,
or a ``change`` that no longer shows a filesystem (a loop device detached, a
card pulled from a reader), means gone. Netlink drops events when its buffer
fills, so the devices are listed again at start-up and after any error.

The mount table is watched too (poll on /proc/self/mountinfo): a desktop's
udisks2 mounts a key a moment after udev announces it, and a user without the
right to mount depends on that; a mount that vanishes withdraws its medium.

Guarantees to the callbacks: they run on the watcher's event loop; for one
device, ``on_gone`` follows ``on_medium`` exactly once and never overlaps it (a
slow ``on_medium`` is cancelled when its device goes, and ``on_gone`` waits for
it at most ``gone_grace`` seconds); an exception in a callback is logged and
changes nothing else. Everything that blocks (mount, umount, reading the mount
table, listing devices) runs in a thread.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import functools
import logging
import select
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyudev

from isrsync.errors import StateError

from .attach import BlockFs, Hooks, MediumDevice, block_fs, prepare, release
from .mounts import MOUNTINFO, find_mount, mounted_at, read_mountinfo

__all__ = ["Accept", "BlockFs", "MediumDevice", "OnDevice", "Watcher"]

log = logging.getLogger("sneakernet.watch")

OnDevice = Callable[[MediumDevice], Awaitable[None]]
Accept = Callable[[BlockFs], bool]
T = TypeVar("T")

# Big enough for a hub of keys plugged at once; netlink drops what does not fit.
RECEIVE_BUFFER = 16 * 1024 * 1024


class _State(enum.Enum):
    PREPARING = "preparing"  # mounting and looking, in a thread
    OFFERED = "offered"  # on_medium was called
    IGNORED = "ignored"  # mounted, and no medium on it
    PENDING = "pending"  # no mount yet and we could not (or may not) make one


@dataclass
class _Tracked:
    fs: BlockFs
    state: _State = _State.PREPARING
    task: asyncio.Future[None] | None = None
    device: MediumDevice | None = None


class Watcher:
    """Follows block devices and offers the media on them; use ``async with`` or start/close."""

    def __init__(self, media_dir: Path, on_medium: OnDevice, on_gone: OnDevice, *,
                 offer_any: bool = False, mount: bool = True, accept: Accept | None = None,
                 gone_grace: float = 1.0, context: pyudev.Context | None = None) -> None:
        """``media_dir``: where filesystems are mounted (one directory per device).
        ``offer_any``: offer every filesystem, with or without ``.isrsync/``.
        ``mount``: mount what nobody mounted (else only existing mounts are used).
        ``accept``: which devices to consider at all (default: every filesystem).
        """
        self.media_dir = media_dir
        self._on_medium, self._on_gone = on_medium, on_gone
        self._offer_any, self._mount, self._accept = offer_any, mount, accept
        self._gone_grace = gone_grace
        self._context = context or pyudev.Context()
        self._tracked: dict[str, _Tracked] = {}
        self._teardowns: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._touched: set[str] = set()  # keys an event spoke of while a rescan was listing
        self._rescan_task: asyncio.Future[None] | None = None
        self._remount_task: asyncio.Future[None] | None = None
        self._remount_again = False
        self._monitor: pyudev.Monitor | None = None
        self._mountinfo: Any = None
        self._mount_poll: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen first, then list what is already there: nothing falls in between."""
        self._loop = asyncio.get_running_loop()
        monitor = pyudev.Monitor.from_netlink(self._context)
        monitor.filter_by("block")
        try:
            monitor.set_receive_buffer_size(RECEIVE_BUFFER)
        except OSError:
            pass  # needs CAP_NET_ADMIN; the rescan after an overflow covers the rest
        monitor.start()
        self._monitor = monitor
        self._loop.add_reader(monitor.fileno(), self._udev_readable)
        # /proc/self/mountinfo is always readable; a change shows as EPOLLPRI,
        # which asyncio's readers do not ask for: an inner epoll asks for it.
        self._mountinfo = open(MOUNTINFO, "rb")  # noqa: SIM115, ASYNC230 - a /proc file opens at once; closed in close()
        self._mount_poll = select.epoll()
        self._mount_poll.register(self._mountinfo.fileno(), select.EPOLLPRI | select.EPOLLERR)
        self._loop.add_reader(self._mount_poll.fileno(), self._mounts_changed)
        try:
            await self.rescan()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening; every offered medium gets its ``on_gone`` and our mounts go."""
        if self._loop is None:
            return
        if self._monitor is not None:
            self._loop.remove_reader(self._monitor.fileno())
            self._monitor = None  # pyudev frees the socket with the object
        if self._mount_poll is not None:
            self._loop.remove_reader(self._mount_poll.fileno())
            self._mount_poll.close()
            self._mountinfo.close()
            self._mount_poll = None
        for task in (self._rescan_task, self._remount_task):
            if task is not None:
                task.cancel()
        for key in list(self._tracked):
            self._gone(key)
        while self._teardowns or self._background:
            await asyncio.gather(*self._teardowns.values(), *self._background, return_exceptions=True)
        self._loop = None

    async def __aenter__(self) -> Watcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def media(self) -> list[MediumDevice]:
        """The media offered now (``on_medium`` called, ``on_gone`` not yet)."""
        return [t.device for t in self._tracked.values() if t.state is _State.OFFERED and t.device]

    @property
    def states(self) -> dict[str, str]:
        """What the watcher made of each device it follows, by device node:
        preparing, offered, ignored (no medium on it) or pending (waiting for a mount)."""
        return {t.fs.devnode: t.state.value for t in self._tracked.values()}

    async def rescan(self) -> None:
        """List the block devices again: new ones appear, missing ones go.

        Devices that held no medium, or had no mount, are looked at again (a key
        formatted since, a mount made since).
        """
        self._touched.clear()
        found = await self._thread(self._list_filesystems)
        for key in list(self._tracked):
            if key not in found and key not in self._touched:
                self._gone(key)
        for key, fs in found.items():
            if key in self._touched or not self._accepts(fs):
                continue
            t = self._tracked.get(key)
            if t is not None and t.fs.identity == fs.identity and t.state in (_State.IGNORED, _State.PENDING):
                self._bring_up(t, mount=self._mount)
            else:
                self._appeared(fs)

    # ---------------------------------------------------------------- events

    def _udev_readable(self) -> None:
        monitor = self._monitor
        while monitor is not None:
            try:
                dev = monitor.poll(timeout=0)
            except OSError as e:
                # ENOBUFS: the kernel dropped events for us; only a listing can tell what.
                log.warning("udev monitor: %s; listing the devices again", e)
                self._schedule_rescan()
                return
            if dev is None:
                return
            try:
                self._on_event(dev.action or "", dev)
            except Exception:
                log.exception("udev event %s on %s", dev.action, dev.sys_name)
                self._schedule_rescan()

    def _on_event(self, action: str, dev: pyudev.Device) -> None:
        key = dev.sys_name
        self._touched.add(key)
        fs = None if action == "remove" else block_fs(dev)
        if fs is None or not self._accepts(fs):
            self._gone(key)
        elif action in ("add", "change", "move", "online", "bind"):
            self._appeared(fs)

    def _accepts(self, fs: BlockFs) -> bool:
        return self._accept is None or self._accept(fs)

    def _appeared(self, fs: BlockFs, *, mount: bool | None = None) -> None:
        t = self._tracked.get(fs.sys_name)
        if t is not None:
            if t.fs.identity == fs.identity:
                return  # another change event for the same medium
            self._gone(fs.sys_name)
        t = _Tracked(fs)
        self._tracked[fs.sys_name] = t
        self._bring_up(t, mount=self._mount if mount is None else mount)

    def _bring_up(self, t: _Tracked, *, mount: bool) -> None:
        t.state = _State.PREPARING
        t.task = self._spawn(self._up(t, mount))

    async def _up(self, t: _Tracked, mount: bool) -> None:
        key = t.fs.sys_name
        before = self._teardowns.get(key)
        if before is not None:
            # The last device of this name must be unmounted before its directory is reused.
            await asyncio.shield(before)
        fut = self._thread(functools.partial(prepare, t.fs, self.media_dir, mount=mount, offer_any=self._offer_any))
        try:
            device = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._undo_late_mount)
            raise
        except StateError as e:
            log.info("%s: %s; waiting for a mount", t.fs.devnode, e)
            t.state = _State.PENDING
            return
        except Exception as e:  # noqa: BLE001 - a bad device must not stop the watcher
            log.warning("%s: %s", t.fs.devnode, e)
            t.state = _State.PENDING
            return
        if device is None:
            t.state = _State.IGNORED
            return
        t.device, t.state = device, _State.OFFERED
        await self._call(self._on_medium, device)

    def _undo_late_mount(self, fut: asyncio.Future[MediumDevice | None]) -> None:
        # The device went while the thread was mounting it: nobody was told, so just unmount.
        if fut.cancelled() or fut.exception() is not None:
            return
        device = fut.result()
        if device is not None and device.mounted_by_us:
            self._spawn(self._thread(functools.partial(release, device, gone=True)))

    def _gone(self, key: str) -> None:
        t = self._tracked.pop(key, None)
        if t is None:
            return
        if t.task is not None and not t.task.done():
            t.task.cancel()
        before = self._teardowns.get(key)
        task = self._spawn(self._down(t, before))
        self._teardowns[key] = task
        task.add_done_callback(lambda _t, key=key: self._teardowns.get(key) is _t and self._teardowns.pop(key))

    async def _down(self, t: _Tracked, before: asyncio.Future[None] | None) -> None:
        if t.task is not None and not t.task.done():
            await asyncio.wait([t.task], timeout=self._gone_grace)
        if before is not None:
            await asyncio.shield(before)
        if t.device is None:
            return
        await self._call(self._on_gone, t.device)
        if not await self._thread(functools.partial(release, t.device, gone=True)):
            log.warning("could not unmount %s", t.device.mountpoint)

    # ---------------------------------------------------------------- the mount table

    def _mounts_changed(self) -> None:
        if self._mount_poll is None:
            return
        self._mount_poll.poll(0)  # takes the event: the next change raises a new one
        if self._remount_task is not None and not self._remount_task.done():
            self._remount_again = True
            return
        self._remount_task = self._spawn(self._recheck_mounts())

    async def _recheck_mounts(self) -> None:
        while True:
            self._remount_again = False
            entries = await self._thread(read_mountinfo)
            for key, t in list(self._tracked.items()):
                if t.task is not None and not t.task.done():
                    continue
                if t.state is _State.PENDING:
                    if find_mount(entries, t.fs.devnum, t.fs.devnode) is not None:
                        self._bring_up(t, mount=False)
                elif t.state is _State.OFFERED and t.device is not None:
                    if mounted_at(entries, t.device.mountpoint) is None:
                        # Unmounted under us (a desktop's eject): withdraw it, then
                        # offer it again if another mount of it is left.
                        log.info("%s: %s was unmounted", t.fs.devnode, t.device.mountpoint)
                        self._gone(key)
                        self._appeared(t.fs, mount=False)
            if not self._remount_again:
                return

    # ---------------------------------------------------------------- helpers

    def _schedule_rescan(self) -> None:
        if self._rescan_task is None or self._rescan_task.done():
            self._rescan_task = self._spawn(self.rescan())

    def _list_filesystems(self) -> dict[str, BlockFs]:
        found: dict[str, BlockFs] = {}
        for dev in self._context.list_devices(subsystem="block"):
            fs = block_fs(dev)
            if fs is not None:
                found[fs.sys_name] = fs
        return found

    def _thread(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        assert self._loop is not None, "the watcher is not started"
        return self._loop.run_in_executor(None, fn)

    def _spawn(self, aw: Awaitable[T]) -> asyncio.Future[T]:
        assert self._loop is not None, "the watcher is not started"
        task = asyncio.ensure_future(aw)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    async def _call(self, callback: OnDevice, device: MediumDevice) -> None:
        try:
            await callback(device)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s for %s failed", getattr(callback, "__name__", callback), device.devnode)


def devnode_filter(patterns: list[str]) -> Accept | None:
    """Accept only devices whose node matches one of the shell ``patterns`` (all when none)."""
    if not patterns:
        return None
    return lambda fs: any(fnmatch.fnmatchcase(fs.devnode, p) for p in patterns)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("watcher task failed", exc_info=task.exception())


async def serve(media_dir: Path, emit: Callable[[str, MediumDevice], None], *, hooks: Hooks,
                offer_any: bool = False, accept: Accept | None = None, stop: asyncio.Event | None = None) -> None:
    """What `sneakernet watch` runs: the watcher, feeding ``hooks`` as the systemd unit would.

    Runs until ``stop`` is set, SIGINT or SIGTERM; on the way out every medium
    gets its detached hooks and our mounts go.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def on_medium(device: MediumDevice) -> None:
        emit("medium", device)
        for hook in hooks.attached:
            await asyncio.to_thread(hook, device)

    async def on_gone(device: MediumDevice) -> None:
        for hook in hooks.detached:
            await asyncio.to_thread(hook, device)
        emit("gone", device)

    try:
        async with Watcher(media_dir, on_medium, on_gone, offer_any=offer_any, accept=accept):
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
