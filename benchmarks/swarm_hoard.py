"""N sites hoard the same parcel at once behind one shaped WAN link (issue 12, benchmark).

Topology (network namespaces, all torn down at the end): a hub namespace with a
bridge; the server's namespace joins it through a veth pair shaped with
``tc tbf`` at the WAN rate (100 Mbit/s, both directions); N site namespaces join
it unshaped (the LAN). Each site is its own process running a real libtorrent
:class:`~isrsync.swarm.session.SwarmSession` that fetches every pack of the
parcel whole (``want_all`` at priority 1, the hoard's background priority).

* ``no swarm`` rows: every site reads every pack from the server itself and has
  no peers: N copies cross the WAN link.
* swarm rows: the sites know each other (as discovery would tell them; mDNS is
  not timed here) and each pack has one *leader* (``isrsync.swarm.bulk.leader``
  over random site ids), the only site that reads it from the server; the others
  take its pieces from the LAN as they arrive (and from each other). One copy
  crosses the WAN. This is the mechanism of ``isrsync.swarm.bulk.prefetch`` that
  ``isrsync hoard`` runs (tests/lan/test_jukebox_lan.py runs the real CLI for N = 2).

Both modes fetch the same way: 1 MiB piece-aligned Range GETs handed to libtorrent
with ``SwarmSession.feed`` (``add_piece``), as a hoard's leader does.

Server egress is the byte counter of the server's veth (every byte on the wire,
headers included), read before and after each row; time is from starting the N
site processes to the last one holding every pack verified.

The "server" is a plain aiohttp static file route serving the pack files with
Range (the ranges a leader's Store asks of the home server's
``/v1/parcels/{parcel}/packs/`` route); no auth header, no TLS.

Scaling: the issue asks for a 1 GiB parcel; ``--mib`` (default 128) scales it
down so the no-swarm rows (N copies over 100 Mbit/s) finish on a 2-core box.
One copy takes ``mib * 8.4 / 100`` seconds on the wire at 100 Mbit/s.

Run as root: ``PYTHONPATH=. python benchmarks/swarm_hoard.py [--mib 128] [--packs 8] [--n 1 2 4 8]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SUBNET = "10.232.0"
SERVER_PORT = 8099
BT_PORT = 6900
WAN_BPS = 100_000_000


def _ip(*a: str) -> None:
    subprocess.run(["ip", *a], check=True, capture_output=True, timeout=20)


def tbf(rate_bps: float) -> list[str]:
    # usb_resume.py's shaping: 20 ms of burst, a queue of >= 200 ms.
    burst = max(int(rate_bps / 8 * 0.02), 3200)
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "200ms"]


class Net:
    def __init__(self, sites: int) -> None:
        self.tag = f"hoard{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.hub = f"{self.tag}-hub"
        self.spaces: list[str] = []
        _ip("netns", "add", self.hub)
        self.spaces.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        self.server = self._host(100)
        for cmd in (["ip", "netns", "exec", self.server, "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf(WAN_BPS)],
                    ["ip", "netns", "exec", self.hub, "tc", "qdisc", "replace", "dev", "p100", "root", *tbf(WAN_BPS)]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=20)
        self.sites = [self._host(i + 1) for i in range(sites)]

    def _host(self, n: int) -> str:
        ns = f"{self.tag}-h{n}"
        _ip("netns", "add", ns)
        self.spaces.append(ns)
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{n}", "netns", self.hub)
        _ip("-n", self.hub, "link", "set", f"p{n}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    @staticmethod
    def addr(ns: str) -> str:
        return f"{SUBNET}.{ns.rsplit('-h', 1)[1]}"

    def server_tx(self) -> int:
        out = subprocess.run(["ip", "-n", self.server, "-s", "-j", "link", "show", "eth0"], check=True,
                             capture_output=True, text=True, timeout=20).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def spawn(self, ns: str, *argv: str, **kw) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "ISRSYNC_SWARM": "on"}
        return subprocess.Popen(["ip", "netns", "exec", ns, PY, __file__, *argv], env=env, **kw)

    def close(self) -> None:
        for ns in reversed(self.spaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20, check=False)


# -- the programs run inside the namespaces -------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/packs/", args.dir)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.addr, SERVER_PORT).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def site(args: argparse.Namespace) -> None:
    import aiohttp

    from isrsync.swarm.bulk import LEAD_BLOCK
    from isrsync.swarm.session import SwarmSession, SwarmSettings
    from isrsync.swarm.torrent import load_torrent

    started = time.monotonic()
    packs = {}
    for t in sorted(Path(args.dir).glob("*.torrent")):
        pid = bytes.fromhex(t.stem)
        packs[pid] = load_torrent(pid, t.read_bytes())
    ses = await SwarmSession(Path(args.work), SwarmSettings(interface=args.addr, port=BT_PORT)).start()
    lead = set(args.lead or [])
    for pid, t in packs.items():
        await ses.add(t)
        if pid.hex() not in lead:
            ses.want_all(pid, 1)

    async def feed() -> None:
        async with aiohttp.ClientSession() as http:
            for pid, t in packs.items():
                if pid.hex() not in lead:
                    continue
                for at in range(0, t.size, LEAD_BLOCK):
                    rng = f"bytes={at}-{min(at + LEAD_BLOCK, t.size) - 1}"
                    async with http.get(f"http://{SUBNET}.100:{SERVER_PORT}/packs/{pid.hex()}",
                                        headers={"Range": rng}) as r:
                        ses.feed(pid, at, await r.read())

    feeder = asyncio.create_task(feed())
    todo = set(packs)
    last_connect = 0.0
    while todo:
        if args.peer and time.monotonic() - last_connect > 1.0:
            # Peers start at different times: connect again until every pack is complete
            # (libtorrent ignores a connect to a peer it already has).
            last_connect = time.monotonic()
            for pid in todo:
                for p in args.peer:
                    await ses.connect(pid, p, BT_PORT, attempts=1)
        await asyncio.sleep(0.1)
        todo = {p for p in todo if not await asyncio.to_thread(ses.complete, p)}
    await feeder
    print(json.dumps({"done": time.monotonic() - started}), flush=True)
    # Keep seeding for the others until told to stop.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await ses.close()


# -- the driver ---------------------------------------------------------------------------------


def make_parcel(where: Path, mib: int, packs: int) -> list[str]:
    from isrsync.swarm.torrent import make_torrent_sync

    served, tor = where / "served", where / "torrents"
    served.mkdir()
    tor.mkdir()
    size = mib * (1 << 20) // packs
    ids = []
    for _ in range(packs):
        pid = os.urandom(32)
        path = served / pid.hex()
        with open(path, "wb") as f:
            f.write(os.urandom(size))  # ciphertext: incompressible
        (tor / f"{pid.hex()}.torrent").write_bytes(make_torrent_sync(path, pid).data)
        ids.append(pid.hex())
    return ids


def run_row(net: Net, work: Path, ids: list[str], n: int, swarm: bool, timeout: float) -> tuple[float, int]:
    from isrsync.swarm.bulk import leader

    sites = net.sites[:n]
    site_ids = [uuid.uuid4() for _ in sites]
    before = net.server_tx()
    procs = []
    t0 = time.monotonic()
    for i, ns in enumerate(sites):
        d = work / f"row-{n}-{int(swarm)}-{i}"
        argv = ["site", "--addr", net.addr(ns), "--dir", str(work / "torrents"), "--work", str(d)]
        if swarm:
            argv += [a for pid in ids if leader(bytes.fromhex(pid), site_ids) == site_ids[i] for a in ("--lead", pid)]
            argv += [a for other in sites if other != ns for a in ("--peer", net.addr(other))]
        else:
            argv += [a for pid in ids for a in ("--lead", pid)]
        procs.append(net.spawn(ns, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    ends = []
    try:
        for p in procs:
            line = ""
            while not line.startswith("{"):
                line = p.stdout.readline()
                if not line:
                    raise SystemExit(f"a site ended early (rc {p.wait()})")
                if time.monotonic() - t0 > timeout:
                    raise SystemExit("a site did not finish in time")
            ends.append(time.monotonic() - t0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for i in range(n):
            shutil.rmtree(work / f"row-{n}-{int(swarm)}-{i}", ignore_errors=True)
    return max(ends), net.server_tx() - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve", "site"])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--packs", type=int, default=8)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--addr")
    ap.add_argument("--dir")
    ap.add_argument("--work")
    ap.add_argument("--lead", action="append")
    ap.add_argument("--peer", action="append")
    args = ap.parse_args()
    if args.mode == "serve":
        asyncio.run(serve(args))
        return
    if args.mode == "site":
        asyncio.run(site(args))
        return
    if os.geteuid() != 0:
        raise SystemExit("swarm_hoard.py: needs root (ip netns, tc); run it with sudo")
    work = Path(tempfile.mkdtemp(prefix="swarm-hoard-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    net = Net(max(args.n))
    server = None
    try:
        print(f"making a {args.mib} MiB parcel in {args.packs} packs (the issue's 1 GiB scaled by "
              f"{args.mib / 1024:.3f}) ...", flush=True)
        ids = make_parcel(work, args.mib, args.packs)
        copy = args.mib * (1 << 20)
        server = net.spawn(net.server, "serve", "--addr", f"{SUBNET}.100", "--dir", str(work / "served"),
                           stdout=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the server did not start")
        wire = copy * 8 / WAN_BPS
        print(f"WAN: tbf 100 Mbit/s to the server; one copy is {wire:.1f} s on the wire", flush=True)
        rows = []
        for n in args.n:
            for swarm in (False, True):
                timeout = wire * n * 3 + 60
                secs, egress = run_row(net, work, ids, n, swarm, timeout)
                rows.append((n, swarm, secs, egress))
                print(f"  N={n} {'swarm' if swarm else 'no swarm'}: {secs:.1f} s, server egress "
                      f"{egress / copy:.2f} copies", flush=True)
        print()
        print(f"| N | mode | time s | × time at N=1 | server egress MiB | × one copy ({args.mib} MiB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        base = {s: t for n, s, t, _ in rows if n == args.n[0]}
        for n, swarm, secs, egress in rows:
            print(f"| {n} | {'swarm' if swarm else 'no swarm'} | {secs:.1f} | {secs / base[swarm]:.2f} | "
                  f"{egress / (1 << 20):.1f} | {egress / copy:.2f} |")
        last = [r for r in rows if r[0] == max(args.n) and r[1]]
        if last:
            ratio = last[0][3] / copy
            print(f"\ntarget: swarm egress at N={max(args.n)} <= 1.5 copies: {ratio:.2f} "
                  f"({'met' if ratio <= 1.5 else 'NOT met'})")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        net.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
