"""A parcel whose disk is big enough for its keyring to be held as segments (issue 15,
part 3): made at site A, resumed at site B with an empty cache. B starts on the
manifests and the segments its guest touches; the rest of the keyring follows
while the guest runs; memory and disk arrive intact, and B commits on top."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from isrsync.demo.guest import make_disk_image

DISK_MIB = 1024  # four keyring segments of 252 MiB; ext4 spreads its metadata over all of them


def test_a_segmented_keyring_resumes_lazily_and_commits(sites, guest, tmp_path) -> None:
    a = sites("a")
    img = tmp_path / "big.img"
    make_disk_image(img, DISK_MIB, {"hello.txt": b"made at init"})
    a.run("init", "vm", "--image", str(img), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline, timeout=600)
    img.unlink()

    proc_a, ev, con = a.resume("vm")
    con.wait_for("GUEST: READY", 120)
    assert con.command("fill big 8", timeout=120) == "GUEST: OK"
    sha = con.command("sha big")
    assert sha.startswith("GUEST: SHA ")
    time.sleep(1.0)
    c1 = int(con.command("counter").split()[-1])
    con.close()
    res = json.loads(a.run("suspend", "vm", "--json").stdout)
    assert res["committed"] is True and res["version"] == 2
    a.ended(proc_a)

    b = sites("b")  # an empty cache: the keyring segments come from the server, as needed
    proc_b, ev, con = b.resume("vm")
    assert ev["version"] == 2 and ev["cold_boot"] is False
    # Running before the whole keyring was in: the report says when it completed, later.
    assert "keyring_complete" not in ev["seconds"]
    c2 = int(con.command("counter").split()[-1])
    assert c1 <= c2 < c1 + 50, (c1, c2)  # the guest's memory came along
    assert con.command("sha big") == sha  # its disk too: entries from delta, trace and segments
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    deadline = time.monotonic() + 120
    while (e := proc_b.next_event(deadline)) is not None and e["event"] != "keyring":
        pass
    assert e is not None and e["seconds"] >= ev["seconds"]["total"], e
    status = json.loads(b.run("status", "--json").stdout)
    (run,) = status["running"]
    assert run["report"]["seconds"]["keyring_complete"] == pytest.approx(e["seconds"], abs=0.01)
    assert con.command("write note at-b") == "GUEST: OK"
    con.close()
    res = json.loads(b.run("suspend", "--json").stdout)
    assert res["committed"] is True and res["version"] == 3
    b.ended(proc_b)

    # A third site reads version 3 (a delta over the segments of version 1) intact.
    c = sites("c")
    proc_c, ev, con = c.resume("vm")
    assert con.command("read note") == "GUEST: DATA at-b" and con.command("sha big") == sha
    con.close()
    c.run("suspend", "--json")
    c.ended(proc_c)


def test_a_carried_medium_holds_the_segments_for_an_offline_resume(sites, guest, live_server, tmp_path) -> None:
    a = sites("a")
    img = tmp_path / "big.img"
    make_disk_image(img, DISK_MIB, {"hello.txt": b"made at init"})
    a.run("init", "vm", "--image", str(img), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline, timeout=600)
    img.unlink()
    key = tmp_path / "key"
    key.mkdir()
    subprocess.run([sys.executable, "-m", "sneakernet.cli", "format", str(key), "--label", "carry"],
                   check=True, capture_output=True)
    proc, _, con = a.resume("vm")
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note before-the-trip") == "GUEST: OK"
    con.close()
    res = a.json("suspend", "vm", "--to-usb", str(key), "--full", "--carry-lock")
    assert res["committed"] is True and res["medium"]["published"] is True, res
    a.ended(proc)

    b = sites("b")  # an empty cache, and no server: the keyring's segments must be on the key
    live_server.stop()
    proc, ev, con = b.resume("vm", "--from-usb", str(key))
    assert ev["cold_boot"] is False and ev["version"] == 2, ev
    assert con.command("read note") == "GUEST: DATA before-the-trip"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    con.close()
    assert b.json("suspend", "vm")["committed"] is False  # offline: kept here
    b.ended(proc)
