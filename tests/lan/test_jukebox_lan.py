"""Issue 12, parts 2 and 4, end to end on a private LAN of network namespaces: a real
`isrsync serve` behind a `tc tbf`-shaped link, real `isrsync jukebox` daemons (real
mDNS, real libtorrent), and a real `isrsync hoard` at a third site, all through the CLI.

Host 1 is the home server; its egress is shaped (a WAN). Hosts 2 and 3 are jukeboxes
whose caches hold the parcel; host 4 is the site that hoards it. The server's access
log counts the pack bytes it sent, so "most bytes came from the LAN" is measured, not
inferred from the site's own statistics.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import accesslog
from lankit import PY, Lan, lan, read_line, usable, wait_line

pytestmark = [pytest.mark.skipif(usable() is not None, reason=usable() or "")]

SERVER, A, B, C = 0, 1, 2, 3
IMAGE = 12 << 20
WAN = "40mbit"


@dataclass
class World:
    lan: Lan
    ns: list[str]
    root: Path
    url: str
    log: Path
    sockets: Path  # short: an AF_UNIX path holds 107 bytes, and tmp_path under xdist is deep

    def addr(self, i: int) -> str:
        return self.lan.hosts[self.ns[i]]

    def env(self, i: int, **extra: str) -> dict[str, str]:
        d = self.root / f"site{i}"
        d.mkdir(exist_ok=True)
        return {"ISRSYNC_CACHE": str(d / "cache"), "ISRSYNC_CONFIG": str(d / "config.json"),
                "ISRSYNC_RUNTIME": str(self.sockets / f"run{i}"), "ISRSYNC_PASSPHRASE": "correct horse battery",
                "ISRSYNC_SWARM": "on", **extra}

    def isr(self, i: int, *args: str, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess[str]:
        r = self.lan.run(self.ns[i], PY, "-m", "isrsync.cli.main", *args, env=self.env(i, **extra), timeout=timeout)
        assert r.returncode == 0, f"isrsync {' '.join(args)}: {r.stderr[-3000:]}"
        return r

    def jukebox(self, i: int, *args: str) -> subprocess.Popen[str]:
        return self.lan.spawn(self.ns[i], PY, "-m", "isrsync.cli.main", "jukebox", "--json", "--round", "1",
                              "--interface", self.addr(i), *args, env=self.env(i), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)

    def pack_bytes_sent(self) -> int:
        return accesslog.pack_bytes_sent(self.log)

    def peers(self, i: int, wait: float = 2.5) -> list[dict[str, object]]:
        r = self.isr(i, "peers", "--json", "--wait", str(wait), "--interface", self.addr(i))
        return json.loads(r.stdout)


def _event(p: subprocess.Popen[str], kind: str, timeout: float = 60, pred=lambda e: True) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = read_line(p, deadline)
        if line is None:
            break
        if not line:
            raise AssertionError(f"the jukebox ended (rc {p.wait(30)}) before a {kind!r} event")
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == kind and pred(ev):
            return ev
    raise AssertionError(f"no {kind!r} event within {timeout} s")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with lan(4) as net:
        ns = list(net.hosts)
        # The WAN: the server's egress is a token bucket (no netem here).
        subprocess.run(["ip", "netns", "exec", ns[SERVER], "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                        "rate", WAN, "burst", "64kb", "latency", "100ms"], check=True, capture_output=True)
        data, log = tmp_path / "server-data", tmp_path / "server.log"
        errf = open(log, "ab")
        srv = net.spawn(ns[SERVER], PY, "-m", "isrsync.cli.main", "serve", "--data", str(data), "--listen",
                        f"{net.hosts[ns[SERVER]]}:0", stdout=subprocess.PIPE, stderr=errf)
        errf.close()
        url = json.loads(wait_line(srv, "{", 30))["listening"]
        w = World(net, ns, tmp_path, url, log, Path(tempfile.mkdtemp(prefix="isr-lan-")))
        try:
            from isrsync.server.repo import Repository

            repo = Repository(data)
            try:
                token = repo.add_user("alice")
            finally:
                repo.close()
            for i in (A, B, C):
                w.isr(i, "login", url, "--user", "alice", "--token", token, "--kdf-min", "--insecure")
            yield w
        finally:
            shutil.rmtree(w.sockets, ignore_errors=True)


def _stop(p: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int | None:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


def test_hoard_takes_most_bytes_from_two_jukeboxes(world: World) -> None:
    w = world
    image = w.root / "disk.raw"
    image.write_bytes(os.urandom(IMAGE))  # incompressible: the packs are the image's size
    w.isr(A, "init", "vm", "--image", str(image), ISRSYNC_SWARM="off")
    w.isr(B, "hoard", "vm", ISRSYNC_SWARM="off")
    w.isr(A, "hoard", "vm", ISRSYNC_SWARM="off")  # whatever init did not leave in A's cache
    boxes = [w.jukebox(A), w.jukebox(B)]
    try:
        for box in boxes:
            _event(box, "announcing")
            # Seeding means: the packs are laid out and checked, and whole (filled if need be).
            _event(box, "state", 90, lambda e: int(e["packs"]) > 0 and e["complete"] == e["packs"])
        before = w.pack_bytes_sent()
        t0 = time.monotonic()
        r = w.isr(C, "hoard", "vm", "--json")
        took = time.monotonic() - t0
        sent = w.pack_bytes_sent() - before
        out = json.loads(r.stdout)
        print(f"hoard at C: {took:.1f} s, server sent {sent} pack bytes for a {IMAGE}-byte image; {out}")
        lan_hits = sum(int(s.get("bytes") or 0) for s in out.get("sources", []) if s.get("name") == "lan")
        assert lan_hits > IMAGE // 2, out
        assert sent < IMAGE // 4, f"the server sent {sent} bytes of a {IMAGE}-byte parcel"
        # The same hoard out of the swarm (--no-swarm), into a fresh cache at the same host: all from the server.
        before = w.pack_bytes_sent()
        t0 = time.monotonic()
        w.isr(C, "--no-swarm", "--cache-dir", str(w.root / "site-c2"), "hoard", "vm", "--json")
        alone, alone_s = w.pack_bytes_sent() - before, time.monotonic() - t0
        print(f"hoard at C without the swarm: {alone_s:.1f} s, server sent {alone} pack bytes")
        assert alone > IMAGE * 0.9
    finally:
        for box in boxes:
            _stop(box)


def test_two_sites_hoarding_at_once_take_one_copy_from_the_server(world: World) -> None:
    """B and C hoard the parcel at the same time, with no jukebox around: each pack has one
    leader that reads it from the server, the other takes it from the leader
    over the LAN (isrsync/swarm/bulk.py). The server's access log is the judge."""
    w = world
    image = w.root / "disk.raw"
    image.write_bytes(os.urandom(IMAGE))
    w.isr(A, "init", "vm", "--image", str(image), ISRSYNC_SWARM="off")
    before = w.pack_bytes_sent()
    t0 = time.monotonic()
    hoards = [w.lan.spawn(w.ns[i], PY, "-m", "isrsync.cli.main", "hoard", "vm", "--json", env=w.env(i),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (B, C)]
    outs = []
    for h in hoards:
        out, err = h.communicate(timeout=240)
        assert h.returncode == 0, err[-3000:]
        outs.append(json.loads(out))
    took = time.monotonic() - t0
    sent = w.pack_bytes_sent() - before
    print(f"B and C hoarding at once: {took:.1f} s, server sent {sent} pack bytes for a {IMAGE}-byte image")
    assert all(o["chunks"] > 0 for o in outs), outs
    assert sent < IMAGE * 1.5, f"the server sent {sent / IMAGE:.2f} copies of the parcel to two sites"
    # Both caches hold the whole parcel: a hoard out of the swarm now fetches nothing.
    for i in (B, C):
        r = w.isr(i, "--no-swarm", "hoard", "vm", "--json")
        assert json.loads(r.stdout)["fetched"] == 0, r.stdout


def test_peers_see_a_jukebox_start_and_go(world: World) -> None:
    w = world
    box = w.jukebox(A)
    killed = w.jukebox(B)
    try:
        _event(box, "announcing")
        _event(killed, "announcing")
        t0 = time.monotonic()
        rows = w.peers(C)
        assert {r["address"] for r in rows} == {w.addr(A), w.addr(B)}, rows
        assert time.monotonic() - t0 < 10
        # SIGTERM: a clean stop says goodbye, and the jukebox exits 0.
        assert _stop(box) == 0
        # SIGKILL: no goodbye; the liveness probe drops it.
        killed.kill()
        killed.wait()
        t0 = time.monotonic()
        while True:
            rows = w.peers(C, wait=4.0)
            if not rows or time.monotonic() - t0 > 20:
                break
        assert rows == [], rows
        assert time.monotonic() - t0 < 20
    finally:
        _stop(box)
        _stop(killed)


def test_no_lan_means_one_warning_and_the_server_alone(tmp_path: Path) -> None:
    """A host with no LAN address (a namespace with loopback only): the swarm cannot start;
    the hoard says so in one line and fetches everything from the server."""
    ns = f"jbx-solo{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, capture_output=True)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        data, log = tmp_path / "data", tmp_path / "server.log"
        with open(log, "ab") as errf:
            srv = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "isrsync.cli.main", "serve", "--data",
                                    str(data), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=errf,
                                   env=env, text=True)
        try:
            url = json.loads(wait_line(srv, "{", 30))["listening"]
            from isrsync.server.repo import Repository

            repo = Repository(data)
            try:
                token = repo.add_user("alice")
            finally:
                repo.close()

            def isr(site: str, *args: str, swarm: str = "on") -> subprocess.CompletedProcess[str]:
                e = {**env, "ISRSYNC_CACHE": str(tmp_path / site / "cache"),
                     "ISRSYNC_CONFIG": str(tmp_path / site / "config.json"), "ISRSYNC_RUNTIME": str(tmp_path / site),
                     "ISRSYNC_PASSPHRASE": "correct horse battery", "ISRSYNC_SWARM": swarm}
                r = subprocess.run(["ip", "netns", "exec", ns, PY, "-m", "isrsync.cli.main", *args], env=e,
                                   capture_output=True, text=True, timeout=240)
                assert r.returncode == 0, r.stderr
                return r

            image = tmp_path / "disk.raw"
            image.write_bytes(os.urandom(4 << 20))
            for site in ("a", "b"):
                isr(site, "login", url, "--user", "alice", "--token", token, "--kdf-min", swarm="off")
            isr("a", "init", "vm", "--image", str(image), swarm="off")
            r = isr("b", "hoard", "vm", "--json")
            warn = [ln for ln in r.stderr.splitlines() if "LAN swarm is off" in ln]
            assert len(warn) == 1, r.stderr
            assert "Traceback" not in r.stderr
            out = json.loads(r.stdout)
            assert out["fetched"] == out["chunks"] > 0
            assert [s["name"] for s in out["sources"]] == ["server"], out
        finally:
            srv.kill()
            srv.wait()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _guest(request: pytest.FixtureRequest):  # the tests/vm guest, from the same caches
    from isrsync.demo.guest import build_guest

    env = os.environ.get("ISRSYNC_TEST_GUEST_CACHE")
    cache = Path(env) if env else request.config.cache.mkdir("isrsync-guest")
    return build_guest(cache)


def test_a_real_guest_resumes_beside_a_jukebox_and_reads_its_disk_from_the_lan(
        world: World, request: pytest.FixtureRequest) -> None:
    """The strongest case: a real resume (QEMU, TCG) at C, with a jukebox at A on the LAN.
    The guest boots from chunks its resume reads on demand; the LAN peer source joins the
    running resume when discovery finds A, and serves what the server would have."""
    import socket as sk

    from isrsync.demo.guest import make_disk_image

    w = world
    guest = _guest(request)
    img = w.root / "disk.img"
    make_disk_image(img, 64, {"hello.txt": b"made at init"})
    w.isr(A, "init", "vm", "--image", str(img), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline, ISRSYNC_SWARM="off")
    w.isr(A, "hoard", "vm", ISRSYNC_SWARM="off")
    box = w.jukebox(A)
    serial = w.sockets / "c-ser.sock"
    errlog = w.root / "c-resume.err"
    resume = None
    try:
        st = _event(box, "state", 90, lambda e: int(e["packs"]) > 0)
        print(f"jukebox A: {st}")
        before = w.pack_bytes_sent()
        with errlog.open("w") as errf:
            resume = w.lan.spawn(w.ns[C], PY, "-m", "isrsync.cli.main", "resume", "vm", "--json", "--serial",
                                 str(serial), env=w.env(C), stdout=subprocess.PIPE, stderr=errf)
        events: list[dict[str, object]] = []
        until = time.monotonic() + 240
        while not any(e.get("event") == "resumed" for e in events):
            line = read_line(resume, until)
            assert line is not None, f"no resumed event within 240 s: {events}"
            assert line, f"the resume ended (rc {resume.wait(30)}): {events} {errlog.read_text()[-2000:]}"
            events.append(json.loads(line))
        con = sk.socket(sk.AF_UNIX)
        con.connect(str(serial))
        con.settimeout(5)
        seen, deadline = b"", time.monotonic() + 240
        while b"GUEST: READY" not in seen and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                seen += con.recv(65536)
        assert b"GUEST: READY" in seen, seen[-2000:]

        def command(line: str) -> str:
            con.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                while con.recv(65536):  # drain what came before
                    pass
            con.settimeout(5)
            con.sendall(line.encode() + b"\n")
            buf, end = b"", time.monotonic() + 60
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    buf += con.recv(65536)
                for ln in buf.split(b"\n")[:-1]:
                    if b"GUEST: " in ln:
                        text = ln.decode(errors="replace").rstrip("\r")
                        return text[text.index("GUEST: "):]
            return buf.decode(errors="replace")

        assert command("write note kept-through-eviction") == "GUEST: OK"
        time.sleep(1.0)
        (run,) = json.loads(w.isr(C, "status", "--json").stdout)["running"]
        src = {s["name"]: s for s in run["sources"]}
        sent = w.pack_bytes_sent() - before
        print(f"resume at C: LAN {src.get('lan')}, server {src.get('server')}, server sent {sent} pack bytes")
        assert "lan" in src and src["lan"]["hits"] > 0 and src["lan"]["bad"] == 0, src
        assert src["lan"]["bytes"] > 4 * sent, (src, sent)
        # The guest's demand misses went the direct path (the jukebox's cache, by tag).
        st = _event(box, "state", 30, lambda e: int(e["direct_chunks"]) > 0)
        print(f"jukebox A after the resume: {st}")
        # A cache limit far below what C holds: everything goes but the running parcel's
        # own state (the guest's note, not committed yet).
        limited = w.lan.spawn(w.ns[C], PY, "-m", "isrsync.cli.main", "jukebox", "--json", "--round", "1",
                              "--cache-limit", "1K", "--interface", w.addr(C), env=w.env(C),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ev = _event(limited, "evicted", 60)
        except AssertionError:
            _stop(limited)
            assert limited.stderr is not None
            raise AssertionError(limited.stderr.read()[-3000:]) from None
        finally:
            _stop(limited)
        print(f"eviction at C beside the running guest: {ev}")
        assert int(ev["chunks"]) > 50 and int(ev["protected_bytes"]) > 0, ev
        assert command("read note") == "GUEST: DATA kept-through-eviction"
        assert command("read hello.txt") == "GUEST: DATA made at init"  # evicted: fetched again
        con.close()
        res = json.loads(w.isr(C, "suspend", "vm", "--json").stdout)
        assert res["committed"] is True, res
        assert resume.wait(timeout=120) == 0
    finally:
        if resume is not None and resume.poll() is None:
            resume.kill()
            resume.wait()
        _stop(box)


# A direct-path client run in another namespace: asks host:port for the given chunks.
_DIRECT_CLIENT = r"""
import asyncio, json, sys
from isrsync.swarm.direct import DirectClient, DirectError
from isrsync.swarm.directfmt import Want

async def main(host, port, asked):
    # The pack location is only a hint: a jukebox answers from its cache by tag.
    wants = [Want(bytes.fromhex(t), bytes(32), 0, n) for t, n in json.loads(asked)]
    client = DirectClient(connect_timeout=3, stall=5)
    try:
        got = await client.fetch(host, int(port), wants)
        print(json.dumps({"good": sorted(t.hex() for t in got.good), "bad": len(got.bad)}))
    except DirectError as e:
        print(json.dumps({"error": str(e)}))
    finally:
        await client.close()

asyncio.run(main(*sys.argv[1:]))
"""


def test_a_jukebox_answers_chunks_by_tag_on_its_announced_direct_port(world: World) -> None:
    """Issue 12, part 5: the direct path of a real `isrsync jukebox`, announced in its TXT
    record, bound on its LAN address (not loopback), answering from its site cache."""
    w = world
    image = w.root / "disk.raw"
    image.write_bytes(os.urandom(4 << 20))
    w.isr(A, "init", "vm", "--image", str(image), ISRSYNC_SWARM="off")
    w.isr(A, "hoard", "vm", ISRSYNC_SWARM="off")
    from isrsync.site.cache import SiteCache

    cache = SiteCache(w.root / f"site{A}" / "cache")
    try:
        tags = cache.tags()[:20]
        asked = json.dumps([(t.hex(), len(cache.get(t) or b"")) for t in tags])
    finally:
        cache.close()
    assert len(tags) == 20
    box = w.jukebox(A)
    try:
        port = int(_event(box, "announcing")["direct_port"])
        rows = w.peers(C)
        assert [r["direct_port"] for r in rows if r["address"] == w.addr(A)] == [port], rows

        r = w.lan.run(w.ns[C], PY, "-c", _DIRECT_CLIENT, w.addr(A), str(port), asked, timeout=60)
        got = json.loads(r.stdout)
        assert got == {"good": sorted(t.hex() for t in tags), "bad": 0}, (got, r.stderr[-2000:])
        # Bound on the address it announces: nothing listens on the jukebox's loopback.
        r = w.lan.run(w.ns[A], PY, "-c", _DIRECT_CLIENT, "127.0.0.1", str(port), asked, timeout=60)
        assert "error" in json.loads(r.stdout), r.stdout
    finally:
        _stop(box)
