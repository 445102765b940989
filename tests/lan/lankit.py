"""A private LAN for the mDNS tests, and the little programs that run on it.

:class:`Lan` makes network namespaces joined by veth pairs to a bridge that lives in
a namespace of its own (10.231.0.0/24), so multicast never leaves the test and
nothing touches the host's interfaces. Run this file as a script inside a namespace
to play a site (``site``), a hostile announcer (``hostile``), a watcher of peer
events (``watch``) or a dumper of raw TXT records (``dump``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SUBNET = "10.231.0"


def usable() -> str | None:
    """Why the netns tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Lan:
    """A hub namespace with a bridge, and one namespace per host on it."""

    def __init__(self) -> None:
        self.tag = f"mdns{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.hub = f"{self.tag}-hub"
        self.hosts: dict[str, str] = {}  # namespace -> address
        self.procs: list[subprocess.Popen[str]] = []
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def add_host(self) -> str:
        n = len(self.hosts) + 1
        ns, addr = f"{self.tag}-h{n}", f"{SUBNET}.{n}"
        _ip("netns", "add", ns)
        # Created inside the namespaces, so no interface ever exists in the host's.
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{n}", "netns", self.hub)
        _ip("-n", self.hub, "link", "set", f"p{n}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        self.hosts[ns] = addr
        return ns

    def spawn(self, ns: str, *argv: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
        e = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=e, text=True, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def run(self, ns: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        return subprocess.run(["ip", "netns", "exec", ns, *argv], env=e, text=True, capture_output=True,
                              timeout=timeout)

    def kit(self, ns: str, *args: str, **kw: object) -> subprocess.Popen[str]:
        """Run this file in ``ns`` with its output piped."""
        return self.spawn(ns, PY, __file__, *args, stdout=subprocess.PIPE, **kw)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for ns in [*self.hosts, self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@contextlib.contextmanager
def lan(hosts: int) -> Iterator[Lan]:
    net = Lan()
    try:
        for _ in range(hosts):
            net.add_host()
        yield net
    finally:
        net.close()


def read_line(p: subprocess.Popen, deadline: float) -> str | None:
    """The next stdout line of ``p`` ("" at its end), or None once ``deadline``
    (monotonic) passes: a child that prints nothing never hangs the test.

    A thread per process reads the pipe; a bare readline() would block forever.
    """
    # Kept on the process object itself: a dict keyed by id() handed a new process
    # the finished queue of an earlier one whose id was reused.
    q: "queue.Queue[str] | None" = getattr(p, "isrsync_lines", None)
    if q is None:
        q = queue.Queue()
        p.isrsync_lines = q  # type: ignore[attr-defined]
        out = p.stdout
        assert out is not None

        def pump() -> None:
            for line in out:
                q.put(line if isinstance(line, str) else line.decode(errors="replace"))
            q.put("")

        threading.Thread(target=pump, daemon=True).start()
    try:
        return q.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None


def wait_line(p: subprocess.Popen[str], prefix: str, timeout: float = 15) -> str:
    """The first stdout line of ``p`` that starts with ``prefix`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        line = read_line(p, deadline)
        if line is None:
            raise AssertionError(f"no {prefix!r} within {timeout} s")
        if not line:
            raise AssertionError(f"process ended (rc {p.wait(30)}) before printing {prefix!r}")
        if line.startswith(prefix):
            return line.rstrip("\n")


# -- the programs ------------------------------------------------------------------------


async def _listener(addr: str) -> tuple[asyncio.base_events.Server, int]:
    # A stand-in for libtorrent's listen socket: the liveness probe connects to it.
    server = await asyncio.start_server(lambda r, w: w.close(), addr, 0)
    return server, server.sockets[0].getsockname()[1]


async def _until_term() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def site(args: argparse.Namespace) -> None:
    from isrsync.swarm import announce
    from isrsync.swarm.discovery import announcing

    server, port = await _listener(args.addr)
    ann = announce.make(uuid.UUID(args.site_id), args.name, port, args.cached, [uuid.UUID(p) for p in args.parcel])
    # SIGTERM cancels the task inside the block, as a daemon's shutdown does: the goodbye
    # must go out on cancellation, not only on a normal exit.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with server, announcing(ann, [args.addr]):
            print(f"ready {port} {time.time()}", flush=True)
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        print("bye", flush=True)


#: Records no reader may accept (each is wrong in one way), with a live port behind them.
HOSTILE: list[dict[bytes, bytes | None]] = [
    {b"v": b"2", b"id": b"0" * 32, b"n": b"future", b"bt": b"PORT", b"c": b"1", b"s": b"s" * 16, b"p": b""},
    {b"v": b"1", b"id": b"1" * 32, b"n": b"short-hash", b"bt": b"PORT", b"c": b"1", b"s": b"s" * 16, b"p": b"1234567"},
    {b"v": b"1", b"id": b"2" * 32, b"n": b"negative", b"bt": b"PORT", b"c": b"-1", b"s": b"s" * 16, b"p": b""},
    {b"v": b"1", b"n": b"no-id", b"bt": b"PORT", b"c": b"1", b"s": b"s" * 16, b"p": b""},
    {b"v": b"1", b"id": b"4" * 32, b"n": b"\xff\xfe", b"bt": b"PORT", b"c": b"1", b"s": b"s" * 16, b"p": b""},
    {b"v": b"1", b"id": b"5" * 32, b"n": b"bad-port", b"bt": b"99999", b"c": b"1", b"s": b"s" * 16, b"p": b""},
    {b"v": None, b"id": b"6" * 32, b"n": b"no-value", b"bt": b"PORT", b"c": b"1", b"s": b"s" * 16, b"p": b""},
    {b"v": b"1", b"id": b"7" * 32, b"n": b"huge", b"bt": b"PORT", b"c": b"9" * 40, b"s": b"s" * 16, b"p": b""},
]


async def hostile(args: argparse.Namespace) -> None:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    from isrsync.swarm import announce

    server, port = await _listener(args.addr)
    azc = AsyncZeroconf(interfaces=[args.addr], ip_version=IPVersion.V4Only)
    infos = []
    for i, props in enumerate(HOSTILE):
        props = {k: (v.replace(b"PORT", str(port).encode()) if v else v) for k, v in props.items()}
        infos.append(AsyncServiceInfo(announce.SERVICE_TYPE, f"hostile-{i}.{announce.SERVICE_TYPE}", port=port,
                                      properties=props, server=f"hostile-{i}.local.", parsed_addresses=[args.addr]))

    async def register(info: AsyncServiceInfo) -> None:
        await (await azc.async_register_service(info))

    # In parallel: each registration spends ~2 s probing.
    await asyncio.gather(*(register(i) for i in infos))
    async with server:
        print(f"ready {port} {time.time()}", flush=True)
        await _until_term()
    await azc.async_unregister_all_services()
    await azc.async_close()


async def watch(args: argparse.Namespace) -> None:
    from isrsync.swarm.discovery import Browser, lan

    async with lan([args.addr]) as zc, Browser(zc) as b:
        print("ready", flush=True)
        async for ev in b.events():
            print(json.dumps({"t": time.time(), "change": ev.change.value, **ev.peer.to_json()}), flush=True)


async def dump(args: argparse.Namespace) -> None:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    from isrsync.swarm import announce

    names: set[str] = set()
    azc = AsyncZeroconf(interfaces=[args.addr], ip_version=IPVersion.V4Only)
    browser = AsyncServiceBrowser(azc.zeroconf, announce.SERVICE_TYPE, handlers=[lambda **kw: names.add(kw["name"])])
    await asyncio.sleep(args.wait)
    for name in sorted(names):
        info = AsyncServiceInfo(announce.SERVICE_TYPE, name)
        if await info.async_request(azc.zeroconf, 3000):
            print(json.dumps({"name": name, "txt": (info.text or b"").hex()}), flush=True)
    await browser.async_cancel()
    await azc.async_close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["site", "hostile", "watch", "dump"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--site-id", default=str(uuid.uuid4()))
    ap.add_argument("--name", default=socket.gethostname())
    ap.add_argument("--cached", type=int, default=0)
    ap.add_argument("--parcel", action="append", default=[])
    ap.add_argument("--wait", type=float, default=3.0)
    args = ap.parse_args()
    asyncio.run({"site": site, "hostile": hostile, "watch": watch, "dump": dump}[args.mode](args))


if __name__ == "__main__":
    main()
