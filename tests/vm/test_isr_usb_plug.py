"""A USB key noticed by a running resume (udev), with a real systemd-udevd, real loop
devices holding ext4, and a real guest: a key mounted as a desktop would is indexed and
registered, the resume takes the memory image from it, a second key plugged while the
guest runs is registered live, and a key yanked while in use is withdrawn without a
stall. Fixtures are in tests/vm/conftest.py and tests/media/udevkit.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

# systemd-udevd is one per machine, and a loop device one test plugs is an event for
# every watcher: these tests run on their own, after the parallel part (scripts/test).
pytestmark = pytest.mark.serial


def _load(name: str, path: Path):
    # tests/media is not importable from here (test directories are rootless).
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


udevkit = _load("udevkit", Path(__file__).resolve().parents[1] / "media" / "udevkit.py")
udevd = udevkit.udevd
loops = udevkit.loops


def _sneakernet(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sneakernet.cli", *args], check=True, capture_output=True)


def _media(site) -> dict[str, dict]:
    (run,) = site.json("status")["running"]
    return {s["name"]: s for s in run["sources"] if s["kind"] == "medium"}


def _until(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_plugged_key_is_noticed_used_and_withdrawn_when_yanked(sites, parcel, live_server, loops,
                                                                 tmp_path) -> None:
    a, name = parcel
    key_img = loops.image("travel", medium=False, size_mib=64)
    key = loops.plug_and_settle(key_img)
    at = loops.mount(key)
    _sneakernet("format", str(at), "--label", "travel")
    proc, _, con = a.resume(name, "--watch-media")
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note from-the-key") == "GUEST: OK"
    con.close()
    res = a.json("suspend", name, "--to-usb", str(at))
    assert res["medium"]["published"] is True, res
    a.ended(proc)
    loops.umount(at)
    loops.detach(key)

    # Site B: the key goes in and is mounted (as udisks2 would) before the resume.
    key = loops.plug_and_settle(key_img)
    at = loops.mount(key)
    b = sites("b")
    before = live_server.pack_bytes_sent()
    proc, ev, con = b.resume(name, "--policy", "lookaside", "--watch-media")
    assert con.command("read note") == "GUEST: DATA from-the-key"
    (medium,) = _until("the key to be registered", lambda: _media(b)).values()
    assert medium["bad"] == 0, medium
    served = _until("the key to serve chunks", lambda: [m for m in _media(b).values() if m["hits"] > 20])
    from_server = live_server.pack_bytes_sent() - before
    assert served[0]["bytes"] > from_server, (served, from_server)

    # A second key (formatted elsewhere) plugged while the guest runs is registered live.
    seed = tmp_path / "spare-seed"
    seed.mkdir()
    _sneakernet("format", str(seed), "--label", "spare")
    files = {str(p.relative_to(seed)): p.read_bytes() for p in seed.rglob("*") if p.is_file()}
    other = loops.plug_and_settle(loops.image("spare", medium=False, size_mib=16, files=files))
    other_at = loops.mount(other)
    _until("the second key", lambda: len(_media(b)) == 2)

    # Yanked while in use: withdrawn within seconds, and the guest never stalls.
    loops.umount(other_at)
    loops.yank(other)
    t0 = time.monotonic()
    _until("the yanked key to be withdrawn", lambda: len(_media(b)) == 1, timeout=10)
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    assert con.command("counter").startswith("GUEST: COUNTER ")
    assert time.monotonic() - t0 < 5
    con.close()
    assert b.json("suspend", name)["committed"] is True
    b.ended(proc)
    loops.umount(at)
