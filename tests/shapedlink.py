"""A shaped link for tests and benchmarks: a network namespace, a veth pair into it,
`tc tbf` on both ends, and `isrsync serve` started inside the namespace.

Used by tests over slow links (tests/sources/test_slow_link.py) and by the
benchmarks that measure them (benchmarks/usb_resume.py, benchmarks/slow_links.py).
Needs root. Everything made is removed by :meth:`Link.down` (and the server by
its ``kill``), on error too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable


def _root_conftest():
    """tests/conftest.py as a module: under pytest the name ``conftest`` may be a
    subdirectory's (tests/ is rootless), so it is loaded by its path."""
    path = Path(__file__).resolve().parent / "conftest.py"
    for mod in list(sys.modules.values()):
        if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("isrsync_tests_conftest", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_conftest = _root_conftest()
LiveServer = _conftest.LiveServer
isrsync_cmd = _conftest.isrsync_cmd


class Link:
    """A network namespace holding the server, a veth pair to it, tbf on both ends."""

    def __init__(self, say: Callable[[str], None] = lambda s: None, prefix: str = "isrsync-link",
                 octet: int = 213) -> None:
        n = os.getpid() % 100000
        self.ns = f"{prefix}-{n}"
        tag = prefix.rsplit("-", 1)[-1][:2]
        self.host_if, self.ns_if = f"is{tag}{n}h", f"is{tag}{n}n"
        o = 16 + n % 200
        self.host_ip, self.ns_ip = f"10.{octet}.{o}.1", f"10.{octet}.{o}.2"
        self.say = say
        self.made = False
        self.shaped: float | None = None

    @staticmethod
    def _ip(*a: str) -> None:
        r = subprocess.run(list(a), capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(a)} failed: {r.stderr.strip()}")

    def up(self) -> None:
        self.made = True
        ip = self._ip
        ip("ip", "netns", "add", self.ns)
        ip("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        ip("ip", "link", "set", self.ns_if, "netns", self.ns)
        ip("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        ip("ip", "link", "set", self.host_if, "up")
        ip("ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        ip("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        ip("ip", "-n", self.ns, "link", "set", "lo", "up")
        self.say(f"link: namespace {self.ns}, veth {self.host_if} ({self.host_ip}) <-> {self.ns_if} ({self.ns_ip})")

    @staticmethod
    def tbf(rate_bps: float) -> tuple[str, str, str]:
        """rate, burst, latency for tc tbf: burst 20 ms of traffic (>= 2 full frames), a queue of
        >= 200 ms or 20 full frames (a shorter one drops most packets at 100 Kb/s)."""
        burst = max(int(rate_bps / 8 * 0.02), 3200)
        lat_ms = max(200, int(20 * 1514 * 8 / rate_bps * 1000))
        return f"{int(rate_bps)}bit", str(burst), f"{lat_ms}ms"

    def shape(self, rate_bps: float) -> list[str]:
        """Shape both ends to ``rate_bps``; returns the tc commands run."""
        rate, burst, lat = self.tbf(rate_bps)
        cmds = [["tc", "qdisc", "replace", "dev", self.host_if, "root", "tbf", "rate", rate, "burst", burst,
                 "latency", lat],
                ["ip", "netns", "exec", self.ns, "tc", "qdisc", "replace", "dev", self.ns_if, "root", "tbf", "rate",
                 rate, "burst", burst, "latency", lat]]
        for c in cmds:
            self._ip(*c)
        self.shaped = rate
        return [" ".join(c) for c in cmds]

    def unshape(self) -> None:
        if self.shaped is None:
            return
        for c in (["tc", "qdisc", "del", "dev", self.host_if, "root"],
                  ["ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev", self.ns_if, "root"]):
            subprocess.run(c, capture_output=True, check=False)
        self.shaped = None

    def down(self) -> None:
        if not self.made:
            return
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)  # takes its peer along
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)
        self.made = False


class NsServer(LiveServer):
    """tests/conftest.py's LiveServer, started inside the namespace on its veth address."""

    def start_in(self, link: Link, timeout: float = 30.0) -> NsServer:
        self.log = self.data.parent / f"{self.data.name}-server.log"
        with open(self.log, "ab") as errf:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", link.ns, *isrsync_cmd(), "serve", "--data", str(self.data),
                 "--listen", f"{link.ns_ip}:0"],
                stdout=subprocess.PIPE, stderr=errf, start_new_session=True,
            )
        self.url = _conftest.listening_url(self.proc, self.log, timeout, self.kill)
        return self
