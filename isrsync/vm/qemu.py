"""QEMU launcher and QMP control, including the memory image streams.

The guest's disk is our NBD server (``-blockdev driver=nbd`` with
``reconnect-delay``). Memory moves through migration to and from pipes whose
other ends we hold: saving does ``stop`` + ``getfd`` + ``migrate fd:`` and reads
the stream as QEMU writes it; restoring starts QEMU with ``-incoming defer``,
then ``getfd`` + ``migrate-incoming fd:`` and feeds the stream while its chunks
are still arriving. (QEMU 7.2 has no ``file:`` URI and no mapped-ram.)

Guest RAM can live in a memfd we create and QEMU maps shared
(``memory-backend-file`` on ``/proc/self/fd/N``, named ``pc.ram`` like QEMU's
own). With ``x-ignore-shared`` the stream then carries device state only, and
RAM is read and written in place by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from qemu.qmp import EventListener, QMPClient, Runstate
from qemu.qmp.error import QMPError

from ..errors import QemuError
from .postcopy import PostcopySource
from .screen import VNC_SOCK, screen_args

log = logging.getLogger("isrsync.qemu")
PIPE_BUF = 1 << 20
# The guest RAM block kept in our memfd: QEMU's own name for main RAM, so that
# streams stay compatible with a QEMU that keeps RAM to itself.
RAM_BLOCK = "pc.ram"


def kvm_usable() -> bool:
    """/dev/kvm can exist on a CPU without virtualization, where a KVM guest hangs."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


def accelerator(requested: str = "auto") -> str:
    if requested == "auto":
        return "kvm" if kvm_usable() else "tcg"
    if requested == "kvm" and not kvm_usable():
        raise QemuError("KVM was asked for, but this CPU or /dev/kvm cannot run it", hint="use --accel tcg")
    return requested


_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


@functools.cache
def postcopy_usable() -> bool:
    """Whether QEMU started by us could trap guest faults (userfaultfd), as post-copy needs.

    Asked the way QEMU 7.2 asks (no user-mode-only flag): an unprivileged user
    where ``vm.unprivileged_userfaultfd`` is 0, or a seccomp sandbox, is refused.
    """
    nr = _USERFAULTFD.get(os.uname().machine)
    if nr is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False
    os.close(fd)
    return True


def qemu_binary() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise QemuError("qemu-system-x86_64 is not installed", hint="run scripts/setup or apt-get install qemu-system-x86")
    return exe


@functools.cache
def _dies_with_us() -> tuple[str, ...]:
    """A prefix that makes QEMU die with the process that started it, however that ends.

    A guest whose runner was SIGKILLed must not run on, re-parented to init,
    holding the disk's NBD socket and the lock's promise: the kernel sends
    QEMU SIGKILL when its parent goes (PR_SET_PDEATHSIG, kept across exec).
    setpriv sets it and execs QEMU in the same process, so the pid, the
    descriptors and the exit status are QEMU's own; preexec_fn could do it
    too but is unsafe in a process with threads. The signal follows the
    *thread* that forked: QEMU is started from the event loop's thread,
    which lives as long as the run.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) is missing: QEMU would outlive a killed isrsync")
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--")


@dataclass
class VmConfig:
    """What QEMU needs to run a parcel's machine (from the manifest's VM spec)."""

    memory_mib: int = 256
    cpus: int = 1
    machine: str = "q35"
    cpu_model: str = "qemu64"
    accel: str = "tcg"
    kernel: str | None = None  # path (a /proc/self/fd/N of a memfd for parcels)
    initrd: str | None = None
    cmdline: str | None = None
    display: str = "none"
    # A memfd of memory_mib MiB that holds guest RAM (shared with QEMU), so that
    # RAM is saved and restored in place rather than through the stream.
    ram_fd: int | None = None
    free_page_reporting: bool = False  # a virtio-balloon the guest reports free pages to
    extra: list[str] = field(default_factory=list)


class Qemu:
    """One running QEMU with a QMP connection."""

    def __init__(self, cfg: VmConfig, rundir: Path, nbd_socket: Path, *, serial: Path | None = None) -> None:
        self.cfg = cfg
        self.rundir = rundir
        self.nbd_socket = nbd_socket
        self.serial = serial
        self.proc: subprocess.Popen | None = None
        self.qmp = QMPClient("isrsync")
        # Kept from the start: with -no-reboot, a guest that reboots ends QEMU
        # with reason "guest-reset", and whoever runs it starts it again.
        self._shutdowns = EventListener("SHUTDOWN")
        self.qmp.register_listener(self._shutdowns)
        self._stderr = rundir / "qemu.log"
        self._pass_fds: tuple[int, ...] = ()

    def args(self, incoming: bool, *, qmp_fd: int, preconfig: bool = False) -> list[str]:
        c = self.cfg
        a = [
            # debug-threads: QEMU names its threads (the post-copy one is reniced by name).
            qemu_binary(), "-name", "isrsync,debug-threads=on", "-nodefaults", "-no-user-config",
            "-machine", f"{c.machine},accel={c.accel}", "-cpu", c.cpu_model,
            "-m", str(c.memory_mib), "-smp", str(c.cpus),
            # A reboot ends QEMU (see shutdown_reason): a resumed machine has no
            # boot files to reboot from, and a fresh QEMU boots the guest cold.
            "-no-reboot",
            "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            # MIGRATION events: completion is noticed when it happens, not at the next poll.
            "-global", "migration.x-events=on",
            "-blockdev",
            f"driver=nbd,node-name=disk0,server.type=unix,server.path={self.nbd_socket},export=disk,"
            "reconnect-delay=10,cache.direct=off",
            "-device", "virtio-blk-pci,drive=disk0,id=vda",
        ]
        if c.ram_fd is not None:
            a += [
                "-object", f"memory-backend-file,id={RAM_BLOCK},size={c.memory_mib}M,"
                f"mem-path=/proc/self/fd/{c.ram_fd},share=on",
                "-machine", f"memory-backend={RAM_BLOCK}",
            ]
        if c.free_page_reporting:
            # Reported pages are discarded: punched out of the shared RAM memfd, so they
            # read as holes and a save skips them. No deflate/inflate is ever asked.
            a += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
        a += screen_args(c.display, self.rundir / VNC_SOCK)
        if c.kernel:
            a += ["-kernel", c.kernel]
        if c.initrd:
            a += ["-initrd", c.initrd]
        if c.cmdline:
            a += ["-append", c.cmdline]
        if self.serial is not None:
            a += ["-chardev", f"socket,id=ser0,path={self.serial},server=on,wait=off", "-serial", "chardev:ser0"]
        if incoming:
            a += ["-incoming", "defer"]
        if preconfig:
            a.append("--preconfig")
        return a + c.extra

    async def start(
        self, *, incoming: bool = False, pass_fds: Iterable[int] = (), machine: Awaitable[Any] | None = None
    ) -> None:
        """Launch QEMU and connect QMP; with ``machine``, overlap QEMU's own start-up with it.

        QMP runs over a socketpair, so there is no socket file to poll for: the
        greeting arrives the moment QEMU's main loop runs. ``machine`` is awaited
        while QEMU sits in ``--preconfig`` (process, accelerator and back-ends
        up, the board not yet built): it is what the board needs, such as the
        boot files being decoded into memfds that ``-kernel`` names. Only then
        does ``x-exit-preconfig`` build the machine, which reads them.
        """
        self.rundir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err = open(self._stderr, "ab")
        try:
            self.proc = subprocess.Popen(
                [*_dies_with_us(), *self.args(incoming, qmp_fd=theirs.fileno(), preconfig=machine is not None)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                pass_fds=(theirs.fileno(), *pass_fds), start_new_session=True,
            )
        finally:
            err.close()
            theirs.close()
        try:
            try:
                await asyncio.wait_for(self.qmp.connect(ours), 30)
            except asyncio.TimeoutError:
                raise QemuError("QEMU did not answer on QMP within 30 s") from None
            except (OSError, EOFError, QMPError) as e:
                await asyncio.to_thread(self._reap, 2.0)
                if self.proc.returncode is None:  # alive: the greeting itself failed
                    raise QemuError(f"QEMU did not complete its QMP greeting ({e or type(e).__name__}): "
                                    f"{self.log_tail()}") from None
                raise QemuError(f"QEMU exited at start ({self.proc.returncode}): {self.log_tail()}") from None
            if machine is not None:
                await machine
                await self.cmd("x-exit-preconfig")
        except BaseException:
            ours.close()
            await self.close()
            raise

    def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def log_tail(self, n: int = 600) -> str:
        try:
            return self._stderr.read_text(errors="replace")[-n:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    async def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.qmp.execute(name, args)
        except QMPError as e:
            raise QemuError(f"QEMU refused {name}: {e}") from None
        except (EOFError, ConnectionError):
            raise QemuError(f"QEMU went away during {name}: {self.log_tail()}") from None

    @property
    def shutdown_reason(self) -> str | None:
        """Why the guest last shut QEMU down ("guest-reset" is a reboot), or None."""
        for ev in reversed(self._shutdowns.history):
            return (ev.get("data") or {}).get("reason")
        return None

    async def status(self) -> str:
        return (await self.cmd("query-status"))["status"]

    async def cont(self) -> None:
        await self.cmd("cont")

    async def stop(self) -> None:
        await self.cmd("stop")

    async def _send_fd(self, fd: int, name: str) -> None:
        self.qmp.send_fd_scm(fd)
        await self.cmd("getfd", {"fdname": name})

    # -- memory image --------------------------------------------------------------

    async def set_capabilities(self, caps: dict[str, bool]) -> None:
        await self.cmd("migrate-set-capabilities",
                       {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})

    async def ignore_shared(self, on: bool) -> None:
        # x-ignore-shared: the shared RAM backend is left out of the stream; the
        # RAM memfd is saved and restored in place instead. A QEMU resumed by
        # post-copy still has postcopy-ram on, which excludes it.
        await self.set_capabilities({"postcopy-ram": False, "x-ignore-shared": on})

    async def save_memory(self, consume: Callable[[int], Any], *, without_ram: bool = False) -> None:
        """Stop the guest and stream its device state (and RAM) to ``consume(fd)``.

        ``consume`` runs in a worker thread and must read the pipe to EOF; it is
        where the stream is chunked and encoded as it arrives. ``without_ram``
        leaves the RAM memfd out (the guest stays stopped: read it next).
        """
        await self.stop()
        await self.ignore_shared(without_ram)
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(r, 1031, PIPE_BUF)  # F_SETPIPE_SZ: fewer wake-ups
        try:
            await self._send_fd(w, "isrsync-out")
        finally:
            os.close(w)
        reader = asyncio.create_task(asyncio.to_thread(consume, r))
        try:
            await self.migrate_out("fd:isrsync-out")
            await reader
        except BaseException:
            reader.cancel()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(r)

    async def migrate_out(self, uri: str) -> None:
        """Migrate a stopped guest to ``uri``, until QEMU has written all of it."""
        with self.qmp.listen(events := EventListener("MIGRATION")):
            # QEMU's default bandwidth cap is meant for live migration over a
            # network; a stopped guest into a local pipe should go flat out.
            await self.cmd("migrate-set-parameters", {"max-bandwidth": 64 << 30})
            await self.cmd("migrate", {"uri": uri})
            await self._migrated(events, self._saved)

    async def load_memory(self, produce: Callable[[int], Any], *, without_ram: bool = False) -> None:
        """Feed a saved stream into a QEMU started with ``incoming=True``.

        ``produce(fd)`` runs in a worker thread writing the stream (it may wait
        for chunks still on their way) and closes nothing; we close the pipe.
        ``without_ram``: the stream was saved so, and RAM is in the memfd already.
        """
        await self.ignore_shared(without_ram)
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(w, 1031, PIPE_BUF)
        try:
            await self._send_fd(r, "isrsync-in")
        finally:
            os.close(r)

        def feed() -> None:
            try:
                produce(w)
            finally:
                os.close(w)

        with self.qmp.listen(events := EventListener("MIGRATION")):
            try:
                await self.cmd("migrate-incoming", {"uri": "fd:isrsync-in"})
            except BaseException:
                os.close(w)
                raise
            writer = asyncio.create_task(asyncio.to_thread(feed))
            try:
                await writer
                await self._migrated(events, self._restored)
            except BrokenPipeError:
                raise QemuError(f"QEMU stopped reading the memory image: {self.log_tail()}") from None

    async def enable_postcopy(self) -> bool:
        """Ready an incoming QEMU for post-copy; False if it cannot (no userfaultfd for it)."""
        try:
            await self.set_capabilities({"x-ignore-shared": False, "postcopy-ram": True})
            return True
        except QemuError as e:
            if not self.alive:
                raise
            log.info("no post-copy here: %s", e)
            return False

    async def load_memory_lazily(self, source: PostcopySource) -> None:
        """Restore by post-copy into a QEMU started with ``incoming=True`` (after ``enable_postcopy``).

        Returns once the guest runs; its RAM keeps arriving from ``source``,
        whose ``finish()`` waits for the rest.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._send_fd(theirs.fileno(), "isrsync-pc")
        finally:
            theirs.close()
        with self.qmp.listen(events := EventListener(("MIGRATION", "RESUME"))):
            try:
                await self.cmd("migrate-incoming", {"uri": "fd:isrsync-pc"})
            except BaseException:
                ours.close()
                raise
            await source.start(ours)
            await self._migrated(events, self._restored)
        # QEMU's thread that places the pages we send: while the guest computes
        # it yields; while the guest waits on a page it has the CPU.
        self.renice_thread("postcopy/listen", 10)

    def renice_thread(self, name: str, nice: int) -> None:
        """Lower the priority of QEMU's threads called ``name``."""
        if self.proc is None:
            return
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                if (task / "comm").read_text().strip() == name:
                    os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile

    async def wait_restored(self) -> None:
        """For a QEMU started with ``-incoming URI``: until the restore has ended."""
        with self.qmp.listen(events := EventListener("MIGRATION")):
            await self._migrated(events, self._restored)

    async def _migrated(self, events: EventListener, done: Callable[[], Awaitable[bool]]) -> None:
        """Until a migration ends, by its MIGRATION events.

        ``done`` asks QEMU directly: once at the start (the migration may have
        ended before the listener was up) and whenever no event came for a
        while, which also notices a QEMU that died.
        """
        deadline = time.monotonic() + 600
        if await done():
            return
        while time.monotonic() < deadline:
            try:
                ev = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await done():
                    return
                continue
            status = (ev.get("data") or {}).get("status")
            if (ev["event"] == "RESUME" or status in ("completed", "failed", "cancelled")) and await done():
                return
        raise QemuError("the memory image did not finish moving within 600 s")

    async def _saved(self) -> bool:
        st = await self.cmd("query-migrate")
        s = st.get("status")
        if s in ("failed", "cancelled"):
            raise QemuError(f"saving the memory image failed: {st.get('error-desc', s)}")
        return s == "completed"

    async def _restored(self) -> bool:
        try:
            s = await self.status()
        except QemuError:
            # A refused image makes QEMU exit: say why, from its log, not "Disconnected".
            if self.proc is not None:
                await asyncio.to_thread(self._reap, 2.0)
                if self.proc.poll() is not None:
                    raise QemuError(f"QEMU exited while restoring memory: {self.log_tail()}") from None
            raise
        if s in ("internal-error", "shutdown", "guest-panicked"):
            raise QemuError(f"restoring the memory image failed (QEMU is {s}): {self.log_tail()}")
        return s in ("paused", "running")

    # -- ending ----------------------------------------------------------------------

    async def quit(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(QemuError, EOFError, ConnectionError, QMPError):
            await self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        await self.wait(timeout)

    async def wait(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        except asyncio.TimeoutError:
            self.kill()
            code = self.proc.returncode
        if code == 0 and not self._shutdowns.history and self.qmp.runstate == Runstate.RUNNING:
            # A clean exit follows a SHUTDOWN event, which may still sit in the
            # QMP socket: the reason (a reboot?) is read before the socket goes.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._shutdowns.get(), 2)
        # QEMU is gone: close our end of QMP so its reader does not report EOF later.
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        return code

    async def close(self) -> None:
        """Kill QEMU if it runs, and end the QMP session.

        Ending it (not just dropping it) collects the reader's EOF: left
        alone, it is logged at garbage collection ("exception was never
        retrieved"), and a finalizer running inside CPython 3.11.7's AST
        conversion is what trips that interpreter's "AST constructor
        recursion depth mismatch" in whatever compiles next.
        """
        self.kill()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
