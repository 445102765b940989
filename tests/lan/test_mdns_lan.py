"""Real mDNS between network namespaces: `isrsync peers` sees sites come, go and die.

One private LAN (a bridge in its own namespace, 10.231.0.0/24) serves the whole
module: h1 is the observer that runs `isrsync peers`, the others play sites.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lankit import PY, Lan, lan, usable, wait_line

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")

OBS, A, B, C = (f"h{i}" for i in range(1, 5))
WAIT = 2.0  # the browse window given to `isrsync peers`


class Net:
    def __init__(self, lan_: Lan, cache: Path) -> None:
        self.lan = lan_
        self.ns = {f"h{i}": ns for i, ns in enumerate(lan_.hosts, 1)}
        self.cache = cache

    def addr(self, h: str) -> str:
        return self.lan.hosts[self.ns[h]]

    def peers(self, *extra: str) -> tuple[list[dict], float]:
        start = time.monotonic()
        r = self.lan.run(self.ns[OBS], PY, "-m", "isrsync.cli.main", "peers", "--json", "--wait", str(WAIT),
                         "--interface", self.addr(OBS), *extra, env={"ISRSYNC_CACHE": str(self.cache)})
        took = time.monotonic() - start
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout), took

    def site(self, h: str, *args: str) -> subprocess.Popen[str]:
        return self.lan.kit(self.ns[h], "site", "--addr", self.addr(h), *args)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    cache = tmp_path_factory.mktemp("observer-cache")
    with lan(4) as lan_:
        yield Net(lan_, cache)


def _stop(p: subprocess.Popen[str], sig: signal.Signals) -> None:
    # `ip netns exec` execs the program, so the pid is the site's own.
    if p.poll() is None:
        p.send_signal(sig)
    p.wait(timeout=10)


def _event(watcher: subprocess.Popen[str], change: str, name: str, timeout: float) -> dict:
    """The watcher's first ``change`` event for ``name``. Events read while looking for
    another one are kept: two sites may come up in either order."""
    seen: list[dict] = watcher.__dict__.setdefault("isrsync_seen", [])
    deadline = time.monotonic() + timeout
    while True:
        for ev in seen:
            if ev["change"] == change and ev["name"] == name:
                seen.remove(ev)
                return ev
        seen.append(json.loads(wait_line(watcher, "{", max(0.0, deadline - time.monotonic()))))


def test_no_peers_answers_quickly_with_an_empty_list(net: Net) -> None:
    rows, took = net.peers()
    assert rows == []
    assert took < WAIT + 3, took


def test_peers_appear_say_goodbye_and_die(net: Net) -> None:
    shared = uuid.uuid4()
    (net.cache / "parcels" / str(shared)).mkdir(parents=True)
    watcher = net.lan.kit(net.ns[OBS], "watch", "--addr", net.addr(OBS))
    wait_line(watcher, "ready")
    t0 = time.time()
    a = net.site(A, "--name", "site-a", "--cached", "12345", "--parcel", str(shared), "--parcel", str(uuid.uuid4()))
    b = net.site(B, "--name", "site-b", "--cached", "7")
    try:
        a_port = int(wait_line(a, "ready").split()[1])
        wait_line(b, "ready")
        up_a = _event(watcher, "up", "site-a", 10)
        _event(watcher, "up", "site-b", 10)
        appear = up_a["t"] - t0

        rows, _ = net.peers()
        by_name = {r["name"]: r for r in rows}
        assert set(by_name) == {"site-a", "site-b"}, rows
        ra = by_name["site-a"]
        assert (ra["address"], ra["port"], ra["cached_bytes"]) == (net.addr(A), a_port, 12345)
        assert ra["parcels_in_common"] == 1 and by_name["site-b"]["parcels_in_common"] == 0
        assert ra["rtt_ms"] is not None and 0 < ra["rtt_ms"] < 100
        assert time.time() - ra["last_seen"] < 5

        t1 = time.time()
        _stop(a, signal.SIGTERM)  # goodbye packets
        goodbye = _event(watcher, "down", "site-a", 5)["t"] - t1
        t2 = time.time()
        _stop(b, signal.SIGKILL)  # no goodbye: only the liveness probe notices
        killed = _event(watcher, "down", "site-b", 8)["t"] - t2

        rows, _ = net.peers()
        assert rows == []
        print(f"\nmDNS: appear {appear:.2f} s after start, goodbye drop {goodbye:.3f} s, "
              f"kill drop {killed:.2f} s, rtt {ra['rtt_ms']:.3f} ms")
        assert appear < 8 and goodbye < 3 and killed < 6
    finally:
        for p in (a, b, watcher):
            if p.poll() is None:
                p.kill()


def test_hostile_records_are_ignored(net: Net) -> None:
    bad = net.lan.kit(net.ns[C], "hostile", "--addr", net.addr(C))
    good = net.site(B, "--name", "[bold]good[/bold]")
    try:
        wait_line(bad, "ready")
        wait_line(good, "ready")
        rows, _ = net.peers()
        assert [r["name"] for r in rows] == ["[bold]good[/bold]"], rows
        # The human table shows the name as given (never as markup) and does not crash.
        r = net.lan.run(net.ns[OBS], PY, "-m", "isrsync.cli.main", "peers", "--wait", str(WAIT),
                        "--interface", net.addr(OBS), env={"ISRSYNC_CACHE": str(net.cache), "COLUMNS": "200"})
        assert r.returncode == 0 and "[bold]good[/bold]" in r.stdout, r.stdout + r.stderr
    finally:
        _stop(good, signal.SIGTERM)
        _stop(bad, signal.SIGTERM)


def test_the_record_reveals_no_parcel_or_user_name(net: Net) -> None:
    parcel = uuid.uuid4()
    secrets_ = ["golden-image-parcel", "alice"]  # a parcel name and a user name the site knows
    p = net.lan.kit(net.ns[A], "site", "--addr", net.addr(A), "--name", "lab-3", "--parcel", str(parcel),
                    env={"USER": "alice", "ISRSYNC_PARCEL_NAME": "golden-image-parcel"})
    try:
        wait_line(p, "ready")
        r = net.lan.run(net.ns[OBS], PY, str(Path(__file__).with_name("lankit.py")), "dump", "--addr",
                        net.addr(OBS), "--wait", "1.5")
        records = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(records) == 1, r.stdout + r.stderr
        raw = bytes.fromhex(records[0]["txt"])
        assert b"lab-3" in raw  # the dump really is the record
        for needle in [*(s.encode() for s in secrets_), str(parcel).encode(), parcel.hex.encode(), parcel.bytes]:
            assert needle not in raw and needle.lower() not in raw.lower()
    finally:
        _stop(p, signal.SIGTERM)


def _exit_while_draining(pid: int, fd: int, timeout: float) -> int:
    """Wait, bounded, for the child on the pty to exit, reading its output meanwhile: a
    terminal nobody reads fills up, and the watcher's redraw would block in write()."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        assert time.monotonic() < deadline, f"`isrsync peers --watch` did not exit within {timeout} s of Ctrl-C"
        if select.select([fd], [], [], 0.2)[0]:
            try:
                os.read(fd, 65536)
            except OSError:
                pass


def test_watch_redraws_live_on_a_terminal(net: Net) -> None:
    site = net.site(B, "--name", "watched-site")
    pid, fd = pty.fork()
    if pid == 0:  # the child: `isrsync peers --watch` on the pty
        # As a user's shell would have it. A suite started in the background inherits
        # SIGINT ignored (shells do that to background jobs); exec keeps it ignored,
        # and Ctrl-C would then never reach the watcher: the hang this test once had.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ.update(PYTHONPATH=str(Path(__file__).resolve().parents[2]), ISRSYNC_CACHE=str(net.cache),
                          COLUMNS="160", LINES="30", TERM="xterm")
        os.execvp("ip", ["ip", "netns", "exec", net.ns[OBS], PY, "-m", "isrsync.cli.main", "peers", "--watch",
                         "--interface", net.addr(OBS)])
    screen = b""
    try:
        wait_line(site, "ready")
        deadline = time.monotonic() + 10
        while b"watched-site" not in screen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
        assert b"watched-site" in screen, screen[-2000:]
        assert b"isrsync sites on this LAN: 1" in screen
        os.kill(pid, signal.SIGINT)
        status = _exit_while_draining(pid, fd, timeout=15)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
        _stop(site, signal.SIGTERM)
