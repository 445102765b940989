"""The testbed: the home server and each site in a network namespace of its own, on one
bridge, with the server's link shaped by ``tc tbf``.

A hub namespace holds a bridge (multicast snooping off, so mDNS reaches every
host, as on a home LAN); each host namespace has one veth into it
(tests/lan/lankit.py's layout, in 10.232.x.0/24 so the two never collide). Only
the server's link is shaped, on both of its ends (its ``eth0`` and its bridge
port), so every byte to or from the server crosses the rate under test while
site-to-site traffic (a jukebox on the LAN) does not.

The sites A and B are this process (QEMU, the site code): :meth:`Testbed.enter`
moves the calling thread into a site's namespace with setns(2) (the network
namespace is per thread) and gives the event loop a fresh default executor,
so every thread and process started afterwards (QEMU, libtorrent, zeroconf,
to_thread workers) is in that namespace too. Other hosts (the server, the
jukebox) run as processes started with ``ip netns exec``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import secrets
import subprocess
from pathlib import Path

CLONE_NEWNET = 0x40000000
HOSTS = ("server", "A", "B", "J")  # J: the jukebox, a third site on the LAN


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")


def tbf(rate_bps: float) -> tuple[str, str, str]:
    """rate, burst, latency for tc tbf: burst 20 ms of traffic (>= 2 full frames), a queue of
    >= 200 ms or 20 full frames (a shorter one drops most packets at 100 Kb/s)."""
    burst = max(int(rate_bps / 8 * 0.02), 3200)
    lat_ms = max(200, int(20 * 1514 * 8 / rate_bps * 1000))
    return f"{int(rate_bps)}bit", str(burst), f"{lat_ms}ms"


class Testbed:
    """Hub bridge + one namespace per host; ``ns`` maps host name to namespace, ``addr`` to address."""

    def __init__(self) -> None:
        tag = f"isrev{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.tag = tag
        self.hub = f"{tag}-hub"
        self.ns = {h: f"{tag}-{h}" for h in HOSTS}
        o = os.getpid() % 200 + 20
        self.addr = {h: f"10.232.{o}.{i + 1}" for i, h in enumerate(HOSTS)}
        self.made: list[str] = []
        self.shaped: float | None = None
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self._libc = ctypes.CDLL(None, use_errno=True)

    def up(self) -> None:
        _ip("netns", "add", self.hub)
        self.made.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, h in enumerate(HOSTS):
            ns = self.ns[h]
            _ip("netns", "add", ns)
            self.made.append(ns)
            # Made inside the namespaces: no interface ever exists in the host's.
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.hub)
            _ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def shape(self, rate_bps: float) -> list[str]:
        """The server's link at ``rate_bps`` both ways; returns the tc commands run."""
        rate, burst, lat = tbf(rate_bps)
        port = f"p{HOSTS.index('server')}"
        cmds = [["ip", "netns", "exec", self.ns["server"], "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                 "rate", rate, "burst", burst, "latency", lat],
                ["ip", "netns", "exec", self.hub, "tc", "qdisc", "replace", "dev", port, "root", "tbf",
                 "rate", rate, "burst", burst, "latency", lat]]
        for c in cmds:
            _ip(*c[1:])
        self.shaped = rate_bps
        return [" ".join(c) for c in cmds]

    def unshape(self) -> None:
        if self.shaped is None:
            return
        port = f"p{HOSTS.index('server')}"
        for c in (["netns", "exec", self.ns["server"], "tc", "qdisc", "del", "dev", "eth0", "root"],
                  ["netns", "exec", self.hub, "tc", "qdisc", "del", "dev", port, "root"]):
            subprocess.run(["ip", *c], capture_output=True, check=False, timeout=30)
        self.shaped = None

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns: {os.strerror(e)}")

    @contextlib.contextmanager
    def enter(self, host: str):
        """This thread, its event loop's new executor threads and its children in ``host``'s namespace."""
        fd = os.open(f"/run/netns/{self.ns[host]}", os.O_RDONLY)
        try:
            self._setns(fd)
        finally:
            os.close(fd)
        loop = None
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
        if loop is not None:
            # Threads keep the namespace they were made in: new ones for this host.
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(thread_name_prefix=host))
        try:
            yield self
        finally:
            self._setns(self._home)
            if loop is not None:
                loop.set_default_executor(concurrent.futures.ThreadPoolExecutor())

    def exec_argv(self, host: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def down(self) -> None:
        self.unshape()
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)
        self.made.clear()

    def gone(self) -> bool:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        return not any(ln.split()[0] in self.ns.values() or ln.split()[0] == self.hub
                       for ln in out.splitlines() if ln.strip())


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()
