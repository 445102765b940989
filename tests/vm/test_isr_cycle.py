"""The whole ISR cycle through the real CLI: a real home server on loopback, two
sites (two caches, two configs), a real guest under QEMU, its memory and disk
moving from site A to site B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from isrsync.vm.guest import make_disk_image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SerialConsole  # noqa: E402

TESTS = Path(__file__).parent.parent


def _cmd() -> list[str]:
    exe = Path(sys.executable).parent / "isrsync"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "isrsync.cli.main"]


class SiteEnv:
    """One site: its own cache, config and runtime dir, logged in as alice."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        # Runtime dirs hold unix sockets: keep their paths short.
        self.runtime = Path(f"/tmp/isr-{os.getpid()}-{name}-{int(time.time() * 1000) % 100000}")
        self.runtime.mkdir(mode=0o700)
        self.env = {
            **os.environ,
            "ISRSYNC_CACHE": str(self.dir / "cache"),
            "ISRSYNC_CONFIG": str(self.dir / "config.json"),
            "ISRSYNC_RUNTIME": str(self.runtime),
            "ISRSYNC_PASSPHRASE": "correct horse battery",
        }
        self.procs: list[subprocess.Popen] = []

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([*_cmd(), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"isrsync {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r

    def resume(self, parcel: str, *extra: str) -> tuple[subprocess.Popen, dict[str, Any], SerialConsole]:
        serial = self.runtime / "ser.sock"
        p = subprocess.Popen(
            [*_cmd(), "resume", parcel, "--json", "--serial", str(serial), *extra],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(p)
        assert p.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                raise AssertionError(f"resume exited ({p.wait()}): {p.stderr.read()[-2000:]}")
            ev = json.loads(line)
            if ev["event"] == "resumed":
                return p, ev, SerialConsole(serial)
        raise AssertionError("resume did not finish in time")

    def ended(self, p: subprocess.Popen, timeout: float = 120) -> dict[str, Any]:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-2000:]
        return json.loads(out.strip().splitlines()[-1])

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["rm", "-rf", str(self.runtime)], check=False)


@pytest.fixture
def sites(tmp_path: Path, live_server):
    token = live_server.add_user("alice")
    made: list[SiteEnv] = []

    def make(name: str) -> SiteEnv:
        s = SiteEnv(tmp_path, name)
        made.append(s)
        s.run("login", live_server.url, "--user", "alice", "--token", token, "--kdf-min")
        return s

    yield make
    for s in made:
        s.cleanup()


@pytest.fixture
def parcel(sites, guest, tmp_path: Path) -> tuple[Any, str]:
    a = sites("a")
    img = tmp_path / "disk.img"
    make_disk_image(img, 64, {"hello.txt": b"made at init"})
    a.run("init", "vm", "--image", str(img), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline)
    return a, "vm"


def test_memory_and_disk_move_from_site_a_to_site_b(sites, parcel) -> None:
    a, name = parcel
    proc_a, ev, con = a.resume(name)
    assert ev["cold_boot"] is True and ev["version"] == 1
    con.wait_for("GUEST: READY", 120)
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    assert con.command("write note written-at-a") == "GUEST: OK"
    time.sleep(1.0)
    c1 = int(con.command("counter").split()[-1])
    assert c1 > 0
    con.close()
    res = json.loads(a.run("suspend", name, "--json").stdout)
    assert res["committed"] is True and res["version"] == 2
    assert a.ended(proc_a)["how"] == "suspended"

    b = sites("b")  # empty cache: everything comes from the home server
    proc_b, ev, con = b.resume(name)
    assert ev["cold_boot"] is False and ev["version"] == 2
    c2 = int(con.command("counter").split()[-1])
    # Memory came along: the counter continues from where it was, not from 0.
    assert c1 <= c2 < c1 + 50, (c1, c2)
    assert con.command("read note") == "GUEST: DATA written-at-a"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"

    # While B runs, A cannot resume: refused with where and since when.
    r = a.run("resume", name, check=False, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "in use on" in r.stderr and "Traceback" not in r.stderr

    status = json.loads(b.run("status", "--json").stdout)
    (run,) = status["running"]
    assert run["sources"]["server"]["hits"] > 0  # B's cache started empty
    con.close()
    res = json.loads(b.run("suspend", "--json").stdout)
    assert res["committed"] is True and res["version"] == 3
    assert b.ended(proc_b)["how"] == "suspended"
    listing = json.loads(a.run("ls", "--json").stdout)
    assert listing[0]["version"] == 3 and listing[0]["holder"] is None
